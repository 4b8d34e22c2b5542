"""The pipeline's stages as run from a config: each takes the resolved config and writes into
the run's output directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import crp_toolkit as ct
from crp_toolkit.atlas.figures import concept_figure

log = logging.getLogger("crp_toolkit")


def run(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    {"explain": explain}[cfg.stage](cfg, out)
    print(f"results in {out}")


def load(cfg: DictConfig):
    """Model (canonized, softmax stripped), dataset and LRP analyzer from the config."""
    torch.manual_seed(cfg.seed)
    model = ct.canonize(ct.strip_softmax(instantiate(cfg.model))).to(cfg.device)
    dataset = instantiate(cfg.dataset)
    analyzer = ct.LRP(model, instantiate(cfg.composite))
    return model, dataset, analyzer


def explain(cfg: DictConfig, out: Path) -> None:
    """LRP heatmaps of the chosen inputs, and each input's most relevant concepts."""
    _, dataset, analyzer = load(cfg)
    bad = [i for i in cfg.explain.indices if not 0 <= i < len(dataset)]
    if bad:
        raise IndexError(f"explain.indices {bad} out of range for a dataset of {len(dataset)}")
    items = [dataset[i] for i in cfg.explain.indices]
    x = torch.stack([image for image, _ in items]).to(cfg.device)
    labels = [int(label) for _, label in items]
    expl = ct.analyze(x, analyzer, cfg.explain.target)
    names = getattr(dataset, "classes", None) or [str(k) for k in range(expl.output.shape[1])]
    titles = [
        f"{names[y]} -> {names[t]}" for y, t in zip(labels, expl.target.tolist(), strict=True)
    ]
    ct.heatmap_figure(expl, inputs=x, titles=titles).savefig(out / "heatmaps.png", dpi=120)
    paths = ct.save_heatmaps(expl, out / "heatmaps")
    log.info("wrote %d heatmaps", len(paths))
    if cfg.concepts.layers:
        layer = cfg.concepts.layers[0]
        crp = ct.CRP(analyzer, layer, ct.TopNFeatures(cfg.explain.top_concepts))
        concepts = crp(x, expl.target)
        concept_figure(x, concepts, layer).savefig(out / "concepts.png", dpi=120)
