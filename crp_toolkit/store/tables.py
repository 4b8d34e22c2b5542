"""Streaming reference tables: the best samples of every concept, per chunk and merged.

A top-k table is an exact, associative reduction: the top k of a union is the top k of the
concatenated top k's of its parts. So each chunk of the dataset pass keeps, for every layer and
every score ``Spec``, its ``k`` best samples per concept and, per class, its ``k_class`` best
samples per (class, concept); ``merge_tables`` reduces them over all chunks (in blocks, so
memory stays bounded) into the final tables kept as derived results. Ties go to the lower
sample index everywhere, as a stable sort over the whole score matrix would give; unreadable
samples and missing entries are padding (sample -1, score -inf) and never count.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import zarr

from crp_toolkit.store.results import ROOT as RESULTS
from crp_toolkit.store.results import write_result

MODES = ("relevance", "activation")
POOLS = ("sum", "max")
# the per-sample statistic a score is made of
SOURCES = {
    ("relevance", "sum"): "relevance",
    ("relevance", "max"): "rel_max",
    ("activation", "sum"): "act_mean",
    ("activation", "max"): "act_max",
}
MERGE_BUDGET = 2**28  # bytes of chunk tables read at once while merging


@dataclass(frozen=True)
class Spec:
    """How samples are scored: by relevance or activation, summed or maximal over space,
    optionally divided per sample by the sum of absolute scores (zennit-crp's abs_norm)."""

    mode: str
    pool: str
    normalised: bool

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.pool not in POOLS:
            raise ValueError(
                f"mode must be one of {MODES} and pool one of {POOLS}, "
                f"got {self.mode!r}, {self.pool!r}"
            )

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.pool}-{'normalised' if self.normalised else 'raw'}"

    @property
    def stat(self) -> str:
        """The store statistic (``layers/<name>/<stat>``) the score is computed from."""
        return SOURCES[self.mode, self.pool]


SPECS = tuple(Spec(m, t, n) for m in MODES for t in POOLS for n in (True, False))


def scores(values: np.ndarray, spec: Spec, positions: int) -> np.ndarray:
    """The (rows x concepts) float64 scores of ``spec`` from its statistic's ``values``
    (``positions``: the layer's spatial size, turning the activation mean into its sum)."""
    if spec.stat == "act_mean":
        values = values * positions
    out = values.astype(np.float64)
    if spec.normalised:
        out = out / np.maximum(np.abs(out).sum(1, keepdims=True), 1e-30)
    return out


