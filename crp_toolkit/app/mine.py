"""The ``mine`` stage: every mining result of every layer of the store, kept in the store
(``derived/``) for the atlas, and a summary in the run's folder (``mining.json``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from crp_toolkit.app.stages import Loaded, load, open_store
from crp_toolkit.mining.ablation import ablation_curves
from crp_toolkit.mining.localise import localise_references
from crp_toolkit.mining.prototypes import fit_prototypes
from crp_toolkit.mining.references import MODES, reference_samples
from crp_toolkit.mining.similarity import concept_similarity
from crp_toolkit.mining.statistics import ClassStatistics, class_statistics, save_result
from crp_toolkit.store.zarr_store import Store

log = logging.getLogger("crp_toolkit")


def mine(cfg: DictConfig, out: Path) -> None:
    """Class statistics, concept similarity, PCX prototypes, localised RelMax and ActMax
    references of the most relevant concepts, and ablation curves, per layer."""
    loaded, store = load(cfg), open_store(cfg, out)
    summary = {layer: mine_layer(cfg.mining, loaded, store, layer) for layer in store.layers}
    (out / "mining.json").write_text(json.dumps(summary, indent=2))
    log.info("mined %s into %s", ", ".join(store.layers), store.path)


def mine_layer(m: DictConfig, loaded: Loaded, store: Store, layer: str) -> dict:
    scoring = {"target": m.target, "normalised": m.normalised}
    stats = class_statistics(store, layer, k=m.k, **scoring)
    save_result(store, stats)
    concepts = store.layer(layer).shape[1]
    similarity = concept_similarity(store, layer, n_clusters=min(m.clusters, concepts), **scoring)
    save_result(store, similarity)
    prototypes = fit_prototypes(
        store, layer, n_prototypes=m.prototypes, normalised=m.normalised, seed=m.seed
    )
    save_result(store, prototypes)
    chosen = most_relevant(stats, m.concepts)
    for mode in MODES:
        table = reference_samples(store, layer, mode=mode, k=m.k, **scoring)
        localise_references(
            loaded.analyzer,
            loaded.dataset,
            store,
            table,
            dataset_description=loaded.description,
            concepts=chosen,
        )
    curves = ablation_curves(
        loaded.analyzer,
        loaded.dataset,
        store,
        layer,
        dataset_description=loaded.description,
        samples=m.ablation_samples,
        steps=m.ablation_steps,
        seed=m.seed,
    )
    return {
        "concepts": chosen,
        "clusters": int(similarity.cluster.max()) + 1,
        "ablation_area": {
            o: round(float(a), 4) for o, a in zip(curves.orderings, curves.area, strict=True)
        },
    }


def dataset_relevance(stats: ClassStatistics) -> np.ndarray:
    """Each concept's mean relevance over all readable samples (from the class means)."""
    counts = stats.counts.astype(np.float64)
    return np.nansum(stats.relevance * counts[:, None], 0) / max(counts.sum(), 1.0)


def most_relevant(stats: ClassStatistics, n: int | None) -> list[int]:
    """The ``n`` concepts with the largest mean relevance over the dataset (all with None)."""
    order = np.argsort(-dataset_relevance(stats), kind="stable")
    return [int(c) for c in order[: n or len(order)]]
