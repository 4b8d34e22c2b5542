"""The dataset store: per-sample concept relevance and activation statistics in Zarr."""

from crp_toolkit.store.bases import (
    SamplingOptions,
    analyze_basis,
    discover_basis,
    list_bases,
    load_basis,
    save_basis,
)
from crp_toolkit.store.integrity import StoreDamagedError
from crp_toolkit.store.results import Result, list_results, read_result, write_result
from crp_toolkit.store.study import Study
from crp_toolkit.store.verify import Verification, verify
from crp_toolkit.store.zarr_store import Store, StoreMismatchError, open

__all__ = [
    "Result",
    "SamplingOptions",
    "Store",
    "StoreDamagedError",
    "StoreMismatchError",
    "Study",
    "Verification",
    "analyze_basis",
    "discover_basis",
    "list_bases",
    "list_results",
    "load_basis",
    "open",
    "read_result",
    "save_basis",
    "verify",
    "write_result",
]
