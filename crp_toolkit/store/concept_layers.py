"""The arrays of a learned basis's *concept layer* in a store (``layers/features.12@nmf16/``)
and their integrity, as the dataset pass keeps its own: per store chunk (a unit of work) the
statistics rows, a digest of what was written and a done flag; the digest of the basis the
rows were computed with (attribute ``basis``), so rows of a basis since replaced are recomputed.

``crp_toolkit.store.bases`` computes the rows; ``crp_toolkit.store.verify`` checks them, and
names the ``crp-toolkit discover`` call that recomputes a damaged unit or basis
(:func:`discover_overrides`, from the settings the stored basis was learned with).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr

from crp_toolkit.concepts.basis import SEPARATOR
from crp_toolkit.store.integrity import (
    DIGEST_BYTES,
    WRITE_ALL,
    unit_digest,
    unit_file,
    unit_problems,
)
from crp_toolkit.store.zarr_store import Layout, new_array

STATS = ("relevance", "rel_max", "act_max", "act_mean", "act_argmax")
UNIT = (*STATS, "normaliser")  # the arrays a unit writes, each (sample, ...) rows
DTYPES = {s: np.int32 if s == "act_argmax" else np.float32 for s in UNIT}


def basis_digest(directions: np.ndarray) -> str:
    """What identifies a basis's numbers: SHA-256 of its directions as float64 (hex, 16)."""
    values = np.ascontiguousarray(directions, np.float64)
    return hashlib.sha256(f"{values.shape}|".encode() + values.tobytes()).hexdigest()[:16]


def concept_group(
    root: zarr.Group, name: str, concepts: int, layout: Layout, digest: str
) -> zarr.Group:
    """The concept layer's group, made on first use (statistics arrays with chunks aligned
    with the store's units, coordinates, a digest and a done flag per unit). Units computed
    with another basis than the one of ``digest`` are marked not done, to be recomputed."""
    path = f"layers/{name}"
    if path in root:
        group = root[path]
        if "digest" not in group or group.attrs.get("basis") != digest:
            group["done"][:] = False  # rows of another basis (or unchecked ones): stale
            _ensure_digests(group, layout)
            group.attrs["basis"] = digest
        return group
    group = root.create_group(path)
    n, chunk = layout.n_samples, layout.chunk
    for stat in STATS:
        new_array(
            group, stat, (n, concepts), (chunk, concepts), DTYPES[stat], ["sample", "concept"]
        )
    new_array(group, "normaliser", (n,), (chunk,), "float32", ["sample"])
    new_array(group, "sample", (n,), (chunk,), "int64", ["sample"])[:] = np.arange(n)
    ids = np.arange(concepts)
    new_array(group, "concept", (concepts,), (concepts,), "int64", ["concept"])[:] = ids
    new_array(group, "done", (layout.n_chunks,), (1,), "bool", ["chunk"])
    _ensure_digests(group, layout)
    group.attrs["basis"] = digest
    return group


def _ensure_digests(group: zarr.Group, layout: Layout) -> None:
    if "digest" not in group:
        shape, chunks = (layout.n_chunks, DIGEST_BYTES), (1, DIGEST_BYTES)
        new_array(group, "digest", shape, chunks, "uint8", ["chunk", "byte"])


def write_unit(
    group: zarr.Group, layout: Layout, unit: int, arrays: Mapping[str, np.ndarray]
) -> None:
    """Write one unit's rows of every array of the concept layer (whole zarr chunks, one write
    each), then its digest, then mark it done."""
    rows = layout.rows(unit)
    arrays = {key: np.asarray(arrays[key], DTYPES[key]) for key in UNIT}
    for key, values in arrays.items():
        group[key].with_config(WRITE_ALL)[rows.start : rows.stop] = values
    digest = unit_digest({f"{group.path}/{key}": values for key, values in arrays.items()})
    group["digest"].with_config(WRITE_ALL)[unit] = digest
    group["done"][unit] = True


def unit_states(
    root: zarr.Group, path: Path, name: str, layout: Layout, units=None
) -> dict[int, list[str]]:
    """Per unit (among ``units``, all by default) of concept layer ``name`` that must be
    computed: ["not done"], or what is wrong with a finished one (missing or undecodable
    files, a digest mismatch)."""
    group = root[f"layers/{name}"]
    done = group["done"][:]
    arrays = {f"{group.path}/{key}": group[key] for key in UNIT}
    found = {}
    for unit in range(layout.n_chunks) if units is None else units:
        if not done[unit]:
            found[unit] = ["not done"]
            continue
        rows = slice(layout.rows(unit).start, layout.rows(unit).stop)
        reads = {p: (array, rows) for p, array in arrays.items()}
        problems = unit_problems(root, path, reads, unit, f"{group.path}/digest")
        if problems:
            found[unit] = problems
    return found


def missing_unit_files(root: zarr.Group, path: Path, name: str, layout: Layout) -> list[str]:
    """The chunk files of the finished units of concept layer ``name`` that should exist and
    do not (cheap: no file is read; a missing one would read as zeros)."""
    group = root[f"layers/{name}"]
    done = group["done"][:]
    arrays = [group[key] for key in UNIT]
    files = (unit_file(a, int(u)) for u in np.flatnonzero(done) for a in arrays)
    return [f for f in files if not (path / f).exists()]


def concept_layer_names(root: zarr.Group) -> list[str]:
    """The concept layers (``layer@basis``) the store holds arrays of, finished or not."""
    if "layers" not in root:
        return []
    return sorted(name for name, _ in root["layers"].groups() if SEPARATOR in name)


def discover_overrides(key: Mapping) -> list[str]:
    """The ``crp-toolkit discover`` overrides that learn a basis again with the settings of its
    ``key`` (``bases.basis_key``), so that the store takes it as the one it keeps."""
    sampling, learner = key["sampling"], key["learner"]
    images = "null" if sampling["images"] is None else sampling["images"]
    return [
        f"discover.layer={key['layer']}",
        f"discover.methods=[{key['method']}]",
        f"discover.n_concepts={key['k']}",
        f"discover.source={key['source']}",
        f"discover.seed={key['seed']}",
        f"discover.positions={sampling['positions']}",
        f"discover.images={images}",
        f"discover.epochs={key['epochs']}",
        f"discover.sae_topk={learner['topk']}",
        f"loader.batch_size={sampling['batch_size']}",
    ]
