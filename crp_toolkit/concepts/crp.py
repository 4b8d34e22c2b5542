"""``CRP(analyzer, layer, features)``: per-concept heatmaps of one layer's top or chosen
concepts, as in RelevancePropagation.jl, plus concept relevance vectors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from crp_toolkit.concepts.concepts import ChannelConcept, Concept, concept_on
from crp_toolkit.concepts.conditional import propagate_conditioned
from crp_toolkit.engine.explanation import Explanation, resolve_target
from crp_toolkit.engine.layout import feature_axes
from crp_toolkit.engine.lrp import LRP


@dataclass(frozen=True)
class TopNFeatures:
    """The ``n`` most relevant concepts of each sample."""

    n: int

    def select(self, scores: Tensor, layer: str) -> Tensor:
        if not 0 < self.n <= scores.shape[1]:
            raise ValueError(
                f"TopNFeatures({self.n}) asks for more concepts than layer {layer!r} has "
                f"({scores.shape[1]}); choose 1..{scores.shape[1]}"
            )
        return scores.topk(self.n, dim=1).indices


class IndexedFeatures:
    """The same chosen concepts for every sample: ``IndexedFeatures(1, 2, 10)``."""

    def __init__(self, *ids: int) -> None:
        if not ids:
            raise ValueError("IndexedFeatures needs at least one concept id")
        self.ids = tuple(int(i) for i in ids)

    def select(self, scores: Tensor, layer: str) -> Tensor:
        bad = [i for i in self.ids if not 0 <= i < scores.shape[1]]
        if bad:
            raise ValueError(
                f"concept ids {bad} out of range for layer {layer!r}: valid ids are "
                f"0..{scores.shape[1] - 1}"
            )
        return torch.tensor(self.ids, device=scores.device).expand(scores.shape[0], -1)

    def __repr__(self) -> str:
        return f"IndexedFeatures{self.ids}"


@dataclass(kw_only=True)
class CRPExplanation(Explanation):
    """An ``Explanation`` with one row per (sample, chosen feature): ``relevance`` is
    (batch, n_features, *input shape) and ``heatmaps`` (batch, n_features, H, W);
    ``features``: the concept ids (batch, n_features); ``scores``: relevance of every
    concept of the layer (batch, n_concepts); ``relevances[layer]``: (batch, n_features,
    ...) for the recorded layers, ``activations[layer]`` (batch, ...)."""

    relevance: Tensor
    features: Tensor
    scores: Tensor

    cases: ClassVar[int] = 2


class CRP:
    """Concept relevance propagation of one layer's concepts.

    All concepts of a batch share one forward pass and the relevance pass above ``layer``;
    the rest is batched over concepts within ``memory_budget`` bytes.
    """

    def __init__(
        self,
        analyzer: LRP,
        layer: str,
        features: TopNFeatures | IndexedFeatures,
        *,
        concept: Concept | None = None,
        exclude_parallel: bool = True,
        memory_budget: int = 2**30,
    ) -> None:
        self.analyzer = analyzer
        self.layer = layer
        self.index = analyzer.graph.index(layer)
        self.features = features
        self.concept = concept or ChannelConcept()
        self.exclude_parallel = exclude_parallel
        self.memory_budget = memory_budget

    def __call__(
        self,
        x: Tensor,
        target: int | Sequence[int] | Tensor | None = None,
        *,
        record: Sequence[str] = (),
    ) -> CRPExplanation:
        """Conditional heatmaps of the chosen features for ``target`` (argmax when None);
        ``record``: layers whose conditional relevance and activation to keep."""
        an = self.analyzer
        recorded = [an.graph.index(name) for name in record]
        fp = an.forward(x, reuse=True, keep=[self.index, *recorded])
        target = resolve_target(fp.output, target)
        init = {an.graph.output_layer: an.output_relevance(fp.output, target)[None]}
        pending, above = an.propagate(fp, init, record=recorded, stop=self.index)
        activation = fp.value(self.index)
        concept = concept_on(self.concept, feature_axes(an, x.shape[1:])[self.index], self.layer)
        scores = concept.relevance(pending[self.index][0], activation)
        chosen = self.features.select(scores, self.layer)  # (B, n)
        ids = [[[int(c)] for c in chosen[:, k]] for k in range(chosen.shape[1])]
        masks = {self.index: concept.mask(ids, activation)}
        heat, below = propagate_conditioned(
            an,
            fp,
            pending,
            masks,
            record=[i for i in recorded if i not in above],
            exclude_parallel=self.exclude_parallel,
            memory_budget=self.memory_budget,
        )
        n = chosen.shape[1]  # relevance above the condition is the same for every feature
        layers = {i: r.expand(n, *r.shape[1:]) for i, r in above.items()} | below
        return CRPExplanation(
            relevance=heat.transpose(0, 1),
            output=fp.output,
            target=target,
            relevances={an.graph.layers[i].name: r.transpose(0, 1) for i, r in layers.items()},
            activations={name: fp.value(i) for name, i in zip(record, recorded)},
            features=chosen,
            scores=scores,
        )

    def __repr__(self) -> str:
        return f"CRP(layer={self.layer!r}, features={self.features!r}, concept={self.concept!r})"


def concept_relevances(
    analyzer: LRP,
    x: Tensor,
    layers: Sequence[str],
    target: int | Sequence[int] | Tensor | None = None,
    *,
    abs_norm: bool = False,
    concept: Concept | None = None,
) -> dict[str, Tensor]:
    """Relevance of every concept of each layer (summed over space), (B, n_concepts) per
    layer, from one explanation; ``abs_norm`` divides by the sum of absolute values."""
    axes = feature_axes(analyzer, x.shape[1:])
    expl = analyzer(x, target, record=layers)
    out = {}
    for name in layers:
        on = concept_on(concept or ChannelConcept(), axes[analyzer.graph.index(name)], name)
        scores = on.relevance(expl.relevances[name], expl.activations[name])
        if abs_norm:
            scores = scores / scores.abs().sum(1, keepdim=True).clamp_min(1e-12)
        out[name] = scores
    return out
