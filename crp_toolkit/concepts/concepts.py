"""Concept types: how concept ids of a layer become masks on the relevance at its output.

A mask has the shape of the layer's output per sample, with a leading slot axis ``(S, B, ...)``
(or broadcastable to it); relevance for a concept is ``R * mask``. Masks of all concepts of a
layer sum to one, so conditional relevances add up to the unconditional one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from crp_toolkit.engine.layout import TokenGrid
from crp_toolkit.engine.rules import stabilize


class Concept:
    """Base: ``mask(ids, activation)`` with ``ids[s][b]`` the concept ids (OR-ed) of slot s and
    sample b, ``activation`` the layer's output (B, C, ...). ``count`` concepts per layer."""

    def count(self, activation: Tensor) -> int:
        raise NotImplementedError

    def relevance(self, R: Tensor, activation: Tensor) -> Tensor:
        """Relevance of every concept (B, n_concepts) from relevance R (B, C, ...) at the layer."""
        raise NotImplementedError

    def mask(self, ids: Sequence[Sequence[Sequence[int]]], activation: Tensor) -> Tensor:
        raise NotImplementedError

    def check(self, ids: Sequence[int], activation: Tensor, layer: str) -> None:
        n = self.count(activation)
        bad = [i for i in ids if not 0 <= int(i) < n]
        if bad:
            raise ValueError(
                f"concept ids {bad} out of range for layer {layer!r}: it has {n} concepts "
                f"({type(self).__name__}), valid ids are 0..{n - 1}"
            )


def one_hot(ids: Sequence[Sequence[Sequence[int]]], n: int, like: Tensor) -> Tensor:
    """(S, B, n) with ones at the given ids (several ids OR-ed), set in one indexed write."""
    cells = [(s, b, i) for s, row in enumerate(ids) for b, chosen in enumerate(row) for i in chosen]
    out = torch.zeros(len(ids), len(ids[0]), n, dtype=like.dtype, device=like.device)
    if cells:
        index = torch.tensor(cells, device=like.device).T
        out[index[0], index[1], index[2]] = 1.0
    return out


def summed_over_positions(values: Tensor) -> Tensor:
    """Per-concept values (B, n, ...) summed over their positions: (B, n)."""
    return values.flatten(2).sum(2) if values.dim() > 2 else values


@dataclass(frozen=True)
class ChannelConcept(Concept):
    """A concept is a channel: a conv channel over all positions, or a dense unit."""

    def count(self, activation: Tensor) -> int:
        return activation.shape[1]

    def relevance(self, R: Tensor, activation: Tensor) -> Tensor:
        return summed_over_positions(R)

    def mask(self, ids, activation: Tensor) -> Tensor:
        m = one_hot(ids, activation.shape[1], activation)
        return m.reshape(*m.shape, *([1] * (activation.dim() - 2)))


@dataclass(frozen=True)
class NeuronConcept(Concept):
    """A concept is one neuron: a flat index into the layer's (C, h, w) output, so
    ``channel * h * w + row * w + col`` (for localising a channel's maximal position)."""

    def count(self, activation: Tensor) -> int:
        return activation[0].numel()

    def relevance(self, R: Tensor, activation: Tensor) -> Tensor:
        return R.flatten(1)

    def mask(self, ids, activation: Tensor) -> Tensor:
        m = one_hot(ids, activation[0].numel(), activation)
        return m.reshape(*m.shape[:2], *activation.shape[1:])


