"""Trace a model into a flat list of layers, each one call of a module or a functional op.

``torch.fx`` sees what module hooks cannot: residual adds written inside ``forward``,
concatenations, gating multiplications, and a module instance called several times (each call
becomes its own layer, named ``path``, ``path#2``, ``path#3``...). Functional ops are named
after the module whose ``forward`` calls them (``layer1.0.add``).
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from crp_toolkit.engine.attention import explicit_attention, explicit_sdpa
from crp_toolkit.engine.ops import (
    GATE,
    GATE_SOURCES,
    MATMUL,
    SOFTMAX,
    TUPLE_FUNCTIONS,
    Op,
    OpRegistry,
    UnsupportedLayerError,
    current_ops,
    select_output,
)

__all__ = ["Graph", "Layer", "UnsupportedLayerError", "trace"]


# calls that return their input unchanged in eval mode
_IDENTITY_CALLS = {F.dropout, torch.dropout, F.dropout2d, "contiguous", "clone"}


@dataclass(frozen=True)
class Layer:
    """One call of a module or op in the traced model.

    ``inputs`` are the positions (in ``Graph.layers``, or -1 for the model input) of the
    tensors the layer reads; ``node`` is the fx node that computes it.
    """

    index: int
    name: str
    op: Op
    node: fx.Node
    module: nn.Module | None
    inputs: tuple[int, ...]
    # for gating products: which input is the gate; for matmuls: which factor is a softmax's
    gate: int | None = None

    @property
    def kind(self) -> str:
        return self.op.kind

    @property
    def is_identity(self) -> bool:
        """Whether the layer returns its input unchanged in eval mode (dropout,
        ``nn.Identity``, ``contiguous``)."""
        if self.module is not None:
            return isinstance(self.module, (nn.modules.dropout._DropoutNd, nn.Identity))
        return self.node.target in _IDENTITY_CALLS

    @property
    def type_name(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        return getattr(self.node.target, "__name__", str(self.node.target))


@dataclass
class Graph:
    """A traced model: its fx module, the relevance-carrying layers in execution order."""

    module: fx.GraphModule
    layers: list[Layer]
    input_node: fx.Node
    output_layer: int
    out_of_place: dict[str, nn.Module] = field(default_factory=dict)

    def submodule(self, target: str) -> nn.Module:
        """The module called at ``target``; in-place activations come as out-of-place
        shallow copies (sharing parameters), so the engine keeps their inputs intact."""
        return self.out_of_place.get(target) or self.module.get_submodule(target)

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def index(self, name: str) -> int:
        """Position of the layer called ``name``; a clear error lists the valid names."""
        for layer in self.layers:
            if layer.name == name:
                return layer.index
        raise KeyError(
            f"no layer named {name!r} in this model. Valid layer names: {', '.join(self.names())}"
        )

    def readers_of_input(self) -> list[int]:
        """Parametric layers (conv/linear) that read the model input without passing through
        another parametric layer: the 'first layer' of every branch."""
        reach = {-1}
        first = []
        for layer in self.layers:
            if any(i in reach for i in layer.inputs):
                if layer.kind in ("conv", "linear"):
                    first.append(layer.index)
                else:
                    reach.add(layer.index)
        return first

    def descendants(self, index: int) -> set[int]:
        """All layers that read the output of layer ``index``, directly or not."""
        out: set[int] = set()
        for layer in self.layers[index + 1 :]:
            if any(i == index or i in out for i in layer.inputs):
                out.add(layer.index)
        return out

    def ancestors(self, index: int) -> set[int]:
        """All layers whose output flows into layer ``index`` (excluding itself)."""
        seen: set[int] = set()
        stack = [i for i in self.layers[index].inputs if i >= 0]
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack.extend(j for j in self.layers[i].inputs if j >= 0)
        return seen


class _Tracer(fx.Tracer):
    """Keeps whole every module the registry knows (torch.nn's, their subclasses, and types
    registered with ``register_module_op``)."""

    def __init__(self, registry: OpRegistry) -> None:
        super().__init__()
        self.registry = registry

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.registry.for_module(m) is not None or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, registry: OpRegistry | None = None) -> Graph:
    """Trace ``model`` with torch.fx and classify every op with ``registry`` (default: the
    current one, see ``crp_toolkit.engine.ops.scoped_ops``); refuse unsupported ones.
    Attention is written out as explicit ops first (``crp_toolkit.engine.attention``)."""
    registry = current_ops() if registry is None else registry
    model = explicit_attention(model)  # a structural copy where it writes attention out
    tracer = _Tracer(registry)
    try:
        optional = _optional_arguments(model)
        fx_graph = tracer.trace(model, concrete_args=optional)
    except Exception as err:  # fx raises many types for untraceable control flow
        raise UnsupportedLayerError(
            f"could not trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}). "
            "crp_toolkit needs a model whose forward has no data-dependent Python control "
            "flow; wrap such parts in a leaf module and register an op for it "
            "(crp_toolkit.engine.ops.register_module_op)."
        ) from err
    _fixed(fx_graph, list(optional.values()))
    explicit_sdpa(fx_graph)
    _split_tuple_ops(fx_graph)
    gm = fx.GraphModule(tracer.root, fx_graph, type(model).__name__)
    layers: list[Layer] = []
    position: dict[fx.Node, int] = {}
    calls: Counter[str] = Counter()
    input_node = None
    output_layer = -1
    for node in fx_graph.nodes:
        if node.op == "placeholder":
            if input_node is not None:
                raise UnsupportedLayerError("crp_toolkit explains models with a single input")
            input_node = node
            position[node] = -1
            continue
        if node.op == "output":
            output_layer = _output_index(node, position)
            continue
        if node.op == "get_attr":
            continue
        tensor_inputs = [n for n in node.all_input_nodes if n in position]
        if not tensor_inputs:
            continue  # a constant or a shape computation: carries no relevance
        op, module = _classify(registry, gm, node)
        if op is None:
            if _is_shape_query(node):
                continue
            raise _unsupported(node, module, registry.kinds)
        name = _layer_name(node, calls)
        index = len(layers)
        inputs = tuple(position[n] for n in node.all_input_nodes if n in position)
        gate = _gate_input(layers, inputs, op)
        layers.append(Layer(index, name, op, node, module, inputs, gate))
        position[node] = index
    if input_node is None:
        raise UnsupportedLayerError("the model takes no input")
    return Graph(gm, layers, input_node, output_layer, _out_of_place(layers))


def _optional_arguments(model: nn.Module) -> dict[str, object]:
    """The arguments of ``forward`` after the input that have defaults (timm's ``attn_mask=None``,
    ``is_causal=False``), fixed to them: the model is explained as a function of its input."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    empty = inspect.Parameter.empty
    return {p.name: p.default for p in parameters if p.default is not empty}


