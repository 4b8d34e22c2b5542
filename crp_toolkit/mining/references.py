"""Reference samples (relevance and activation maximisation) mined from the store: from the
merged streaming tables when they hold enough, otherwise out of core from the score matrices
(read chunk by chunk, the top-k of every concept merged exactly). Either way ties go to the
lower sample index, as a stable sort over the whole matrix would give, and unreadable samples
never count."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from crp_toolkit.store.results import read_result
from crp_toolkit.store.tables import (
    MODES,
    POOLS,
    Spec,
    class_candidates,
    class_of,
    class_table,
    class_table_name,
    scores,
    table_name,
    top_k,
)
from crp_toolkit.store.zarr_store import Store

__all__ = [
    "MODES",
    "POOLS",
    "ClassReferenceTable",
    "ReferenceTable",
    "ScoreChunk",
    "class_references",
    "concept_scores",
    "read_chunks",
    "reference_samples",
    "score_chunks",
]


@dataclass(frozen=True)
class ReferenceTable:
    """``samples[r, c]``: the r-th best sample of concept c; ``scores`` their scores."""

    layer: str
    mode: str
    pool: str
    normalised: bool
    samples: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class ClassReferenceTable:
    """``samples[y, r, c]``: the r-th best sample of concept c among the samples labelled y;
    ``scores`` their scores; -1 / -inf where class y has fewer than r + 1 readable samples."""

    layer: str
    mode: str
    pool: str
    normalised: bool
    samples: np.ndarray
    scores: np.ndarray


def concept_scores(store: Store, layer: str, rows: slice, spec: Spec) -> np.ndarray:
    """The (rows x concepts) scores by ``spec``: relevance or activation, summed ("sum") or
    maximal ("max") over space, optionally divided per sample by the sum of absolute scores
    (zennit-crp's abs_norm); see ``crp_toolkit.store.tables.scores``."""
    positions = int(np.prod(store.shape(layer)[1:], dtype=np.int64))
    return scores(store.layer(layer, spec.stat)[rows], spec, positions)


@dataclass(frozen=True)
class ScoreChunk:
    """Rows of one store chunk: sample ids, labels and (rows x concepts) scores."""

    samples: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


def read_chunks(store: Store, layer: str, spec: Spec) -> Iterator[tuple[ScoreChunk, np.ndarray]]:
    """The scores of ``layer`` by ``spec``, one store chunk at a time (memory bounded by the
    chunk, each array read once), each with the mask of its readable samples: the one loop
    over the store's chunks that mining does."""
    n, chunk = store.attrs["n_samples"], store.attrs["chunk"]
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        part = ScoreChunk(
            np.arange(rows.start, rows.stop),
            store.samples("label")[rows],
            concept_scores(store, layer, rows, spec),
        )
        yield part, store.samples("valid")[rows]


def score_chunks(store: Store, layer: str, spec: Spec) -> Iterator[ScoreChunk]:
    """``read_chunks`` with the unreadable samples dropped."""
    for part, keep in read_chunks(store, layer, spec):
        yield ScoreChunk(part.samples[keep], part.labels[keep], part.scores[keep])


def _chunks(store: Store, layer: str, spec: Spec, wanted: np.ndarray | None = None):
    """Per store chunk: sample ids and their (rows x concepts) scores; ids are -1 for samples
    that do not count (unreadable, or labelled outside ``wanted`` when given)."""
    for part, keep in read_chunks(store, layer, spec):
        if wanted is not None:
            keep = keep & np.isin(part.labels, wanted)
        yield np.where(keep, part.samples, -1), part.scores


def _fold_chunks(store: Store, layer: str, spec: Spec, reduce, wanted=None):
    """``reduce(samples, scores)`` folded over the store's chunks: exact for top-k tables."""
    best = None
    for samples, values in _chunks(store, layer, spec, wanted):
        samples = np.broadcast_to(samples[:, None], values.shape)
        if best is not None:
            samples = np.concatenate([best[0], samples])
            values = np.concatenate([best[1], values])
        best = reduce(samples, values)
    return best


def _check_n_refs(n_refs: int) -> None:
    if n_refs < 1:
        raise ValueError(f"n_refs must be at least 1, got {n_refs}")


def _stored(store: Store, name: str, size: str, k: int):
    """The merged table ``name`` if the store holds it with at least ``k`` rows per entry."""
    found = read_result(store.path, name)
    return found if found is not None and k <= found.attrs[size] else None


def _stored_top(store: Store, layer: str, spec: Spec, k: int, wanted: np.ndarray | None):
    """The top ``k`` from the merged tables: the overall table, or the union of the wanted
    classes' tables (exact when k <= k_class: the top k of a union lies in its parts' top k);
    None when they do not hold enough."""
    if wanted is None:
        found = _stored(store, table_name(layer, spec), "table_size", k)
        return None if found is None else (found["samples"][:k], found["scores"][:k])
    if not np.all((wanted >= 0) & (wanted < store.classes)):
        return None  # labels outside the model's classes: only the matrices know them
    found = _stored(store, class_table_name(layer, spec), "class_table_size", k)
    if found is None:
        return None
    concepts = found["samples"].shape[2]
    samples = found["samples"][wanted].reshape(-1, concepts)
    return top_k(samples, found["scores"][wanted].reshape(-1, concepts), k)


def reference_samples(
    store: Store,
    layer: str,
    *,
    mode: str = "relevance",
    pool: str = "sum",
    normalised: bool = True,
    n_refs: int = 40,
    classes: Iterable[int] | None = None,
) -> ReferenceTable:
    """The ``n_refs`` best samples of every concept of ``layer`` (among ``classes`` only, if
    given); samples that could not be read never count. Rows where some concept has fewer
    than that many samples are dropped."""
    spec = Spec(mode, pool, normalised)
    _check_n_refs(n_refs)
    store.layer(layer)  # an unknown layer fails here, naming the stored ones
    wanted = None if classes is None else np.array(sorted(set(classes)), dtype=np.int64)
    found = _stored_top(store, layer, spec, n_refs, wanted)
    if found is None:
        found = _fold_chunks(store, layer, spec, lambda s, v: top_k(s, v, n_refs), wanted)
    samples, values = found
    rows = np.isfinite(values).all(1)
    return ReferenceTable(layer, mode, pool, normalised, samples[rows], values[rows])


def references_by(store: Store, layer: str, spec: Spec, n_refs: int) -> ReferenceTable:
    """``reference_samples`` of ``layer`` scored by ``spec``."""
    return reference_samples(
        store, layer, mode=spec.mode, pool=spec.pool, normalised=spec.normalised, n_refs=n_refs
    )


def class_references(
    store: Store,
    layer: str,
    *,
    mode: str = "relevance",
    pool: str = "sum",
    normalised: bool = True,
    n_refs: int = 8,
) -> ClassReferenceTable:
    """Per class (by label), the ``n_refs`` best samples of every concept of ``layer``:
    samples and scores shaped (class, n_refs, concept). From the merged per-class tables when
    they hold that many, otherwise computed out of core from the score matrices (vectorised
    over classes)."""
    spec = Spec(mode, pool, normalised)
    _check_n_refs(n_refs)
    k = n_refs
    store.layer(layer)
    found = _stored(store, class_table_name(layer, spec), "class_table_size", k)
    if found is not None:
        samples, values = found["samples"][:, :k], found["scores"][:, :k]
    else:
        n, labels = store.classes, store.samples("label")[:]

        def reduce(s: np.ndarray, v: np.ndarray):
            return class_candidates(s, v, class_of(labels, s), k, min(n * k, len(s)), n)

        s, v = _fold_chunks(store, layer, spec, reduce)
        samples, values = class_table(s, v, class_of(labels, s), k, n)
    return ClassReferenceTable(layer, mode, pool, normalised, samples, values)