@dataclass(frozen=True)
class DirectionConcept(Concept):
    """Concepts are directions in channel space: rows of ``basis`` (n_concepts, C), e.g. from
    NMF or PCA. The activation is decomposed as ``a = basis^T c`` (least squares), and concept
    k receives ``c_k basis_k * R / a`` of each channel's relevance R; with a basis that spans
    the activations the concept relevances sum exactly to R."""

    basis: Tensor

    def count(self, activation: Tensor) -> int:
        return self.basis.shape[0]

    def coefficients(self, activation: Tensor) -> Tensor:
        """Concept coefficients c (B, n_concepts, ...) of an activation (B, C, ...)."""
        basis = self.basis.to(activation)
        a = activation.movedim(1, -1)
        c = torch.linalg.lstsq(basis.T.expand(*a.shape[:-1], *basis.T.shape), a[..., None]).solution
        return c[..., 0].movedim(-1, 1)

    def relevance(self, R: Tensor, activation: Tensor) -> Tensor:
        basis = self.basis.to(activation)
        share = self.coefficients(activation)[:, :, None] * _expand(basis, activation)[None]
        per_channel = share * (R / stabilize(activation, 1e-12))[:, None]  # (B, K, C, ...)
        return per_channel.flatten(2).sum(2)

    def mask(self, ids, activation: Tensor) -> Tensor:
        basis = self.basis.to(activation)
        c = self.coefficients(activation)  # (B, K, ...)
        select = one_hot(ids, basis.shape[0], activation)  # (S, B, K)
        spatial = [1] * (activation.dim() - 2)
        weights = select.reshape(*select.shape, *spatial) * c[None]  # (S, B, K, ...)
        part = torch.einsum("sbk...,kc->sbc...", weights, basis)  # this direction's share of a
        return part / stabilize(activation, 1e-12)[None]


def _expand(basis: Tensor, activation: Tensor) -> Tensor:
    """(K, C) -> (K, C, 1, ...) to broadcast against an activation's spatial axes."""
    return basis.reshape(*basis.shape, *([1] * (activation.dim() - 2)))


@dataclass(frozen=True)
class OnAxis(Concept):
    """``concept`` on a layer whose features lie on ``axis`` rather than axis 1: a token layer
    (batch, tokens, features), axis 2, or a channel-last one (batch, h, w, channels), axis 3.
    The concept sees activation and relevance feature-first, and its masks come back in the
    layer's own layout, so a channel of a token layer is one feature summed over tokens and a
    neuron is one (feature, token) pair, ``feature * tokens + token``."""

    concept: Concept
    axis: int

    def count(self, activation: Tensor) -> int:
        return self.concept.count(activation.movedim(self.axis, 1))

    def relevance(self, R: Tensor, activation: Tensor) -> Tensor:
        return self.concept.relevance(R.movedim(self.axis, 1), activation.movedim(self.axis, 1))

    def mask(self, ids, activation: Tensor) -> Tensor:
        mask = self.concept.mask(ids, activation.movedim(self.axis, 1))
        return mask.movedim(2, self.axis + 1)


def concept_on(concept: Concept, axis: int | None, layer: str) -> Concept:
    """``concept`` for a layer whose feature axis is ``axis`` (see ``engine.layout``); a layer
    without one (attention scores, a channel shuffle's split view) holds no concepts."""
    return concept if require_feature_axis(axis, layer) == 1 else OnAxis(concept, axis)


def feature_first(values: Tensor, axis: int | None, layer: str) -> Tensor:
    """A layer's output, or the relevance there (B, ...), with its features on axis 1."""
    return values.movedim(require_feature_axis(axis, layer), 1)


def spatial_view(values: Tensor, axis: int | None, grid: TokenGrid | None, layer: str) -> Tensor:
    """A layer's output, or the relevance there, as (B, features, *positions): feature-first,
    and a token layer's patch tokens on their grid (B, features, h, w) without the class and
    register tokens."""
    first = feature_first(values, axis, layer)
    return first if grid is None else grid.patches(first)


def require_feature_axis(axis: int | None, layer: str) -> int:
    """``axis``, or a clear error for a layer without a feature axis."""
    if axis is None:
        raise ValueError(
            f"layer {layer!r} has no feature axis (its output mixes or splits the features, "
            "e.g. attention scores or a reshaped view), so it holds no concepts; choose a "
            "layer whose output holds features, such as a block's output or an MLP layer"
        )
    return axis
