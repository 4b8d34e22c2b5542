"""The dataset store: per-sample concept relevance and activation statistics in Zarr 3.

Schema (version 1); every array has ``dimension_names`` so xarray can open it::

    <store>/                      attrs: schema_version, provenance{model, dataset, composite,
                                         package_version, config}, n_samples, chunk, layers
      samples/label      (sample,)            int64
      samples/prediction (sample,)            int64
      samples/logits     (sample, class)      float32
      samples/valid      (sample,)            bool    False where the sample could not be read
      layers/<name>/relevance   (sample, concept) float32  summed over space, explaining the
                                                           label (or prediction), unnormalised
      layers/<name>/normaliser  (sample,)         float32  sum of |relevance| over concepts
      layers/<name>/rel_max     (sample, concept) float32  spatial max of the relevance map
      layers/<name>/act_max     (sample, concept) float32  spatial max of the activation
      layers/<name>/act_mean    (sample, concept) float32  spatial mean
      layers/<name>/act_argmax  (sample, concept) int32    flat position of the max
      layers/<name>/maps        (sample, concept, y, x) float16  optional: relevance maps at
                                                           the layer's own resolution
      progress/done      (chunk,)             bool    set after a chunk's rows are all written

A *chunk* of ``chunk`` rows is the unit of work: one writer writes it whole (one write per
array, chunks aligned to it), then marks it done; a run killed at any moment and started again
redoes only unfinished chunks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import nn

SCHEMA_VERSION = 1
# what makes two runs compute the same numbers: a store is only continued by a run that agrees
IDENTITY = ("model", "dataset", "composite", "explain", "output_relevance")


class StoreMismatchError(ValueError):
    """The store on disk was made with another model, dataset or composite."""


@dataclass(frozen=True)
class Layout:
    """Shape of a store: samples, rows per chunk, classes, and per layer the shape of one
    sample's activation (channels, *spatial); ``maps`` adds relevance maps at each layer's
    resolution (float16)."""

    n_samples: int
    chunk: int
    classes: int
    layers: Mapping[str, tuple[int, ...]]
    maps: bool = False

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.chunk)

    def rows(self, chunk: int) -> range:
        return range(chunk * self.chunk, min((chunk + 1) * self.chunk, self.n_samples))

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str, tuple[str, ...]]]:
        """Every per-sample array: path -> (one sample's entry shape, dtype, dimension names)."""
        out = {
            "samples/label": ((), "int64", ("sample",)),
            "samples/prediction": ((), "int64", ("sample",)),
            "samples/logits": ((self.classes,), "float32", ("sample", "class")),
            "samples/valid": ((), "bool", ("sample",)),
        }
        for name, shape in self.layers.items():
            per_concept = ((shape[0],), "float32", ("sample", "concept"))
            out[f"layers/{name}/relevance"] = per_concept
            out[f"layers/{name}/normaliser"] = ((), "float32", ("sample",))
            out[f"layers/{name}/rel_max"] = per_concept
            out[f"layers/{name}/act_max"] = per_concept
            out[f"layers/{name}/act_mean"] = per_concept
            out[f"layers/{name}/act_argmax"] = ((shape[0],), "int32", ("sample", "concept"))
            if self.maps and len(shape) > 1:
                dims = ("sample", "concept", *("y", "x", "z")[: len(shape) - 1])
                out[f"layers/{name}/maps"] = (tuple(shape), "float16", dims)
        return out

    def empty(self, rows: int) -> dict[str, np.ndarray]:
        """Zeroed arrays for ``rows`` samples (rows that cannot be read stay zero)."""
        arrays = self.arrays().items()
        return {path: np.zeros((rows, *shape), dtype) for path, (shape, dtype, _) in arrays}


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer (names and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset, description: str) -> str:
    """Hash of the dataset's description, length and a few samples (first, middle, last)."""
    digest = hashlib.sha256(f"{description}|{len(dataset)}".encode())
    for index in sorted({0, len(dataset) // 2, len(dataset) - 1}):
        try:
            image, label = dataset[index]
        except Exception as err:  # an unreadable sample still identifies the data
            digest.update(repr(err).encode())
            continue
        digest.update(torch.as_tensor(image).numpy().tobytes() + str(int(label)).encode())
    return digest.hexdigest()[:16]


def _array(group: zarr.Group, path: str, shape, chunks, dtype, dims) -> None:
    group.create_array(
        path, shape=shape, chunks=chunks, dtype=dtype, dimension_names=dims, fill_value=0
    )


def create_or_resume(path: str | Path, layout: Layout, provenance: Mapping) -> zarr.Group:
    """Open the store at ``path`` to continue it, or create it. A store made with another
    model, dataset, composite, explained target or output relevance (or shape) is refused and
    left untouched."""
    path = Path(path)
    identity = {k: provenance.get(k) for k in IDENTITY}
    shape = {
        "n_samples": layout.n_samples,
        "chunk": layout.chunk,
        "layers": {k: list(v) for k, v in layout.layers.items()},
        "maps": layout.maps,
    }
    if (path / "zarr.json").exists():
        group = zarr.open_group(path, mode="r+")
        found = dict(group.attrs)
        stored = {k: found.get("provenance", {}).get(k) for k in identity}
        stored_shape = {k: found.get(k) for k in shape}
        if stored != identity or stored_shape != shape:
            raise StoreMismatchError(
                f"the store at {path} was made with {stored} and {stored_shape}, this run has "
                f"{identity} and {shape}; nothing was changed. Use another store path, or "
                "delete that store to start over."
            )
        return group
    staging = path.with_name(f"{path.name}.creating-{uuid.uuid4().hex[:8]}")
    group = zarr.open_group(staging, mode="w")
    n, c = layout.n_samples, layout.chunk
    for array, (per_sample, dtype, dims) in layout.arrays().items():
        _array(group, array, (n, *per_sample), (c, *per_sample), dtype, list(dims))
    # one zarr chunk per work unit, so writers of different units never share a file
    _array(group, "progress/done", (layout.n_chunks,), (1,), "bool", ["chunk"])
    group.attrs.update({"schema_version": SCHEMA_VERSION, "provenance": dict(provenance), **shape})
    try:  # made aside and renamed: concurrent shards never see a half-made store
        os.rename(staging, path)
    except OSError:
        shutil.rmtree(staging)
        if not (path / "zarr.json").exists():
            raise
        return create_or_resume(path, layout, provenance)  # another shard made it first
    return zarr.open_group(path, mode="r+")


def done_chunks(group: zarr.Group) -> set[int]:
    return {int(i) for i in np.flatnonzero(group["progress/done"][:])}


def write_chunk(
    group: zarr.Group, layout: Layout, chunk: int, arrays: Mapping[str, np.ndarray]
) -> None:
    """Write one chunk's rows of every array (whole chunks, one write each), then mark it done."""
    rows = slice(layout.rows(chunk).start, layout.rows(chunk).stop)
    for path, values in arrays.items():
        group[path][rows] = values
    group["progress/done"][chunk] = True


class Store:
    """Read access to a dataset store, out of core: arrays are read when sliced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise FileNotFoundError(f"no crp_toolkit store at {self.path}")
        self.group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(self.group.attrs)

    @property
    def layers(self) -> list[str]:
        return list(self.attrs["layers"])

    @property
    def complete(self) -> bool:
        return bool(self.group["progress/done"][:].all())

    def samples(self, name: str) -> zarr.Array:
        return self.group[f"samples/{name}"]

    def layer(self, layer: str, stat: str = "relevance") -> zarr.Array:
        if layer not in self.attrs["layers"]:
            raise KeyError(f"layer {layer!r} is not in the store; it holds {self.layers}")
        return self.group[f"layers/{layer}/{stat}"]


def open(path: str | Path) -> Store:  # noqa: A001 - the promised name: crp_toolkit.store.open
    """Open a dataset store for reading."""
    return Store(path)
