"""Derived results kept beside the dataset pass in the same store: mined tables, statistics,
embeddings and caches, each a named group under ``derived/`` (e.g. ``derived/similarity/
features.12``) holding whole numpy arrays with dimension names, and attributes saying how it was
made (so a reader can tell whether a cached result still fits).

Writing a result replaces the older result of that name only; the dataset pass's arrays are
never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from crp_toolkit.store.integrity import COMPRESSOR, WRITE_ALL, CheckedArray

ROOT = "derived"


@dataclass(frozen=True)
class Result:
    """A derived result read back: arrays by name, and the attributes it was written with."""

    arrays: dict[str, np.ndarray]
    attrs: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


def write_result(
    path: str | Path,
    name: str,
    arrays: Mapping[str, np.ndarray],
    *,
    dims: Mapping[str, Sequence[str]] | None = None,
    attrs: Mapping | None = None,
) -> None:
    """Write ``arrays`` as the result ``name`` (replacing an older one of that name).

    ``dims`` gives dimension names per array (for xarray); ``attrs`` must be JSON-able.
    """
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(
            f"a result name is a relative path such as 'similarity/conv2', got {name!r}"
        )
    root = zarr.open_group(Path(path), mode="r+")
    key = f"{ROOT}/{name}"
    if key in root:
        del root[key]
    group = root.create_group(key)
    for array_name, values in arrays.items():
        values = np.asarray(values)
        names = list(dims[array_name]) if dims and array_name in dims else None
        if names is not None and len(names) != values.ndim:
            raise ValueError(f"{array_name}: {values.ndim} dimensions but names {names}")
        group.create_array(
            array_name,
            shape=values.shape,
            dtype=values.dtype,
            chunks=tuple(max(1, n) for n in values.shape),
            dimension_names=names,
            compressors=COMPRESSOR,
            config=WRITE_ALL,
        )[...] = values
    group.attrs.update({"result": name, **dict(attrs or {})})


def read_result(path: str | Path, name: str) -> Result | None:
    """The result ``name``, or None when the store holds no such result."""
    root = zarr.open_group(Path(path), mode="r")
    key = f"{ROOT}/{name}"
    group = root.get(key)
    if not isinstance(group, zarr.Group) or group.attrs.get("result") != name:
        return None  # absent, or only a folder of other results
    arrays = {k: np.asarray(CheckedArray(v, Path(path))[...]) for k, v in group.arrays()}
    return Result(arrays, dict(group.attrs))


def list_results(path: str | Path) -> list[str]:
    """Names of every derived result in the store."""
    root = zarr.open_group(Path(path), mode="r")
    if ROOT not in root:
        return []
    groups = root[ROOT].members(max_depth=None)
    return sorted(name for name, node in groups if isinstance(node, zarr.Group) and node.attrs)
