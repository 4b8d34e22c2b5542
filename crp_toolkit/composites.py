"""Composites: which LRP rule each layer gets (the public home of
``crp_toolkit.engine.composites``)."""

from crp_toolkit.engine.composites import (
    BASE_RULES,
    ROUTING_DEFAULTS,
    WEIGHTED_KINDS,
    Composite,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    FirstLayerMap,
    FirstNTypeMap,
    GlobalMap,
    LastLayerMap,
    NameMap,
    Primitive,
    RangeMap,
    TypeKey,
    TypeMap,
)

__all__ = [
    "TypeKey",
    "Primitive",
    "WEIGHTED_KINDS",
    "ROUTING_DEFAULTS",
    "GlobalMap",
    "TypeMap",
    "NameMap",
    "RangeMap",
    "FirstLayerMap",
    "LastLayerMap",
    "FirstNTypeMap",
    "Composite",
    "BASE_RULES",
    "EpsilonPlus",
    "EpsilonAlpha2Beta1",
    "EpsilonPlusFlat",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox",
]
