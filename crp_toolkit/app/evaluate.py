"""The ``evaluate`` stage: scored discovery on data with ground-truth concepts (the built-in
concept world): a table (``evaluate/scores.md``, ``scores.json``) and a figure per layer, and the
recovery of the ground-truth concepts by every layer, channels and bases (in ``scores.md``,
``recovery.json``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from crp_toolkit.app.atlas import figure_style
from crp_toolkit.app.context import Loaded, class_names, open_study
from crp_toolkit.app.mine import mine_layer
from crp_toolkit.atlas.figures import FigureStyle, save_figure
from crp_toolkit.atlas.sheets import grouped_bars_figure
from crp_toolkit.mining.discovery import DiscoveryScores, score_discovery
from crp_toolkit.mining.recovery import recovery, recovery_markdown

log = logging.getLogger("crp_toolkit")
RECOVERY_NOTE = (
    "Each layer's concepts (all channels, or a basis's K directions without its residual) "
    "matched one-to-one to the ground-truth concepts by the mean relevance mass accuracy of "
    "their RelMax references; recovered: matched with at least {threshold} of the positive "
    "relevance on the concept, and at least {margin} more than on any other ground-truth "
    "concept. Redundancy: mean |cosine| of the concepts' relevance vectors; "
    "polysemanticity: distinct ground-truth concepts a concept's references match best."
)


def evaluate(cfg: DictConfig, out: Path, loaded: Loaded | None = None) -> None:
    """Score each layer's discoveries against the ground truth; write table and figures."""
    study = open_study(cfg, out, loaded)
    store = study.store
    folder = out / "evaluate"
    folder.mkdir(parents=True, exist_ok=True)
    names = class_names(study.dataset, store.classes)
    style = figure_style(cfg)
    report, tables = {}, []
    for layer in store.layers:
        stats = mine_layer(cfg.mining, study, layer, reuse=True).stats
        scores = score_discovery(
            study,
            stats,
            top=cfg.evaluate.top,
            n_refs=cfg.evaluate.n_refs,
            watermark_top=cfg.evaluate.watermark_top,
        )
        tables.append(f"## {layer}\n\n{scores.markdown(names)}\n")
        report[layer] = summary(scores) | {"scores": scores.rows()}
        save_figure(discovery_figure(scores, names, style), folder / f"discovery_{layer}", style)
    recovered = [
        recovery(
            study,
            layer,
            n_refs=cfg.evaluate.n_refs,
            threshold=cfg.evaluate.threshold,
            margin=cfg.evaluate.margin,
            progress=True,
        )
        for layer in store.layers
    ]
    tables.append(
        "## Recovery: channels against every basis\n\n"
        f"{RECOVERY_NOTE.format(threshold=cfg.evaluate.threshold, margin=cfg.evaluate.margin)}\n\n"
        f"{recovery_markdown(recovered)}\n"
    )
    (folder / "scores.md").write_text("\n".join(tables))
    (folder / "recovery.json").write_text(json.dumps([r.row() for r in recovered], indent=2))
    (folder / "scores.json").write_text(json.dumps(report, indent=2))
    for r in recovered:
        log.info(
            "%s recovers %d of %d: %s", r.layer, r.recovered, r.ground_truth, r.recovered_names
        )


def summary(scores: DiscoveryScores) -> dict:
    """Mean scores per reference kind, and the watermark finding."""
    kinds = sorted({s.references for s in scores.scores})
    return {
        "mass_accuracy": {k: round(scores.mean(k, "mass_accuracy"), 4) for k in kinds},
        "purity": {k: round(scores.mean(k, "purity"), 4) for k in kinds},
        "watermark_found": scores.watermark_found,
        "watermark_rank": scores.watermark_rank,
        "watermark_share": scores.watermark_share,
    }


def discovery_figure(scores: DiscoveryScores, names: list[str], style: FigureStyle):
    """Per class, the mean mass accuracy and purity of its top concepts, RelMax vs ActMax."""
    classes = sorted({s.cls for s in scores.headline()})
    panels = {}
    for field in ("mass_accuracy", "purity"):
        panels[field.replace("_", " ")] = {
            kind: np.array(
                [
                    np.mean(
                        [
                            getattr(s, field)
                            for s in scores.headline()
                            if (s.cls, s.references) == (y, kind)
                        ]
                    )
                    for y in classes
                ]
            )
            for kind in ("relevance", "activation")
        }
    return grouped_bars_figure([names[y] for y in classes], panels, style=style)
