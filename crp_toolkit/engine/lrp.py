"""The LRP analyzer: one forward pass that keeps what the rules need, then an explicit
relevance pass over the traced graph, one transposed op per layer.

Unlike hook-based implementations, the relevance pass never re-runs a layer's forward for
rules whose denominator is the layer's own output (epsilon, zero, pass), never computes a
gradient it throws away, and builds no autograd graph at all. Relevance tensors carry a
leading concept axis ``(K, B, ...)`` so many conditional relevances share one forward pass
(see ``crp_toolkit.concepts``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from crp_toolkit.engine.composites import Composite, GlobalMap
from crp_toolkit.engine.graph import Graph, Layer, UnsupportedLayerError, trace
from crp_toolkit.engine.rules import (
    LayerNormRule,
    PassRule,
    Rule,
    Term,
    ZeroRule,
    negative,
    positive,
    stabilize,
)

_NONNEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_NONNEGATIVE_CALLS = {torch.relu, torch.nn.functional.relu, torch.sigmoid, "relu", "sigmoid"}
_NOT_INPLACE = {operator.iadd: operator.add, operator.imul: operator.mul}


@dataclass
class ForwardPass:
    """What one forward pass leaves for the relevance pass.

    ``values`` maps fx nodes to their outputs (only those the relevance pass needs survive);
    ``cache`` holds modified-forward denominators when several relevance passes reuse it.
    """

    graph: Graph
    values: dict[fx.Node, object]
    output: Tensor
    reuse: bool = False
    cache: dict[tuple[int, int], Tensor] = field(default_factory=dict)  # denominators
    pooled: dict[int, tuple[Tensor, torch.Size]] = field(default_factory=dict)  # max indices

    def value(self, index: int) -> Tensor:
        node = self.graph.input_node if index < 0 else self.graph.layers[index].node
        return self.values[node]  # type: ignore[return-value]

    def inputs(self, layer: Layer) -> list[Tensor]:
        return [self.value(i) for i in layer.inputs]


class LRP:
    """Layer-wise relevance propagation for a PyTorch model.

    ``LRP(model, composite)`` traces the model, assigns a rule to every layer and refuses
    anything it cannot explain before running. ``analyzer(x, target)`` (or
    ``ct.analyze(x, analyzer, target)``) returns an :class:`Explanation`.
    The caller's model is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None = None,
        *,
        normalize_output_relevance: bool = True,
    ) -> None:
        self.model = model
        self.composite = composite if composite is not None else Composite(GlobalMap(ZeroRule()))
        self.normalize_output_relevance = normalize_output_relevance
        self.graph = trace(model)
        _refuse_softmax_output(self.graph)
        self.rules: list[Rule] = _checked_rules(self.graph, self.composite.assign(self.graph))
        self._nonnegative = _nonnegative_layers(self.graph)
        self._params = _ParamCache()
        self._pools = {
            layer.node: layer
            for layer in self.graph.layers
            if layer.kind == "maxpool" and layer.op.reports_indices(layer.module)
        }
        self._needed: dict[int, set[fx.Node]] = {}  # by the layer the relevance pass stops at
        self._last_uses = _last_uses(self.graph.module.graph)

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self, x: Tensor, *, reuse: bool = False, keep: Iterable[int] = (), above: int = -1
    ) -> ForwardPass:
        """Run the model once, keeping the tensors the relevance pass will need.

        ``reuse``: several relevance passes will follow (nothing is freed, denominators are
        cached); ``keep``: layer indices whose outputs must survive (recorded activations);
        ``above``: the relevance pass will stop at this layer (``propagate(stop=above)``), so
        what only the layers up to it would read is freed as in a plain forward.
        """
        _check_input(x, self.graph)
        _check_eval_mode(self.model)
        graph, gm = self.graph, self.graph.module
        if above not in self._needed:
            pools = {node for node, layer in self._pools.items() if layer.index > above}
            self._needed[above] = _needed_values(graph, self.rules, pools, above)
        needed = self._needed[above] | {graph.layers[i].node for i in keep}
        values: dict[fx.Node, object] = {graph.input_node: x.detach()}
        pooled: dict[int, tuple[Tensor, torch.Size]] = {}
        with torch.no_grad():
            for node in gm.graph.nodes:
                if node.op in ("placeholder", "output"):
                    continue
                try:
                    values[node] = self._run_forward(node, values, pooled, above)
                except RuntimeError as err:
                    raise ValueError(
                        f"input of shape {tuple(x.shape)} does not fit the model: "
                        f"{node.op} {node.target!r} failed with: {err}"
                    ) from err
                for done in self._last_uses.get(node, ()):
                    if done not in needed:
                        values.pop(done, None)
        output = values[graph.layers[graph.output_layer].node]
        return ForwardPass(graph, values, output, reuse, pooled=pooled)  # type: ignore[arg-type]

    def _run_forward(self, node: fx.Node, values, pooled, above: int) -> object:
        """One node of the forward pass; max-pooling modules the relevance pass will reach
        also leave their indices."""
        layer = self._pools.get(node)
        if layer is not None and layer.index > above:
            x = values[node.all_input_nodes[0]]
            out, indices = layer.op.pool_with_indices(layer.module, x)
            pooled[layer.index] = (indices, x.shape)
            return out
        return _run_node(self.graph, node, values)

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
        the recorded relevances.
        """
        pending = dict(pending)
        masks = masks or {}
        record, exclusive = set(record), set(exclusive)
        recorded: dict[int, Tensor] = {}
        start = max(pending) if pending else -1
        for index in range(start, stop, -1):
            R = pending.pop(index, None)
            if R is None:
                continue
            if index in record:
                recorded[index] = R
            if index in masks:
                R = R * masks[index]
            if index in exclusive:  # only relevance through this layer goes on
                pending.clear()
                downstream = self.graph.descendants(index) | {index}
                recorded = {i: r for i, r in recorded.items() if i in downstream}
            layer = self.graph.layers[index]
            for source, r in zip(layer.inputs, self.relevance_in(fp, layer, R), strict=True):
                if r is not None:
                    pending[source] = pending[source] + r if source in pending else r
            if not fp.reuse:
                fp.values.pop(layer.node, None)
        return pending, recorded

    def relevance_in(self, fp: ForwardPass, layer: Layer, R: Tensor) -> list[Tensor | None]:
        """Relevance at each input of ``layer`` given relevance ``R`` at its output."""
        rule = self.rules[layer.index]
        if isinstance(rule, PassRule) and layer.op.elementwise:
            return [R] + [None] * (len(layer.inputs) - 1)  # inputs were not kept
        if isinstance(rule, PassRule) and layer.index in fp.pooled:
            return [layer.op.unpool(R, *fp.pooled[layer.index])]
        inputs = fp.inputs(layer)
        if isinstance(rule, PassRule):
            return layer.op.route(R, inputs, _evaluator(fp, layer), layer.gate)
        if isinstance(rule, LayerNormRule):
            return [_layernorm_relevance(layer.module, inputs[0], R, rule.stabilizer)]
        return self._weighted(fp, layer, rule, inputs, R)

    def _weighted(
        self, fp: ForwardPass, layer: Layer, rule: Rule, inputs: list[Tensor], R: Tensor
    ) -> list[Tensor | None]:
        """Term-based rules: per part, a denominator from the (modified) forward pass, then
        one transposed op per term."""
        nonneg = all(i in self._nonnegative for i in layer.inputs)
        evaluate = _evaluator(fp, layer)
        result: list[Tensor | None] = [None] * len(inputs)
        for p, part in enumerate(rule.parts()):
            terms = [
                _prepare(t, layer, inputs, nonneg, self._params.view(layer.index, p, k))
                for k, t in enumerate(part.terms)
            ]
            terms = _fuse([t for t in terms if t is not None], layer)
            d = fp.cache.get((layer.index, p))
            if d is None:
                fresh = not (len(terms) == 1 and terms[0].plain)  # not the saved output
                z = _part_output(fp, layer, terms, evaluate)
                d = part.denominator(z, rule.stabilizer, fresh=fresh)
                del z  # a modified forward's output is not kept beside its denominator
                if fp.reuse:
                    fp.cache[(layer.index, p)] = d
            R_part = R if part.select is None else R * part.select(fp.value(layer.index))
            s = R_part / d
            for term in terms:
                if layer.op.parametric:
                    grads = [
                        layer.op.transpose_params(s, term.inputs[0], layer.module, term.weight)
                    ]
                else:
                    grads = layer.op.transpose(s, inputs, evaluate)
                scale = part.coef * term.sign
                for j, (x, g) in enumerate(zip(term.inputs, grads, strict=True)):
                    if g is None:
                        continue
                    own = layer.op.parametric and g.shape == torch.broadcast_shapes(
                        g.shape, x.shape
                    )
                    contribution = g.mul_(x) if own else g * x  # g is fresh from a transpose
                    if scale != 1.0:
                        contribution.mul_(scale)
                    if term.fused > 1:  # sum the stacked terms' slices
                        dim = -1 if layer.kind == "linear" else 2
                        shape = list(contribution.shape)
                        shape[dim : dim + 1 or None] = [term.fused, shape[dim] // term.fused]
                        contribution = contribution.reshape(shape).sum(dim - 1 if dim < 0 else dim)
                    result[j] = contribution if result[j] is None else result[j] + contribution
        return result

    # -- explanation -------------------------------------------------------------------------
    def __call__(self, x: Tensor, target: int | Sequence[int] | Tensor | None = None, **kwargs):
        from crp_toolkit.engine.explanation import explain

        return explain(self, x, target, **kwargs)

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


@dataclass
class _PreparedTerm:
    """A term with its modified inputs and parameters computed once."""

    plain: bool
    inputs: list[Tensor]
    weight: Tensor | None
    bias: Tensor | None
    sign: float
    fused: int = 1  # how many terms are stacked along the input channels


class _ParamCache:
    """Modified parameters (W+, W + g W+, ...) computed once per layer and term, and again
    only when the parameter changes (its version counter moves, e.g. after training steps)."""

    def __init__(self) -> None:
        self._store: dict[tuple, tuple[int, int, Tensor]] = {}

    def view(self, *key) -> Callable[[str, Tensor, Callable[[Tensor], Tensor]], Tensor]:
        def get(name: str, param: Tensor, modify: Callable[[Tensor], Tensor]) -> Tensor:
            stamp = (param._version, param.data_ptr())
            hit = self._store.get((*key, name))
            if hit is None or hit[:2] != stamp:
                hit = (*stamp, modify(param.detach()))
                self._store[(*key, name)] = hit
            return hit[2]

        return get


def _prepare(
    term: Term, layer: Layer, inputs: list[Tensor], nonneg: bool, params
) -> _PreparedTerm | None:
    """Modify inputs and parameters once; drop terms that vanish on non-negative inputs."""
    if nonneg and term.input is negative and term.bias is None:
        return None  # x- = 0 and no bias: the term contributes nothing
    keep = nonneg and term.input is positive  # x+ = x
    modified = [x if keep else term.input(x) for x in inputs]
    module = layer.module
    weight = bias = None
    if layer.op.parametric:
        weight = params("weight", module.weight, term.weight)
        if module.bias is not None and term.bias is not None:
            bias = params("bias", module.bias, term.bias)
    return _PreparedTerm(term.is_plain, modified, weight, bias, term.sign)


def _fuse(terms: list[_PreparedTerm], layer: Layer) -> list[_PreparedTerm]:
    """Stack the terms of a part along input channels, so a conv or dense layer runs one
    modified forward and one transposed op instead of one per term (ZBox, AlphaBeta, ...)."""
    module = layer.module
    if len(terms) < 2 or not layer.op.parametric or getattr(module, "groups", 1) != 1:
        return terms
    if getattr(module, "transposed", False) or getattr(module, "padding_mode", "zeros") != "zeros":
        return terms
    dim = -1 if layer.kind == "linear" else 1
    x = torch.cat([t.inputs[0] for t in terms], dim=dim)
    weight = torch.cat([t.sign * t.weight for t in terms], dim=1)
    biases = [t.sign * t.bias for t in terms if t.bias is not None]
    bias = torch.stack(biases).sum(0) if biases else None
    return [_PreparedTerm(False, [x], weight, bias, 1.0, fused=len(terms))]


def _part_output(fp: ForwardPass, layer: Layer, terms: Sequence[_PreparedTerm], evaluate) -> Tensor:
    """The denominator of one part: the layer's own output when the part is its forward."""
    if len(terms) == 1 and terms[0].plain:
        return fp.value(layer.index)
    z = None
    for t in terms:
        if layer.op.parametric:
            out = layer.op.forward(t.inputs[0], layer.module, t.weight, t.bias)
        else:
            out = evaluate(t.inputs)
        out = out if t.sign == 1.0 else t.sign * out
        z = out if z is None else z + out
    return z


