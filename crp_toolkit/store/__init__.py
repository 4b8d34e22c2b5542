"""The dataset store: per-sample concept relevance and activation statistics in Zarr."""

from crp_toolkit.store.results import Result, list_results, read_result, write_result
from crp_toolkit.store.study import Study
from crp_toolkit.store.zarr_store import Store, StoreMismatchError, open

__all__ = [
    "Result",
    "Store",
    "StoreMismatchError",
    "Study",
    "list_results",
    "open",
    "read_result",
    "write_result",
]
