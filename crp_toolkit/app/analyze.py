"""The ``analyze`` stage: the dataset pass into the run's store."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import crp_toolkit as ct
from crp_toolkit.app.context import Loaded, class_names, load, store_path
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.zarr_store import StoreOptions

log = logging.getLogger("crp_toolkit")


def analyze(cfg: DictConfig, out: Path, loaded: Loaded | None = None) -> None:
    """The dataset pass into the store (created, or resumed when it exists)."""
    loaded = loaded or load(cfg)
    store = store_path(cfg, out)
    shard, shards = _shard(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["analysis"].pop("shard")  # provenance is the same for every shard
    report = analyze_dataset(
        loaded.analyzer,
        loaded.dataset,
        list(cfg.concepts.layers),
        store,
        dataset_description=loaded.description,
        options=StoreOptions(**{f.name: cfg.store[f.name] for f in fields(StoreOptions)}),
        target=cfg.analysis.target,
        device=cfg.device,
        loader_options=dict(cfg.loader),
        config=config,
        shard=shard,
        shards=shards,
        class_names=class_names(loaded.dataset, loaded.classes),
    )
    summary = {
        "store": str(report.path),
        "computed": report.computed,
        "recomputed": {str(unit): problems for unit, problems in report.recomputed.items()},
        "skipped": report.skipped,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    if report.skipped:
        log.warning("%d samples could not be read; listed in %s", len(report.skipped), out)
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
