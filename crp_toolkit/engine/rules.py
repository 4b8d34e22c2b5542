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

A rule may also state its *gradient form* (``gradient_reads``, ``gradient_in``): the same rule
written for a pass that carries ``G`` with relevance ``R = z * G`` at each layer's output
``z`` (input times a modified gradient, as LXT computes LRP-0), which reads less of the
forward pass (a dense layer reads nothing). Rules state it only where it is exact and reads
less: stabilizer-free rules and routing (see ``LRP(domain=...)``).
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
    Reads,
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
    "Reads",
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

    def gradient_reads(self, layer: Layer) -> Reads | None:
        """What ``gradient_in`` reads of the layer, as (inputs, output, the inputs' values:
        all of them, or the positions of those read); None where the rule has no exact
        gradient form on it."""
        return None

    def divides_by_output(self, layer: Layer) -> bool:
        """Whether ``relevance_in`` divides the relevance by the layer's output ``z`` before
        anything else, so relevance ``R`` given there enters the gradient domain as
        ``G = R / z`` exactly (LRP-0 and the other stabilizer-free rules)."""
        return False

    def stashes(self, layer: Layer) -> bool:
        """Whether ``gradient_in`` reads ``stash``'s summary of the forward pass."""
        return False

    def stash(self, values: LayerValues) -> object:
        """A small summary of the layer's forward pass (from its inputs and output) that
        ``gradient_in`` reads instead of them, computed during the forward pass."""
        raise NotImplementedError

    def gradient_in(self, values: LayerValues, G: Tensor) -> list[Tensor | None]:
        """The gradient form: given ``G`` (K, B, ...) with relevance ``z * G`` at the layer's
        output ``z``, the ``G_i`` at each input ``a_i`` such that ``a_i * G_i`` is the
        relevance ``relevance_in`` gives it; None for an input that gets none."""
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

    def gradient_reads(self, layer: Layer) -> Reads | None:
        """LRP-0 only (the one plain term, stabilizer 0): the transpose reads shapes."""
        if self.stabilizer != 0 or self.parts() != TermRule.parts(self):
            return None
        return (True, False, False)

    def divides_by_output(self, layer: Layer) -> bool:
        return self.gradient_reads(layer) is not None

    def gradient_in(self, values: LayerValues, G: Tensor) -> list[Tensor | None]:
        """LRP-0: ``G_in = W^T G``, since ``R / z = G``."""
        return terms.transposed(values, G)


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

    def gradient_reads(self, layer: Layer) -> Reads | None:
        """Identities (dropout in eval) and max-pooling modules read nothing; other
        elementwise ops and gates read their inputs and output (``G_in = G * z / a``);
        re-indexing reads shapes."""
        if layer.is_identity or layer.op.reports_indices(layer.module):
            return (False, False, False)
        if _changes_values(layer):
            return (True, True, True)
        if layer.op.routes_by_shape():
            return (True, False, False)
        return (True, False, True) if layer.kind == "maxpool" else None

    def gradient_in(self, values: LayerValues, G: Tensor) -> list[Tensor | None]:
        """``G`` routed as ``R`` is; where the op changes values (an activation, a gate),
        times ``z / a``, the output over the input it passes to."""
        layer = values.layer
        if layer.is_identity:
            return [G] + [None] * (len(layer.inputs) - 1)
        routed = self.relevance_in(values, G)
        if not _changes_values(layer):
            return routed
        return [
            None if g is None else _scaled(g, _ratio(values.output, a))
            for g, a in zip(routed, values.inputs, strict=True)
        ]


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
        norm = _norm_of(values, x.dtype)
        dims = norm.dims
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

    def gradient_reads(self, layer: Layer) -> Reads | None:
        """Stabilizer 0 only: it reads the stashed ``1 / sigma``, not the layer's tensors."""
        return None if self.stabilizer != 0 else (False, False, False)

    def divides_by_output(self, layer: Layer) -> bool:
        return self.stabilizer == 0

    def stashes(self, layer: Layer) -> bool:
        return True

    def stash(self, values: LayerValues) -> tuple[_Norm, Tensor]:
        """The normalisation and ``1 / sigma`` (``1 / rms`` for RMSNorm) per normalised row."""
        x = values.inputs[0]
        norm = _norm_of(values, x.dtype)
        if norm.centered:  # the forward's kernel (a tenth of the time of x.var)
            return norm, torch.native_layer_norm(x, norm.shape, None, None, norm.eps)[2]
        return norm, x.pow(2).mean(norm.dims, keepdim=True).add_(norm.eps).rsqrt_()

    def gradient_in(self, values: LayerValues, G: Tensor) -> list[Tensor | None]:
        """``G_in = u - mean(u)``, ``u = g / sigma * G`` (``G_in = u`` for RMSNorm)."""
        norm, rstd = values.stash
        u = G * norm.weight if norm.weight is not None else G.clone()
        u.mul_(rstd)
        if norm.centered:
            u.sub_(u.mean(norm.dims, keepdim=True))
        return [u]


