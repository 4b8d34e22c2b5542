"""Attribution graphs: a concept decomposed into the most relevant concepts of the layers
that feed it, recursively, following the model's own graph (residual and parallel branches
included)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from crp_toolkit.concepts.concepts import ChannelConcept, Concept, concept_on
from crp_toolkit.concepts.conditional import propagate_conditioned
from crp_toolkit.engine.explanation import resolve_target
from crp_toolkit.engine.graph import Graph
from crp_toolkit.engine.layout import feature_axes
from crp_toolkit.engine.lrp import LRP


@dataclass(frozen=True, order=True)
class ConceptNode:
    """A channel ``concept`` of ``layer``."""

    layer: str
    concept: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.concept}"


@dataclass
class AttributionGraph:
    """Nodes (deduplicated) with their relevance, and edges (parent, child, fraction): the
    share of the parent's relevance that flows through the child concept."""

    root: ConceptNode
    target: int
    relevance: dict[ConceptNode, float] = field(default_factory=dict)
    edges: list[tuple[ConceptNode, ConceptNode, float]] = field(default_factory=list)

    @property
    def nodes(self) -> list[ConceptNode]:
        return list(self.relevance)

    def children(self, node: ConceptNode) -> list[tuple[ConceptNode, float]]:
        return [(c, f) for p, c, f in self.edges if p == node]


def feeding_layers(graph: Graph, index: int, candidates: set[int]) -> list[int]:
    """The nearest candidate layers upstream of layer ``index`` along every path."""
    found: set[int] = set()
    stack, seen = list(graph.layers[index].inputs), set()
    while stack:
        i = stack.pop()
        if i < 0 or i in seen:
            continue
        seen.add(i)
        if i in candidates:
            found.add(i)
        else:
            stack.extend(graph.layers[i].inputs)
    return sorted(found)


def attribution_graph(
    analyzer: LRP,
    x: Tensor,
    layer: str,
    concept: int,
    *,
    target: int | None = None,
    widths: Sequence[int] = (3, 2),
    layers: Sequence[str] | None = None,
) -> AttributionGraph:
    """Decompose ``concept`` of ``layer`` for one input ``x`` (1, ...), explaining ``target``
    (argmax by default): at each level, the ``widths[level]`` most relevant concepts of each
    feeding layer, conditioned on the parent concept. ``layers`` restricts which layers hold
    concepts (default: every conv and dense layer); a concept is a channel, along each
    layer's feature axis (a token layer's features, see ``engine.layout``)."""
    if x.shape[0] != 1:
        raise ValueError(
            f"attribution graphs explain one input at a time, got a batch of {x.shape[0]}"
        )
    graph = analyzer.graph
    axes = feature_axes(analyzer, x.shape[1:])
    candidates = _concept_layers(graph, axes, layers) | {graph.index(layer)}

    def channels(index: int) -> Concept:
        return concept_on(ChannelConcept(), axes[index], graph.layers[index].name)

    fp = analyzer.forward(x, reuse=True, keep=candidates)
    y = int(resolve_target(fp.output, target)[0])
    init = {graph.output_layer: analyzer.output_relevance(fp.output, torch.tensor([y]))[None]}
    root = ConceptNode(layer, concept)
    channels(graph.index(layer)).check([concept], fp.value(graph.index(layer)), layer)
    result = AttributionGraph(root, y)
    frontier = [root]
    for width in widths:
        next_frontier: list[ConceptNode] = []
        for name in dict.fromkeys(n.layer for n in frontier):
            index = graph.index(name)
            parents = [n for n in frontier if n.layer == name]
            feeders = feeding_layers(graph, index, candidates)
            ids = [[[p.concept]] for p in parents]
            masks = {index: channels(index).mask(ids, fp.value(index))}
            _, recorded = propagate_conditioned(analyzer, fp, init, masks, record=[index, *feeders])
            for s, parent in enumerate(parents):
                score = channels(index).relevance(recorded[index][s], fp.value(index))[0]
                total = result.relevance[parent] = float(score[parent.concept])
                for feeder in feeders:
                    child_scores = channels(feeder).relevance(
                        recorded[feeder][s], fp.value(feeder)
                    )[0]
                    for c in child_scores.topk(min(width, len(child_scores))).indices.tolist():
                        child = ConceptNode(graph.layers[feeder].name, c)
                        fraction = float(child_scores[c]) / total if total else 0.0
                        result.edges.append((parent, child, fraction))
                        if child not in result.relevance and child not in next_frontier:
                            next_frontier.append(child)
        frontier = next_frontier
    for node in frontier:  # leaves: their relevance under their own condition
        index = graph.index(node.layer)
        result.relevance.setdefault(node, _marginal(analyzer, fp, init, node, channels(index)))
    return result


def _concept_layers(graph: Graph, axes: dict, layers: Sequence[str] | None) -> set[int]:
    """The indices of ``layers``, by default every conv and dense layer with a feature axis."""
    if layers is None:
        return {la.index for la in graph.layers if la.op.parametric and axes[la.index] is not None}
    return {graph.index(n) for n in layers}


def _marginal(analyzer: LRP, fp, init, node: ConceptNode, channels: Concept) -> float:
    index = analyzer.graph.index(node.layer)
    pending, _ = analyzer.propagate(fp, init, stop=index)
    scores = channels.relevance(pending[index][0], fp.value(index))
    return float(scores[0, node.concept])
