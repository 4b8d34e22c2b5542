"""LRP rules, stated as how they modify a layer's input, parameters and denominator.

A layer computes ``z = W x + b``. A rule is a sum of *parts*; each part is a set of *terms*
that share one denominator::

    z_part = sum_t sign_t * layer(input_t(x); weight_t(W), bias_t(b))
    R_in  += coef * sum_t sign_t * input_t(x) * layer_t^T (R / s(z_part))

with the stabilised denominator ``s(d) = d + eps * sign0(d)`` and ``sign0(0) = +1``.
Most rules have one part with one term and only override ``modify_input``,
``modify_weight`` and ``modify_bias`` (as in RelevancePropagation.jl); sign-split rules
(ZPlus, AlphaBeta, GeneralizedGamma, ZBox) override ``parts``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

Modifier = Callable[[Tensor], Tensor]


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

    def denominator(self, z: Tensor, eps: float, *, fresh: bool = False) -> Tensor:
        """``s(z)``; where the sign is known, a single shift (in place when ``z`` is a fresh
        tensor nobody else holds)."""
        if self.sign == 0:
            return stabilize(z, eps)
        shift = eps if self.sign > 0 else -eps
        return z.add_(shift) if fresh else z + shift


class Rule:
    """Base of all rules: one part, one term built from the three modifiers."""

    stabilizer: float = 1e-6
    denominator_sign: ClassVar[int] = 0  # +1 where every modified contribution is >= 0

    def modify_input(self, x: Tensor) -> Tensor:
        return x

    def modify_weight(self, w: Tensor) -> Tensor:
        return w

    def modify_bias(self, b: Tensor) -> Tensor:
        return self.modify_weight(b)

    def parts(self) -> tuple[Part, ...]:
        """The rule as parts and terms (see the module docstring)."""
        cls = type(self)

        def pick(name: str) -> Modifier:
            overridden = getattr(cls, name) is not getattr(Rule, name)
            return getattr(self, name) if overridden else identity

        bias = pick("modify_bias")
        if bias is identity and pick("modify_weight") is not identity:
            bias = self.modify_bias
        term = Term(pick("modify_input"), pick("modify_weight"), bias)
        return (Part((term,), sign=self.denominator_sign),)

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in fields if fields[k].repr)
        return f"{type(self).__name__}({args})"


@dataclass(repr=False)
class ZeroRule(Rule):
    """LRP-0: ``x * W^T (R / s(z))`` with a tiny stabilizer (discouraged in deep layers)."""

    stabilizer: float = 1e-9


@dataclass(repr=False)
class EpsilonRule(Rule):
    """LRP-epsilon: like LRP-0, with a larger stabilizer that absorbs weak, noisy relevance."""

    stabilizer: float = 1e-6


@dataclass(repr=False)
class GammaRule(Rule):
    """Classic LRP-gamma: weights and bias favour positive contributions, ``W + g W+``."""

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def modify_weight(self, w: Tensor) -> Tensor:
        return w + self.gamma * w.clamp(min=0)


@dataclass(repr=False)
class WSquareRule(Rule):
    """LRP-w^2: input set to 1, weights squared, no bias."""

    stabilizer: float = 1e-6
    denominator_sign: ClassVar[int] = 1

    def modify_input(self, x: Tensor) -> Tensor:
        return torch.ones_like(x)

    def modify_weight(self, w: Tensor) -> Tensor:
        return w * w

    def modify_bias(self, b: Tensor) -> Tensor:
        return torch.zeros_like(b)


@dataclass(repr=False)
class FlatRule(Rule):
    """LRP-flat: relevance spread uniformly over each receptive field (inputs and weights 1)."""

    stabilizer: float = 1e-6
    denominator_sign: ClassVar[int] = 1

    def modify_input(self, x: Tensor) -> Tensor:
        return torch.ones_like(x)

    def modify_weight(self, w: Tensor) -> Tensor:
        return torch.ones_like(w)

    def modify_bias(self, b: Tensor) -> Tensor:
        return torch.zeros_like(b)


@dataclass(repr=False)
class ZPlusRule(Rule):
    """LRP-z+: ``z+ = W+ x+ + W- x- + b+``, relevance only along positive contributions."""

    stabilizer: float = 1e-6

    def parts(self) -> tuple[Part, ...]:
        return (Part(_positive_terms(), sign=1),)


@dataclass(repr=False)
class AlphaBetaRule(Rule):
    """LRP-alpha-beta: ``alpha`` times the z+ part minus ``beta`` times the z- part."""

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
class GeneralizedGammaRule(Rule):
    """Sign-split gamma rule for leaky activations (Andeol et al. 2021; zennit >= 0.5 Gamma).

    Where the layer output is positive, relevance follows ``W + g W+`` on positive inputs and
    ``W + g W-`` on negative inputs; where it is negative, the two swap.
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def parts(self) -> tuple[Part, ...]:
        g = self.gamma

        def up(w: Tensor) -> Tensor:
            return w + g * w.clamp(min=0)

        def down(w: Tensor) -> Tensor:
            return w + g * w.clamp(max=0)

        pos = Part((Term(positive, up, up), Term(negative, down, None)), select=_is_positive)
        neg = Part((Term(positive, down, down), Term(negative, up, None)), select=_is_negative)
        return pos, neg


@dataclass(repr=False)
class ZBoxRule(Rule):
    """LRP-z^B for bounded inputs in ``[low, high]`` (scalars or input-shaped tensors).

    ``z = W x - W+ l - W- h`` (the bias cancels).
    """

    low: float | Tensor = field(default=None)
    high: float | Tensor = field(default=None)
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        if self.low is None or self.high is None:
            raise ValueError("ZBoxRule needs the input bounds: ZBoxRule(low, high)")

    def _bound(self, value: float | Tensor) -> Modifier:
        def fill(x: Tensor) -> Tensor:
            if isinstance(value, Tensor):
                return value.to(x).expand_as(x)
            return torch.full_like(x, float(value))

        return fill

    def parts(self) -> tuple[Part, ...]:
        terms = (
            Term(identity, identity, None),
            Term(self._bound(self.low), positive, None, sign=-1.0),
            Term(self._bound(self.high), negative, None, sign=-1.0),
        )
        return (Part(terms),)


@dataclass(repr=False)
class PassRule(Rule):
    """Relevance passes unchanged: as is through elementwise ops, and back to where it came
    from through routing ops (reshape, concatenation, max-pooling winner, gate input)."""


@dataclass(repr=False)
class LayerNormRule(Rule):
    """LN-rule (Ali et al. 2022): LayerNorm as a linear centering with sigma detached,
    relevance redistributed by the epsilon rule through that linear map."""

    stabilizer: float = 1e-6


def _positive_terms() -> tuple[Term, Term]:
    return Term(positive, positive, positive), Term(negative, negative, None)


def _is_positive(z: Tensor) -> Tensor:
    return z > 0


def _is_negative(z: Tensor) -> Tensor:
    return z < 0
