"""Where user records live. The service depends only on `Store`; backends live beside it."""

from callout.store.base import Store, StoreError

__all__ = ["Store", "StoreError"]
