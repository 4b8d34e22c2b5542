"""Composites: which rule each layer gets, as a list of small declarative maps.

A composite is a sequence of primitives; later primitives override earlier ones (as in
RelevancePropagation.jl). Every composite starts from ``Routing()``, the rules of the layers
that only move, gate or normalise relevance; it is shown in the composite's ``repr`` (which
is also its identity in a store's provenance). A type map's keys are module classes (matched
with ``isinstance``) or op kinds (strings, checked against the kinds the op registry knows,
see ``crp_toolkit.engine.ops``: "conv", "linear", "add", "concat", "avgpool", "maxpool",
"activation", "batchnorm", "reshape", "index", "gate", "layernorm", "softmax", "matmul").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from crp_toolkit.engine.graph import Graph, Layer
from crp_toolkit.engine.ops import current_ops
from crp_toolkit.engine.rules import (
    AlphaBetaRule,
    ConstantWeightsRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    LayerNormRule,
    PassRule,
    Rule,
    SoftmaxRule,
    UniformRule,
    ZBoxRule,
    ZPlusRule,
)

TypeKey = type | str


def _matches(key: TypeKey, layer: Layer) -> bool:
    if isinstance(key, str):
        return layer.kind == key
    return layer.module is not None and isinstance(layer.module, key)


def _checked(type_map: Mapping[TypeKey, Rule]) -> None:
    """Refuse op kinds (string keys) that no op has: they would silently match nothing."""
    known = current_ops().kinds
    unknown = [key for key in type_map if isinstance(key, str) and key not in known]
    if unknown:
        raise ValueError(
            f"unknown op kind(s) {', '.join(map(repr, unknown))} in a type map; known kinds: "
            f"{', '.join(sorted(known))} (or use a module class, e.g. torch.nn.Conv2d)"
        )


def _lookup(type_map: Mapping[TypeKey, Rule], layer: Layer) -> Rule | None:
    return next((rule for key, rule in type_map.items() if _matches(key, layer)), None)


class Primitive:
    """Assigns rules to some layers: ``assign`` returns {layer index: rule}."""

    def assign(self, graph: Graph) -> dict[int, Rule]:
        raise NotImplementedError


# Kinds that carry a weighted sum, where the choice of rule matters (GlobalMap's reach).
WEIGHTED_KINDS = ("conv", "linear", "add", "avgpool")

# Kinds that only move, gate or normalise relevance: the rules of ``Routing()``.
ROUTING_DEFAULTS: dict[TypeKey, Rule] = {
    "activation": PassRule(),
    "batchnorm": PassRule(),
    "reshape": PassRule(),
    "index": PassRule(),
    "gate": PassRule(),
    "concat": PassRule(),
    "maxpool": PassRule(),
    "layernorm": LayerNormRule(),
}


@dataclass(frozen=True)
class GlobalMap(Primitive):
    """One rule for every weighted layer (conv, dense, sum, average pooling)."""

    rule: Rule

    def assign(self, graph: Graph) -> dict[int, Rule]:
        return {layer.index: self.rule for layer in graph.layers if layer.kind in WEIGHTED_KINDS}


@dataclass(frozen=True)
class TypeMap(Primitive):
    """Rules by module class or op kind.

    ``TypeMap({"conv": ZPlusRule(), nn.Linear: EpsilonRule()})``
    """

    rules: Mapping[TypeKey, Rule]

    def __post_init__(self) -> None:
        _checked(self.rules)

    def assign(self, graph: Graph) -> dict[int, Rule]:
        found = {layer.index: _lookup(self.rules, layer) for layer in graph.layers}
        return {i: rule for i, rule in found.items() if rule is not None}


@dataclass(frozen=True)
class Routing(TypeMap):
    """The rules of layers that only move, gate or normalise relevance (``ROUTING_DEFAULTS``):
    activations, BatchNorm, dropout, reshapes, concatenations and gates pass it (PassRule;
    at max pooling the winner takes all), LayerNorm gets the LN-rule. Every composite starts
    from it."""

    rules: Mapping[TypeKey, Rule] = field(default_factory=lambda: dict(ROUTING_DEFAULTS))


@dataclass(frozen=True)
class NameMap(Primitive):
    """Rules by layer name, as regular expressions matched in full.

    ``NameMap({r"features\\.0": FlatRule()})``
    """

    rules: Mapping[str, Rule]

    def assign(self, graph: Graph) -> dict[int, Rule]:
        out = {}
        for layer in graph.layers:
            for pattern, rule in self.rules.items():
                if re.fullmatch(pattern, layer.name):
                    out[layer.index] = rule
                    break
        return out


@dataclass(frozen=True)
class RangeMap(Primitive):
    """A rule (or type map) for the layers with index in ``range`` (see ``print(analyzer)``);
    a bare rule reaches only weighted layers (conv, dense, sum, average pooling)."""

    range: range
    rule: Rule | Mapping[TypeKey, Rule]

    def __post_init__(self) -> None:
        _checked_rule(self.rule)

    def assign(self, graph: Graph) -> dict[int, Rule]:
        layers = [graph.layers[i] for i in self.range if i < len(graph.layers)]
        if isinstance(self.rule, Rule):  # a bare rule reaches weighted layers, as GlobalMap
            layers = [layer for layer in layers if layer.kind in WEIGHTED_KINDS]
        return _restricted(self.rule, layers)


@dataclass(frozen=True)
class FirstLayerMap(Primitive):
    """A rule (or type map) for every conv/dense layer that reads the model input directly."""

    rule: Rule | Mapping[TypeKey, Rule]

    def __post_init__(self) -> None:
        _checked_rule(self.rule)

    def assign(self, graph: Graph) -> dict[int, Rule]:
        return _restricted(self.rule, [graph.layers[i] for i in graph.readers_of_input()])


@dataclass(frozen=True)
class LastLayerMap(Primitive):
    """A rule (or type map) for the last conv/dense layer before the output."""

    rule: Rule | Mapping[TypeKey, Rule]

    def __post_init__(self) -> None:
        _checked_rule(self.rule)

    def assign(self, graph: Graph) -> dict[int, Rule]:
        parametric = [layer for layer in graph.layers if layer.op.parametric]
        return _restricted(self.rule, parametric[-1:])


@dataclass(frozen=True)
class FirstNTypeMap(Primitive):
    """Rules by type for the first ``n`` layers that match any key of the type map."""

    n: int
    rules: Mapping[TypeKey, Rule]

    def __post_init__(self) -> None:
        _checked(self.rules)

    def assign(self, graph: Graph) -> dict[int, Rule]:
        hits = [layer for layer in graph.layers if _lookup(self.rules, layer) is not None]
        return _restricted(self.rules, hits[: self.n])


def _checked_rule(rule: Rule | Mapping[TypeKey, Rule]) -> None:
    if not isinstance(rule, Rule):
        _checked(rule)


def _restricted(rule: Rule | Mapping[TypeKey, Rule], layers: Sequence[Layer]) -> dict[int, Rule]:
    if isinstance(rule, Rule):
        return {layer.index: rule for layer in layers}
    found = {layer.index: _lookup(rule, layer) for layer in layers}
    return {i: r for i, r in found.items() if r is not None}


class Composite:
    """``Routing()`` (or ``routing``), then the primitives in order; later ones override
    earlier ones."""

    def __init__(self, *primitives: Primitive, routing: Primitive | None = None):
        self.routing = Routing() if routing is None else routing
        self.primitives = tuple(primitives)

    def assign(self, graph: Graph) -> list[Rule | None]:
        """Rule per layer (None where no primitive reaches a weighted layer)."""
        rules: list[Rule | None] = [None] * len(graph.layers)
        for primitive in (self.routing, *self.primitives):
            for index, rule in primitive.assign(graph).items():
                rules[index] = rule
        return rules

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(p) for p in (self.routing, *self.primitives))
        return f"{type(self).__name__}(\n  {inner}\n)"


def base_rules(epsilon: float = 1e-6) -> dict[TypeKey, Rule]:
    """Every preset's rules for dense layers, sums and average pooling: the epsilon rule."""
    return {kind: EpsilonRule(epsilon) for kind in ("linear", "add", "avgpool")}


