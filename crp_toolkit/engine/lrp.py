"""The LRP analyzer: one forward pass that keeps what the rules need, then an explicit
relevance pass over the traced graph, one transposed op per layer.

Unlike hook-based implementations, the relevance pass never re-runs a layer's forward for
rules whose denominator is the layer's own output (epsilon, zero, pass), never computes a
gradient it throws away, and builds no autograd graph at all. Relevance tensors carry a
leading concept axis ``(K, B, ...)`` so many conditional relevances share one forward pass
(see ``crp_toolkit.concepts``).
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from crp_toolkit.engine import domain as domains
from crp_toolkit.engine.composites import Composite, GlobalMap
from crp_toolkit.engine.explanation import explain_lrp
from crp_toolkit.engine.graph import Graph, Layer, UnsupportedLayerError, trace
from crp_toolkit.engine.memory import (
    MemoryPlan,
    frontier,
    last_uses,
    memory_plan,
    reached_layers,
    stand_in,
)
from crp_toolkit.engine.rules import LayerValues, ParamView, Reads, Rule, ZeroRule

_NONNEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_NONNEGATIVE_CALLS = {torch.relu, torch.nn.functional.relu, torch.sigmoid, "relu", "sigmoid"}
_NOT_INPLACE = {operator.iadd: operator.add, operator.imul: operator.mul}
# how many memory plans (and measured sizes) an analyzer remembers, by input shape, stop layer
# and kept layers; a plan takes a few milliseconds to make again
REMEMBERED = 64


@dataclass
class ForwardPass:
    """What one forward pass leaves for the relevance pass.

    ``values`` maps fx nodes to their outputs (only those the relevance pass needs survive,
    as ``plan`` says, from what each layer's rule ``reads``); ``recomputed`` holds the
    values the plan recomputes, from the first rule that reads one until its last reader has
    run (``at``: the layer the relevance pass is at); ``cache`` holds, per layer, what its
    rule keeps (denominators) when several relevance passes reuse it; ``stashed``, what
    rules' ``stash`` kept (gradient domain).
    """

    graph: Graph
    values: dict[fx.Node, object]
    output: Tensor
    plan: MemoryPlan
    reads: list[Reads]
    reuse: bool = False
    cache: dict[int, dict] = field(default_factory=dict)  # by layer, what its rule keeps
    pooled: dict[int, tuple[Tensor, torch.Size]] = field(default_factory=dict)  # max indices
    recomputed: dict[fx.Node, object] = field(default_factory=dict)
    stashed: dict[int, object] = field(default_factory=dict)
    at: int = 1 << 62

    def node(self, index: int) -> fx.Node:
        """The fx node of layer ``index`` (-1: the model's input)."""
        return self.graph.input_node if index < 0 else self.graph.layers[index].node

    def value(self, index: int) -> Tensor:
        return self.get(self.node(index))  # type: ignore[return-value]

    def inputs(self, layer: Layer) -> list[Tensor]:
        return [self.value(i) for i in layer.inputs]

    def get(self, node: fx.Node) -> object:
        """The value of ``node``: kept, or recomputed from kept values (held while a rule
        below the current layer still reads it)."""
        program = self.plan.recomputes.get(node)
        if program is None:
            return self.values[node]
        if node in self.recomputed:
            return self.recomputed[node]
        local: dict[fx.Node, object] = {}
        env = collections.ChainMap(local, self.recomputed, self.values)
        with torch.no_grad():
            for step in program:
                if step not in self.recomputed:
                    local[step] = _run_node(self.graph, step, env)
                    if self.plan.last_reader.get(step, self.at + 1) <= self.at:
                        self.recomputed[step] = local[step]  # a rule below reads it too
        return env[node]

    def argument(self, node: fx.Node) -> object:
        """The value of ``node`` as a call argument: None where the forward pass freed it
        (a rule that does not read a tensor may still read the call's other arguments)."""
        try:
            return self.get(node)
        except KeyError:
            return None

    def release(self, index: int) -> None:
        """Drop the recomputed values whose last reader is layer ``index``."""
        for node in self.plan.dropped_after.get(index, ()):
            self.recomputed.pop(node, None)


class LRP:
    """Layer-wise relevance propagation for a PyTorch model.

    ``LRP(model, composite)`` traces the model, assigns a rule to every layer and refuses
    anything it cannot explain before running. ``analyzer(x, target)`` (or
    ``ct.analyze(x, analyzer, target)``) returns an :class:`Explanation`.
    The caller's model is never modified.

    ``recompute`` (default True): the relevance pass computes cheap values again (activations,
    norms, re-indexing, sums, attention weights) instead of the forward pass keeping them,
    where that keeps fewer bytes (see ``crp_toolkit.engine.memory``): the relevance is bit
    for bit the same; on vit_b_16 the kept tensors fall to 50% for about 2% more time.
    False keeps every value a rule reads. Several relevance passes over one forward pass
    (CRP) always keep them.

    ``domain`` (default "auto"): "gradient" carries ``G`` with relevance ``R = z * G`` at each
    layer's output ``z`` through the pass (input times a modified gradient, as LXT), using
    the rules' gradient forms, which read less of the forward pass: an LRP-0 dense layer or
    sum reads nothing, so under ``CPLRP(epsilon=0)`` vit_b_16 keeps 169 MiB where the
    relevance domain keeps 282 (224x224, batch 4), and the same relevance up to rounding.
    Relevance is formed (``a * G``) only where it is returned or recorded. "relevance"
    carries ``R``; "auto" takes the gradient domain where every rule has a
    gradient form (stabilizer-free rules and routing: ``Rule.gradient_reads``).
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None = None,
        *,
        normalize_output_relevance: bool = True,
        recompute: bool = True,
        domain: str = "auto",
    ) -> None:
        self.model = model
        self.recompute = recompute
        self.composite = composite if composite is not None else Composite(GlobalMap(ZeroRule()))
        self.normalize_output_relevance = normalize_output_relevance
        self.graph = trace(model)
        _refuse_softmax_output(self.graph)
        self.rules: list[Rule] = _checked_rules(self.graph, self.composite.assign(self.graph))
        self._nonnegative = _nonnegative_layers(self.graph)
        self._params = _ParamCache()
        self.domain = domains.resolve(domain, self.graph, self.rules)
        self._divides = [
            rule.divides_by_output(layer)
            for layer, rule in zip(self.graph.layers, self.rules, strict=True)
        ]
        self._stashing = {
            layer.node: layer
            for layer, rule in zip(self.graph.layers, self.rules, strict=True)
            if self.domain == "gradient" and rule.stashes(layer)
        }
        self._passes = [
            rule.passes_to(layer) for layer, rule in zip(self.graph.layers, self.rules, strict=True)
        ]
        self._pools = {
            layer.node: layer
            for layer in self.graph.layers
            if layer.op.reports_indices(layer.module)
        }
        # memory plans by the layer the relevance pass stops at, the layers kept, reuse and
        # the input's shape (batch aside) where its values' sizes are known (bytes per node)
        self._plans: dict[tuple, tuple[MemoryPlan, list[Reads]]] = {}
        self._sizes: dict[tuple, dict[fx.Node, int]] = {}
        self._last_uses = last_uses(self.graph.module.graph)

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self, x: Tensor, *, reuse: bool = False, keep: Iterable[int] = (), above: int = -1
    ) -> ForwardPass:
        """Run the model once, keeping the tensors the relevance pass will need.

        ``reuse``: several relevance passes will follow (nothing is freed, denominators are
        cached); ``keep``: layer indices whose outputs must survive (recorded activations);
        ``above``: the relevance pass will stop at this layer (``propagate(stop=above)``), so
        what only the layers up to it would read is freed as in a plain forward. Relevance
        passes over the result start at the output or at layers in ``keep``: what only layers
        that relevance cannot reach from there would read is freed too, and what is read only
        for its shape is kept as a one-element stand-in of that shape.
        """
        _check_input(x, self.graph)
        _check_eval_mode(self.model)
        graph, gm = self.graph, self.graph.module
        recompute = self.recompute and not reuse  # several passes: keep all
        shape = (tuple(x.shape[1:]), x.dtype, x.device)  # sizes scale with the batch
        sizes = self._sizes.get(shape) if recompute else None
        known = shape if sizes is not None else None
        plan, reads = self._plan(set(keep), above, reuse, recompute, known)
        measured: dict[fx.Node, int] | None = {} if recompute and sizes is None else None
        values: dict[fx.Node, object] = {graph.input_node: x.detach()}
        fp = ForwardPass(graph, values, x, plan, reads, reuse)  # output set below
        with torch.no_grad():
            for node in gm.graph.nodes:
                if node.op in ("placeholder", "output"):
                    continue
                try:
                    values[node] = self._run_forward(node, fp, above)
                except RuntimeError as err:
                    raise ValueError(
                        f"input of shape {tuple(x.shape)} does not fit the model: "
                        f"{node.op} {node.target!r} failed with: {err}"
                    ) from err
                if measured is not None and isinstance(values[node], Tensor):
                    measured[node] = values[node].nbytes  # type: ignore[union-attr]
                for done in self._last_uses.get(node, ()):
                    if done in plan.shaped:
                        values[done] = stand_in(values[done])  # type: ignore[arg-type]
                    elif done not in plan.kept:
                        values.pop(done, None)
        if measured is not None:
            _remember(self._sizes, shape, measured)  # later passes on this shape plan with sizes
        fp.output = values[graph.layers[graph.output_layer].node]  # type: ignore[assignment]
        return fp

    def _plan(
        self, keep: set[int], above: int, reuse: bool, recompute: bool, shape: tuple | None
    ) -> tuple[MemoryPlan, list[Reads]]:
        """The memory plan (cached) for passes from the output and ``keep`` down to ``above``,
        and what each rule reads in them. In the gradient domain the layers where such a pass
        leaves relevance are kept too, as relevance is formed there from their values (with
        ``reuse``, every layer relevance reaches: passes may stop anywhere). ``shape``: the
        input's, where the sizes of its values are known (``self._sizes``)."""
        key = (above, frozenset(keep), reuse, shape)
        if key not in self._plans:
            starts = self._starts(keep, above, reuse)
            relevance = domains.relevance_layers(self.graph, self.rules, self._passes, starts)
            reads = domains.layer_reads(self.graph, self.rules, self.domain, relevance)
            plan = memory_plan(
                self.graph,
                reads,
                self._passes,
                starts=starts,
                above=above,
                recompute=recompute,
                sizes=self._sizes.get(shape) if shape is not None else None,
            )
            _remember(self._plans, key, (plan, reads))
        return self._plans[key]

    def _starts(self, keep: set[int], above: int, reuse: bool) -> set[int]:
        """The layers whose values a plan keeps for relevance passes from the output and
        ``keep``: those, and in the gradient domain the frontier at ``above`` (with ``reuse``,
        every layer relevance reaches)."""
        starts = {self.graph.output_layer, *keep}
        if self.domain == "gradient" and reuse:
            return {i for i in reached_layers(self.graph, self._passes, starts) if i >= 0}
        if self.domain == "gradient":
            starts |= frontier(self.graph, self._passes, starts, above)
        return starts

    def _run_forward(self, node: fx.Node, fp: ForwardPass, above: int) -> object:
        """One node of the forward pass; max-pooling modules the relevance pass will reach
        also leave their indices, and rules that stash (gradient domain) their summary."""
        values = fp.values
        layer = self._pools.get(node)
        if layer is not None and layer.index > above:
            x = values[node.all_input_nodes[0]]
            out, indices = layer.op.pool_with_indices(layer.module, x)
            fp.pooled[layer.index] = (indices, x.shape)
            return out
        out = _run_node(self.graph, node, values)
        layer = self._stashing.get(node)
        if layer is not None and layer.index > above:
            seen = LayerValues(
                layer=layer,
                inputs=[values[fp.node(i)] for i in layer.inputs],  # type: ignore[misc]
                output=out,  # type: ignore[arg-type]
                evaluate=_evaluator(fp, layer),
                nonnegative=False,
                pooled=None,
                params=self._params.view(layer.index),
                cache=None,
                arguments=lambda: fx.node.map_arg((node.args, node.kwargs), values.__getitem__),
            )
            fp.stashed[layer.index] = self.rules[layer.index].stash(seen)
        return out

    # -- relevance ---------------------------------------------------------------------------
    @torch.no_grad()
    def propagate(
        self,
        fp: ForwardPass,
        pending: dict[int, Tensor],
        *,
        masks: Mapping[int, Tensor] | None = None,
        record: Iterable[int] = (),
        exclusive: Iterable[int] = (),
        stop: int = -1,
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Propagate relevance from the layers in ``pending`` down to layer ``stop``.

        ``pending`` maps layer index -> relevance (K, B, ...) arriving at its output.
        ``masks`` multiply the relevance at a layer's output; ``record`` keeps the relevance
        arriving at a layer (before its mask); at an ``exclusive`` layer all relevance that
        bypasses it is dropped, and so is what was recorded in parallel to it. Returns the
        relevance still pending (at ``stop``; with ``stop=-1``, at the input under key -1) and
        the recorded relevances. In the gradient domain the pass carries ``G`` (``R = z * G``)
        and forms relevance where it records and returns it.
        """
        if self.domain == "gradient":
            _check_kept(fp, pending)
        pending = domains.Pending(pending, fp.value)
        masks = masks or {}
        record, exclusive = set(record), set(exclusive)
        recorded: dict[int, Tensor] = {}
        start = max(pending) if pending else -1
        for index in range(start, stop, -1):
            fp.at = index
            R, gradient = pending.pop(index)
            if R is None:
                fp.release(index)
                continue
            if index in record:
                recorded[index] = fp.value(index) * R if gradient else R
            if index in masks:
                R = R * masks[index]
            if index in exclusive:  # only relevance through this layer goes on
                pending.clear()
                downstream = self.graph.descendants(index) | {index}
                recorded = {i: r for i, r in recorded.items() if i in downstream}
            layer = self.graph.layers[index]
            out, gradient = self._step(fp, layer, R, gradient)
            for source, r in zip(layer.inputs, out, strict=True):
                if r is not None:
                    pending.add(source, r, gradient)
            if not fp.reuse:
                fp.values.pop(layer.node, None)
            fp.release(index)
        return pending.relevance(), recorded

    def _step(
        self, fp: ForwardPass, layer: Layer, R: Tensor, gradient: bool
    ) -> tuple[list[Tensor | None], bool]:
        """One layer of the pass: its rule's gradient form for ``G`` (``gradient``), and for
        relevance where the rule divides by its output (it enters the gradient domain);
        else its relevance form. Returns what reaches the inputs and whether it is ``G``."""
        if self.domain == "gradient" and not gradient and self._divides[layer.index]:
            R, gradient = domains.entered(R, fp.value(layer.index)), True
        if gradient:
            return self.gradient_in(fp, layer, R), True
        return self.relevance_in(fp, layer, R), False

    @torch.no_grad()
    def relevance_in(self, fp: ForwardPass, layer: Layer, R: Tensor) -> list[Tensor | None]:
        """Relevance at each input of ``layer`` given relevance ``R`` at its output: the
        layer's rule computes it from what the forward pass kept for it."""
        return self.rules[layer.index].relevance_in(self._layer_values(fp, layer), R)

    @torch.no_grad()
    def gradient_in(self, fp: ForwardPass, layer: Layer, G: Tensor) -> list[Tensor | None]:
        """The gradient domain's step: ``G`` at each input of ``layer`` given ``G`` at its
        output (``Rule.gradient_in``)."""
        return self.rules[layer.index].gradient_in(self._layer_values(fp, layer), G)

    def _layer_values(self, fp: ForwardPass, layer: Layer) -> LayerValues:
        """What the layer's rule reads, from the forward pass."""
        reads_inputs, reads_output, _ = fp.reads[layer.index]
        return LayerValues(
            layer=layer,
            inputs=fp.inputs(layer) if reads_inputs else [],
            output=fp.value(layer.index) if reads_output else None,
            evaluate=_evaluator(fp, layer),
            nonnegative=all(i in self._nonnegative for i in layer.inputs),
            pooled=fp.pooled.get(layer.index),
            params=self._params.view(layer.index),
            cache=fp.cache.setdefault(layer.index, {}) if fp.reuse else None,
            arguments=lambda: fx.node.map_arg((layer.node.args, layer.node.kwargs), fp.argument),
            stash=fp.stashed.get(layer.index),
        )

    def reachable(self, starts: Iterable[int] | None = None) -> set[int]:
        """The layers relevance from ``starts`` (layer indices; the output by default) arrives
        at, as the rules declare (under CP-LRP, not the q and k projections: the attention
        weights are constants)."""
        starts = {self.graph.output_layer} if starts is None else set(starts)
        return reached_layers(self.graph, self._passes, starts)

    def refuse_unreached(self, layers: Iterable[int], starts: Iterable[int] | None = None) -> None:
        """Raise, naming them, if relevance from ``starts`` (the output) reaches none of
        ``layers``: relevance there would be zero whatever the input."""
        reached = self.reachable(starts)
        unreached = sorted(self.graph.layers[i].name for i in set(layers) - reached)
        if unreached:
            raise ValueError(
                f"no relevance reaches {unreached} under this analyzer's rules (CP-LRP, for one, "
                "holds attention weights constant, so q and k projections get none): choose "
                "layers that relevance reaches"
            )

    # -- explanation -------------------------------------------------------------------------
    def __call__(self, x: Tensor, target: int | Sequence[int] | Tensor | None = None, **kwargs):
        """``analyzer(x, target, record=..., to_input=...)``: see ``ct.analyze``."""
        return explain_lrp(self, x, target, **kwargs)

    def output_relevance(self, output: Tensor, target: Tensor) -> Tensor:
        """Relevance at the output: one-hot at ``target`` (value 1, or the logit)."""
        R = torch.zeros_like(output)
        value = output.gather(1, target[:, None]) if not self.normalize_output_relevance else 1.0
        R.scatter_(1, target[:, None], value)
        return R

    def __repr__(self) -> str:
        width = max((len(layer.name) for layer in self.graph.layers), default=4)
        lines = [f"LRP({type(self.model).__name__}, {type(self.composite).__name__}) with rules:"]
        for layer, rule in zip(self.graph.layers, self.rules, strict=True):
            lines.append(
                f"  {layer.index:>3}  {layer.name:<{width}}  {layer.type_name:<18} {rule!r}"
            )
        return "\n".join(lines)


class _ParamCache:
    """Modified parameters (W+, W + g W+, ...) computed once per layer and term, and again
    only when the parameter changes (its version counter moves, e.g. after training steps)."""

    def __init__(self) -> None:
        self._store: dict[tuple, tuple[int, int, Tensor]] = {}

    def view(self, layer: int) -> ParamView:
        """``get(key, param, modify)`` for one layer (see ``LayerValues.params``)."""

        def get(key: tuple, param: Tensor, modify: Callable[[Tensor], Tensor]) -> Tensor:
            stamp = (param._version, param.data_ptr())
            hit = self._store.get((layer, *key))
            if hit is None or hit[:2] != stamp:
                hit = (*stamp, modify(param.detach()))
                self._store[(layer, *key)] = hit
            return hit[2]

        return get


def _remember(cache: dict, key: object, value: object) -> None:
    """``cache[key] = value``, the oldest entries dropped beyond ``REMEMBERED`` (inputs of
    many shapes do not grow it without bound)."""
    cache[key] = value
    while len(cache) > REMEMBERED:
        cache.pop(next(iter(cache)))


def _check_kept(fp: ForwardPass, pending: Mapping[int, Tensor]) -> None:
    """In the gradient domain relevance starts only at layers whose values the forward pass
    kept (the output, ``keep``): it enters as ``G = R / z``, or meets ``G`` there."""
    for index in pending:
        node = fp.node(index)
        if index >= 0 and (node not in fp.plan.kept or node in fp.plan.shaped):
            raise ValueError(
                f"relevance given at layer {index} ({fp.graph.layers[index].name!r}), whose "
                "value the forward pass did not keep; name the layer in keep= of LRP.forward"
            )


def _evaluator(fp: ForwardPass, layer: Layer):
    """A function that re-runs ``layer`` on other tensors in place of its inputs."""
    node = layer.node
    sources = [fp.graph.input_node if i < 0 else fp.graph.layers[i].node for i in layer.inputs]

    def evaluate(tensors: Sequence[Tensor]) -> Tensor:
        env = dict(fp.values)
        env.update(zip(sources, tensors, strict=True))
        return _run_node(fp.graph, node, env)

    return evaluate


def _run_node(graph: Graph, node: fx.Node, env: Mapping[fx.Node, object]):
    """Evaluate one fx node without in-place side effects on values the engine keeps."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
    if node.op == "call_module":
        return graph.submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        if "inplace" in kwargs:
            kwargs = {**kwargs, "inplace": False}
        return _NOT_INPLACE.get(node.target, node.target)(*args, **kwargs)
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and hasattr(args[0], name[:-1]):
            name = name[:-1]
        return getattr(args[0], name)(*args[1:], **kwargs)
    if node.op == "get_attr":
        return _attr(graph.module, node.target)
    raise UnsupportedLayerError(f"cannot evaluate fx node {node.op} {node.target}")


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _nonnegative_layers(graph: Graph) -> set[int]:
    """Layers whose output is non-negative by construction (ReLU and what keeps its sign)."""
    out: set[int] = set()
    keeps_sign = ("maxpool", "avgpool", "reshape", "concat", "add")
    for layer in graph.layers:
        target = layer.node.target
        if (
            isinstance(layer.module, _NONNEGATIVE)
            or (layer.module is None and target in _NONNEGATIVE_CALLS)
            or (layer.kind in keeps_sign or layer.is_identity)
            and all(i in out for i in layer.inputs)
        ):
            out.add(layer.index)
    return out


def _checked_rules(graph: Graph, rules: Sequence[Rule | None]) -> list[Rule]:
    """Every layer has a rule compatible with it, or the analyzer is refused."""
    for layer, rule in zip(graph.layers, rules, strict=True):
        where = f"layer {layer.name!r} ({layer.type_name}, kind {layer.kind!r})"
        if rule is None:
            example = {"softmax": "SoftmaxRule()", "matmul": "UniformRule()"}
            attention = layer.kind in example
            raise UnsupportedLayerError(
                f"the composite assigns no rule to {where}; add one, e.g. "
                f"TypeMap({{{layer.kind!r}: {example.get(layer.kind, 'EpsilonRule()')}}}) or "
                f"NameMap({{{layer.name!r}: ...}})"
                + ("; for attention use ct.composites.AttnLRP() or CPLRP()" if attention else "")
            )
        if not rule.is_compatible(layer):
            raise UnsupportedLayerError(
                f"{type(rule).__name__} cannot be applied to {where}; it fits {rule.fits}"
            )
    return list(rules)  # type: ignore[arg-type]


def _refuse_softmax_output(graph: Graph) -> None:
    last = graph.layers[graph.output_layer]
    if last.kind == "softmax":
        raise ValueError(
            f"the model's output ends in a softmax ({last.name!r}); LRP explains logits. "
            "Remove it first: model = crp_toolkit.strip_softmax(model)"
        )


def _check_input(x: Tensor, graph: Graph) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"input must be a floating-point torch.Tensor, got {type(x).__name__}"
            f"{'' if not isinstance(x, Tensor) else ' of dtype ' + str(x.dtype)}"
        )
    if not torch.isfinite(x.sum()):  # one reduction; any NaN or inf makes the sum non-finite
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"input contains NaN or inf (samples {bad[:10]}); clean or drop them first"
        )
    for i in graph.readers_of_input():
        module = graph.layers[i].module
        if isinstance(module, nn.modules.conv._ConvNd):
            dims = len(module.kernel_size) + 2
            if x.dim() != dims or x.shape[1] != module.in_channels:
                raise ValueError(
                    f"input of shape {tuple(x.shape)} does not fit layer {graph.layers[i].name!r}, "
                    f"which expects (batch, {module.in_channels}, ...) with {dims} dimensions"
                )
        elif isinstance(module, nn.Linear) and x.dim() == 2 and x.shape[1] != module.in_features:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit layer {graph.layers[i].name!r}, "
                f"which expects {module.in_features} features"
            )


def _check_eval_mode(model: nn.Module) -> None:
    stochastic = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    for name, module in model.named_modules():
        attention_dropout = isinstance(module, nn.MultiheadAttention) and module.dropout > 0
        if module.training and (isinstance(module, stochastic) or attention_dropout):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) is in training mode, so its output "
                "depends on the batch or on chance; call model.eval() before explaining"
            )
