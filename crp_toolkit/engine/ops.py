"""What the engine knows about each kind of op: its forward with modified parameters, its
transpose, and how relevance is routed through it under ``PassRule``.

Relevance tensors carry a leading *concept* axis: shape ``(K, B, ...)`` against saved
activations of shape ``(B, ...)``, so K conditional relevances share one forward pass.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

Evaluate = Callable[[Sequence[Tensor]], Tensor]


class UnsupportedLayerError(TypeError):
    """A layer or op of the model has no relevance rule; raised before anything runs."""


@dataclass(frozen=True)
class Op:
    """An op kind. ``linear``: the output is a linear map of the inputs (plus bias), so the
    term-based rules (epsilon, z+, ...) apply; ``elementwise``: PassRule returns R as is;
    ``recomputable``: cheap next to dense layers and convolutions, so the relevance pass may
    compute its output again instead of the forward pass keeping it (see
    ``crp_toolkit.engine.memory``)."""

    kind: str
    linear: bool = False
    elementwise: bool = False
    parametric: bool = False
    recomputable: bool = False

    def route(
        self, R: Tensor, inputs: Sequence[Tensor], evaluate: Evaluate, gate: int | None = None
    ) -> list[Tensor | None]:
        """PassRule: send R back unchanged, through the op's structure where shapes differ."""
        return vjp(evaluate, inputs, R)

    def reports_indices(self, module: nn.Module | None) -> bool:
        """Whether the forward pass records this layer's max-pooling winners (see MaxPool)."""
        return False

    def routes_by_shape(self) -> bool:
        """Whether ``route`` reads only the inputs' shapes, dtypes and devices, not their
        values (so the forward pass need not keep them)."""
        return False

    def transpose(
        self, grad: Tensor, inputs: Sequence[Tensor], evaluate: Evaluate, gate: int | None = None
    ) -> list[Tensor | None]:
        """``J^T grad`` for a parameter-free linear op (values of ``inputs`` do not matter)."""
        return vjp(evaluate, [torch.zeros_like(x) for x in inputs], grad)


@dataclass(frozen=True)
class Reshape(Op):
    """Flatten, view, reshape, squeeze...: relevance is reshaped back."""

    def route(
        self, R: Tensor, inputs: Sequence[Tensor], evaluate: Evaluate, gate: int | None = None
    ) -> list[Tensor | None]:
        return [R.reshape(R.shape[0], *inputs[0].shape)] + [None] * (len(inputs) - 1)

    transpose = route

    def routes_by_shape(self) -> bool:
        return True


@dataclass(frozen=True)
class Reindex(Op):
    """Ops that only move, copy or drop values (permute, transpose, indexing and slicing,
    roll, pad, expand, concatenation, one output of chunk/split/unbind): relevance goes back
    through the transpose of the selection, so every input position gets exactly the relevance
    of the output positions that read it (summed where it was read twice, none if unread)."""

    def route(
        self, R: Tensor, inputs: Sequence[Tensor], evaluate: Evaluate, gate: int | None = None
    ) -> list[Tensor | None]:
        return selection_transpose(evaluate, inputs, R)

    transpose = route

    def routes_by_shape(self) -> bool:
        """The transpose is taken at zeros shaped like the inputs."""
        return True


def selection_transpose(
    evaluate: Evaluate, inputs: Sequence[Tensor], grad: Tensor
) -> list[Tensor | None]:
    """``J^T grad`` of a linear, parameter-free op, evaluated once at zeros shaped like
    ``inputs`` (so shape arguments computed from the batch size stay valid); the concept axis
    of ``grad`` (K, B, ...) is handled by batched gradients instead of folding it into the
    batch. Integer inputs (indices) get none."""
    zeros = [
        torch.zeros(x.shape, dtype=x.dtype, device=x.device, requires_grad=x.is_floating_point())
        for x in inputs
    ]
    leaves = [z for z in zeros if z.requires_grad]
    k = grad.shape[0]
    with torch.enable_grad():
        out = evaluate(zeros)
        grads = iter(
            torch.autograd.grad(
                out, leaves, grad if k > 1 else grad[0], allow_unused=True, is_grads_batched=k > 1
            )
        )
    result: list[Tensor | None] = []
    for z in zeros:
        g = next(grads) if z.requires_grad else None
        result.append(None if g is None else g if k > 1 else g[None])
    return result


def shape_function(function: Callable) -> Callable:
    """Mark ``function`` as computing constants from its tensor arguments' shapes only (a
    padding, a mask): its calls carry no relevance and need no rule, as ``x.size()``."""
    function.crp_shape_function = True
    return function