def _layernorm_relevance(module: nn.Module, x: Tensor, R: Tensor, eps: float) -> Tensor:
    """LN-rule: y = (x - mean) * g / sigma + b with sigma held constant."""
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    sigma = (x.var(dims, unbiased=False, keepdim=True) + module.eps).sqrt()
    gain = module.weight / sigma if module.weight is not None else 1.0 / sigma
    z = (x - mean) * gain + (module.bias if module.bias is not None else 0.0)
    u = R / stabilize(z, eps) * gain
    return x * (u - u.mean(dims, keepdim=True))


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


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the nodes whose last forward use it is (so they can be freed)."""
    seen: set[fx.Node] = set()
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        for source in node.all_input_nodes:
            if source not in seen:
                seen.add(source)
                out.setdefault(node, []).append(source)
    return out


def _needed_values(
    graph: Graph, rules: Sequence[Rule], pools: set[fx.Node], above: int = -1
) -> set[fx.Node]:
    """fx nodes whose values the relevance pass (through the layers above index ``above``)
    reads; the rest are freed during forward."""
    layer_nodes = {layer.node for layer in graph.layers}
    needed = {n for n in graph.module.graph.nodes if n not in layer_nodes}  # shapes, constants
    needed.add(graph.layers[graph.output_layer].node)
    for layer, rule in zip(graph.layers, rules, strict=True):
        if layer.index <= above:
            continue
        routed_without_inputs = layer.op.elementwise or layer.node in pools
        if not (isinstance(rule, PassRule) and routed_without_inputs):
            needed.update(layer.node.all_input_nodes)
        if _reads_own_output(rule):
            needed.add(layer.node)
    return needed


def _reads_own_output(rule: Rule) -> bool:
    """A part whose denominator is the layer's plain output, or that selects by its sign."""
    if isinstance(rule, (PassRule, LayerNormRule)):
        return False
    return any(
        part.select is not None or (len(part.terms) == 1 and part.terms[0].is_plain)
        for part in rule.parts()
    )


