"""Where user records live. The service depends only on `Store`; backends live beside it."""

from callout.store.base import Store, StoreError, WouldBlock

__all__ = ["Store", "StoreError", "WouldBlock"]
