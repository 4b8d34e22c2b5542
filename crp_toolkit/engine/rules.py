"""LRP rules: which layers each rule fits, what it reads, and the relevance it sends back.

A rule answers the engine three questions about a layer (as in RelevancePropagation.jl):
``is_compatible(layer)``; ``reads_inputs(layer)`` / ``reads_output(layer)``, so the forward
pass frees every other tensor; and ``relevance_in(values, R)``, the relevance at each input
of the layer given relevance ``R`` at its output. A new rule is one class; the engine needs
no edit.

Most rules are *term rules* on a linear layer ``z = W x + b``: a sum of *parts*, each a set
of *terms* that share one denominator::

    z_part = sum_t sign_t * layer(input_t(x); weight_t(W), bias_t(b))
    R_in  += coef * sum_t sign_t * input_t(x) * layer_t^T (R / s(z_part))

with the stabilised denominator ``s(d) = d + eps * sign0(d)`` and ``sign0(0) = +1``. A term
rule states its parts (``parts()``); ``crp_toolkit.engine.terms`` evaluates them fast.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields, is_dataclass
from operator import matmul as operator_matmul
from typing import ClassVar

import torch
from torch import Tensor

from crp_toolkit.engine import terms
from crp_toolkit.engine.graph import Layer
from crp_toolkit.engine.ops import vjp
from crp_toolkit.engine.terms import (
    LayerValues,
    Modifier,
    ParamView,
    Part,
    Term,
    divided,
    identity,
    negative,
    ones,
    positive,
    square,
    stabilize,
)

__all__ = [
    "Modifier",
    "ParamView",
    "identity",
    "positive",
    "negative",
    "ones",
    "square",
    "stabilize",
    "Term",
    "Part",
    "LayerValues",
    "Rule",
    "TermRule",
    "ZeroRule",
    "EpsilonRule",
    "GammaRule",
    "WSquareRule",
    "FlatRule",
    "ZPlusRule",
    "AlphaBetaRule",
    "GeneralizedGammaRule",
    "ZBoxRule",
    "PassRule",
    "LayerNormRule",
    "SoftmaxRule",
    "UniformRule",
    "ConstantWeightsRule",
]


class Rule:
    """Base of all rules: the three questions the engine asks (see the module docstring).

    ``fits`` names the layers a rule is compatible with, for the error message.
    """

    fits: ClassVar[str] = "no layer"

    def is_compatible(self, layer: Layer) -> bool:
        """Whether the rule can explain ``layer``."""
        raise NotImplementedError

    def reads_inputs(self, layer: Layer) -> bool:
        """Whether ``relevance_in`` reads the layer's inputs (else they may be freed)."""
        return True

    def reads_output(self, layer: Layer) -> bool:
        """Whether ``relevance_in`` reads the layer's own output (else it may be freed)."""
        return False

    def reads_input_values(self, layer: Layer) -> bool:
        """Whether, of the inputs it reads, ``relevance_in`` reads the values (else only their
        shapes, dtypes and devices: the forward pass keeps one-element stand-ins for them)."""
        return True

    def passes_to(self, layer: Layer) -> tuple[int, ...]:
        """Positions of the layer's inputs that ``relevance_in`` may hand relevance to; it
        returns None for every other one. The forward pass keeps nothing for a layer that
        relevance cannot reach this way (CP-LRP's attention scores)."""
        return tuple(range(len(layer.inputs)))

    def relevance_in(self, values: LayerValues, R: Tensor) -> list[Tensor | None]:
        """Relevance (K, B, ...) at each input of the layer given ``R`` at its output; None
        for an input that gets none."""
        raise NotImplementedError

    def __repr__(self) -> str:
        shown = fields(self) if is_dataclass(self) else ()
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in shown if f.repr)
        return f"{type(self).__name__}({args})"


class TermRule(Rule):
    """A rule for linear layers stated as parts and terms (see the module docstring); the
    default is one plain term: ``R_in = x * W^T (R / s(z))``."""

    stabilizer: float = 1e-6
    fits: ClassVar[str] = (
        "linear ops (conv, dense, sum, concatenation, average pooling, reshape); "
        "give other layers PassRule"
    )

    def parts(self) -> tuple[Part, ...]:
        return (Part((Term(),)),)

    def is_compatible(self, layer: Layer) -> bool:
        return layer.op.linear

    def reads_output(self, layer: Layer) -> bool:
        """A part whose denominator is the layer's plain output, or that selects by its sign."""
        return any(part.select is not None or part.is_plain for part in self.parts())

    def relevance_in(self, values: LayerValues, R: Tensor) -> list[Tensor | None]:
        return terms.relevance(values, self.parts(), self.stabilizer, R)


