"""Mining the dataset store: reference samples (RelMax/ActMax, localised), class statistics,
PCX prototypes, concept similarity, ablation curves, scored discovery, concept labels and the
recovery of ground-truth concepts."""

from crp_toolkit.engine.receptive_field import ReceptiveField, receptive_field
from crp_toolkit.mining.ablation import AblationCurves, ablation_curves, read_ablation
from crp_toolkit.mining.discovery import DiscoveryScores, score_discovery
from crp_toolkit.mining.labels import (
    ConceptLabels,
    ProbeLabels,
    concept_labels,
    probe_labels,
    stored_probe_labels,
)
from crp_toolkit.mining.localise import LocalisedReferences, localise_references
from crp_toolkit.mining.prototypes import Prototypes, fit_prototypes
from crp_toolkit.mining.recovery import Recovery, recovery, recovery_markdown
from crp_toolkit.mining.references import (
    ClassReferenceTable,
    ReferenceTable,
    class_references,
    reference_samples,
)
from crp_toolkit.mining.similarity import ConceptSimilarity, concept_similarity
from crp_toolkit.mining.statistics import (
    ClassStatistics,
    class_statistics,
    load_result,
    save_result,
    top_classes,
    top_concepts,
)

__all__ = [
    "AblationCurves",
    "ClassReferenceTable",
    "ClassStatistics",
    "ConceptLabels",
    "ConceptSimilarity",
    "DiscoveryScores",
    "LocalisedReferences",
    "Prototypes",
    "ReceptiveField",
    "Recovery",
    "ReferenceTable",
    "ablation_curves",
    "class_references",
    "class_statistics",
    "concept_labels",
    "probe_labels",
    "ProbeLabels",
    "stored_probe_labels",
    "concept_similarity",
    "fit_prototypes",
    "load_result",
    "localise_references",
    "read_ablation",
    "receptive_field",
    "recovery",
    "recovery_markdown",
    "reference_samples",
    "save_result",
    "score_discovery",
    "top_classes",
    "top_concepts",
]
