"""The memory plan of a forward pass: which tensors it keeps for the relevance pass, which it
keeps only as shapes, and which the relevance pass recomputes from kept ones.

Rules declare what they read (``Rule.reads_inputs``, ``reads_output``, ``reads_input_values``)
and where they send relevance (``Rule.passes_to``); from that alone the plan frees, during the
forward pass, every value no relevance pass will read. A value that is read but cheap to
compute again (an op declared ``Op.recomputable``: activations, norms, re-indexing, sums,
softmax, products of activations) from values that are kept anyway is not kept either: the
relevance pass recomputes it when a rule first asks for it and drops it after its last
reader, as activation checkpointing does. Its chain may start at outputs no rule reads (q
and k for the attention weights), which are then kept instead of it, only where they take
fewer bytes. Dense and convolution outputs, recorded layers and the model's output are
always kept. Every value a rule sees is the one the forward pass computed (same op, same
inputs), so the relevance is bit for bit that of a pass that keeps everything.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch.fx as fx
from torch import Tensor

from crp_toolkit.engine.graph import Graph, Layer
from crp_toolkit.engine.terms import Reads

# How many recomputed values that rules read may lie on one chain of recomputation: a value is
# recomputed only from kept values and from at most three other recomputed values rules read,
# which bounds the extra work and how long recomputed values are held.
MAX_READ_ON_CHAIN = 3


@dataclass(frozen=True)
class MemoryPlan:
    """What one forward pass leaves: ``kept`` values, values kept as one-element ``shaped``
    stand-ins, and the values the relevance pass ``recomputes`` (each mapped to the nodes to
    run for it, in order); ``last_reader``: the layer after which a recomputed value is
    dropped (relevance runs from high layer indices to low); ``dropped_after``: the same by
    layer."""

    kept: frozenset[fx.Node]
    shaped: frozenset[fx.Node]
    recomputes: dict[fx.Node, tuple[fx.Node, ...]] = field(default_factory=dict)
    last_reader: dict[fx.Node, int] = field(default_factory=dict)
    dropped_after: dict[int, list[fx.Node]] = field(default_factory=dict)


def memory_plan(
    graph: Graph,
    reads: Sequence[Reads],
    passes: Sequence[tuple[int, ...]],
    *,
    starts: Collection[int],
    above: int = -1,
    recompute: bool = True,
    sizes: Mapping[fx.Node, int] | None = None,
) -> MemoryPlan:
    """The plan for relevance passes that start at ``starts`` (the output layer and recorded
    layers, whose values are kept) and stop at layer ``above``; ``reads``: per layer, whether
    its rule reads its inputs, its output, the inputs' values (all, or which); ``passes``: per
    layer, the positions of the inputs its rule hands relevance to. ``recompute=False`` keeps
    every value that is read (several relevance passes will follow). A read value may be recomputed
    from outputs no rule reads, kept instead of it where they are smaller (the attention
    weights from q and k, where there are more tokens than twice the head width): ``sizes``
    (bytes per node, from an earlier forward pass on inputs of the same shape) decide that,
    and without them values made by products of activations are assumed larger."""
    reached = reached_layers(graph, passes, set(starts))
    readers = _readers(graph, reads, reached, above)
    needed = {n for n, (_, values) in readers.items() if values}
    protected = {graph.layers[i].node for i in starts}
    layer_nodes = {layer.node for layer in graph.layers}
    always = {n for n in graph.module.graph.nodes if n not in layer_nodes}  # shapes, constants
    recomputed, roots = _recomputable(graph, needed, protected, sizes) if recompute else ({}, set())
    read_recomputed = [n for n in recomputed if n in needed]
    last_reader = {n: readers[n][0] for n in read_recomputed}
    dropped_after: dict[int, list[fx.Node]] = {}
    for node, index in last_reader.items():
        dropped_after.setdefault(index, []).append(node)
    return MemoryPlan(
        kept=frozenset(always | protected | roots | (needed - recomputed.keys())),
        shaped=frozenset(set(readers) - needed - always - protected - roots),
        recomputes={n: _program(n, recomputed) for n in read_recomputed},
        last_reader=last_reader,
        dropped_after=dropped_after,
    )


def reached_layers(
    graph: Graph, passes: Sequence[tuple[int, ...]], starts: Collection[int]
) -> set[int]:
    """Layers that relevance starting at ``starts`` can arrive at, as the rules declare
    (``passes``: per layer, the positions of the inputs its rule hands relevance to)."""
    reached = set(starts)
    for layer in reversed(graph.layers):  # execution order: inputs come before their readers
        if layer.index in reached:
            reached.update(layer.inputs[k] for k in passes[layer.index])
    return reached


def frontier(
    graph: Graph, passes: Sequence[tuple[int, ...]], starts: Collection[int], above: int
) -> set[int]:
    """The layers at or below ``above`` that relevance from ``starts`` arrives at from
    layers above it: where a relevance pass that stops at ``above`` leaves its relevance
    (the model's input aside)."""
    reached = reached_layers(graph, passes, set(starts))
    return {
        layer.inputs[k]
        for layer in graph.layers
        if layer.index > above and layer.index in reached
        for k in passes[layer.index]
        if 0 <= layer.inputs[k] <= above
    }


def _readers(
    graph: Graph, reads: Sequence[Reads], reached: set[int], above: int
) -> dict[fx.Node, tuple[int, bool]]:
    """For each fx node a relevance pass through the ``reached`` layers above ``above``
    reads: (the lowest layer index reading it, whether any reader needs its values rather
    than only its shape)."""
    out: dict[fx.Node, tuple[int, bool]] = {}

    def read(node: fx.Node, index: int, values: bool) -> None:
        lowest, had_values = out.get(node, (index, False))
        out[node] = (min(lowest, index), had_values or values)

    for layer, (reads_inputs, reads_output, values) in zip(graph.layers, reads, strict=True):
        if layer.index <= above or layer.index not in reached:
            continue
        if reads_inputs:
            valued = _valued_inputs(graph, layer, values)
            for node in layer.node.all_input_nodes:
                read(node, layer.index, valued is None or node in valued)
        if reads_output:
            read(layer.node, layer.index, True)
    out.pop(graph.input_node, None)  # the input is always kept
    return out


def _valued_inputs(
    graph: Graph, layer: Layer, values: bool | tuple[int, ...]
) -> set[fx.Node] | None:
    """The input nodes whose values a rule reads (``values``: all of them, none, or their
    positions); None for all."""
    if values is True:
        return None
    if values is False:
        return set()
    return {
        graph.input_node if i < 0 else graph.layers[i].node
        for i in (layer.inputs[k] for k in values)
    }


def _recomputable(
    graph: Graph,
    needed: set[fx.Node],
    protected: set[fx.Node],
    sizes: Mapping[fx.Node, int] | None,
) -> tuple[dict[fx.Node, int], set[fx.Node]]:
    """Layer nodes whose values can be recomputed from kept values, in execution order with
    their positions in it, and the roots to keep for them. Recomputable: recomputable ops,
    other than the ``protected`` layers (always kept), whose inputs are kept (the input,
    constants, protected layers, ``needed`` ones, read by a rule, unless recomputed
    themselves) or recomputable, with at most ``MAX_READ_ON_CHAIN`` needed values recomputed
    on the way. Inputs that no rule reads (which the forward pass would free) may be roots
    of a chain: a needed value is recomputed from them, and they are kept, where that takes
    fewer bytes (``_roots_pay``; roots kept for an earlier value are free)."""
    layers = {layer.node: layer for layer in graph.layers}
    chain: dict[fx.Node, int] = {}  # recomputable node -> needed recomputed values below it
    free: dict[fx.Node, frozenset[fx.Node]] = {}  # roots a chain node needs, not yet kept
    product: dict[fx.Node, bool] = {}  # a chain node's value comes from a product
    roots: set[fx.Node] = set()  # kept for recomputation
    for node in graph.module.graph.nodes:  # execution order
        layer = layers.get(node)
        if layer is None or node in protected or not layer.op.recomputable:
            continue
        depth, wanted = 0, set()
        via_product = layer.kind == "matmul" and len(layer.inputs) == 2  # of two activations
        for source in node.all_input_nodes:
            if source in chain:
                depth = max(depth, chain[source] + (source in needed))
                wanted |= free[source]
                via_product |= product[source]
            elif source in layers and source not in needed and source not in protected:
                wanted.add(source)  # freed by the forward pass, unless kept as a root
        wanted -= roots
        if depth > MAX_READ_ON_CHAIN:
            continue
        if node in needed and wanted:
            if not _roots_pay(node, wanted, sizes, via_product):
                continue  # keeping the value is cheaper than keeping its roots
            roots |= wanted
            wanted = set()
        chain[node], free[node], product[node] = depth, frozenset(wanted), via_product
    return {node: position for position, node in enumerate(chain)}, roots


def _roots_pay(
    node: fx.Node, roots: set[fx.Node], sizes: Mapping[fx.Node, int] | None, via_product: bool
) -> bool:
    """Whether keeping ``roots`` to recompute ``node`` takes fewer bytes than keeping
    ``node``: by ``sizes`` where they are known; otherwise assumed where the value comes from
    a product of two activations (attention weights, tokens x tokens, are larger than q and
    k in most vision transformers: 197 tokens against heads of width 64 in vit_b_16)."""
    if sizes is None:
        return via_product
    return sizes.get(node, 0) > sum(sizes.get(r, 0) for r in roots)


def _program(node: fx.Node, recomputed: dict[fx.Node, int]) -> tuple[fx.Node, ...]:
    """The recomputed nodes to run, in execution order (``recomputed``: their positions in
    it), to recompute ``node``."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(s for s in current.all_input_nodes if s in recomputed)
    return tuple(sorted(seen, key=recomputed.__getitem__))


def last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the nodes whose last forward use it is (so they can be freed)."""
    seen: set[fx.Node] = set()
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        for source in node.all_input_nodes:
            if source not in seen:
                seen.add(source)
                out.setdefault(node, []).append(source)
    return out


def stand_in(value: Tensor) -> Tensor:
    """Zeros of ``value``'s shape, dtype and device on one element of storage: all a rule
    that reads only shapes sees of a tensor."""
    return value.new_zeros(()).expand(value.shape)