def _fixed(graph: fx.Graph, values: list[object]) -> None:
    """Replace the placeholders after the input (fx keeps them for concrete arguments, read
    only by its guards) with their fixed values."""
    extra = [node for node in graph.nodes if node.op == "placeholder"][1:]
    if len(extra) != len(values):
        return  # not the concrete arguments: trace() refuses the extra inputs
    for node, value in zip(extra, values, strict=True):
        for user in list(node.users):
            user.args, user.kwargs = fx.node.map_arg(
                (user.args, user.kwargs),
                lambda n, node=node, value=value: value if n is node else n,
            )
        graph.erase_node(node)


def _out_of_place(layers: list[Layer]) -> dict[str, nn.Module]:
    copies = {}
    for layer in layers:
        if getattr(layer.module, "inplace", False):
            clone = copy.copy(layer.module)  # shares parameters and buffers
            clone.inplace = False
            copies[str(layer.node.target)] = clone
    return copies


def _split_tuple_ops(graph: fx.Graph) -> None:
    """Rewrite ``chunk(x)[i]`` (and split, unbind) to ``select_output(chunk, i, x)``, one op
    with one tensor output per item, so relevance can flow back through each."""
    for node in list(graph.nodes):
        source = node.args[0] if node.target is operator.getitem and node.args else None
        if not isinstance(source, fx.Node) or not isinstance(node.args[1], int):
            continue
        function = TUPLE_FUNCTIONS.get(source.target) if source.op != "get_attr" else None
        if function is None or source.op == "call_module":
            continue
        with graph.inserting_before(node):
            item = graph.call_function(
                select_output, (function, node.args[1], *source.args), dict(source.kwargs)
            )
        item.meta = dict(source.meta)
        node.replace_all_uses_with(item)
        graph.erase_node(node)
        if not source.users:
            graph.erase_node(source)