@dataclass(repr=False)
class ZeroRule(TermRule):
    """LRP-0: ``R_in = x * W^T (R / s(z))`` with a tiny stabilizer (discouraged in deep
    layers). Bach et al. 2015, "On pixel-wise explanations for non-linear classifier
    decisions by layer-wise relevance propagation", PLoS ONE."""

    stabilizer: float = 1e-9


@dataclass(repr=False)
class EpsilonRule(TermRule):
    """LRP-epsilon: ``R_in = x * W^T (R / s(z))``; the larger stabilizer absorbs weak, noisy
    relevance. Bach et al. 2015 (PLoS ONE); Montavon et al. 2019, "Layer-wise relevance
    propagation: an overview" (LNCS 11700)."""

    stabilizer: float = 1e-6


@dataclass(repr=False)
class GammaRule(TermRule):
    """Classic LRP-gamma: ``W' = W + g W+``, ``b' = b + g b+``;
    ``R_in = x * W'^T (R / s(W' x + b'))``. Montavon et al. 2019 (LNCS 11700)."""

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def parts(self) -> tuple[Part, ...]:
        up = _raised(self.gamma)
        return (Part((Term(identity, up, up),)),)


@dataclass(repr=False)
class WSquareRule(TermRule):
    """LRP-w^2: input set to 1, weights squared, no bias:
    ``R_in = W^2^T (R / (W^2 1))``. Montavon et al. 2017, "Explaining nonlinear
    classification decisions with deep Taylor decomposition", Pattern Recognition."""

    stabilizer: float = 1e-6

    def parts(self) -> tuple[Part, ...]:
        return (Part((Term(ones, square, None),), sign=1),)


@dataclass(repr=False)
class FlatRule(TermRule):
    """LRP-flat: inputs and weights set to 1, no bias, so ``R`` spreads uniformly over each
    receptive field. Lapuschkin et al. 2019, "Unmasking Clever Hans predictors and assessing
    what machines really learn", Nature Communications."""

    stabilizer: float = 1e-6

    def parts(self) -> tuple[Part, ...]:
        return (Part((Term(ones, ones, None),), sign=1),)


@dataclass(repr=False)
class ZPlusRule(TermRule):
    """LRP-z+: ``z+ = W+ x+ + W- x- + b+``;
    ``R_in = x+ * W+^T (R / s(z+)) + x- * W-^T (R / s(z+))``. Montavon et al. 2017
    (Pattern Recognition)."""

    stabilizer: float = 1e-6

    def parts(self) -> tuple[Part, ...]:
        return (Part(_positive_terms(), sign=1),)


@dataclass(repr=False)
class AlphaBetaRule(TermRule):
    """LRP-alpha-beta: ``alpha`` times the z+ part (as ZPlusRule) minus ``beta`` times the
    z- part, ``z- = W- x+ + W+ x- + b-``; ``alpha - beta = 1``, both >= 0. Bach et al. 2015
    (PLoS ONE)."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"AlphaBetaRule needs alpha, beta >= 0, got {self.alpha}, {self.beta}")
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError(
                f"AlphaBetaRule needs alpha - beta = 1 (conservation), got "
                f"alpha={self.alpha}, beta={self.beta}; e.g. AlphaBetaRule(2, 1) or (1, 0)"
            )

    def parts(self) -> tuple[Part, ...]:
        negative_terms = (
            Term(positive, negative, negative),
            Term(negative, positive, None),
        )
        return Part(_positive_terms(), self.alpha, sign=1), Part(
            negative_terms, -self.beta, sign=-1
        )


@dataclass(repr=False)
class GeneralizedGammaRule(TermRule):
    """Sign-split gamma rule for leaky activations (zennit >= 0.5 calls it Gamma).

    Where the layer output is positive, relevance follows ``W + g W+`` on positive inputs and
    ``W + g W-`` on negative inputs; where it is negative, the two swap. Andeol et al. 2021,
    "Learning domain invariant representations by joint Wasserstein distance minimization"
    (arXiv:2106.04923), after Montavon et al. 2019.
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def parts(self) -> tuple[Part, ...]:
        up, down = _raised(self.gamma), _lowered(self.gamma)
        pos = Part((Term(positive, up, up), Term(negative, down, None)), select=_is_positive)
        neg = Part((Term(positive, down, down), Term(negative, up, None)), select=_is_negative)
        return pos, neg