@dataclass(frozen=True)
class _Norm:
    """What a LayerNorm / RMSNorm layer normalises and with which parameters."""

    shape: tuple[int, ...]
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    centered: bool

    @property
    def dims(self) -> tuple[int, ...]:
        """The normalised axes, negative."""
        return tuple(range(-len(self.shape), 0))


def _norm_of(values: LayerValues, dtype: torch.dtype) -> _Norm:
    """The normalisation of a norm module, or of ``F.layer_norm`` / ``F.rms_norm`` from its
    traced call arguments (``dtype``: the input's, for the default eps of RMSNorm)."""
    layer = values.layer
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
    eps = torch.finfo(dtype).eps if eps is None else eps
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

    def gradient_reads(self, layer: Layer) -> Reads | None:
        return (False, True, False)

    def gradient_in(self, values: LayerValues, G: Tensor) -> list[Tensor | None]:
        """``G_in = s * G - s * sum(s * G)``: the softmax's own gradient (``R = s * G``)."""
        s = values.output
        sg = G * s
        return [sg.sub_(s * sg.sum(_softmax_dim(values), keepdim=True))]


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

    def gradient_reads(self, layer: Layer) -> Reads | None:
        """Matmuls with stabilizer 0 and gates: the factors (a single factor: the output)."""
        if layer.kind == "matmul":
            return None if self.stabilizer != 0 else (True, False, True)
        return (True, len(layer.inputs) == 1, True)

    def divides_by_output(self, layer: Layer) -> bool:
        return layer.kind == "matmul" and self.stabilizer == 0

    def gradient_in(self, values: LayerValues, G: Tensor) -> list[Tensor | None]:
        """``G_a = (G / 2) @ b^T``, ``G_b = a^T @ (G / 2)``; at a gate ``a * b``,
        ``G_a = b * G / 2`` (summed over the axes ``a`` was broadcast along)."""
        inputs = values.inputs
        if values.layer.kind == "matmul":
            return _product_transpose(values, G / 2)
        if len(inputs) == 1:
            return [_scaled(G, _ratio(values.output, inputs[0]))]
        a, b = inputs
        return [_unbroadcast(G * b / 2, a.shape), _unbroadcast(G * a / 2, b.shape)]


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

    def gradient_reads(self, layer: Layer) -> Reads | None:
        """Stabilizer 0 only: of ``A @ v``, the values of ``A`` (and the shape of ``v``)."""
        if self.stabilizer != 0:
            return None
        return (True, False, (layer.gate,)) if self.reads_inputs(layer) else (False, False, False)

    def divides_by_output(self, layer: Layer) -> bool:
        return self.stabilizer == 0 and self.reads_inputs(layer)

    def gradient_in(self, values: LayerValues, G: Tensor) -> list[Tensor | None]:
        """``G_v = A^T @ G``; none into the attention weights."""
        layer = values.layer
        out: list[Tensor | None] = [None] * len(layer.inputs)
        if layer.kind == "matmul" and layer.gate is not None:
            signal = 1 - layer.gate
            out[signal] = _product_transpose(values, G, (signal,))[signal]
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
    shaped = values.inputs[0] if values.inputs else values.output
    module, ndim = values.layer.module, shaped.dim()
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


def _changes_values(layer: Layer) -> bool:
    """Whether PassRule hands on relevance through an op that changes values (an activation,
    a gate), not one that only moves them."""
    return layer.op.elementwise or layer.kind == "gate"


def _ratio(z: Tensor, a: Tensor) -> Tensor:
    """``z / a``, 0 where ``a = 0`` (the relevance ``a * G`` is 0 there whatever ``G`` is, as
    the relevance over a stabilized ``a`` is): the quotient's nan and infinities (from
    ``a = 0``; the inputs are finite) set to 0 in one pass."""
    return torch.div(z, a).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _scaled(G: Tensor, ratio: Tensor) -> Tensor:
    """``G * ratio`` (K, B, ...) times (B, ...), written into the fresh ``ratio`` when it
    may be."""
    if G.shape[0] == 1 and G.shape[1:] == ratio.shape and G.dtype == ratio.dtype:
        return ratio.mul_(G[0]).unsqueeze(0)
    return G * ratio


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
