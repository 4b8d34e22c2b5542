"""The vocabulary of term rules (modifiers, ``Term``, ``Part``, and ``LayerValues``: what a
rule sees of a layer) and their fast evaluation: modified parameters computed once per
parameter version, the terms of a part stacked into one modified forward and one transposed op
(ZBox, AlphaBeta, ...), terms that vanish on non-negative inputs dropped, and the layer's own
output reused as the denominator where a part is its plain forward pass (epsilon, zero)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from crp_toolkit.engine.graph import Layer
from crp_toolkit.engine.ops import Evaluate

Modifier = Callable[[Tensor], Tensor]
ParamView = Callable[[tuple, Tensor, Modifier], Tensor]
# what a rule reads of a layer: (its inputs, its output, the inputs' values: all of them, or
# the positions of those read; the others only for their shapes)
Reads = tuple[bool, bool, bool | tuple[int, ...]]


def identity(t: Tensor) -> Tensor:
    """Leave a tensor unchanged."""
    return t


def positive(t: Tensor) -> Tensor:
    """``t+ = max(t, 0)``."""
    return t.clamp(min=0)


def negative(t: Tensor) -> Tensor:
    """``t- = min(t, 0)``."""
    return t.clamp(max=0)


def ones(t: Tensor) -> Tensor:
    """A tensor of ones shaped like ``t`` (Flat and WSquare inputs)."""
    return torch.ones_like(t)


def square(t: Tensor) -> Tensor:
    """``t * t`` (WSquare weights)."""
    return t * t


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign0(z)`` with ``sign0(0) = +1``, as in zennit and RelevancePropagation.jl.

    Computed as ``z + copysign(eps, z)`` (two passes instead of four): it differs only at
    ``z = -0.0``, which a sum produces only when every contribution is zero, and then the
    relevance it passes on is zero either way.
    """
    return torch.copysign(z.new_full((), eps), z).add_(z)


@dataclass(frozen=True)
class Term:
    """One summand ``sign * layer(input(x); weight(W), bias(b))`` of a modified forward pass.

    ``bias=None`` drops the bias from this term.
    """

    input: Modifier = identity
    weight: Modifier = identity
    bias: Modifier | None = identity
    sign: float = 1.0

    @property
    def is_plain(self) -> bool:
        """True when the term is the layer's own forward pass (its output can be reused)."""
        return (
            self.input is identity
            and self.weight is identity
            and self.bias is identity
            and self.sign == 1.0
        )

    @property
    def vanishes_on_nonnegative(self) -> bool:
        """True when the term is zero for inputs >= 0 (it reads x- and has no bias)."""
        return self.input is negative and self.bias is None

    @property
    def keeps_nonnegative(self) -> bool:
        """True when the input modifier is the identity on inputs >= 0 (x+ = x)."""
        return self.input is positive


@dataclass(frozen=True)
class Part:
    """Terms sharing one denominator, weighted by ``coef``.

    ``select`` (a function of the layer's original output ``z``) restricts the part to the
    output relevance where it is true (used by the generalised gamma rule).
    """

    terms: tuple[Term, ...]
    coef: float = 1.0
    select: Callable[[Tensor], Tensor] | None = None
    sign: int = 0  # +1 / -1 when the denominator is >= 0 / <= 0 by construction

    @property
    def is_plain(self) -> bool:
        """True when the denominator is the layer's own output."""
        return len(self.terms) == 1 and self.terms[0].is_plain

    def denominator(self, z: Tensor, eps: float, *, fresh: bool = False) -> Tensor:
        """``s(z)``; where the sign is known, a single shift (in place when ``z`` is a fresh
        tensor nobody else holds)."""
        if self.sign == 0:
            return stabilize(z, eps)
        shift = eps if self.sign > 0 else -eps
        return z.add_(shift) if fresh else z + shift


@dataclass
class LayerValues:
    """What a rule sees of one layer in the relevance pass.

    ``inputs`` (empty unless the rule reads them) and ``output`` (None unless it reads it)
    come from the forward pass; ``evaluate`` re-runs the layer on other inputs;
    ``nonnegative``: every input is >= 0 by construction (it comes from a ReLU);
    ``pooled``: (winner indices, input shape) recorded by a max-pooling layer; ``params``:
    ``params(key, parameter, modify)`` is ``modify(parameter)`` computed once per parameter
    version; ``cache``: tensors a rule may keep for later relevance passes over the same
    forward pass (None when only one follows); ``arguments()``: the layer's call arguments
    (args, kwargs) with traced values filled in (a functional op's weights, dims...);
    ``stash``: what the rule's ``stash`` kept of the forward pass (gradient forms).
    """

    layer: Layer
    inputs: Sequence[Tensor]
    output: Tensor | None
    evaluate: Evaluate
    nonnegative: bool
    pooled: tuple[Tensor, torch.Size] | None
    params: ParamView
    cache: dict | None
    arguments: Callable[[], tuple[tuple, dict]] = lambda: ((), {})
    stash: object = None


