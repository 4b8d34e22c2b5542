"""crp_toolkit: LRP and Concept Relevance Propagation for PyTorch vision models.

Importing the package loads only the engine and the concept code; the store (Zarr) and the
heatmaps (matplotlib) are imported on first use of ``ct.store`` or ``ct.heatmap...``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crp_toolkit import composites, ops, rules
from crp_toolkit._version import __version__ as __version__
from crp_toolkit.concepts.attribution_graph import AttributionGraph, ConceptNode, attribution_graph
from crp_toolkit.concepts.basis import BasisConcept, ConceptBasis
from crp_toolkit.concepts.concepts import ChannelConcept, DirectionConcept, NeuronConcept
from crp_toolkit.concepts.conditional import CondAttribution, CondResult
from crp_toolkit.concepts.crp import (
    CRP,
    CRPExplanation,
    IndexedFeatures,
    TopNFeatures,
    concept_relevances,
)
from crp_toolkit.engine.canonize import canonize, strip_softmax
from crp_toolkit.engine.explanation import Explanation, analyze
from crp_toolkit.engine.graph import UnsupportedLayerError
from crp_toolkit.engine.lrp import LRP

if TYPE_CHECKING:
    from crp_toolkit import store
    from crp_toolkit.atlas.heatmap import heatmap, heatmap_figure, save_heatmaps


# name -> (module, attribute of it; None for the module itself), imported on first access
_LAZY: dict[str, tuple[str, str | None]] = {
    "store": ("crp_toolkit.store", None),
    "heatmap": ("crp_toolkit.atlas.heatmap", "heatmap"),
    "heatmap_figure": ("crp_toolkit.atlas.heatmap", "heatmap_figure"),
    "save_heatmaps": ("crp_toolkit.atlas.heatmap", "save_heatmaps"),
}


def __getattr__(name: str) -> Any:
    """Import a lazy name (PEP 562) and keep it, so that this runs once per name."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AttributionGraph",
    "ConceptNode",
    "attribution_graph",
    "BasisConcept",
    "CRP",
    "CRPExplanation",
    "ConceptBasis",
    "ChannelConcept",
    "CondAttribution",
    "CondResult",
    "DirectionConcept",
    "IndexedFeatures",
    "NeuronConcept",
    "TopNFeatures",
    "concept_relevances",
    "LRP",
    "Explanation",
    "UnsupportedLayerError",
    "analyze",
    "canonize",
    "composites",
    "heatmap",
    "heatmap_figure",
    "save_heatmaps",
    "ops",
    "rules",
    "store",
    "strip_softmax",
]
