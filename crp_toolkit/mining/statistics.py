"""Class statistics of a layer's concepts, mined out of core: which classes use a concept (the
mean of each class's top-k scores) and which concepts a class relies on (its mean concept
relevance). Also the chunk helpers and the result writer the other mining modules share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, TypeVar

import numpy as np

from crp_toolkit.mining.references import ScoreChunk, class_references, score_chunks
from crp_toolkit.store.results import read_result, write_result
from crp_toolkit.store.tables import Spec
from crp_toolkit.store.zarr_store import Store

R = TypeVar("R")


def sorted_by_label(part: ScoreChunk) -> ScoreChunk:
    """The chunk's rows ordered by label (ids ascending within a class)."""
    order = np.argsort(part.labels, kind="stable")
    return ScoreChunk(part.samples[order], part.labels[order], part.scores[order])


def by_class(part: ScoreChunk):
    """(class, sample ids, scores) for each class of a chunk sorted by label (views, no copy)."""
    present, starts = np.unique(part.labels, return_index=True)
    cuts = starts[1:]
    yield from zip(present, np.split(part.samples, cuts), np.split(part.scores, cuts))


def class_sums(part: ScoreChunk, classes: int) -> np.ndarray:
    """Per class, the sum of the chunk's score rows with that label: (classes, concepts)."""
    out = np.zeros((classes, part.scores.shape[1]))
    if len(part.labels):
        part = sorted_by_label(part)
        present, starts = np.unique(part.labels, return_index=True)
        out[present] = np.add.reduceat(part.scores, starts, axis=0)
    return out


# -- results kept in the store -----------------------------------------------------------------
def save_result(store: Store, result, key: Mapping | None = None) -> str:
    """Write a mining result (a dataclass with ``DIMS`` and ``name``) into the store under
    ``derived/<result.name>``: its array fields with dimension names, the others as attributes,
    and ``key`` (what made it). Returns the name."""
    arrays = {f.name: getattr(result, f.name) for f in fields(result) if f.name in result.DIMS}
    attrs = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in result.DIMS}
    write_result(store.path, result.name, arrays, dims=result.DIMS, attrs=attrs, key=key)
    return result.name


def load_result(store: Store, kind: type[R], name: str, key: Mapping | None = None) -> R | None:
    """The mining result ``name`` of type ``kind`` read back, or None if the store has none
    (or, given ``key``, none made with that key)."""
    found = read_result(store.path, name, key)
    if found is None:
        return None
    values = {**found.attrs, **found.arrays}
    return kind(**{f.name: values[f.name] for f in fields(kind)})


# -- class statistics --------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassStatistics:
    """How a layer's concepts and the classes relate.

    ``usage[c, y]``: the mean of class y's ``n_refs`` best scores of concept c (by ``mode`` and
    ``pool``); ``relevance[y, c]``: the mean (normalised) relevance of concept c over class
    y's samples; ``counts[y]``: class y's readable samples.
    """

    layer: str
    mode: str
    pool: str
    normalised: bool
    n_refs: int
    usage: np.ndarray
    relevance: np.ndarray
    counts: np.ndarray

    DIMS: ClassVar[dict[str, tuple[str, ...]]] = {
        "usage": ("concept", "class"),
        "relevance": ("class", "concept"),
        "counts": ("class",),
    }

    @property
    def name(self) -> str:
        return f"statistics/{self.layer}"


def class_relevance(store: Store, layer: str, *, normalised: bool = True):
    """Per class, the summed relevance of every concept (classes x concepts) and the number of
    readable samples, in one pass over the relevance array."""
    classes = store.classes
    sums = np.zeros((classes, store.layer(layer).shape[1]))
    counts = np.zeros(classes, np.int64)
    for part in score_chunks(store, layer, Spec("relevance", "sum", normalised)):
        sums += class_sums(part, classes)
        counts += np.bincount(part.labels, minlength=classes)
    return sums, counts


def class_statistics(
    store: Store,
    layer: str,
    *,
    mode: str = "relevance",
    pool: str = "sum",
    normalised: bool = True,
    n_refs: int = 8,
) -> ClassStatistics:
    """The class statistics of ``layer``: concept usage per class from each class's
    top-``n_refs`` reference scores, and each class's mean concept relevance. Classes without
    samples get NaN. With ``n_refs`` up to the store's merged per-class tables
    (``class_table_size``) the score matrix is read once; otherwise ``class_references`` scans
    it too."""
    table = class_references(
        store, layer, mode=mode, pool=pool, normalised=normalised, n_refs=n_refs
    )
    found = np.isfinite(table.scores)  # -inf: the class has fewer than n_refs samples
    sums, counts = class_relevance(store, layer, normalised=normalised)
    with np.errstate(invalid="ignore", divide="ignore"):
        usage = (np.where(found, table.scores, 0).sum(1) / found.sum(1)).T
        relevance = sums / counts[:, None]
    return ClassStatistics(layer, mode, pool, normalised, n_refs, usage, relevance, counts)


def top_classes(stats: ClassStatistics, concept: int, n: int = 5) -> np.ndarray:
    """The ``n`` classes that use ``concept`` most (by ``usage``), best first."""
    return _top(stats.usage[concept], n)


def top_concepts(stats: ClassStatistics, cls: int, n: int = 5) -> np.ndarray:
    """The ``n`` most relevant concepts of class ``cls`` (by mean relevance), best first."""
    return _top(stats.relevance[cls], n)


def _top(values: np.ndarray, n: int) -> np.ndarray:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")
    return order[: min(n, np.isfinite(values).sum())]