def _nonnegative_layers(graph: Graph) -> set[int]:
    """Layers whose output is non-negative by construction (ReLU and what keeps its sign)."""
    out: set[int] = set()
    keeps_sign = ("maxpool", "avgpool", "reshape", "concat", "add")
    for layer in graph.layers:
        target = layer.node.target
        if (
            isinstance(layer.module, _NONNEGATIVE)
            or (layer.module is None and target in _NONNEGATIVE_CALLS)
            or (layer.kind in keeps_sign or _is_dropout(layer))
            and all(i in out for i in layer.inputs)
        ):
            out.add(layer.index)
    return out


def _is_dropout(layer: Layer) -> bool:
    return isinstance(layer.module, (nn.Dropout, nn.Identity))


def _checked_rules(graph: Graph, rules: Sequence[Rule | None]) -> list[Rule]:
    """Every layer has a rule its kind supports, or the analyzer is refused."""
    for layer, rule in zip(graph.layers, rules, strict=True):
        where = f"layer {layer.name!r} ({layer.type_name}, kind {layer.kind!r})"
        if rule is None:
            raise UnsupportedLayerError(
                f"the composite assigns no rule to {where}; add one, e.g. "
                f"TypeMap({{{layer.kind!r}: EpsilonRule()}}) or NameMap({{{layer.name!r}: ...}})"
            )
        if isinstance(rule, LayerNormRule) != (layer.kind == "layernorm") and not isinstance(
            rule, PassRule
        ):
            raise UnsupportedLayerError(f"{type(rule).__name__} cannot be applied to {where}")
        if isinstance(rule, PassRule) and layer.kind in ("add", "avgpool", "conv", "linear"):
            raise UnsupportedLayerError(
                f"PassRule cannot be applied to {where}: it changes the number of values; "
                "use EpsilonRule or another weighted rule"
            )
        if not isinstance(rule, (PassRule, LayerNormRule)) and not layer.op.linear:
            raise UnsupportedLayerError(
                f"{type(rule).__name__} needs a linear op, but {where} is not; use PassRule"
            )
    return list(rules)  # type: ignore[arg-type]


def _refuse_softmax_output(graph: Graph) -> None:
    last = graph.layers[graph.output_layer]
    if last.kind == "softmax":
        raise ValueError(
            f"the model's output ends in a softmax ({last.name!r}); LRP explains logits. "
            "Remove it first: model = crp_toolkit.strip_softmax(model)"
        )
    for layer in graph.layers:
        if layer.kind == "softmax":
            raise UnsupportedLayerError(
                f"softmax inside the model at {layer.name!r} has no LRP rule; register an op for it"
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
        if module.training and isinstance(module, stochastic):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) is in training mode, so its output "
                "depends on the batch or on chance; call model.eval() before explaining"
            )
