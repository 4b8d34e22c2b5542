"""The dataset store: per-sample concept relevance and activation statistics in Zarr 3.

Schema (version 4); every array has ``dimension_names`` and each group its coordinates
(``sample``, ``class``, ``concept``, ``chunk_index``, ``spec``), so
``xarray.open_zarr(path, group="layers/<name>")`` gives labelled data::

    <store>/                      attrs: schema_version, provenance{model, dataset, composite,
                                         target, output_relevance, package_version, config},
                                         n_samples, chunk, classes, layers, maps, table_size,
                                         class_table_size, specs, keep_logits,
                                         top_heatmaps, tables_merged (once merged)
      samples/label      (sample,)            int64
      samples/prediction (sample,)            int64
      samples/logits     (sample, class)      float32 all logits, or with ``keep_logits`` below
                                                      the class count instead:
      samples/top_logits  (sample, rank)      float32 the ``keep_logits`` largest logits
      samples/top_classes (sample, rank)      int64   their classes (ties: lower class first)
      samples/valid      (sample,)            bool    False where the sample could not be read
      samples/sample, layers/<name>/sample (sample,) int64  coordinates: sample ids
      samples/class      (class,)             str     coordinate: class names (or ids)
      layers/<name>/concept (concept,)        int64   coordinate: concept ids
      layers/<name>/relevance   (sample, concept) float32  summed over space, explaining the
                                                           label (or prediction), unnormalised
      layers/<name>/normaliser  (sample,)         float32  sum of |relevance| over concepts
      layers/<name>/rel_max     (sample, concept) float32  spatial max of the relevance map
      layers/<name>/act_max     (sample, concept) float32  spatial max of the activation
      layers/<name>/act_mean    (sample, concept) float32  spatial mean
      layers/<name>/act_argmax  (sample, concept) int32    flat position of the max
      layers/<name>/maps        (sample, concept, y, x) float16  optional: relevance maps at
                                                           the layer's own resolution
      layers/<name>/top_concepts (sample, rank) int32   optional: the sample's most relevant
                                                        concepts (``top_heatmaps`` of them)
      layers/<name>/top_heatmaps (sample, rank, y, x) float16  their input-space conditional
                                                        heatmaps (same target as the pass)
      layers/<name>/tables/top_samples   (chunk_index, spec, rank, concept) int32  per chunk,
      layers/<name>/tables/top_scores    (chunk_index, spec, rank, concept) float64 the
                                         ``table_size`` best samples of each concept
                                         (-1 / -inf padding)
      layers/<name>/tables/class_samples (chunk_index, spec, entry, concept) int32  per chunk,
      layers/<name>/tables/class_scores  (chunk_index, spec, entry, concept) float64 each
                                         class's ``class_table_size`` best samples of
                                         each concept,
                                         sorted by (label, -score), -1 / -inf padding
      progress/done      (chunk,)             bool    set after a chunk's rows are all written
      progress/digest    (chunk, byte)        uint8   SHA-256 of what the chunk wrote (every
                                                      array's rows), checked by ``verify``
      derived/tables/<layer>/<spec>        the merged tables (see ``tables.merge_tables``)
      derived/class_tables/<layer>/<spec>

``spec`` runs over ``tables.SPECS`` (mode x pool x normalised, names in attrs ``specs``).
A *chunk* of ``chunk`` rows is the unit of work: one writer writes it whole (one write per
array, chunks aligned to it; the per-chunk tables too), then marks it done; a run killed at
any moment and started again redoes only unfinished chunks, and a chunk whose files were
deleted or damaged since (found by ``check_unit``: missing files, failed zstd checksums,
digest mismatch) is recomputed.
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

from crp_toolkit.store.integrity import (
    COMPRESSOR,
    DIGEST_BYTES,
    WRITE_ALL,
    CheckedArray,
    unit_digest,
    unit_file,
    unit_problems,
)
from crp_toolkit.store.tables import SPECS

SCHEMA_VERSION = 4
# what makes two runs compute the same numbers: a store is only continued by a run that agrees
IDENTITY = ("model", "dataset", "composite", "target", "output_relevance")


class StoreMismatchError(ValueError):
    """The store on disk was made with another model, dataset or composite."""


@dataclass(frozen=True)
class StoreOptions:
    """What a store holds besides each layer's concept statistics, the same in the config
    (``store.*``) and the writer: ``chunk`` samples per unit of work; ``maps``: relevance maps
    at each layer's resolution (float16); ``table_size`` / ``class_table_size``: sizes of the
    streaming reference tables per concept, and per class and concept (0: none);
    ``keep_logits``: with more classes than this, only each sample's top ``keep_logits`` logits
    (0: all); ``top_heatmaps``: input-space heatmaps of each sample's that many most relevant
    concepts per layer (float16; 0: none)."""

    chunk: int = 256
    maps: bool = False
    table_size: int = 32
    class_table_size: int = 8
    keep_logits: int = 0
    top_heatmaps: int = 0

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"{{'chunk': {self.chunk}}} must be at least 1")
        counts = {
            "table_size": self.table_size,
            "class_table_size": self.class_table_size,
            "keep_logits": self.keep_logits,
            "top_heatmaps": self.top_heatmaps,
        }
        negative = {key: value for key, value in counts.items() if value < 0}
        if negative:
            raise ValueError(f"{negative} must be at least 0 (0 disables the option)")

    @property
    def tables(self) -> bool:
        """Whether the store keeps reference tables."""
        return bool(self.table_size or self.class_table_size)


NO_TABLES = StoreOptions(table_size=0, class_table_size=0)


@dataclass(frozen=True)
class Layout:
    """Shape of a store: samples, classes, and per layer the shape of one sample's activation
    (channels, *spatial); what else it holds (``options``); ``input_shape``: the spatial shape
    of the input-space heatmaps (``options.top_heatmaps``)."""

    n_samples: int
    classes: int
    layers: Mapping[str, tuple[int, ...]]
    options: StoreOptions = NO_TABLES
    input_shape: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()  # coordinates only (the dataset's fingerprint decides)

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> Layout:
        """The layout of a store from its root attributes."""
        options = StoreOptions(
            chunk=attrs["chunk"],
            maps=attrs["maps"],
            table_size=attrs["table_size"],
            class_table_size=attrs["class_table_size"],
            keep_logits=attrs["keep_logits"],
            top_heatmaps=attrs["top_heatmaps"],
        )
        return cls(
            n_samples=attrs["n_samples"],
            classes=attrs["classes"],
            layers={name: tuple(shape) for name, shape in attrs["layers"].items()},
            options=options,
            input_shape=tuple(attrs["input_shape"]),
        )

    @property
    def chunk(self) -> int:
        return self.options.chunk

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.chunk)

    @property
    def class_entries(self) -> int:
        """Rows of a chunk's per-class table: each class keeps at most ``k_class`` of the
        chunk's samples, so at most ``min(chunk, classes * k_class)`` in all."""
        return min(self.chunk, self.classes * self.options.class_table_size)

    @property
    def top_logits(self) -> bool:
        return 0 < self.options.keep_logits < self.classes

    def top_concepts(self, layer: str) -> int:
        """How many concepts of ``layer`` get input-space heatmaps per sample."""
        return min(self.options.top_heatmaps, self.layers[layer][0])

    def rows(self, chunk: int) -> range:
        return range(chunk * self.chunk, min((chunk + 1) * self.chunk, self.n_samples))

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str, tuple[str, ...]]]:
        """Every per-sample array: path -> (one sample's entry shape, dtype, dimension names)."""
        if self.top_logits:
            ranked = ((self.options.keep_logits,), ("sample", "rank"))
            logits = {"samples/top_logits": "float32", "samples/top_classes": "int64"}
            logits = {path: (ranked[0], dtype, ranked[1]) for path, dtype in logits.items()}
        else:
            logits = {"samples/logits": ((self.classes,), "float32", ("sample", "class"))}
        out = {
            "samples/label": ((), "int64", ("sample",)),
            "samples/prediction": ((), "int64", ("sample",)),
            **logits,
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
            if self.options.maps and len(shape) > 1:
                dims = ("sample", "concept", *("y", "x", "z")[: len(shape) - 1])
                out[f"layers/{name}/maps"] = (tuple(shape), "float16", dims)
            if self.options.top_heatmaps:
                n = self.top_concepts(name)
                space = ("y", "x", "z")[: len(self.input_shape)]
                out[f"layers/{name}/top_concepts"] = ((n,), "int32", ("sample", "rank"))
                out[f"layers/{name}/top_heatmaps"] = (
                    (n, *self.input_shape),
                    "float16",
                    ("sample", "rank", *space),
                )
        return out

    def chunk_arrays(self) -> dict[str, tuple[tuple[int, ...], str, tuple[str, ...], float]]:
        """Every per-chunk array (the reference tables): path -> (one chunk's entry shape,
        dtype, dimension names, padding value)."""
        out = {}
        specs = len(SPECS)
        for name, shape in self.layers.items():
            for kind, rows, dim in (
                ("top", self.options.table_size, "rank"),
                ("class", self.class_entries, "entry"),
            ):
                if rows:
                    dims = ("chunk_index", "spec", dim, "concept")
                    entry = (specs, rows, shape[0])
                    out[f"layers/{name}/tables/{kind}_samples"] = (entry, "int32", dims, -1)
                    out[f"layers/{name}/tables/{kind}_scores"] = (entry, "float64", dims, -np.inf)
        return out

    def shape_attrs(self) -> dict:
        """What a resumed run must agree on (stored in the root attributes)."""
        return {
            "n_samples": self.n_samples,
            "chunk": self.chunk,
            "classes": self.classes,
            "layers": {k: list(v) for k, v in self.layers.items()},
            "maps": self.options.maps,
            "table_size": self.options.table_size,
            "class_table_size": self.options.class_table_size,
            "specs": [spec.name for spec in SPECS] if self.options.tables else [],
            "keep_logits": self.options.keep_logits if self.top_logits else 0,
            "top_heatmaps": self.options.top_heatmaps,
            "input_shape": list(self.input_shape),
        }

    def unit(self) -> dict[str, tuple[str, bool]]:
        """Every array a unit of work (a chunk) writes: path -> (dtype, whether it is a
        per-chunk array, indexed by the chunk, rather than by the chunk's rows)."""
        rows = {path: (dtype, False) for path, (_, dtype, _) in self.arrays().items()}
        chunks = {path: (spec[1], True) for path, spec in self.chunk_arrays().items()}
        return {**rows, **chunks}

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


def new_array(group: zarr.Group, path: str, shape, chunks, dtype, dims, fill=0) -> zarr.Array:
    """An array of the store: named dimensions, zstd with a content checksum, every chunk
    written (an all-zero chunk too, so a missing file always means damage)."""
    return group.create_array(
        path,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        dimension_names=dims,
        fill_value=fill,
        compressors=COMPRESSOR,
        config=WRITE_ALL,
    )


def _coordinates(group: zarr.Group, layout: Layout) -> None:
    """The labels of the store's dimensions, as xarray coordinates (written once)."""

    def coordinate(path: str, values: np.ndarray, dim: str, chunk: int | None = None) -> None:
        text = values.dtype == object
        dtype, fill = (str, "") if text else (values.dtype, 0)
        chunks = (chunk or len(values),)
        new_array(group, path, values.shape, chunks, dtype, [dim], fill)[:] = values

    samples = np.arange(layout.n_samples, dtype=np.int64)
    names = layout.class_names or tuple(str(k) for k in range(layout.classes))
    coordinate("samples/sample", samples, "sample", layout.chunk)
    coordinate("samples/class", np.array(names, dtype=object), "class")
    spec_names = np.array([spec.name for spec in SPECS], dtype=object)
    for name, shape in layout.layers.items():
        concepts = np.arange(shape[0], dtype=np.int64)
        coordinate(f"layers/{name}/sample", samples, "sample", layout.chunk)
        coordinate(f"layers/{name}/concept", concepts, "concept")
        if layout.options.tables:
            tables = f"layers/{name}/tables"
            chunk_ids = np.arange(layout.n_chunks, dtype=np.int64)
            coordinate(f"{tables}/chunk_index", chunk_ids, "chunk_index")
            coordinate(f"{tables}/spec", spec_names, "spec")
            coordinate(f"{tables}/concept", concepts, "concept")


def store_path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot hold a store (a file, or a non-empty folder that is not a store);
    None when it can (a store, an empty folder, or nothing yet)."""
    path = Path(path).resolve()
    if (path / "zarr.json").exists() or not path.exists():
        return None
    if not path.is_dir():
        return f"the store path {path} is a file; give a folder such as stores/data.zarr"
    if any(path.iterdir()):
        return (
            f"the store path {path} is a non-empty folder that is not a crp_toolkit store; "
            "give a new path such as stores/data.zarr"
        )
    return None


def _mismatch(stored: Mapping, wanted: Mapping) -> str:
    """Only the keys whose values differ, with both values."""
    keys = [k for k in wanted if stored.get(k) != wanted[k]]
    return "; ".join(f"{k}: store has {stored.get(k)!r}, this run has {wanted[k]!r}" for k in keys)


def create_or_resume(path: str | Path, layout: Layout, provenance: Mapping) -> zarr.Group:
    """Open the store at ``path`` to continue it, or create it. A store made with another
    model, dataset, composite, explained target or output relevance (or shape) is refused and
    left untouched."""
    path = Path(path).resolve()
    problem = store_path_problem(path)
    if problem:
        raise FileExistsError(f"{problem}; nothing was changed")
    identity = {k: provenance.get(k) for k in IDENTITY}
    shape = {"schema_version": SCHEMA_VERSION, **layout.shape_attrs()}
    if (path / "zarr.json").exists():
        group = zarr.open_group(path, mode="r+")
        found = dict(group.attrs)
        if "schema_version" not in found:
            raise StoreMismatchError(f"{path} is a zarr group but not a crp_toolkit store")
        differ = _mismatch(found.get("provenance", {}), identity) or _mismatch(found, shape)
        if differ:
            raise StoreMismatchError(
                f"the store at {path} does not fit this run: {differ}; nothing was changed. "
                "Use another store path, or delete that store to start over."
            )
        return group
    staging = path.with_name(f"{path.name}.creating-{uuid.uuid4().hex[:8]}")
    try:
        _create(staging, layout, {"provenance": dict(provenance), **shape})
        os.rename(staging, path)  # made aside and renamed: shards never see a half-made store
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (path / "zarr.json").exists():
            raise
        return create_or_resume(path, layout, provenance)  # another shard made it first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return zarr.open_group(path, mode="r+")


def _create(path: Path, layout: Layout, attrs: Mapping) -> None:
    group = zarr.open_group(path, mode="w")
    n, c = layout.n_samples, layout.chunk
    for array, (per_sample, dtype, dims) in layout.arrays().items():
        new_array(group, array, (n, *per_sample), (c, *per_sample), dtype, list(dims))
    for array, (per_chunk, dtype, dims, fill) in layout.chunk_arrays().items():
        whole, chunks = (layout.n_chunks, *per_chunk), (1, *per_chunk)
        new_array(group, array, whole, chunks, dtype, list(dims), fill)
    _coordinates(group, layout)
    # one zarr chunk per work unit, so writers of different units never share a file
    new_array(group, "progress/done", (layout.n_chunks,), (1,), "bool", ["chunk"])
    digests = (layout.n_chunks, DIGEST_BYTES)
    new_array(group, "progress/digest", digests, (1, DIGEST_BYTES), "uint8", ["chunk", "byte"])
    group.attrs.update(dict(attrs))


def done_chunks(group: zarr.Group) -> set[int]:
    return {int(i) for i in np.flatnonzero(group["progress/done"][:])}


def _selection(layout: Layout, chunk: int, per_chunk: bool):
    return chunk if per_chunk else slice(layout.rows(chunk).start, layout.rows(chunk).stop)


def write_chunk(
    group: zarr.Group, layout: Layout, chunk: int, arrays: Mapping[str, np.ndarray]
) -> None:
    """Write one chunk's rows of every per-sample array and its entry of every per-chunk array
    (whole zarr chunks, one write each, empty ones too so that every file exists), then its
    digest, then mark it done."""
    unit = layout.unit()
    arrays = {path: np.asarray(values, dtype=unit[path][0]) for path, values in arrays.items()}
    for path, values in arrays.items():
        group[path].with_config(WRITE_ALL)[_selection(layout, chunk, unit[path][1])] = values
    group["progress/digest"].with_config(WRITE_ALL)[chunk] = unit_digest(arrays)
    group["progress/done"][chunk] = True


def unit_arrays(group: zarr.Group, layout: Layout) -> dict[str, zarr.Array]:
    """Every array a unit of work writes, opened once (each opening reads its metadata)."""
    return {path: group[path] for path in layout.unit()}


def missing_files(group: zarr.Group, root: Path, layout: Layout, chunks) -> dict[int, list[str]]:
    """Per unit among ``chunks``: the chunk files that should exist and do not (cheap: no
    file is read)."""
    arrays = unit_arrays(group, layout).values()
    out = {}
    for chunk in chunks:
        missing = [name for a in arrays if not (root / (name := unit_file(a, chunk))).exists()]
        if missing:
            out[chunk] = missing
    return out


def check_unit(
    group: zarr.Group, root: Path, layout: Layout, chunk: int, arrays: Mapping[str, zarr.Array]
) -> list[str]:
    """What is wrong with a finished unit of work (``arrays``: ``unit_arrays``): its missing
    chunk files, the ones that fail to decode (zstd checksum), or a digest that differs from
    what was written; [] if sound."""
    reads = {
        path: (arrays[path], _selection(layout, chunk, per_chunk))
        for path, (_, per_chunk) in layout.unit().items()
    }
    return unit_problems(group, root, reads, chunk, "progress/digest")


class Store:
    """Read access to a dataset store, out of core: arrays are read when sliced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise FileNotFoundError(f"no crp_toolkit store at {self.path}")
        self.group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(self.group.attrs)
        version = self.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreMismatchError(
                f"the store at {self.path} has schema version {version}, this crp_toolkit reads "
                f"version {SCHEMA_VERSION}; run `crp-toolkit analyze` into a new store.path"
            )

    @property
    def layers(self) -> list[str]:
        """The layers of the dataset pass, then the concept layers of learned bases
        (``features.12@nmf16``, see ``crp_toolkit.store.bases``)."""
        return [*self.attrs["layers"], *self.attrs.get("concept_layers", {})]

    def shape(self, layer: str) -> tuple[int, ...]:
        """One sample's (concepts, *spatial) shape of a layer of the store."""
        self.layer(layer)  # an unknown layer fails here, naming the stored ones
        shapes = {**self.attrs["layers"], **self.attrs.get("concept_layers", {})}
        return tuple(shapes[layer])

    @property
    def classes(self) -> int:
        """How many classes the model has (whether or not all logits are kept)."""
        return int(self.attrs["classes"])

    @property
    def layout(self) -> Layout:
        return Layout.from_attrs(self.attrs)

    def incomplete_units(self) -> dict[int, list[str]]:
        """Per unit of work not finished: "not done", or the chunk files of a finished unit
        that are missing (no file is read; ``crp_toolkit.store.verify.verify`` also decodes
        them and checks their digests)."""
        done = self.group["progress/done"][:]
        out = {int(unit): ["not done"] for unit in np.flatnonzero(~done)}
        finished = [int(unit) for unit in np.flatnonzero(done)]
        missing = missing_files(self.group, self.path, self.layout, finished)
        out.update(
            {unit: [f"{name}: missing" for name in names] for unit, names in missing.items()}
        )
        return dict(sorted(out.items()))

    @property
    def complete(self) -> bool:
        """Every unit of work is marked done and all its chunk files exist."""
        return not self.incomplete_units()

    def samples(self, name: str) -> CheckedArray:
        return CheckedArray(self.group[f"samples/{name}"], self.path)

    def layer(self, layer: str, stat: str = "relevance") -> CheckedArray:
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} is not in the store; it holds {self.layers}")
        return CheckedArray(self.group[f"layers/{layer}/{stat}"], self.path)


def open(path: str | Path) -> Store:  # noqa: A001 - the promised name: crp_toolkit.store.open
    """Open a dataset store for reading."""
    return Store(path)
