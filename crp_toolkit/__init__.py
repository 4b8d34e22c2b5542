"""crp_toolkit: LRP and Concept Relevance Propagation for PyTorch vision models."""

from crp_toolkit import store
from crp_toolkit.atlas.heatmap import heatmap, heatmap_figure, save_heatmaps
from crp_toolkit.concepts.attribution_graph import AttributionGraph, ConceptNode, attribution_graph
from crp_toolkit.concepts.concepts import ChannelConcept, DirectionConcept, NeuronConcept
from crp_toolkit.concepts.conditional import CondAttribution, CondResult
from crp_toolkit.concepts.crp import (
    CRP,
    CRPExplanation,
    IndexedFeatures,
    TopNFeatures,
    concept_relevances,
)
from crp_toolkit.engine import composites, ops, rules
from crp_toolkit.engine.canonize import canonize, strip_softmax
from crp_toolkit.engine.explanation import Explanation, analyze
from crp_toolkit.engine.graph import UnsupportedLayerError
from crp_toolkit.engine.lrp import LRP

__version__ = "0.1.0"

__all__ = [
    "AttributionGraph",
    "ConceptNode",
    "attribution_graph",
    "CRP",
    "CRPExplanation",
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
