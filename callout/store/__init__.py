"""Where user records live. The service depends only on `Store`; backends live beside it."""

from callout.store.base import TOMBSTONE, Store, StoreError, Tombstone, WouldBlock

__all__ = ["TOMBSTONE", "Store", "StoreError", "Tombstone", "WouldBlock"]
