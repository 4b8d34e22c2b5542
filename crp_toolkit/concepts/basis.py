"""Learned concept bases as concepts: K directions in a layer's channel space, plus a residual.

A :class:`ConceptBasis` is what discovery learns (NMF, PCA, a dictionary, k-means centres or a
sparse autoencoder's decoder, see ``crp_toolkit.concepts.learning``): its directions (K, C)
and how they were made. :class:`BasisConcept` makes them concepts of the layer with
``DirectionConcept``'s semantics (the activation decomposed as ``a = basis^T c`` by least
squares; direction k carries the share ``c_k basis_k / a`` of each channel's relevance) and
adds concept K, the *residual* ``a - basis^T c``: what the basis does not span. The masks of
all K + 1 concepts sum to one, so a layer's conditional relevances add up to the unconditional
relevance whether or not the basis spans the activations.

In a store, the concepts of basis ``name`` of layer ``features.12`` form the *concept layer*
``features.12@name`` (see :func:`concept_layer`), beside the layer's channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from crp_toolkit.concepts.concepts import (
    ChannelConcept,
    Concept,
    DirectionConcept,
    one_hot,
    summed_over_positions,
)
from crp_toolkit.engine.rules import stabilize

SEPARATOR = "@"
SOURCES = ("activation", "relevance")  # what a basis is learned from


def concept_layer(layer: str, basis: str) -> str:
    """The name of the concept layer of basis ``basis`` of ``layer``: ``layer@basis``."""
    return f"{layer}{SEPARATOR}{basis}"


def split_concept_layer(name: str) -> tuple[str, str | None]:
    """(model layer, basis name or None) of a store layer name."""
    layer, _, basis = name.partition(SEPARATOR)
    return layer, basis or None


@dataclass(frozen=True)
class ConceptBasis:
    """K learned directions of ``layer``'s channel space (rows of ``directions``, unit norm),
    learned by ``method`` from ``source`` ("activation" or "relevance": relevance-weighted
    activations) with ``seed``; ``provenance`` names the model, dataset and composite of the
    store it was learned for, and how many positions it saw."""

    layer: str
    method: str
    source: str
    seed: int
    directions: np.ndarray
    provenance: Mapping = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.directions.shape[0])

    @property
    def channels(self) -> int:
        return int(self.directions.shape[1])

    @property
    def name(self) -> str:
        """Its name in a store: method and K (``nmf16``), and the source when it is not the
        activation (``nmf16-relevance``)."""
        suffix = "" if self.source == "activation" else f"-{self.source}"
        return f"{self.method}{self.k}{suffix}"

    @property
    def concept_layer(self) -> str:
        return concept_layer(self.layer, self.name)

    def concept(self) -> BasisConcept:
        """The basis as the concepts of its layer (K directions and the residual)."""
        return BasisConcept(torch.as_tensor(np.asarray(self.directions, np.float32)))


@dataclass(frozen=True, eq=False)
class BasisConcept(DirectionConcept):
    """The K directions of ``basis`` (K, C) and, as concept K, the residual they leave out.

    Coefficients come from the pseudo-inverse of ``basis^T`` (the least-squares solution
    ``DirectionConcept`` computes, once for all positions)."""

    @property
    def residual(self) -> int:
        """The id of the residual concept."""
        return self.basis.shape[0]

    @cached_property
    def _pinv(self) -> Tensor:
        return torch.linalg.pinv(self.basis.double().T).float()  # (K, C)

    def count(self, activation: Tensor) -> int:
        return self.basis.shape[0] + 1

    def coefficients(self, activation: Tensor) -> Tensor:
        return torch.einsum("kc,bc...->bk...", self._pinv.to(activation), activation)

    def maps(self, R: Tensor, activation: Tensor) -> tuple[Tensor, Tensor]:
        """Per concept, its relevance map (B, K + 1, ...) (summed over channels: its share of
        R) and its activation map (B, K + 1, ...): the coefficients of the directions, and the
        norm of the residual over channels."""
        basis = self.basis.to(activation)
        c = self.coefficients(activation)
        ratio = torch.where(_live(activation), R / stabilize(activation, 1e-12), 0.0)
        per_direction = c * torch.einsum("kc,bc...->bk...", basis, ratio)
        rest = R.sum(1, keepdim=True) - per_direction.sum(1, keepdim=True)
        spanned = torch.einsum("kc,bk...->bc...", basis, c)
        norm = (activation - spanned).norm(dim=1, keepdim=True)
        return torch.cat([per_direction, rest], 1), torch.cat([c, norm], 1)

    def relevance(self, R: Tensor, activation: Tensor) -> Tensor:
        return summed_over_positions(self.maps(R, activation)[0])

    def mask(self, ids, activation: Tensor) -> Tensor:
        basis = self.basis.to(activation)
        k = basis.shape[0]
        select = one_hot(ids, k + 1, activation)  # (S, B, K + 1)
        spatial = [1] * (activation.dim() - 2)
        c = self.coefficients(activation)
        weights = select[..., :k].reshape(*select.shape[:2], k, *spatial) * c[None]
        part = torch.einsum("sbk...,kc->sbc...", weights, basis)  # the chosen directions' share
        spanned = torch.einsum("bk...,kc->bc...", c, basis)
        residual = select[..., k].reshape(*select.shape[:2], 1, *spatial)
        part = part + residual * (activation - spanned)[None]
        # where the activation vanishes, its relevance (if any) goes to the residual
        live = _live(activation)[None]
        return torch.where(live, part / stabilize(activation, 1e-12)[None], residual)


def concept_values(concept: Concept, R: Tensor, activation: Tensor) -> tuple[Tensor, Tensor]:
    """Each concept's relevance map and activation map (B, n_concepts, ...) at its layer, from
    the relevance R and activation there (B, C, ...): R and the activation themselves for
    channels; a basis's shares of R, and its coefficients (the residual: its norm)."""
    if isinstance(concept, BasisConcept):
        return concept.maps(R, activation)
    if isinstance(concept, ChannelConcept):
        return R, activation
    raise TypeError(f"no relevance maps for {type(concept).__name__} concepts")


def ablated(concept: Concept, activation: Tensor, keep: Tensor) -> Tensor:
    """The activation (B, C, ...) with the concepts where ``keep`` (B, n_concepts) is 0
    removed: a channel zeroed; a direction k's component ``c_k basis_k`` subtracted, the
    residual's ``a - basis^T c`` likewise (all removed: zero)."""
    spatial = [1] * (activation.dim() - 2)
    keep = keep.to(activation)
    if isinstance(concept, ChannelConcept):
        return activation * keep.reshape(*keep.shape, *spatial)
    if not isinstance(concept, BasisConcept):
        raise TypeError(f"{type(concept).__name__} concepts cannot be ablated")
    basis = concept.basis.to(activation)
    c = concept.coefficients(activation)
    removed = (1 - keep).reshape(*keep.shape, *spatial)
    spanned = torch.einsum("bk...,kc->bc...", c, basis)
    directions = torch.einsum("bk...,kc->bc...", removed[:, :-1] * c, basis)
    return activation - directions - removed[:, -1:] * (activation - spanned)


def _live(activation: Tensor) -> Tensor:
    """Where an activation is large enough to divide by."""
    return activation.abs() > 1e-12