def _gate_input(layers: list[Layer], inputs: tuple[int, ...], op: Op) -> int | None:
    """For a gating product, the factor that comes straight from a sigmoid-like op; for a
    matmul, the factor that comes from a softmax (the attention weights); if exactly one."""
    if op is not GATE and op is not MATMUL:
        return None

    def is_gate(i: int) -> bool:
        while op is MATMUL and i >= 0 and isinstance(layers[i].module, (nn.Dropout, nn.Identity)):
            i = layers[i].inputs[0]  # attention dropout (identity in eval) after the softmax
        if i < 0:
            return False
        if op is MATMUL:
            return layers[i].op is SOFTMAX
        source = layers[i].module if layers[i].module is not None else layers[i].node.target
        kinds = tuple(k for k in GATE_SOURCES if isinstance(k, type))
        return isinstance(source, kinds) or (
            not isinstance(source, nn.Module) and source in GATE_SOURCES
        )

    gates = [k for k, i in enumerate(inputs) if is_gate(i)]
    return gates[0] if len(gates) == 1 else None


def _output_index(node: fx.Node, position: dict[fx.Node, int]) -> int:
    out = node.args[0]
    if not isinstance(out, fx.Node) or out not in position:
        raise UnsupportedLayerError(
            "crp_toolkit explains models that return a single tensor of class scores; "
            f"this one returns {out!r}"
        )
    return position[out]


def _classify(
    registry: OpRegistry, gm: fx.GraphModule, node: fx.Node
) -> tuple[Op | None, nn.Module | None]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return registry.for_module(module), module
    if node.op == "call_function":
        return registry.for_function(node.target, node), None
    if node.op == "call_method":
        return registry.for_method(node.target, node), None
    return None, None


def _is_shape_query(node: fx.Node) -> bool:
    shape_ops: set[Callable | str] = {"size", "dim", getattr, operator.getitem, "numel"}
    if getattr(node.target, "crp_shape_function", False):
        return True  # see crp_toolkit.engine.ops.shape_function
    return node.target in shape_ops and node.op in ("call_method", "call_function")


def _layer_name(node: fx.Node, calls: Counter[str]) -> str:
    if node.op == "call_module":
        base = str(node.target)
    else:
        stack = node.meta.get("nn_module_stack") or {}
        scope = next(reversed(stack.values()))[0] if stack else ""
        target = node.target
        op_name = node.args[0] if target is select_output else getattr(target, "__name__", "")
        op_name = (op_name or str(target)).strip("_")
        base = f"{scope}.{op_name}" if scope else op_name
    calls[base] += 1
    return base if calls[base] == 1 else f"{base}#{calls[base]}"


def _unsupported(
    node: fx.Node, module: nn.Module | None, kinds: frozenset[str]
) -> UnsupportedLayerError:
    if module is not None:
        what = f"module {node.target!r} of type {type(module).__name__} (traced node {node.name!r})"
        how = (
            "register a rule for it with crp_toolkit.engine.ops.register_module_op("
            f"{type(module).__name__}, ops.ELEMENTWISE or another op of crp_toolkit.engine.ops)"
        )
    else:
        target = getattr(node.target, "__name__", node.target)
        stack = node.meta.get("nn_module_stack") or {}
        scope, scope_type = next(reversed(stack.values())) if stack else ("<top level>", None)
        of_type = f" of type {getattr(scope_type, '__name__', scope_type)}" if scope_type else ""
        what = f"op {target!r} ({node.op}) inside {scope!r}{of_type} (traced node {node.name!r})"
        how = (
            f"register it with crp_toolkit.engine.ops.register_method_op({target!r}, <Op>)"
            if node.op == "call_method"
            else "register it with crp_toolkit.engine.ops.register_function_op(<function>, <Op>)"
        )
    return UnsupportedLayerError(
        f"no LRP rule for {what}; supported kinds: {', '.join(sorted(kinds))}. "
        f"To explain this model, {how}."
    )
