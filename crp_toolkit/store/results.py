"""Derived results kept beside the dataset pass in the same store: mined tables, statistics,
embeddings and caches, each a named group under ``derived/`` (e.g. ``derived/similarity/
features.12``) holding whole numpy arrays with dimension names, and attributes saying how it was
made. A result made from given inputs carries a ``key`` (a JSON-able mapping of everything
that fixes it); reading it with a key returns it only when the keys agree, so a stale result is
a miss, never an answer.

Writing a result replaces the older result of that name only; the dataset pass's arrays are
never touched.
"""

from __future__ import annotations

import hashlib
import json
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
    key: Mapping | None = None,
) -> None:
    """Write ``arrays`` as the result ``name`` (replacing an older one of that name).

    ``dims`` gives dimension names per array (for xarray); ``attrs`` and ``key`` (what fixes the
    result, checked by ``read_result``) must be JSON-able.
    """
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(
            f"a result name is a relative path such as 'similarity/conv2', got {name!r}"
        )
    root = zarr.open_group(Path(path), mode="r+")
    member = f"{ROOT}/{name}"
    if member in root:
        del root[member]
    group = root.create_group(member)
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
    keyed = {} if key is None else {"key": dict(key)}
    group.attrs.update({"result": name, **dict(attrs or {}), **keyed})


def read_result(path: str | Path, name: str, key: Mapping | None = None) -> Result | None:
    """The result ``name``, or None when the store holds no such result, or (given ``key``)
    when the one it holds was made with another key."""
    root = zarr.open_group(Path(path), mode="r")
    group = root.get(f"{ROOT}/{name}")
    if not isinstance(group, zarr.Group) or group.attrs.get("result") != name:
        return None  # absent, or only a folder of other results
    if key is not None and group.attrs.get("key") != _jsonable(key):
        return None  # made from other inputs: stale
    arrays = {k: np.asarray(CheckedArray(v, Path(path))[...]) for k, v in group.arrays()}
    return Result(arrays, dict(group.attrs))


def list_results(path: str | Path) -> list[str]:
    """Names of every derived result in the store."""
    root = zarr.open_group(Path(path), mode="r")
    if ROOT not in root:
        return []
    groups = root[ROOT].members(max_depth=None)
    return sorted(name for name, node in groups if isinstance(node, zarr.Group) and node.attrs)


def keyed_name(kind: str, key: Mapping) -> str:
    """A result name for one of many cached results of a kind: ``<kind>/<hash of key>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"{kind}/{digest}"


def _jsonable(key: Mapping) -> dict:
    """``key`` as it reads back from the store's JSON attributes (tuples become lists)."""
    return json.loads(json.dumps(dict(key)))