def _padding(samples: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Entries that never count: no sample, or a score that is -inf or NaN."""
    return (samples < 0) | ~(values > -np.inf)


def _pad_rows(samples: np.ndarray, values: np.ndarray, rows: int):
    missing = rows - len(samples)
    if missing <= 0:
        return samples[:rows], values[:rows]
    shape = (missing, *samples.shape[1:])
    return (
        np.concatenate([samples, np.full(shape, -1, samples.dtype)]),
        np.concatenate([values, np.full(shape, -np.inf)]),
    )


def _lines(per_row: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``per_row`` ((rows,) or (rows, concepts), beside ``values``) as contiguous lines
    (concepts, rows): what the sorts work on, one column of ``values`` per line."""
    return np.ascontiguousarray(np.broadcast_to(per_row.reshape(len(values), -1), values.shape).T)


def _flat(order: np.ndarray) -> np.ndarray:
    """Positions within each line as indices into the raveled lines (for np.take)."""
    return order + np.arange(len(order))[:, None] * order.shape[1]


def _lex_order(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """The flat order of every line's entries by (major, minor): integer keys, ``minor`` at
    least -1 and distinct within a line wherever the order matters."""
    minor = minor + 1
    return _flat(np.argsort(major * (int(minor.max(initial=0)) + 1) + minor, axis=1))


def _by_score(samples: np.ndarray, values: np.ndarray):
    """Every column's entries best first, ties to the lower sample, as lines (concepts,
    rows): their flat indices into the lines, samples (-1: padding) and scores (-inf:
    padding). ``samples`` is (rows,), ascending apart from padding (position breaks ties),
    or (rows, concepts)."""
    ids = _lines(samples, values)
    lines = np.ascontiguousarray(np.where(_padding(ids, values.T), -np.inf, values.T))
    order = _flat(np.argsort(-lines, axis=1))  # fast but not stable: ties are fixed below
    ordered = np.take(lines, order)
    runs = np.zeros(order.shape, dtype=np.int64)  # each run of equal scores numbered
    np.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1, out=runs[:, 1:])
    tie = order if samples.ndim == 1 else np.take(ids, order)
    fix = _lex_order(runs, tie)  # mostly in place: the gathers below stay local
    order, best = np.take(order, fix), np.take(ordered, fix)
    found = np.take(ids, order) if samples.ndim == 1 else np.take(tie, fix)
    return order, np.where(best > -np.inf, found, -1).astype(np.int64, copy=False), best


def _top(found: np.ndarray, best: np.ndarray, k: int):
    """The first ``k`` of entries sorted by ``_by_score``: (samples, scores), each (k,
    concepts)."""
    return _pad_rows(found[:, :k].T, best[:, :k].T, k)


def top_k(samples: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best entries of every column of ``values`` (rows x concepts), best first,
    ties to the lower sample: (samples, scores), each (k, concepts), padded with -1 / -inf.
    ``samples`` is (rows,), ascending apart from padding, or (rows, concepts)."""
    return _top(*_by_score(samples, values)[1:], k)


def _counted(found: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Each entry's class, ``n_classes`` where it does not count (padding, or a class outside
    0..n_classes-1)."""
    return np.where((found >= 0) & (classes >= 0) & (classes < n_classes), classes, n_classes)


def _rank_in_runs(key: np.ndarray) -> np.ndarray:
    """Each entry's position within its run of equal ``key`` along its line."""
    position = np.arange(key.shape[1])
    first = np.ones(key.shape, dtype=bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    return position - np.maximum.accumulate(np.where(first, position, 0), axis=1)


def _by_class(order, found, best, classes, n_classes: int):
    """Entries sorted by ``_by_score`` re-sorted by (class, -score, sample): their samples,
    scores, class (``_counted``) and rank within their class, as lines."""
    key = _counted(found, np.take(_lines(classes, best.T), order), n_classes)
    small = key.astype(np.min_scalar_type(n_classes))  # a radix sort for up to 65535 classes
    fix = _flat(np.argsort(small, axis=1, kind="stable"))  # stable: by score within a class
    found, best, key = (np.take(a, fix) for a in (found, best, key))
    return found, best, key, _rank_in_runs(key)


def _class_ranked(samples, values, classes, n_classes: int):
    """``_by_class`` of unsorted entries (like ``top_k``'s) with their ``classes``."""
    return _by_class(*_by_score(samples, values), classes, n_classes)


def _pack(keep: np.ndarray, found: np.ndarray, best: np.ndarray, rows: int):
    """The kept entries of every line, in order, moved to the front of ``rows`` rows (-1 /
    -inf after them): (rows, concepts) each."""
    slot = np.cumsum(keep, axis=1) - 1
    keep = keep & (slot < rows)
    where = (slot + np.arange(len(keep))[:, None] * rows)[keep]
    out_samples = np.full((len(keep), rows), -1, dtype=np.int64)
    out_scores = np.full(out_samples.shape, -np.inf)
    out_samples.ravel()[where], out_scores.ravel()[where] = found[keep], best[keep]
    return out_samples.T, out_scores.T


def _candidates(found, best, key, rank, k_class: int, rows: int, n_classes: int):
    """From entries sorted by ``_by_class``, each class's first ``k_class`` of every column
    moved to the front of ``rows`` rows: (rows, concepts) each."""
    return _pack((key < n_classes) & (rank < k_class), found, best, rows)


def class_candidates(samples, values, classes, k_class: int, rows: int, n_classes: int):
    """Per column, each class's ``k_class`` best entries, sorted by (class, -score), as the
    first of ``rows`` rows (-1 / -inf after them): the compact per-class table of a part of
    the data. ``classes`` gives each entry's class (like ``samples``)."""
    ranked = _class_ranked(samples, values, classes, n_classes)
    return _candidates(*ranked, k_class, rows, n_classes)


def _dense(found, best, key, rank, k_class: int, n_classes: int):
    """Entries ranked as ``_by_class`` gives them as the dense per-class table."""
    keep = (key < n_classes) & (rank < k_class)
    column = np.broadcast_to(np.arange(len(key))[:, None], key.shape)
    out_samples = np.full((n_classes, k_class, len(key)), -1, dtype=np.int64)
    out_scores = np.full(out_samples.shape, -np.inf)
    where = key[keep], rank[keep], column[keep]
    out_samples[where], out_scores[where] = found[keep], best[keep]
    return out_samples, out_scores


def class_table(samples, values, classes, k_class: int, n_classes: int):
    """The dense per-class table: (samples, scores), each (n_classes, k_class, concepts),
    best first within each class, -1 / -inf where a class has fewer samples."""
    return _dense(*_class_ranked(samples, values, classes, n_classes), k_class, n_classes)


def _ranked_candidates(samples, values, classes, n_classes: int):
    """A ``class_candidates`` table (already in order: no sort) ranked as ``_by_class``."""
    key = _counted(samples.T, classes.T, n_classes)
    return samples.T, values.T, key, _rank_in_runs(key)


def _class_floor(samples, values, block: np.ndarray, labels, k_class: int, n_classes: int):
    """Per entry of a block of samples (rows, concepts): the ``k_class``-th best score of its
    class and concept in a ``class_candidates`` table (``samples``, ``values``), -inf while
    that holds fewer or where the entry does not count (the reduction drops it)."""
    _, best, key, rank = _ranked_candidates(samples, values, class_of(labels, samples), n_classes)
    kth = np.full((n_classes + 1, len(key)), -np.inf)
    at = rank == k_class - 1
    kth[key[at], np.nonzero(at)[0]] = best[at]
    classes = _counted(block, class_of(labels, block), n_classes)
    return kth[classes, np.arange(block.shape[1])]


def _above(samples: np.ndarray, values: np.ndarray, floor) -> tuple[np.ndarray, np.ndarray]:
    """The real entries of every column scoring at least ``floor`` (broadcast against
    ``values``), packed to the top of as few rows as hold them: all that can still enter a
    table of k entries whose k-th best score is ``floor``."""
    keep = ((samples >= 0) & (values >= floor) & (values > -np.inf)).T
    return _pack(keep, samples.T, values.T, int(keep.sum(1).max(initial=0)))


def class_of(labels: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """The label of each sample id (-1 for padding)."""
    return np.where(samples >= 0, labels[np.maximum(samples, 0)], -1)


def chunk_tables(
    stats: Mapping[str, np.ndarray],
    positions: int,
    labels: np.ndarray,
    valid: np.ndarray,
    start: int,
    *,
    k: int,
    k_class: int,
    entries: int,
    n_classes: int,
) -> dict[str, np.ndarray]:
    """One chunk's tables of one layer, for every spec: ``top_samples``/``top_scores``
    (spec, k, concepts) and ``class_samples``/``class_scores`` (spec, entries, concepts).
    ``stats`` holds the chunk's rows of the layer's statistics, from sample ``start`` on."""
    samples = np.where(valid, np.arange(start, start + len(valid)), -1)
    parts: dict[str, list[np.ndarray]] = {}
    for spec in SPECS:
        values = scores(stats[spec.stat], spec, positions)
        ranked = _by_score(samples, values)  # one sort serves both tables
        found = {}
        if k:
            found["top"] = _top(*ranked[1:], k)
        if k_class:
            by_class = _by_class(*ranked, labels, n_classes)
            found["class"] = _candidates(*by_class, k_class, entries, n_classes)
        for kind, (s, v) in found.items():
            parts.setdefault(f"{kind}_samples", []).append(s.astype(np.int32))
            parts.setdefault(f"{kind}_scores", []).append(v)
    return {name: np.stack(values) for name, values in parts.items()}


# -- the merge over chunks ---------------------------------------------------------------------
def table_name(layer: str, spec: Spec) -> str:
    """The derived result holding the merged top-k table of ``layer`` under ``spec``."""
    return f"tables/{layer}/{spec.name}"


def class_table_name(layer: str, spec: Spec) -> str:
    """The derived result holding the merged per-class table of ``layer`` under ``spec``."""
    return f"class_tables/{layer}/{spec.name}"


Reduce = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
Floor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _fold_step(reduce: Reduce, floor: Floor, running, samples, values):
    """One spec's running table (None before the first block) folded with a block of chunk
    tables (chunks, rows, concepts): only entries at least ``floor`` join it."""
    samples = samples.reshape(-1, samples.shape[-1]).astype(np.int64)
    values = values.reshape(-1, values.shape[-1])
    if running is not None:
        samples, values = _above(samples, values, floor(*running, samples))
        samples = np.concatenate([running[0], samples])
        values = np.concatenate([running[1], values])
    return reduce(samples, values)


def _fold(
    group: zarr.Group, prefix: str, reduce: Reduce, floor: Floor, pool: ThreadPoolExecutor
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per spec, ``reduce`` folded over the chunk tables ``<prefix>_samples/_scores``, read in
    blocks of chunks of at most MERGE_BUDGET bytes; of each block only the entries at least
    ``floor(running samples, running scores, block samples)`` join the running table. The
    specs are folded side by side in ``pool`` (numpy's sorts release the GIL)."""
    samples, values = group[f"{prefix}_samples"], group[f"{prefix}_scores"]
    n_chunks, n_specs, rows, concepts = samples.shape
    block = max(1, MERGE_BUDGET // (n_specs * rows * concepts * 12))
    running: list = [None] * n_specs
    step = partial(_fold_step, reduce, floor)
    for start in range(0, n_chunks, block):
        s_block, v_block = samples[start : start + block], values[start : start + block]
        parts = [(s_block[:, i], v_block[:, i]) for i in range(n_specs)]  # views
        running = list(pool.map(step, running, *zip(*parts, strict=True)))
    return running


def merge_tables(path: str | Path, workers: int | None = None) -> None:
    """Merge the per-chunk tables of a complete store exactly into the derived results
    ``tables/<layer>/<spec>`` ((k, concept)) and ``class_tables/<layer>/<spec>`` ((class,
    k_class, concept)); running it again rewrites the same results. ``workers``: threads
    folding the specs side by side (default: one per CPU this process may use, at most one
    per spec)."""
    group = zarr.open_group(Path(path), mode="r+")
    attrs = dict(group.attrs)
    if not group["progress/done"][:].all():
        raise ValueError(f"the store at {path} is not complete; merge its tables once it is")
    k, k_class, n_classes = attrs["table_size"], attrs["class_table_size"], attrs["classes"]
    labels = group["samples/label"][:]

    def top(s: np.ndarray, v: np.ndarray):
        return top_k(s, v, k)

    def top_floor(_, v: np.ndarray, __) -> np.ndarray:
        return v[k - 1]  # each concept's k-th best so far

    def per_class(s: np.ndarray, v: np.ndarray):
        rows = min(n_classes * k_class, len(s))  # no more than the entries at hand
        return class_candidates(s, v, class_of(labels, s), k_class, rows, n_classes)

    def class_floor(s: np.ndarray, v: np.ndarray, block: np.ndarray) -> np.ndarray:
        return _class_floor(s, v, block, labels, k_class, n_classes)

    def dense(table: tuple[np.ndarray, np.ndarray]):
        s, v = table
        return _dense(*_ranked_candidates(s, v, class_of(labels, s), n_classes), k_class, n_classes)

    workers = workers or min(len(SPECS), len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(workers) as pool:
        for layer in attrs["layers"]:
            tables = group[f"layers/{layer}/tables"]
            jobs = []
            if k:
                merged = _fold(tables, "top", top, top_floor, pool)
                dims = ("rank", "concept")
                jobs += [(table_name(layer, s), s, dims, t) for s, t in zip(SPECS, merged)]
            if k_class:
                merged = pool.map(dense, _fold(tables, "class", per_class, class_floor, pool))
                dims = ("class", "rank", "concept")
                jobs += [(class_table_name(layer, s), s, dims, t) for s, t in zip(SPECS, merged)]
            for parent in {name.rsplit("/", 1)[0] for name, *_ in jobs}:  # before the threads
                group.require_group(f"{RESULTS}/{parent}")
            meta = {"layer": layer, "table_size": k, "class_table_size": k_class}
            list(pool.map(partial(_write, path, meta), jobs))
    group.attrs["tables_merged"] = True


def _write(path, meta: Mapping, job: tuple) -> None:
    """Write one merged table: ``job`` is (result name, spec, dimension names, table)."""
    name, spec, dims, (samples, values) = job
    attrs = {**meta, "mode": spec.mode, "pool": spec.pool, "normalised": spec.normalised}
    arrays = {"samples": samples, "scores": values}
    write_result(path, name, arrays, dims={"samples": dims, "scores": dims}, attrs=attrs)


def merge_when_complete(path: str | Path) -> bool:
    """Merge the tables if the store is complete and they are not merged yet; one process
    at a time (a lock file beside the store; a lock left by a dead process on this host is
    taken over). True if this call merged them."""
    path = Path(path)
    group = zarr.open_group(path, mode="r")
    if group.attrs.get("tables_merged") or not group["progress/done"][:].all():
        return False
    lock = path.with_name(f"{path.name}.merging")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if not _stale(lock):
            return False  # another process is merging
        lock.unlink(missing_ok=True)
        return merge_when_complete(path)
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")
    try:
        merge_tables(path)
    finally:
        lock.unlink(missing_ok=True)
    return True


def _stale(lock: Path) -> bool:
    """Whether ``lock`` was left by a process of this host that no longer runs."""
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return False  # being written right now, or gone
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