def select_output(function: str, index: int, *args, **kwargs) -> Tensor:
    """``torch.<function>(*args, **kwargs)[index]``: one output of an op that returns several
    tensors (chunk, split, unbind), as an op of its own; the tracer rewrites ``x.chunk(2)[i]``
    to ``select_output("chunk", i, x, 2)``."""
    return getattr(torch, function)(*args, **kwargs)[index]


# Ops that return a tuple of tensors (functions and methods), by the name select_output takes.
TUPLE_FUNCTIONS: dict[Callable | str, str] = {
    **{getattr(torch, name): name for name in ("chunk", "split", "unbind", "tensor_split")},
    **{name: name for name in ("chunk", "split", "unbind", "tensor_split")},
}


@dataclass(frozen=True)
class Sum(Op):
    """Sums of tensors (residual adds): the transpose hands each input the gradient, summed
    over the axes it was broadcast along."""

    def transpose(
        self, grad: Tensor, inputs: Sequence[Tensor], evaluate: Evaluate, gate: int | None = None
    ) -> list[Tensor | None]:
        return [_unbroadcast(grad, x.shape) for x in inputs]


def _unbroadcast(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum (K, ...) ``grad`` down to (K, *shape)."""
    target = (grad.shape[0], *shape)
    if grad.shape == target:
        return grad
    lead = grad.dim() - len(target)
    summed = grad.sum(tuple(range(1, 1 + lead))) if lead else grad
    axes = [
        i for i, (g, t) in enumerate(zip(summed.shape, target, strict=True)) if t == 1 and g != 1
    ]
    return summed.sum(axes, keepdim=True) if axes else summed


@dataclass(frozen=True)
class Gate(Op):
    """Elementwise product where one factor gates the other (squeeze-excitation). The gate
    is held constant, so all relevance goes to the gated input."""

    def route(
        self, R: Tensor, inputs: Sequence[Tensor], evaluate: Evaluate, gate: int | None = None
    ) -> list[Tensor | None]:
        """``gate``: which input is the gate (found when tracing: the output of a sigmoid),
        else the smaller (broadcast) factor."""
        if len(inputs) == 1:
            return [R]
        a, b = inputs
        if gate is None:
            gate = 0 if a.numel() < b.numel() else 1 if b.numel() < a.numel() else None
        if gate is None:
            raise ValueError(
                "cannot tell the gate from the gated input of an elementwise product of two "
                f"equally shaped tensors {tuple(a.shape)} (neither comes from a sigmoid); "
                "register a rule for this op"
            )
        out: list[Tensor | None] = [None, None]
        out[1 - gate] = R
        return out

    def routes_by_shape(self) -> bool:
        """The gate is known from tracing, or told by the factors' sizes."""
        return True


_WINDOW_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


@dataclass(frozen=True)
class MaxPool(Op):
    """Max pooling: relevance goes to the winner of each window. Pooling modules report their
    indices during the forward pass, so the relevance pass needs neither input nor recompute."""

    def reports_indices(self, module: nn.Module | None) -> bool:
        return isinstance(module, _WINDOW_POOLS + _ADAPTIVE_POOLS)

    def pool_with_indices(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, flat spatial indices of the winners) of a max-pooling module."""
        if isinstance(module, _WINDOW_POOLS):
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[x.dim() - 3]
            return fn(
                x,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                ceil_mode=module.ceil_mode,
                return_indices=True,
            )
        fn = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[x.dim() - 3]
        return fn(x, module.output_size, return_indices=True)

    @staticmethod
    def unpool(R: Tensor, indices: Tensor, input_shape: torch.Size) -> Tensor:
        """Scatter R (K, B, C, ...) back to the winners' positions in the input."""
        k = R.shape[0]
        flat = torch.zeros(
            k, *input_shape[:2], input_shape[2:].numel(), dtype=R.dtype, device=R.device
        )
        index = indices.flatten(2).expand(k, *indices.shape[:2], -1)
        flat.scatter_add_(-1, index, R.flatten(3))
        return flat.reshape(k, *input_shape)


@dataclass(frozen=True)
class Dense(Op):
    """``nn.Linear``."""

    def forward(self, x: Tensor, module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def transpose_params(
        self, grad: Tensor, x: Tensor, module: nn.Module, weight: Tensor
    ) -> Tensor:
        live = live_features(grad)
        return grad @ weight if live is None else grad[..., live] @ weight[live]


def live_features(grad: Tensor, most: float = 0.75) -> slice | Tensor | None:
    """The output features (last axis) where ``grad`` is non-zero anywhere, as a slice when
    they are one run, or None when more than ``most`` of them are: a dense layer's transpose
    then multiplies only those rows of its weight (timm's fused q, k, v projection gets
    relevance for v alone under CP-LRP; a channel concept of a dense layer one feature), the
    same sum without its zero terms. One row with that many live features settles it
    without reading the rest."""
    flat = grad.reshape(-1, grad.shape[-1])
    width = flat.shape[1]
    if flat.shape[0] == 0 or int(flat[0].count_nonzero()) > most * width:
        return None
    live = flat.any(0).nonzero().squeeze(1)
    if len(live) > most * width:
        return None
    if len(live) == 0:
        return slice(0, 0)
    first, last = int(live[0]), int(live[-1])
    return slice(first, last + 1) if last - first + 1 == len(live) else live


@dataclass(frozen=True)
class Conv(Op):
    """Convolutions and transposed convolutions of any dimension."""

    def forward(self, x: Tensor, module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
        if module.transposed:
            return _conv_t(x, module, weight, bias)
        return module._conv_forward(x, weight, bias)

    def transpose_params(
        self, grad: Tensor, x: Tensor, module: nn.Module, weight: Tensor
    ) -> Tensor:
        lead = grad.shape[: grad.dim() - x.dim() + 1]
        flat = grad.reshape(-1, *grad.shape[len(lead) :])
        size = (flat.shape[0], *x.shape[1:])
        if getattr(module, "padding_mode", "zeros") != "zeros":  # reflect/circular padding
            forward = lambda t: self.forward(t[0], module, weight, None)  # noqa: E731
            [out] = vjp(forward, [x.new_zeros(size)], flat[None])
            return out.reshape(*lead, *x.shape[1:])
        placeholder = flat.new_empty(1).expand(size)
        out = torch.ops.aten.convolution_backward(
            flat,
            placeholder,
            weight,
            None,
            module.stride,
            _padding(module),
            module.dilation,
            module.transposed,
            module.output_padding,
            module.groups,
            (True, False, False),
        )[0]
        return out.reshape(*lead, *x.shape[1:])


def _conv_t(x: Tensor, module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[x.dim() - 2]
    return fn(
        x,
        weight,
        bias,
        module.stride,
        module.padding,
        module.output_padding,
        module.groups,
        module.dilation,
    )


def _padding(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0,) * len(module.kernel_size)
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError(f"asymmetric padding='same' of {module} is not supported")
        return tuple(t // 2 for t in total)
    return module.padding


def vjp(evaluate: Evaluate, inputs: Sequence[Tensor], grad: Tensor) -> list[Tensor | None]:
    """``J^T grad`` of ``evaluate`` at ``inputs``; the concept axis of ``grad`` (K, B, ...) is
    folded into the batch (the inputs are repeated K times)."""
    k = grad.shape[0]
    folded = [
        x.detach().expand(k, *x.shape).reshape(-1, *x.shape[1:]).requires_grad_() for x in inputs
    ]
    with torch.enable_grad():
        out = evaluate(folded)
        grads = torch.autograd.grad(out, folded, grad.reshape(out.shape), allow_unused=True)
    return [
        None if g is None else g.reshape(k, *x.shape) for g, x in zip(grads, inputs, strict=True)
    ]


ELEMENTWISE = Op("activation", elementwise=True, recomputable=True)
BATCHNORM = Op("batchnorm", elementwise=True, recomputable=True)
LAYERNORM = Op("layernorm", elementwise=True, recomputable=True)
RESHAPE = Reshape("reshape", linear=True, recomputable=True)
CONCAT = Reindex("concat", linear=True, recomputable=True)
INDEX = Reindex("index", linear=True, recomputable=True)
SUM = Sum("add", linear=True, recomputable=True)
AVGPOOL = Op("avgpool", linear=True, recomputable=True)
MAXPOOL = MaxPool("maxpool", recomputable=True)
SOFTMAX = Op("softmax", recomputable=True)
# products of two activations (attention scores, attention times v)
MATMUL = Op("matmul", recomputable=True)
GATE = Gate("gate", recomputable=True)
GATE_SOURCES = (nn.Sigmoid, nn.Hardsigmoid, torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid")
DENSE = Dense("linear", linear=True, parametric=True)
CONV = Conv("conv", linear=True, parametric=True)

KINDS = frozenset(
    op.kind
    for op in (
        ELEMENTWISE,
        BATCHNORM,
        LAYERNORM,
        RESHAPE,
        INDEX,
        CONCAT,
        SUM,
        AVGPOOL,
        MAXPOOL,
        SOFTMAX,
        MATMUL,
        GATE,
        DENSE,
        CONV,
    )
)

_MODULE_OPS: dict[type, Op] = {
    nn.Linear: DENSE,
    **{
        t: CONV
        for t in (
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.ConvTranspose1d,
            nn.ConvTranspose2d,
            nn.ConvTranspose3d,
        )
    },
    **{t: BATCHNORM for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    nn.LayerNorm: LAYERNORM,
    nn.RMSNorm: LAYERNORM,
    **{
        t: AVGPOOL
        for t in (
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
        )
    },
    **{
        t: MAXPOOL
        for t in (
            nn.MaxPool1d,
            nn.MaxPool2d,
            nn.MaxPool3d,
            nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d,
        )
    },
    nn.Flatten: RESHAPE,
    nn.Unflatten: RESHAPE,
    nn.Softmax: SOFTMAX,
    nn.LogSoftmax: SOFTMAX,
    **{
        t: ELEMENTWISE
        for t in (
            nn.ReLU,
            nn.ReLU6,
            nn.LeakyReLU,
            nn.PReLU,
            nn.RReLU,
            nn.ELU,
            nn.SELU,
            nn.CELU,
            nn.GELU,
            nn.SiLU,
            nn.Mish,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Hardtanh,
            nn.Sigmoid,
            nn.Tanh,
            nn.Softplus,
            nn.Softsign,
            nn.Tanhshrink,
            nn.Threshold,
            nn.LogSigmoid,
            nn.Dropout,
            nn.Dropout1d,
            nn.Dropout2d,
            nn.Dropout3d,
            nn.AlphaDropout,
            nn.Identity,
        )
    },
}

_FUNCTION_OPS: dict[Callable, Op] = {
    **{
        f: ELEMENTWISE
        for f in (
            F.relu,
            torch.relu,
            F.relu6,
            F.leaky_relu,
            F.elu,
            F.selu,
            F.gelu,
            F.silu,
            F.mish,
            F.hardswish,
            F.hardsigmoid,
            F.hardtanh,
            torch.sigmoid,
            F.sigmoid,
            torch.tanh,
            F.tanh,
            F.softplus,
            F.dropout,
            torch.dropout,
            F.dropout2d,
        )
    },
    **{
        f: RESHAPE
        for f in (torch.flatten, torch.unflatten, torch.reshape, torch.squeeze, torch.unsqueeze)
    },
    **{
        f: INDEX
        for f in (
            operator.getitem,
            select_output,
            torch.permute,
            torch.transpose,
            torch.swapaxes,
            torch.movedim,
            torch.roll,
            torch.narrow,
            torch.select,
            torch.flip,
            F.pad,
        )
    },
    **{f: SUM for f in (operator.add, operator.iadd, torch.add)},
    **{f: CONCAT for f in (torch.cat, torch.concat, torch.stack)},
    **{f: MATMUL for f in (torch.matmul, operator.matmul, torch.bmm, torch.einsum)},
    **{f: LAYERNORM for f in (F.layer_norm, F.rms_norm)},
    **{f: GATE for f in (operator.mul, operator.imul, torch.mul)},
    # division: the divisor is held constant (as the standard deviation in LayerNorm), so
    # relevance passes to the dividend (timm's distilled heads average with ``/ 2``)
    **{f: ELEMENTWISE for f in (operator.truediv, torch.div, F.normalize)},
    **{
        f: AVGPOOL
        for f in (
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
        )
    },
    **{
        f: MAXPOOL
        for f in (
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            F.adaptive_max_pool1d,
            F.adaptive_max_pool2d,
            F.adaptive_max_pool3d,
        )
    },
    F.softmax: SOFTMAX,
    torch.softmax: SOFTMAX,
    F.log_softmax: SOFTMAX,
}

_METHOD_OPS: dict[str, Op] = {
    **{m: ELEMENTWISE for m in ("relu", "relu_", "sigmoid", "tanh", "contiguous", "clone")},
    **{
        m: RESHAPE
        for m in ("view", "view_as", "reshape", "reshape_as", "flatten", "unflatten")
        + ("squeeze", "unsqueeze")
    },
    **{
        m: INDEX
        for m in ("permute", "transpose", "swapaxes", "movedim", "roll", "narrow", "select")
        + ("flip", "expand", "expand_as", "repeat", "t")
    },
    **{m: MATMUL for m in ("matmul", "bmm")},
    **{m: SUM for m in ("add", "add_")},
    **{m: GATE for m in ("mul", "mul_")},
    "mean": AVGPOOL,
    "softmax": SOFTMAX,
}


@dataclass(frozen=True)
class OpRegistry:
    """Which op each module type, function and tensor method is. The engine traces with the
    registry active when an analyzer is built (``current_ops()``); ``scoped_ops()`` gives a
    block its own copy, so what is registered inside it is gone after it."""

    modules: dict[type, Op] = field(default_factory=lambda: dict(_MODULE_OPS))
    functions: dict[Callable, Op] = field(default_factory=lambda: dict(_FUNCTION_OPS))
    methods: dict[str, Op] = field(default_factory=lambda: dict(_METHOD_OPS))

    @property
    def kinds(self) -> frozenset[str]:
        """Every op kind the registry knows (composites' type maps are checked against it)."""
        tables = (self.modules, self.functions, self.methods)
        return frozenset(op.kind for table in tables for op in table.values())

    def copy(self) -> OpRegistry:
        return OpRegistry(dict(self.modules), dict(self.functions), dict(self.methods))

    def for_module(self, module: nn.Module) -> Op | None:
        """The op of the nearest registered class of ``module``; None for a subclass that
        overrides that class's ``forward`` (it may compute more, e.g. torchvision's
        channel-first LayerNorm2d permutes around the norm), so it is traced through."""
        for cls in type(module).__mro__:
            if cls in self.modules:
                return self.modules[cls] if type(module).forward is cls.forward else None
        return None

    def for_function(self, function: Callable, node: fx.Node) -> Op | None:
        name = getattr(function, "__name__", "")
        if name == "stochastic_depth":  # torchvision, eval: identity
            return ELEMENTWISE
        if name == "_patch_merging_pad":  # torchvision Swin: zero padding to even H, W
            return INDEX
        return self.functions.get(function)

    def for_method(self, method: str, node: fx.Node) -> Op | None:
        return self.methods.get(method)


_DEFAULT_OPS = OpRegistry()
_CURRENT: ContextVar[OpRegistry | None] = ContextVar("crp_toolkit_ops", default=None)


def current_ops() -> OpRegistry:
    """The registry in effect: the innermost ``scoped_ops()`` block's, else the default one."""
    registry = _CURRENT.get()
    return _DEFAULT_OPS if registry is None else registry


@contextmanager
def scoped_ops() -> Iterator[OpRegistry]:
    """A block with its own copy of the current registry: ``register_*_op`` calls inside it
    (and analyzers built inside it) see the registrations, nothing outside does."""
    token = _CURRENT.set(current_ops().copy())
    try:
        yield current_ops()
    finally:
        _CURRENT.reset(token)


def register_module_op(module_type: type, op: Op) -> None:
    """Teach the engine a module type, e.g. ``register_module_op(MyAct, ops.ELEMENTWISE)``
    (in the current registry: inside ``with scoped_ops():`` only for that block)."""
    current_ops().modules[module_type] = op


def register_function_op(function: Callable, op: Op) -> None:
    """Teach the engine a function called inside ``forward``, e.g. ``torch.nn.functional.mish``."""
    current_ops().functions[function] = op


def register_method_op(method: str, op: Op) -> None:
    """Teach the engine a tensor method called inside ``forward``, e.g. ``("abs", ...)``."""
    current_ops().methods[method] = op


def op_for_module(module: nn.Module) -> Op | None:
    return current_ops().for_module(module)


def op_for_function(function: Callable, node: fx.Node) -> Op | None:
    return current_ops().for_function(function, node)


def op_for_method(method: str, node: fx.Node) -> Op | None:
    return current_ops().for_method(method, node)


__all__ = [
    "AVGPOOL",
    "BATCHNORM",
    "CONCAT",
    "CONV",
    "DENSE",
    "ELEMENTWISE",
    "GATE",
    "GATE_SOURCES",
    "INDEX",
    "KINDS",
    "LAYERNORM",
    "MATMUL",
    "MAXPOOL",
    "RESHAPE",
    "SOFTMAX",
    "SUM",
    "Conv",
    "Dense",
    "Evaluate",
    "Gate",
    "MaxPool",
    "Op",
    "OpRegistry",
    "Reindex",
    "Reshape",
    "Sum",
    "UnsupportedLayerError",
    "current_ops",
    "op_for_function",
    "op_for_method",
    "op_for_module",
    "register_function_op",
    "register_method_op",
    "register_module_op",
    "scoped_ops",
    "select_output",
    "shape_function",
    "vjp",
]