@dataclass(repr=False)
class ZBoxRule(TermRule):
    """LRP-z^B for inputs bounded by ``[low, high]`` (scalars or input-shaped tensors):
    ``z = W x - W+ l - W- h`` (the bias cancels);
    ``R_in = x W^T s - l W+^T s - h W-^T s`` with ``s = R / s(z)``. Montavon et al. 2017
    (Pattern Recognition)."""

    low: float | Tensor = field(default=None)
    high: float | Tensor = field(default=None)
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        if self.low is None or self.high is None:
            raise ValueError("ZBoxRule needs the input bounds: ZBoxRule(low, high)")

    def parts(self) -> tuple[Part, ...]:
        terms = (
            Term(identity, identity, None),
            Term(_filled(self.low), positive, None, sign=-1.0),
            Term(_filled(self.high), negative, None, sign=-1.0),
        )
        return (Part(terms),)


# Kinds that mix values (PassRule would change their number) or whose transpose is no routing.
_MIXING_KINDS = ("add", "avgpool", "conv", "linear", "matmul", "softmax")


@dataclass(repr=False)
class PassRule(Rule):
    """``R_in = R``: as is through elementwise ops, back to where it came from through routing
    ops (reshape, concatenation, gate input; at max pooling the winner of each window takes
    all). RelevancePropagation.jl's PassRule; Montavon et al. 2019 (LNCS 11700)."""

    fits: ClassVar[str] = (
        "layers that keep or route values (activations, normalisation, dropout, reshape, "
        "concatenation, gates, max pooling); weighted layers need EpsilonRule or another "
        "weighted rule"
    )

    def is_compatible(self, layer: Layer) -> bool:
        return layer.kind not in _MIXING_KINDS

    def reads_inputs(self, layer: Layer) -> bool:
        return not (layer.op.elementwise or layer.op.reports_indices(layer.module))

    def reads_input_values(self, layer: Layer) -> bool:
        """Routing by reshape, re-indexing or a gate needs only the inputs' shapes."""
        return not layer.op.routes_by_shape()

    def relevance_in(self, values: LayerValues, R: Tensor) -> list[Tensor | None]:
        layer = values.layer
        if layer.op.elementwise:
            return [R] + [None] * (len(layer.inputs) - 1)
        if values.pooled is not None:
            return [layer.op.unpool(R, *values.pooled)]
        return layer.op.route(R, values.inputs, values.evaluate, layer.gate)


@dataclass(repr=False)
class LayerNormRule(Rule):
    """LN-rule: ``y = (x - mean(x)) * g / sigma + b`` with ``sigma`` held constant, relevance
    redistributed by the epsilon rule through that linear map:
    ``R_in = x * (u - mean(u))``, ``u = g / sigma * R / s(y)``; for RMSNorm
    (``y = x * g / rms(x)``, no centering) ``R_in = x * u``. Ali et al. 2022, "XAI for
    transformers: better explanations through conservative propagation", ICML; the same rule
    is AttnLRP's (Achtibat et al. 2024, ICML). Fits ``nn.LayerNorm``, ``nn.RMSNorm`` and
    ``F.layer_norm`` / ``F.rms_norm`` called in ``forward``."""

    stabilizer: float = 1e-6
    fits: ClassVar[str] = "LayerNorm and RMSNorm layers"

    def is_compatible(self, layer: Layer) -> bool:
        return layer.kind == "layernorm"

    def relevance_in(self, values: LayerValues, R: Tensor) -> list[Tensor | None]:
        x = values.inputs[0]
        norm = _norm_of(values)
        dims = tuple(range(-len(norm.shape), 0))
        if norm.centered:  # the forward's kernel: its output and 1 / sigma in one pass
            y, _, rstd = torch.native_layer_norm(x, norm.shape, norm.weight, norm.bias, norm.eps)
            gain = norm.weight * rstd if norm.weight is not None else rstd
        else:
            sigma = (x.pow(2).mean(dims, keepdim=True) + norm.eps).sqrt()
            gain = norm.weight / sigma if norm.weight is not None else 1.0 / sigma
            y = x * gain + (norm.bias if norm.bias is not None else 0.0)
        u = divided(R, stabilize(y, self.stabilizer)).mul_(gain)  # fresh: updated in place
        if norm.centered:
            u.sub_(u.mean(dims, keepdim=True))
        return [u.mul_(x)]


