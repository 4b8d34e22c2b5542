"""Figures and the HTML atlas: heatmaps, glocal explanations, concept atlases and sheets,
layer maps, prototypes, ablation curves, and a static site to browse them."""

from crp_toolkit.atlas.figures import (
    ConceptPanel,
    FigureStyle,
    concept_atlas_figure,
    concept_panels,
    dominant_concepts,
    glocal_figure,
    save_figure,
    superpixels,
)
from crp_toolkit.atlas.heatmap import heatmap, heatmap_figure, save_heatmaps
from crp_toolkit.atlas.sheets import (
    AblationCurve,
    ConceptSheet,
    PrototypeView,
    ablation_figure,
    class_importance_figure,
    concept_sheet_figure,
    layer_map_figure,
    prototype_figure,
)
from crp_toolkit.atlas.site import (
    ClassEntry,
    ConceptEntry,
    PrototypeEntry,
    SiteContent,
    write_site,
)

__all__ = [
    "AblationCurve",
    "ClassEntry",
    "ConceptEntry",
    "ConceptPanel",
    "ConceptSheet",
    "FigureStyle",
    "PrototypeEntry",
    "PrototypeView",
    "SiteContent",
    "ablation_figure",
    "class_importance_figure",
    "concept_atlas_figure",
    "concept_panels",
    "concept_sheet_figure",
    "dominant_concepts",
    "glocal_figure",
    "heatmap",
    "heatmap_figure",
    "layer_map_figure",
    "prototype_figure",
    "save_figure",
    "save_heatmaps",
    "superpixels",
    "write_site",
]
