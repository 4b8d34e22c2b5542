"""Prototypical concept-based explanations (PCX; Dreyer et al., "Understanding the
(extra-)ordinary: validating deep model decisions with prototypical concept-based
explanations"): per class, a Gaussian mixture over its samples' concept-relevance vectors in a
layer. Each component is a prototype, shown by the real samples nearest to its mean; each sample
gets its log-likelihood under its class's mixture (low: an outlier), its prototype, and the
concepts it uses more or less than that prototype.

Fitting needs a class's samples at once: by default every readable sample is kept (memory of
the samples x concepts matrix, read once); ``max_fit_samples`` fits on a seeded subsample per
class instead and scores all samples in a second, chunked pass (memory bounded by the fit set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from sklearn.mixture import GaussianMixture

from crp_toolkit.mining.references import ScoreChunk, score_chunks
from crp_toolkit.mining.statistics import by_class, sorted_by_label
from crp_toolkit.store.tables import Spec
from crp_toolkit.store.zarr_store import Store


@dataclass(frozen=True)
class Prototypes:
    """Per class y and prototype p: ``means[y, p]`` (concept relevance), ``weights[y, p]`` and
    ``nearest[y, p]``, the ids of the samples of class y closest to it (Euclidean), nearest
    first. A class with fewer samples than ``n_prototypes`` has fewer prototypes: the rest are
    NaN means, weight 0 and id -1.

    Per sample s: ``log_likelihood[s]`` under its class's mixture, ``prototype[s]`` (the most
    probable component), and ``overused[s]``/``underused[s]``, the concepts whose relevance is
    most above/below that prototype's mean, with the differences in ``overuse``/``underuse``.
    Unreadable samples have NaN and -1.
    """

    layer: str
    normalised: bool
    n_prototypes: int
    covariance_type: str
    max_fit_samples: int | None
    max_iter: int
    seed: int
    means: np.ndarray
    weights: np.ndarray
    nearest: np.ndarray
    log_likelihood: np.ndarray
    prototype: np.ndarray
    overused: np.ndarray
    overuse: np.ndarray
    underused: np.ndarray
    underuse: np.ndarray

    DIMS: ClassVar[dict[str, tuple[str, ...]]] = {
        "means": ("class", "prototype", "concept"),
        "weights": ("class", "prototype"),
        "nearest": ("class", "prototype", "nearest_rank"),
        "log_likelihood": ("sample",),
        "prototype": ("sample",),
        "overused": ("sample", "concept_rank"),
        "overuse": ("sample", "concept_rank"),
        "underused": ("sample", "concept_rank"),
        "underuse": ("sample", "concept_rank"),
    }

    @property
    def name(self) -> str:
        return f"prototypes/{self.layer}"


def fit_subset(labels: np.ndarray, valid: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Which samples to fit on: every readable one, or at most ``limit`` per class drawn at
    random (seeded)."""
    chosen = valid.copy()
    if limit is None:
        return chosen
    ids = np.random.default_rng(seed).permutation(np.flatnonzero(valid))
    ids = ids[np.argsort(labels[ids], kind="stable")]
    _, starts, counts = np.unique(labels[ids], return_index=True, return_counts=True)
    rank = np.arange(len(ids)) - np.repeat(starts, counts)
    chosen[ids[rank >= limit]] = False
    return chosen


def gather(store: Store, layer: str, chosen: np.ndarray, labels: np.ndarray, normalised: bool):
    """The scores of the ``chosen`` samples in one (samples x concepts) matrix ordered by class
    then id, filled chunk by chunk (no other copy of it is made)."""
    ids = np.flatnonzero(chosen)
    ids = ids[np.argsort(labels[ids], kind="stable")]
    if not len(ids):
        raise ValueError(f"the store at {store.path} has no readable samples to fit on")
    slot = np.zeros(len(chosen), np.int64)
    slot[ids] = np.arange(len(ids))
    scores = np.empty((len(ids), store.layer(layer).shape[1]))
    for part in score_chunks(store, layer, Spec("relevance", "sum", normalised)):
        keep = chosen[part.samples]
        scores[slot[part.samples[keep]]] = part.scores[keep]
    return ScoreChunk(ids, labels[ids], scores)


