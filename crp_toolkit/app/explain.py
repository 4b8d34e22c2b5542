"""The ``explain`` stage: LRP heatmaps of chosen inputs and their most relevant concepts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

import crp_toolkit as ct
from crp_toolkit.app.context import Loaded, class_names, load
from crp_toolkit.atlas.figures import concept_figure
from crp_toolkit.data.loading import gather

log = logging.getLogger("crp_toolkit")


def explain(cfg: DictConfig, out: Path, loaded: Loaded | None = None) -> None:
    """LRP heatmaps of the chosen inputs, and each input's most relevant concepts."""
    loaded = loaded or load(cfg)
    dataset, analyzer = loaded.dataset, loaded.analyzer
    batch = gather(dataset, list(cfg.explain.indices), classes=loaded.classes, **cfg.loader)
    report = {"explained": batch.indices, "skipped": batch.skipped}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for skipped in batch.skipped:
        log.warning("skipped sample %d: %s", skipped["index"], skipped["error"])
    if not batch.indices:
        raise RuntimeError(f"none of explain.indices could be read; see {out / 'report.json'}")
    x = batch.images.to(cfg.device)
    expl = ct.analyze(x, analyzer, cfg.explain.target)
    names = class_names(dataset, expl.output.shape[1])
    titles = [
        f"{names[y]} -> {names[t]}"
        for y, t in zip(batch.labels.tolist(), expl.target.tolist(), strict=True)
    ]
    ct.heatmap_figure(expl, inputs=x, titles=titles).savefig(out / "heatmaps.png", dpi=120)
    paths = ct.save_heatmaps(expl, out / "heatmaps")
    log.info("wrote %d heatmaps", len(paths))
    if cfg.concepts.layers:
        layer = cfg.concepts.layers[0]
        crp = ct.CRP(analyzer, layer, ct.TopNFeatures(cfg.explain.top_concepts))
        concepts = crp(x, expl.target)
        concept_figure(x, concepts, layer).savefig(out / "concepts.png", dpi=120)
