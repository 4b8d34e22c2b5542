"""The ``mine`` stage: every mining result of every layer of the store, kept in the store
(``derived/``) for the atlas, and a summary in the run's folder (``mining.json``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from crp_toolkit.app.context import Loaded, open_study
from crp_toolkit.mining.ablation import ablation_curves
from crp_toolkit.mining.localise import LocalisedReferences, localise_references
from crp_toolkit.mining.prototypes import Prototypes, fit_prototypes
from crp_toolkit.mining.references import MODES, reference_samples
from crp_toolkit.mining.similarity import ConceptSimilarity, concept_similarity
from crp_toolkit.mining.statistics import (
    ClassStatistics,
    class_statistics,
    load_result,
    save_result,
)
from crp_toolkit.store.study import Study

log = logging.getLogger("crp_toolkit")


@dataclass(frozen=True)
class MinedLayer:
    """A layer's mining results: class statistics, concept similarity, PCX prototypes, and
    localised RelMax and ActMax references of its most relevant ``concepts``."""

    layer: str
    stats: ClassStatistics
    similarity: ConceptSimilarity
    prototypes: Prototypes
    concepts: list[int]  # the concepts with references, most relevant first
    relmax: LocalisedReferences
    actmax: LocalisedReferences

    def column(self, concept: int) -> int:
        return self.concepts.index(concept)


def mine(cfg: DictConfig, out: Path, loaded: Loaded | None = None) -> None:
    """Every mining result of every layer, and ablation curves, kept in the store; a bar of
    the layers done (and of the long steps of each) on stderr."""
    study = open_study(cfg, out, loaded)
    store, m, summary = study.store, cfg.mining, {}
    layers = tqdm(store.layers, desc="mine", unit="layer")
    for layer in layers:
        layers.set_postfix_str(layer)
        mined = mine_layer(m, study, layer, reuse=False, progress=True)
        summary[layer] = {
            "concepts": mined.concepts,
            "clusters": int(mined.similarity.cluster.max()) + 1,
        }
        curves = ablation_curves(
            study,
            layer,
            samples=m.ablation_samples,
            steps=m.ablation_steps,
            seed=m.seed,
            progress=True,
        )
        summary[layer]["ablation_area"] = dict(
            zip(curves.orderings, curves.area.round(4).tolist(), strict=True)
        )
    (out / "mining.json").write_text(json.dumps(summary, indent=2))
    log.info("mined %s into %s", ", ".join(store.layers), store.path)


def mine_layer(
    m: DictConfig, study: Study, layer: str, *, reuse: bool, progress: bool = False
) -> MinedLayer:
    """A layer's mining results by the ``mining`` config, kept in the store. With ``reuse``,
    results the store already holds for the same settings (their key) are read back instead.
    With ``progress``, bars of the references localised (when not cached) on stderr."""
    store, scoring = study.store, {"pool": m.pool, "normalised": m.normalised}

    def kept(kind, name: str, compute, **settings):
        found = load_result(store, kind, name, settings) if reuse else None
        if found is None:
            found = compute()
            save_result(store, found, settings)
        return found

    stats = kept(
        ClassStatistics,
        f"statistics/{layer}",
        lambda: class_statistics(store, layer, n_refs=m.n_refs, **scoring),
        n_refs=m.n_refs,
        **scoring,
    )
    clusters = min(m.clusters, store.layer(layer).shape[1])
    similarity = kept(
        ConceptSimilarity,
        f"similarity/{layer}/relevance",
        lambda: concept_similarity(store, layer, n_clusters=clusters, **scoring),
        n_clusters=clusters,
        **scoring,
    )
    fitting = {"n_prototypes": m.prototypes, "normalised": m.normalised, "seed": m.seed}
    prototypes = kept(
        Prototypes,
        f"prototypes/{layer}",
        lambda: fit_prototypes(store, layer, **fitting),
        **fitting,
    )
    concepts = most_relevant(stats, m.concepts)
    refs = [
        localise_references(  # cached in the store by everything that fixes them
            study,
            reference_samples(store, layer, mode=mode, n_refs=m.n_refs, **scoring),
            concepts=concepts,
            progress=progress,
        )
        for mode in MODES
    ]
    return MinedLayer(layer, stats, similarity, prototypes, concepts, *refs)


def dataset_relevance(stats: ClassStatistics) -> np.ndarray:
    """Each concept's mean relevance over all readable samples (from the class means)."""
    counts = stats.counts.astype(np.float64)
    return np.nansum(stats.relevance * counts[:, None], 0) / max(counts.sum(), 1.0)


def most_relevant(stats: ClassStatistics, n: int | None) -> list[int]:
    """The ``n`` concepts with the largest mean relevance over the dataset (all with None)."""
    order = np.argsort(-dataset_relevance(stats), kind="stable")
    return [int(c) for c in order[: n or len(order)]]