def _preset(
    epsilon: float, conv_rule: Rule, first_rule: Rule | Mapping[TypeKey, Rule] | None = None
) -> tuple[Primitive, ...]:
    primitives: list[Primitive] = [TypeMap({**base_rules(epsilon), "conv": conv_rule})]
    if first_rule is not None:
        primitives.append(FirstLayerMap(first_rule))
    return tuple(primitives)


class EpsilonPlus(Composite):
    """conv -> ZPlus, dense -> Epsilon(epsilon); ``stabilizer`` is ZPlus's."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> None:
        super().__init__(*_preset(epsilon, ZPlusRule(stabilizer)))


class EpsilonAlpha2Beta1(Composite):
    """conv -> AlphaBeta(2, 1), dense -> Epsilon(epsilon); ``stabilizer`` is AlphaBeta's."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> None:
        super().__init__(*_preset(epsilon, AlphaBetaRule(2.0, 1.0, stabilizer)))


class EpsilonPlusFlat(Composite):
    """EpsilonPlus, with Flat on every conv/dense layer that reads the input."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> None:
        super().__init__(*_preset(epsilon, ZPlusRule(stabilizer), FlatRule(stabilizer)))


class EpsilonAlpha2Beta1Flat(Composite):
    """EpsilonAlpha2Beta1, with Flat on every conv/dense layer that reads the input."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> None:
        conv, first = AlphaBetaRule(2.0, 1.0, stabilizer), FlatRule(stabilizer)
        super().__init__(*_preset(epsilon, conv, first))