@dataclass(frozen=True)
class _Norm:
    """What a LayerNorm / RMSNorm layer normalises and with which parameters."""

    shape: tuple[int, ...]
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    centered: bool


def _norm_of(values: LayerValues) -> _Norm:
    """The normalisation of a norm module, or of ``F.layer_norm`` / ``F.rms_norm`` from its
    traced call arguments."""
    layer, x = values.layer, values.inputs[0]
    module = layer.module
    if module is not None:
        centered = not isinstance(module, torch.nn.RMSNorm)
        found = (module.normalized_shape, module.weight, getattr(module, "bias", None))
        eps = module.eps
    else:
        args, kwargs = values.arguments()
        bound = inspect.signature(layer.node.target).bind(*args, **kwargs).arguments
        centered = layer.node.target is torch.nn.functional.layer_norm
        found = (bound["normalized_shape"], bound.get("weight"), bound.get("bias"))
        eps = bound.get("eps", 1e-5 if centered else None)
    shape, weight, bias = found
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return _Norm(tuple(shape), weight, bias, float(eps), centered)


@dataclass(repr=False)
class SoftmaxRule(Rule):
    """AttnLRP's softmax rule, a deep Taylor decomposition at the input:
    ``R_in = x * (R - s * sum(R))``, ``s = softmax(x)``, the sum along the softmax's dim
    (logits masked to -inf get none). Achtibat et al. 2024, "AttnLRP: attention-aware
    layer-wise relevance propagation for transformers", ICML, Proposition 3.1."""

    fits: ClassVar[str] = "softmax layers (not log-softmax)"

    def is_compatible(self, layer: Layer) -> bool:
        return layer.kind == "softmax" and not _is_log_softmax(layer)

    def reads_output(self, layer: Layer) -> bool:
        return True

    def relevance_in(self, values: LayerValues, R: Tensor) -> list[Tensor | None]:
        x, s = values.inputs[0], values.output
        dim = _softmax_dim(values)
        x = torch.where(torch.isneginf(x), torch.zeros_like(x), x)
        return [x * (R - s * R.sum(dim, keepdim=True))]


@dataclass(repr=False)
class UniformRule(Rule):
    """AttnLRP's uniform rule for products of two activations. A matmul ``z = a @ b`` (or a
    two-operand einsum): each factor gets half of the epsilon-LRP relevance computed with the
    other held constant, ``R_a = a * ((R / 2s(z)) @ b^T)``, ``R_b = b * (a^T @ (R / 2s(z)))``
    (Proposition 3.3); an elementwise product (a gate) gives each factor ``R / 2``
    (Proposition 3.2), summed over the axes it was broadcast along. Achtibat et al. 2024,
    "AttnLRP", ICML."""

    stabilizer: float = 1e-6
    fits: ClassVar[str] = "products of activations (matmul, einsum, elementwise gates)"

    def is_compatible(self, layer: Layer) -> bool:
        return layer.kind in ("matmul", "gate")

    def reads_output(self, layer: Layer) -> bool:
        return layer.kind == "matmul"

    def relevance_in(self, values: LayerValues, R: Tensor) -> list[Tensor | None]:
        n = len(values.layer.inputs)
        if values.layer.kind == "gate":
            return [_unbroadcast(R / n, x.shape) for x in values.inputs]
        s = R / stabilize(values.output, self.stabilizer) / n
        grads = _product_transpose(values, s)
        return [x * g for x, g in zip(values.inputs, grads, strict=True)]


