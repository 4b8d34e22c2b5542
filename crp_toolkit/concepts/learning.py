"""Learning K directions of a layer's channel space from a stream of samples (rows of C
values: activation vectors at sampled positions), out of core and seeded.

Each method is a *learner* with ``partial_fit(rows)`` and ``directions()`` (K, C): NMF
(``MiniBatchNMF``; non-negative rows), sparse dictionary learning
(``MiniBatchDictionaryLearning``) and k-means (``MiniBatchKMeans``) from scikit-learn; an exact
streaming PCA (the rows' count, sum and Gram matrix accumulated in float64, one
eigendecomposition of the covariance at the end: one pass, a C x C state whatever N); and a
TopK sparse autoencoder trained in torch (each row encoded by its ``topk`` largest codes; the
decoder's rows are the directions). :func:`learn_directions` feeds a learner the stream in
blocks of ``block`` rows, so memory is one block whatever the stream's length. scikit-learn is
imported when a learner is made, not with this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

METHODS = ("nmf", "pca", "dictionary", "kmeans", "sae")


def check_method(method: str, k: int, channels: int) -> None:
    """Refuse an unknown method or a K the layer cannot hold, before any work."""
    if method not in METHODS:
        raise ValueError(f"unknown basis method {method!r}; choose one of {', '.join(METHODS)}")
    if not 1 <= k <= channels:
        raise ValueError(
            f"K={k} directions for a layer of {channels} channels: K must be between 1 and "
            f"{channels} (the directions must be independent for the least-squares concept "
            "coefficients); choose a smaller K or another layer"
        )


class _Sklearn:
    """A scikit-learn incremental estimator as a learner: each block is fitted as shuffled
    mini-batches of about ``batch`` rows (one ``partial_fit`` step each)."""

    def __init__(self, estimator, attribute: str, batch: int, seed: int) -> None:
        self.estimator, self.attribute, self.batch = estimator, attribute, batch
        self.rng = np.random.default_rng(seed)

    def partial_fit(self, rows: np.ndarray) -> None:
        shuffled = rows[self.rng.permutation(len(rows))]
        for part in np.array_split(shuffled, max(1, len(rows) // self.batch)):
            self.estimator.partial_fit(part)

    def directions(self) -> np.ndarray:
        return np.asarray(getattr(self.estimator, self.attribute), np.float64)


class StreamingPCA:
    """Exact PCA of a stream of rows: the principal directions of all rows seen, computed from
    their count, sum and Gram matrix ``X^T X`` (float64, accumulated block by block, shifted by
    the first block's mean so that large means do not cancel away the variance) with one
    eigendecomposition of the C x C covariance when the directions are asked for. Equal to
    scikit-learn's ``PCA`` on the same rows held in memory (up to sign), whatever the blocks."""

    def __init__(self, k: int, channels: int) -> None:
        self.k = k
        self.count = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(channels)
        self.gram = np.zeros((channels, channels))

    def partial_fit(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float64)
        if self.shift is None:
            self.shift = rows.mean(0)
        centred = rows - self.shift
        self.count += len(rows)
        self.total += centred.sum(0)
        self.gram += centred.T @ centred

    def covariance(self) -> np.ndarray:
        """The rows' covariance (C, C), normalised by the count."""
        mean = self.total / max(self.count, 1)
        return self.gram / max(self.count, 1) - np.outer(mean, mean)

    def directions(self) -> np.ndarray:
        """The K eigenvectors of the covariance with the largest eigenvalues, largest first."""
        values, vectors = np.linalg.eigh(self.covariance())
        return vectors[:, np.argsort(-values, kind="stable")[: self.k]].T


class TopKAutoencoder(nn.Module):
    """A sparse autoencoder: codes ``topk(relu(W_e (x - b) + b_e))``, reconstruction
    ``W_d^T codes + b`` with unit-norm decoder rows (the directions)."""

    def __init__(self, channels: int, k: int, topk: int, generator: torch.Generator) -> None:
        super().__init__()
        decoder = torch.randn(k, channels, generator=generator, dtype=torch.float64)
        decoder = decoder / decoder.norm(dim=1, keepdim=True)
        self.decoder = nn.Parameter(decoder)
        self.encoder = nn.Parameter(decoder.T.clone())
        self.code_bias = nn.Parameter(torch.zeros(k, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=torch.float64))
        self.topk = topk

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu((x - self.bias) @ self.encoder + self.code_bias)
        top = pre.topk(self.topk, dim=1)
        return torch.zeros_like(pre).scatter(1, top.indices, top.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x) @ self.decoder + self.bias


class _SAE:
    """A :class:`TopKAutoencoder` trained with Adam on mini-batches of each block."""

    def __init__(self, k: int, seed: int, channels: int, topk: int, lr: float, batch: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.model = TopKAutoencoder(channels, k, min(topk, k), self.generator)
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.batch, self.started = batch, False

    @torch.enable_grad()
    def partial_fit(self, rows: np.ndarray) -> None:
        x = torch.as_tensor(rows, dtype=torch.float64)
        if not self.started:
            self._initialise(x)
        order = torch.randperm(len(x), generator=self.generator)
        for start in range(0, len(x), self.batch):
            part = x[order[start : start + self.batch]]
            loss = (self.model(part) - part).pow(2).sum(1).mean()
            self.optimiser.zero_grad()
            loss.backward()
            self.optimiser.step()
            with torch.no_grad():
                self.model.decoder /= self.model.decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def _initialise(self, x: torch.Tensor) -> None:
        """The pre-bias at the data's mean, the decoder rows (and encoder columns) at K
        centred rows of the first block, spread apart (data-driven: no latent starts dead)."""
        model = self.model
        model.bias.copy_(x.mean(0))
        rows = x - model.bias
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        picked = spread_rows(rows, model.decoder.shape[0], self.generator)
        model.decoder.copy_(picked)
        model.encoder.copy_(picked.T)
        self.started = True

    def directions(self) -> np.ndarray:
        return self.model.decoder.detach().numpy().copy()


def spread_rows(rows: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """K of the unit ``rows``, chosen greedily to be far apart (farthest-point sampling by
    cosine, from a random first row)."""
    chosen = [int(torch.randint(len(rows), (1,), generator=generator))]
    closest = (rows @ rows[chosen[0]]).abs()
    for _ in range(k - 1):
        chosen.append(int(closest.argmin()))
        closest = torch.maximum(closest, (rows @ rows[chosen[-1]]).abs())
    return rows[chosen]


@dataclass(frozen=True)
class LearnerOptions:
    """Settings of the learners beyond method, K and seed: ``block`` rows held at a time;
    ``batch`` rows per scikit-learn ``partial_fit`` step; the SAE's active codes per row
    (``topk``), learning rate and mini-batch (``sae_batch``)."""

    block: int = 8192
    batch: int = 1024
    topk: int = 4
    lr: float = 1e-2
    sae_batch: int = 256


def make_learner(
    method: str, k: int, seed: int, channels: int, options: LearnerOptions = LearnerOptions()
):
    """A fresh learner of K directions for rows of ``channels`` values."""
    check_method(method, k, channels)
    if method == "sae":
        return _SAE(k, seed, channels, options.topk, options.lr, options.sae_batch)
    if method == "pca":
        return StreamingPCA(k, channels)
    from sklearn import cluster, decomposition

    batch = max(options.batch, 2 * k)  # every partial fit sees at least K rows
    if method == "nmf":
        found = decomposition.MiniBatchNMF(k, random_state=seed, init="random"), "components_"
    elif method == "dictionary":
        found = (
            decomposition.MiniBatchDictionaryLearning(k, random_state=seed, batch_size=batch),
            "components_",
        )
    else:
        found = cluster.MiniBatchKMeans(k, random_state=seed, n_init=1), "cluster_centers_"
    return _Sklearn(*found, batch, seed)


def blocks(stream: Iterable[np.ndarray], rows: int, least: int) -> Iterator[np.ndarray]:
    """The stream's rows regrouped into blocks of ``rows`` rows (the last one shorter; a last
    one under ``least`` rows, too few for a partial fit, joins the block before it)."""
    held: list[np.ndarray] = []
    count, last = 0, None
    for part in stream:
        held.append(np.asarray(part, np.float64))
        count += len(part)
        while count >= rows:
            joined = np.concatenate(held)
            if last is not None:
                yield last
            last, rest = joined[:rows], joined[rows:]
            held, count = [rest], len(rest)
    tail = np.concatenate(held) if held else np.zeros((0, 0))
    if last is not None and len(tail) < least:
        yield np.concatenate([last, tail]) if len(tail) else last
    else:
        if last is not None:
            yield last
        if len(tail):
            yield tail


def learn_directions(
    stream: Callable[[], Iterable[np.ndarray]],
    method: str,
    k: int,
    seed: int,
    channels: int,
    *,
    epochs: int = 1,
    options: LearnerOptions = LearnerOptions(),
) -> tuple[np.ndarray, int]:
    """K unit-norm directions (K, C) learned by ``method`` from ``stream()`` (called once per
    epoch; rows of C values), and the rows seen in one epoch. Too few rows (fewer than K) are
    refused. Orientation is fixed (each direction's largest entry positive) so a seed always
    gives the same numbers."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    learner = make_learner(method, k, seed, channels, options)
    seen = 0
    for epoch in range(epochs):
        for block in blocks(stream(), options.block, k):
            if len(block) < k:
                raise ValueError(
                    f"only {len(block)} sampled positions for K={k} directions: sample more "
                    "positions (or images), or choose a smaller K"
                )
            if method == "nmf" and block.min() < 0:
                raise ValueError(
                    "NMF needs non-negative rows, and the sampled ones have negative values: "
                    "learn NMF from a layer after a ReLU, or choose pca, dictionary, kmeans "
                    "or sae"
                )
            learner.partial_fit(block)
            seen += len(block) if epoch == 0 else 0
    if seen < k:
        raise ValueError(
            f"only {seen} sampled positions for K={k} directions: sample more positions (or "
            "images), or choose a smaller K"
        )
    return oriented(learner.directions()), seen


def oriented(directions: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero), each with its largest-magnitude entry
    positive."""
    norm = np.linalg.norm(directions, axis=1, keepdims=True)
    unit = np.divide(directions, norm, out=np.zeros_like(directions), where=norm > 0)
    peak = unit[np.arange(len(unit)), np.abs(unit).argmax(1)]
    return unit * np.where(peak < 0, -1.0, 1.0)[:, None]