class EpsilonGammaBox(Composite):
    """conv -> Gamma(gamma), dense -> Epsilon(epsilon), and ZBox(low, high) on the convs
    reading the input; ``stabilizer`` is Gamma's and ZBox's."""

    def __init__(
        self,
        low: float | Tensor,
        high: float | Tensor,
        gamma: float = 0.25,
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
    ) -> None:
        box = ZBoxRule(low, high, stabilizer)
        super().__init__(*_preset(epsilon, GammaRule(gamma, stabilizer), {"conv": box}))


def _transformer_rules(
    epsilon: float, gamma: float | None, stabilizer: float
) -> dict[TypeKey, Rule]:
    """Dense and conv layers (the patch embedding): Gamma(gamma) when ``gamma`` is given, else
    Epsilon(epsilon); sums and average pooling: Epsilon(epsilon); LayerNorm/RMSNorm: the LN
    rule (standard deviation constant) with the same epsilon."""
    weighted = GammaRule(gamma, stabilizer) if gamma is not None else EpsilonRule(epsilon)
    return {
        **base_rules(epsilon),
        "linear": weighted,
        "conv": weighted,
        "layernorm": LayerNormRule(epsilon),
    }


class AttnLRP(Composite):
    """AttnLRP for transformers (Achtibat et al. 2024, ICML): softmax -> SoftmaxRule, matmuls
    and gating products -> UniformRule, LayerNorm/RMSNorm -> std held constant, GELU/SiLU and
    other activations -> identity; dense and conv layers -> Epsilon(epsilon), or Gamma(gamma)
    when ``gamma`` is given; sums -> Epsilon(epsilon). ``stabilizer`` is Gamma's and the
    uniform rule's; with ``epsilon=0, stabilizer=0`` the analyzer runs in the gradient domain
    (``LRP(domain=...)``)."""

    def __init__(
        self, epsilon: float = 1e-6, gamma: float | None = None, stabilizer: float = 1e-6
    ) -> None:
        attention = {"softmax": SoftmaxRule(), "matmul": UniformRule(stabilizer)}
        super().__init__(
            TypeMap(
                {
                    **_transformer_rules(epsilon, gamma, stabilizer),
                    **attention,
                    "gate": UniformRule(),
                }
            )
        )


class CPLRP(Composite):
    """CP-LRP for transformers (Ali et al. 2022, ICML): the attention weights are constants
    (ConstantWeightsRule on softmax and matmuls: no relevance into q and k), LayerNorm with
    the std constant, activations -> identity, gates -> the signal takes all; dense and conv
    layers -> Epsilon(epsilon), or Gamma(gamma) when ``gamma`` is given. With ``epsilon=0``
    this is LXT's efficient CP-LRP for torchvision's ViT (gradient times input), and the
    analyzer runs in the gradient domain (``LRP(domain=...)``), which keeps less."""

    def __init__(
        self, epsilon: float = 1e-6, gamma: float | None = None, stabilizer: float = 1e-6
    ) -> None:
        constant = ConstantWeightsRule(epsilon)
        super().__init__(
            TypeMap(
                {
                    **_transformer_rules(epsilon, gamma, stabilizer),
                    "softmax": constant,
                    "matmul": constant,
                }
            )
        )