class _Accumulator:
    """Fills the per-sample outputs and merges the nearest samples of every prototype."""

    def __init__(self, n: int, classes: int, concepts: int, P: int, n_nearest: int, m: int):
        self.log_likelihood = np.full(n, np.nan)
        self.prototype = np.full(n, -1, np.int64)
        self.used = {key: np.full((n, m), -1, np.int64) for key in ("overused", "underused")}
        self.use = {key: np.full((n, m), np.nan) for key in ("overuse", "underuse")}
        self.best_dist = np.full((classes, n_nearest, P), np.inf)
        self.best_ids = np.full((classes, n_nearest, P), -1, np.int64)
        self.m = min(m, concepts)

    def add(self, cls: int, model: GaussianMixture, ids: np.ndarray, X: np.ndarray) -> None:
        """Score the samples ``ids`` (rows of ``X``, ids ascending) of class ``cls``."""
        self.log_likelihood[ids] = model.score_samples(X)
        proto = self.prototype[ids] = model.predict(X)
        diff = X - model.means_[proto]
        for name, sign in (("over", -1), ("under", 1)):
            cols = np.argsort(sign * diff, axis=1, kind="stable")[:, : self.m]
            self.used[f"{name}used"][ids, : self.m] = cols
            self.use[f"{name}use"][ids, : self.m] = np.take_along_axis(diff, cols, 1)
        self.merge_nearest(cls, model.means_, ids, X)

    def merge_nearest(self, cls: int, means: np.ndarray, ids: np.ndarray, X: np.ndarray) -> None:
        """Merge these samples into the nearest of each prototype of ``cls`` (earlier ids win
        ties, as in a stable sort over all samples)."""
        P, k = means.shape[0], self.best_dist.shape[1]
        square = (X**2).sum(1)[:, None] - 2 * X @ means.T + (means**2).sum(1)[None, :]
        dist = np.concatenate([self.best_dist[cls, :, :P], np.sqrt(np.maximum(square, 0.0))])
        index = np.concatenate([self.best_ids[cls, :, :P], np.repeat(ids[:, None], P, 1)])
        keep = np.argsort(dist, axis=0, kind="stable")[:k]
        self.best_dist[cls, :, :P] = np.take_along_axis(dist, keep, 0)
        self.best_ids[cls, :, :P] = np.take_along_axis(index, keep, 0)


def _check_counts(
    n_prototypes: int, n_nearest: int, n_concepts: int, max_fit_samples: int | None
) -> None:
    counts = {"n_prototypes": n_prototypes, "n_nearest": n_nearest, "n_concepts": n_concepts}
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if max_fit_samples is not None and max_fit_samples < n_prototypes:
        raise ValueError(
            f"max_fit_samples ({max_fit_samples}) must be at least n_prototypes ({n_prototypes})"
        )


def _parameters(models: dict, classes: int, n_prototypes: int, concepts: int):
    """Means (class, prototype, concept; NaN for missing components) and weights."""
    means = np.full((classes, n_prototypes, concepts), np.nan)
    weights = np.zeros((classes, n_prototypes))
    for cls, model in models.items():
        means[cls, : model.n_components] = model.means_
        weights[cls, : model.n_components] = model.weights_
    return means, weights


def fit_prototypes(
    store: Store,
    layer: str,
    *,
    n_prototypes: int = 4,
    normalised: bool = True,
    covariance_type: str = "full",
    n_nearest: int = 8,
    n_concepts: int = 5,
    max_fit_samples: int | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> Prototypes:
    """PCX prototypes of every class in ``layer``: a seeded ``GaussianMixture`` of
    ``n_prototypes`` components (``covariance_type`` as in scikit-learn) per class over its
    samples' concept relevance (per-sample normalised by default), fitted on all readable
    samples or at most ``max_fit_samples`` per class (EM for at most ``max_iter`` steps; PCX uses
    10); every readable sample is scored."""
    _check_counts(n_prototypes, n_nearest, n_concepts, max_fit_samples)
    classes, concepts = store.classes, store.layer(layer).shape[1]
    labels, valid = store.samples("label")[:], store.samples("valid")[:]
    if np.any((labels[valid] < 0) | (labels[valid] >= classes)):
        raise ValueError(f"labels of the store at {store.path} lie outside its {classes} classes")
    chosen = fit_subset(labels, valid, max_fit_samples, seed)
    fitted = gather(store, layer, chosen, labels, normalised)
    mixture = {"covariance_type": covariance_type, "max_iter": max_iter, "random_state": seed}
    models = {
        int(cls): GaussianMixture(min(n_prototypes, len(ids)), **mixture).fit(X)
        for cls, ids, X in by_class(fitted)
    }
    out = _Accumulator(len(chosen), classes, concepts, n_prototypes, n_nearest, n_concepts)
    if max_fit_samples is None:  # every sample was fitted on: score them from memory
        parts = [fitted]
    else:
        parts = (
            sorted_by_label(p)
            for p in score_chunks(store, layer, Spec("relevance", "sum", normalised))
        )
    for part in parts:
        for cls, ids, X in by_class(part):
            out.add(int(cls), models[int(cls)], ids, X)
    means, weights = _parameters(models, classes, n_prototypes, concepts)
    return Prototypes(
        layer,
        normalised,
        n_prototypes,
        covariance_type,
        max_fit_samples,
        max_iter,
        seed,
        means,
        weights,
        out.best_ids.transpose(0, 2, 1),
        out.log_likelihood,
        out.prototype,
        out.used["overused"],
        out.use["overuse"],
        out.used["underused"],
        out.use["underuse"],
    )
