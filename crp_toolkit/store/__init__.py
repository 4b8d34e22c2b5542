"""The dataset store: per-sample concept relevance and activation statistics in Zarr."""

from crp_toolkit.store.zarr_store import Store, StoreMismatchError, open

__all__ = ["Store", "StoreMismatchError", "open"]
