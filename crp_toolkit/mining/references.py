"""Reference samples (relevance and activation maximisation) mined from the store, out of
core: the score matrix is read chunk by chunk and the top-k of every concept is merged exactly
(ties go to the lower sample index, as a stable sort over the whole matrix would give)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from crp_toolkit.store.zarr_store import Store

MODES = ("relevance", "activation")
TARGETS = ("sum", "max")


@dataclass(frozen=True)
class ReferenceTable:
    """``samples[r, c]``: the r-th best sample of concept c; ``scores`` their scores."""

    layer: str
    mode: str
    target: str
    normalised: bool
    samples: np.ndarray
    scores: np.ndarray


def concept_scores(store: Store, layer: str, rows: slice, mode: str, target: str, normalised: bool):
    """The (rows x concepts) scores: relevance or activation, summed ("sum") or maximal ("max")
    over space, optionally divided per sample by the sum of absolute scores (zennit-crp's
    abs_norm)."""
    if mode == "relevance":
        scores = store.layer(layer, "relevance" if target == "sum" else "rel_max")[rows]
    elif target == "max":
        scores = store.layer(layer, "act_max")[rows]
    else:
        positions = int(np.prod(store.attrs["layers"][layer][1:], dtype=np.int64))
        scores = store.layer(layer, "act_mean")[rows] * positions
    scores = scores.astype(np.float64)
    if normalised:
        scores = scores / np.maximum(np.abs(scores).sum(1, keepdims=True), 1e-30)
    return scores


def reference_samples(
    store: Store,
    layer: str,
    *,
    mode: str = "relevance",
    target: str = "sum",
    normalised: bool = True,
    k: int = 40,
    classes: Iterable[int] | None = None,
) -> ReferenceTable:
    """The ``k`` best samples of every concept of ``layer`` (among ``classes`` only, if
    given); samples that could not be read never count."""
    if mode not in MODES or target not in TARGETS:
        raise ValueError(f"mode must be one of {MODES} and target one of {TARGETS}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    wanted = None if classes is None else np.array(sorted(set(classes)))
    n, chunk = store.attrs["n_samples"], store.attrs["chunk"]
    best_idx = best_val = None
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        scores = concept_scores(store, layer, rows, mode, target, normalised)
        keep = store.samples("valid")[rows]
        if wanted is not None:
            keep &= np.isin(store.samples("label")[rows], wanted)
        scores[~keep] = -np.inf
        index = np.broadcast_to(np.arange(rows.start, rows.stop)[:, None], scores.shape)
        if best_val is not None:  # earlier rows first: the stable sort keeps ties in order
            scores, index = np.concatenate([best_val, scores]), np.concatenate([best_idx, index])
        order = np.argsort(-scores, axis=0, kind="stable")[:k]
        best_val = np.take_along_axis(scores, order, 0)
        best_idx = np.take_along_axis(index, order, 0)
    found = np.isfinite(best_val).all(1)
    return ReferenceTable(layer, mode, target, normalised, best_idx[found], best_val[found])
