"""Attribution graphs: a concept decomposed into the most relevant concepts of the layers
that feed it, recursively, following the model's own graph (residual and parallel branches
included). A layer's concepts are its channels, or a learned basis's directions and residual
(``concepts=``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from crp_toolkit.concepts.basis import split_concept_layer
from crp_toolkit.concepts.concepts import ChannelConcept, Concept, concept_on
from crp_toolkit.concepts.conditional import propagate_conditioned
from crp_toolkit.engine.explanation import resolve_target
from crp_toolkit.engine.graph import Graph
from crp_toolkit.engine.layout import feature_axes
from crp_toolkit.engine.lrp import LRP, ForwardPass


@dataclass(frozen=True, order=True)
class ConceptNode:
    """Concept ``concept`` of ``layer``: a channel, or of a concept layer of a learned basis
    (``features.12@nmf16``) a direction (the residual last)."""

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
    concepts: Mapping[str, Concept] | None = None,
) -> AttributionGraph:
    """Decompose ``concept`` of ``layer`` for one input ``x`` (1, ...), explaining ``target``
    (argmax by default): at each level, the ``widths[level]`` most relevant concepts of each
    feeding layer, conditioned on the parent concept. ``layers`` restricts which layers hold
    concepts (default: every conv and dense layer that relevance reaches); a concept is a
    channel, along each layer's feature axis (a token layer's features, see
    ``engine.layout``), unless
    ``concepts`` gives a layer others: a learned basis (``ConceptBasis.concept()``: its
    directions and residual), keyed by the name its nodes carry, ``"features.12@nmf16"``
    (the model layer before the ``@``) or the model layer's own. ``layer`` is such a name."""
    if x.shape[0] != 1:
        raise ValueError(
            f"attribution graphs explain one input at a time, got a batch of {x.shape[0]}"
        )
    held = _held_concepts(analyzer, x.shape[1:], layer, layers, concepts or {})
    graph, index_of = analyzer.graph, {name: i for i, (name, _) in held.items()}
    fp = analyzer.forward(x, reuse=True, keep=set(held))
    y = int(resolve_target(fp.output, target)[0])
    init = {graph.output_layer: analyzer.output_relevance(fp.output, torch.tensor([y]))[None]}
    root = ConceptNode(layer, concept)
    held[index_of[layer]][1].check([concept], fp.value(index_of[layer]), layer)
    result = AttributionGraph(root, y)
    frontier = [root]
    for width in widths:
        next_frontier: list[ConceptNode] = []
        for name in dict.fromkeys(n.layer for n in frontier):
            parents = [n for n in frontier if n.layer == name]
            for child in _expand(analyzer, fp, init, held, index_of[name], parents, width, result):
                if child not in result.relevance and child not in next_frontier:
                    next_frontier.append(child)
        frontier = next_frontier
    for node in frontier:  # leaves: their relevance under their own condition
        index = index_of[node.layer]
        result.relevance.setdefault(node, _marginal(analyzer, fp, init, index, node, held))
    return result


def _held_concepts(
    analyzer: LRP,
    input_shape: Sequence[int],
    root: str,
    layers: Sequence[str] | None,
    concepts: Mapping[str, Concept],
) -> dict[int, tuple[str, Concept]]:
    """Per layer holding concepts (by index): the name its nodes carry and its concepts on
    its feature axis. A layer given ``concepts`` holds those (under their name); two for one
    layer, or a root named otherwise than its layer's concepts, are refused."""
    graph = analyzer.graph
    axes = feature_axes(analyzer, input_shape)
    given = {graph.index(split_concept_layer(name)[0]): name for name in concepts}
    if len(given) < len(concepts):
        raise ValueError(
            f"concepts names several concept sets for one layer ({sorted(concepts)}): give "
            "one per layer"
        )
    root_index = graph.index(split_concept_layer(root)[0])
    indices = _concept_layers(analyzer, axes, layers) | {root_index} | set(given)
    analyzer.refuse_unreached(indices)
    held = {}
    for i in indices:
        name = given.get(i, graph.layers[i].name)
        found = concepts.get(name, ChannelConcept())
        held[i] = name, concept_on(found, axes[i], graph.layers[i].name)
    if held[root_index][0] != root:
        raise ValueError(
            f"the root layer {root!r} holds {held[root_index][0]!r}'s concepts here: name it "
            f"{held[root_index][0]!r}, or give its concepts as concepts={{{root!r}: ...}}"
        )
    return held


def _expand(
    analyzer: LRP,
    fp: ForwardPass,
    init: dict,
    held: dict[int, tuple[str, Concept]],
    index: int,
    parents: list[ConceptNode],
    width: int,
    result: AttributionGraph,
) -> list[ConceptNode]:
    """One level below the ``parents`` (concepts of layer ``index``): each parent's relevance
    and its ``width`` most relevant children in every feeding layer, as edges of ``result``;
    returns the children."""
    feeders = feeding_layers(analyzer.graph, index, set(held))
    concept = held[index][1]
    masks = {index: concept.mask([[[p.concept]] for p in parents], fp.value(index))}
    _, recorded = propagate_conditioned(analyzer, fp, init, masks, record=[index, *feeders])
    children = []
    for s, parent in enumerate(parents):
        score = concept.relevance(recorded[index][s], fp.value(index))[0]
        total = result.relevance[parent] = float(score[parent.concept])
        for feeder in feeders:
            name, below = held[feeder]
            scores = below.relevance(recorded[feeder][s], fp.value(feeder))[0]
            for c in scores.topk(min(width, len(scores))).indices.tolist():
                child = ConceptNode(name, c)
                result.edges.append((parent, child, float(scores[c]) / total if total else 0.0))
                children.append(child)
    return children


def _concept_layers(analyzer: LRP, axes: dict, layers: Sequence[str] | None) -> set[int]:
    """The indices of ``layers``, by default every conv and dense layer with a feature axis
    that relevance reaches."""
    if layers is None:
        reached = analyzer.reachable()
        return {
            la.index
            for la in analyzer.graph.layers
            if la.op.parametric and axes[la.index] is not None and la.index in reached
        }
    return {analyzer.graph.index(n) for n in layers}


def _marginal(
    analyzer: LRP, fp, init, index: int, node: ConceptNode, held: dict[int, tuple[str, Concept]]
) -> float:
    pending, _ = analyzer.propagate(fp, init, stop=index)
    scores = held[index][1].relevance(pending[index][0], fp.value(index))
    return float(scores[0, node.concept])
