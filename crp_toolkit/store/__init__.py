"""The dataset store: per-sample concept relevance and activation statistics in Zarr."""

from crp_toolkit.store.integrity import StoreDamagedError
from crp_toolkit.store.results import Result, list_results, read_result, write_result
from crp_toolkit.store.study import Study
from crp_toolkit.store.verify import Verification, verify
from crp_toolkit.store.zarr_store import Store, StoreMismatchError, open

__all__ = [
    "Result",
    "Store",
    "StoreDamagedError",
    "StoreMismatchError",
    "Study",
    "Verification",
    "list_results",
    "open",
    "read_result",
    "verify",
    "write_result",
]
