"""The pipeline's stages as run from a config: each takes the resolved config and writes into
the run's output directory."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

import crp_toolkit as ct
from crp_toolkit.atlas.figures import concept_figure
from crp_toolkit.data.loading import first_readable, gather
from crp_toolkit.store.analysis import analyze_dataset

log = logging.getLogger("crp_toolkit")


def run(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    {"explain": explain, "analyze": analyze}[cfg.stage](cfg, out)
    print(f"results in {out}")


def load(cfg: DictConfig):
    """Model (canonized, softmax stripped), dataset and LRP analyzer from the config; a
    dataset with more classes than the model has outputs is refused here, before any work."""
    torch.manual_seed(cfg.seed)
    model = ct.canonize(ct.strip_softmax(instantiate(cfg.model))).to(cfg.device)
    dataset = instantiate(cfg.dataset)
    if cfg.output_relevance not in ("one", "logit"):
        raise ValueError(f"output_relevance must be 'one' or 'logit', got {cfg.output_relevance!r}")
    analyzer = ct.LRP(
        model, instantiate(cfg.composite), normalize_output_relevance=cfg.output_relevance == "one"
    )
    _check_classes(model, dataset, cfg.device)
    return model, dataset, analyzer


def _check_classes(model, dataset, device: str) -> None:
    with torch.no_grad():
        outputs = model(first_readable(dataset)[None].to(device)).shape[-1]
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) != outputs:
        raise ValueError(
            f"the dataset has {len(classes)} classes but the model has {outputs} outputs; "
            "choose the matching model (e.g. model.num_classes) or dataset"
        )


def explain(cfg: DictConfig, out: Path) -> None:
    """LRP heatmaps of the chosen inputs, and each input's most relevant concepts."""
    _, dataset, analyzer = load(cfg)
    batch = gather(dataset, list(cfg.explain.indices), **cfg.loader)
    report = {"explained": batch.indices, "skipped": batch.skipped}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for skipped in batch.skipped:
        log.warning("skipped sample %d: %s", skipped["index"], skipped["error"])
    if not batch.indices:
        raise RuntimeError(f"none of explain.indices could be read; see {out / 'report.json'}")
    x = batch.images.to(cfg.device)
    expl = ct.analyze(x, analyzer, cfg.explain.target)
    if (batch.labels >= expl.output.shape[1]).any():
        raise ValueError(
            f"labels {sorted(set(batch.labels.tolist()))} exceed the model's "
            f"{expl.output.shape[1]} classes; is this the model for this dataset?"
        )
    names = getattr(dataset, "classes", None) or [str(k) for k in range(expl.output.shape[1])]
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


def analyze(cfg: DictConfig, out: Path) -> None:
    """The dataset pass into the store (created, or resumed when it exists)."""
    _, dataset, analyzer = load(cfg)
    if cfg.analysis.limit is not None:
        dataset = Subset(dataset, range(min(cfg.analysis.limit, len(dataset))))
    store = Path(cfg.analysis.store) if cfg.analysis.store else out / "store.zarr"
    description = OmegaConf.to_yaml(cfg.dataset) + f"limit={cfg.analysis.limit}"
    shard, shards = _shard(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["analysis"].pop("shard")  # provenance is the same for every shard
    analyze_dataset(
        analyzer,
        dataset,
        list(cfg.concepts.layers),
        store,
        dataset_description=description,
        chunk=cfg.analysis.chunk,
        explain=cfg.analysis.explain,
        device=cfg.device,
        loader_options=dict(cfg.loader),
        config=config,
        shard=shard,
        shards=shards,
        maps=cfg.analysis.maps,
    )
    if shards > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's chunks are in
    status = "complete" if ct.store.open(store).complete else "partial (other shards pending)"
    log.info("store %s: %s", store, status)


def _shard(cfg: DictConfig) -> tuple[int, int]:
    """This process's shard: from torchrun's environment (one per rank, joined by a gloo
    process group), else from the config (``analysis.shard`` of ``analysis.shards``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        return int(os.environ["RANK"]), world
    return cfg.analysis.shard, cfg.analysis.shards