def relevance(
    values: LayerValues, parts: Sequence[Part], stabilizer: float, R: Tensor
) -> list[Tensor | None]:
    """Per part, a denominator from the (modified) forward pass, then one transposed op per
    (stacked) term; the contributions of all parts summed per input."""
    layer, inputs = values.layer, values.inputs
    result: list[Tensor | None] = [None] * len(inputs)
    for p, part in enumerate(parts):
        prepared = [
            _prepare(t, layer, inputs, values.nonnegative, values.params, (p, k))
            for k, t in enumerate(part.terms)
        ]
        stacked = _fuse([t for t in prepared if t is not None], layer)
        d = _denominator(values, part, p, stacked, stabilizer)
        R_part = R if part.select is None else R * part.select(values.output)
        s = divided(R_part, d, fresh=values.cache is None)
        for term in stacked:
            for j, contribution in _contributions(values, term, s, part.coef * term.sign):
                result[j] = contribution if result[j] is None else result[j] + contribution
    return result


def divided(R: Tensor, d: Tensor, *, fresh: bool = True) -> Tensor:
    """``R / d``, a fresh tensor; written into ``d`` when it may be (``fresh``: a denominator
    nobody else holds, of the quotient's shape), which saves a buffer the size of the layer's
    output."""
    if fresh and R.shape[0] == 1 and R.shape[1:] == d.shape and R.dtype == d.dtype:
        return torch.div(R[0], d, out=d).unsqueeze(0)
    return R / d


@dataclass
class _PreparedTerm:
    """A term with its modified inputs and parameters computed once."""

    plain: bool
    inputs: list[Tensor]
    weight: Tensor | None
    bias: Tensor | None
    sign: float
    fused: int = 1  # how many terms are stacked along the input channels


def _prepare(
    term: Term,
    layer: Layer,
    inputs: Sequence[Tensor],
    nonneg: bool,
    params: ParamView,
    key: tuple[int, int],
) -> _PreparedTerm | None:
    """Modify inputs and parameters once; drop terms that vanish on non-negative inputs."""
    if nonneg and term.vanishes_on_nonnegative:
        return None  # x- = 0 and no bias: the term contributes nothing
    keep = nonneg and term.keeps_nonnegative  # x+ = x
    modified = [x if keep else term.input(x) for x in inputs]
    module = layer.module
    weight = bias = None
    if layer.op.parametric:
        weight = params((*key, "weight"), module.weight, term.weight)
        if module.bias is not None and term.bias is not None:
            bias = params((*key, "bias"), module.bias, term.bias)
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


def _denominator(
    values: LayerValues, part: Part, p: int, terms: Sequence[_PreparedTerm], stabilizer: float
) -> Tensor:
    """``s(z_part)``, kept in ``values.cache`` for later relevance passes where there are."""
    cache = values.cache
    d = None if cache is None else cache.get(p)
    if d is None:
        fresh = not (len(terms) == 1 and terms[0].plain)  # not the saved output
        d = part.denominator(_part_output(values, terms), stabilizer, fresh=fresh)
        if cache is not None:
            cache[p] = d
    return d


def _part_output(values: LayerValues, terms: Sequence[_PreparedTerm]) -> Tensor:
    """The output of one part: the layer's own output when the part is its forward."""
    if len(terms) == 1 and terms[0].plain:
        return values.output
    layer = values.layer
    z = None
    for t in terms:
        if layer.op.parametric:
            out = layer.op.forward(t.inputs[0], layer.module, t.weight, t.bias)
        else:
            out = values.evaluate(t.inputs)
        out = out if t.sign == 1.0 else t.sign * out
        z = out if z is None else z + out
    return z


def transposed(
    values: LayerValues, grad: Tensor, weight: Tensor | None = None, x: Tensor | None = None
) -> list[Tensor | None]:
    """``layer^T grad`` at each input: for conv and dense layers, of the linear map with
    ``weight`` (the layer's own by default) at an input shaped like ``x`` (the layer's);
    for parameter-free linear ops, of the op."""
    layer = values.layer
    if layer.op.parametric:
        weight = layer.module.weight if weight is None else weight
        x = values.inputs[0] if x is None else x
        return [layer.op.transpose_params(grad, x, layer.module, weight)]
    return layer.op.transpose(grad, values.inputs, values.evaluate)


def _contributions(values: LayerValues, term: _PreparedTerm, s: Tensor, scale: float):
    """(input position, ``input_t(x) * layer_t^T s``) for each input the term reaches."""
    layer = values.layer
    grads = transposed(values, s, term.weight, term.inputs[0])
    for j, (x, g) in enumerate(zip(term.inputs, grads, strict=True)):
        if g is None:
            continue
        own = layer.op.parametric and g.shape == torch.broadcast_shapes(g.shape, x.shape)
        contribution = g.mul_(x) if own else g * x  # g is fresh from a transpose
        if scale != 1.0:
            contribution.mul_(scale)
        if term.fused > 1:  # sum the stacked terms' slices
            dim = -1 if layer.kind == "linear" else 2
            shape = list(contribution.shape)
            shape[dim : dim + 1 or None] = [term.fused, shape[dim] // term.fused]
            contribution = contribution.reshape(shape).sum(dim - 1 if dim < 0 else dim)
        yield j, contribution