@dataclass(repr=False)
class ConstantWeightsRule(Rule):
    """CP-LRP: the attention weights (a softmax's output) are constants. At ``A @ v`` the
    factor from the softmax is held constant and the other gets the epsilon-LRP relevance,
    ``R_v = v * (A^T @ (R / s(z)))``; at the softmax, and at the product that computes the
    attention scores (``q @ k^T``, read only by a softmax), relevance stops, so none flows into
    q and k. Ali et al. 2022, "XAI for transformers: better explanations through conservative
    propagation", ICML."""

    stabilizer: float = 1e-6
    fits: ClassVar[str] = (
        "softmax layers and matmuls with one factor from a softmax (attention times v) or "
        "read only by a softmax (attention scores)"
    )

    def is_compatible(self, layer: Layer) -> bool:
        if layer.kind == "softmax":
            return not _is_log_softmax(layer)
        return layer.kind == "matmul" and (layer.gate is not None or _feeds_softmax(layer.node))

    def reads_inputs(self, layer: Layer) -> bool:
        return layer.kind == "matmul" and layer.gate is not None

    def reads_output(self, layer: Layer) -> bool:
        return self.reads_inputs(layer)

    def passes_to(self, layer: Layer) -> tuple[int, ...]:
        """Only the factor that is not the attention weights, of ``A @ v``."""
        return (1 - layer.gate,) if self.reads_inputs(layer) else ()

    def relevance_in(self, values: LayerValues, R: Tensor) -> list[Tensor | None]:
        layer = values.layer
        out: list[Tensor | None] = [None] * len(layer.inputs)
        if layer.kind == "matmul" and layer.gate is not None:
            s = R / stabilize(values.output, self.stabilizer)
            signal = 1 - layer.gate
            grad = _product_transpose(values, s, (signal,))[signal]
            out[signal] = values.inputs[signal] * grad
        return out


def _is_log_softmax(layer: Layer) -> bool:
    target = layer.node.target
    return isinstance(layer.module, torch.nn.LogSoftmax) or target in (
        torch.nn.functional.log_softmax,
        torch.log_softmax,
        "log_softmax",
    )


def _softmax_dim(values: LayerValues) -> int:
    """The softmax's dim, negative (so it also indexes relevance with its concept axis)."""
    module, ndim = values.layer.module, values.inputs[0].dim()
    if module is not None:
        dim = module.dim
    else:
        args, kwargs = values.arguments()
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        raise ValueError(f"softmax {values.layer.name!r} has no explicit dim; give one")
    return dim - ndim if dim >= 0 else dim


def _feeds_softmax(node: object) -> bool:
    """Whether every use of ``node`` (through other ops) ends in a softmax: it computes
    attention scores."""
    users = list(node.users)
    if not users:
        return False
    for user in users:
        target = user.target
        if user.op == "call_module":
            target = type(user.graph.owning_module.get_submodule(target)).__name__.lower()
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name != "softmax" and (user.op == "output" or not _feeds_softmax(user)):
            return False
    return True


def _unbroadcast(R: Tensor, shape: torch.Size) -> Tensor:
    """Sum (K, ...) relevance down to (K, *shape) over the axes ``shape`` was broadcast along."""
    lead = R.dim() - 1 - len(shape)
    summed = R.sum(tuple(range(1, 1 + lead))) if lead else R
    axes = [i + 1 for i, n in enumerate(shape) if n == 1 and summed.shape[i + 1] != 1]
    return summed.sum(axes, keepdim=True) if axes else summed


_MATMULS = (torch.matmul, torch.bmm, "matmul", "bmm", operator_matmul)


def _product_transpose(
    values: LayerValues, s: Tensor, factors: tuple[int, ...] = (0, 1)
) -> list[Tensor | None]:
    """``J_a^T s`` and ``J_b^T s`` of a product of two tensors (for the ``factors`` asked
    for, None for the other), each with the other factor held constant (the product is
    bilinear, so these are the gradients at the inputs)."""
    a, b = values.inputs
    if values.layer.node.target in _MATMULS and a.dim() >= 2 and b.dim() >= 2:
        ga = _unbroadcast(s @ b.transpose(-1, -2), a.shape) if 0 in factors else None
        gb = _unbroadcast(a.transpose(-1, -2) @ s, b.shape) if 1 in factors else None
        return [ga, gb]
    return vjp(values.evaluate, [a, b], s)


def _positive_terms() -> tuple[Term, Term]:
    return Term(positive, positive, positive), Term(negative, negative, None)


def _raised(gamma: float) -> Modifier:
    """``w -> w + g w+``."""
    return lambda w: w + gamma * w.clamp(min=0)


def _lowered(gamma: float) -> Modifier:
    """``w -> w + g w-``."""
    return lambda w: w + gamma * w.clamp(max=0)


def _filled(value: float | Tensor) -> Modifier:
    """``x -> value`` broadcast to the shape of ``x`` (ZBox bounds)."""

    def fill(x: Tensor) -> Tensor:
        if isinstance(value, Tensor):
            return value.to(x).expand_as(x)
        return torch.full_like(x, float(value))

    return fill


def _is_positive(z: Tensor) -> Tensor:
    return z > 0


def _is_negative(z: Tensor) -> Tensor:
    return z < 0
