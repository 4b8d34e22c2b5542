"""The pipeline's stages as run from a config: each takes the resolved config and writes into
the run's output directory."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

import crp_toolkit as ct
from crp_toolkit.app.schema import JOB, PIPELINE, check_config
from crp_toolkit.atlas.figures import concept_figure
from crp_toolkit.data.loading import first_readable, gather
from crp_toolkit.store.analysis import analyze_dataset, report_unmerged
from crp_toolkit.store.tables import merge_when_complete
from crp_toolkit.store.verify import verify as verify_store

log = logging.getLogger("crp_toolkit")


def run(cfg: DictConfig) -> None:
    """Run the configured stage (``run``: every stage of the pipeline, in order)."""
    from crp_toolkit.app.atlas import atlas
    from crp_toolkit.app.evaluate import evaluate
    from crp_toolkit.app.mine import mine
    from crp_toolkit.mining.discovery import has_ground_truth

    check_config(cfg)  # every bad value refused before any work
    out = Path(HydraConfig.get().runtime.output_dir)
    claim_output(out)
    stages = {
        "explain": explain,
        "analyze": analyze,
        "mine": mine,
        "atlas": atlas,
        "evaluate": evaluate,
        "verify": verify,
    }
    if cfg.stage != "run":
        stages[cfg.stage](cfg, out)
    else:
        loaded = load(cfg)  # model, dataset and analyzer made once for every stage
        for name in PIPELINE:
            if name == "evaluate" and not has_ground_truth(loaded.dataset):
                log.info("evaluate skipped: the dataset has no ground-truth concepts")
                continue
            log.info("stage %s", name)
            stages[name](cfg, out, loaded)
    print(f"results in {out}")


@dataclass(frozen=True)
class Loaded:
    """What a stage works with: the dataset (cut to ``analysis.limit``), its description (part
    of the store's provenance) and the LRP analyzer of the canonized model."""

    dataset: Dataset
    description: str
    analyzer: ct.LRP
    classes: int  # the model's outputs


def load(cfg: DictConfig) -> Loaded:
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
    if len(dataset) == 0:
        raise ValueError(f"the dataset is empty: check its config ({cfg.dataset})")
    outputs = _check_classes(analyzer, dataset, cfg.device)
    if cfg.analysis.limit is not None:
        dataset = Subset(dataset, range(min(cfg.analysis.limit, len(dataset))))
    return Loaded(dataset, dataset_description(cfg), analyzer, outputs)


def _check_classes(analyzer: ct.LRP, dataset, device: str) -> int:
    """The model's output count, from one sample; images the model cannot read (channels,
    dimensions) and a class count that differs from the dataset's are refused here."""
    image = first_readable(dataset)
    try:
        with torch.no_grad():
            outputs = analyzer.forward(image[None].to(device)).output.shape[-1]
    except ValueError as err:
        raise ValueError(
            f"the dataset's images have shape {tuple(image.shape)}, which the model cannot read: "
            f"{err}. Choose the dataset (or its transform) that matches the model"
        ) from err
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) != outputs:
        raise ValueError(
            f"the dataset has {len(classes)} classes but the model has {outputs} outputs; "
            "choose the matching model (e.g. model.num_classes) or dataset"
        )
    return outputs


def claim_output(out: Path) -> None:
    """Mark the run folder as this process's; a folder in use by another live process is
    refused (two runs never mix their reports, configs and figures), unless both are ranks of
    one torchrun job."""
    claim = out / ".crp_toolkit_run"
    try:
        pid, job = claim.read_text().split(" ", 1)
        holder = int(pid)
    except (OSError, ValueError):
        holder, job = None, ""
    same_job = bool(JOB) and job == JOB
    if holder not in (None, os.getpid()) and not same_job and _alive(holder):
        raise FileExistsError(
            f"the output folder {out} is in use by another run (pid {holder}); give this run "
            "its own folder (hydra.run.dir=...)"
        )
    out.mkdir(parents=True, exist_ok=True)
    claim.write_text(f"{os.getpid()} {JOB}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        chunk=cfg.store.chunk,
        explain=cfg.analysis.explain,
        device=cfg.device,
        loader_options=dict(cfg.loader),
        config=config,
        shard=shard,
        shards=shards,
        maps=cfg.store.maps,
        k=cfg.store.tables_k,
        k_class=cfg.store.class_tables_k,
        logits_k=cfg.store.logits_k,
        top_heatmaps=cfg.store.top_heatmaps,
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


def store_path(cfg: DictConfig, out: Path) -> Path:
    """The store this run writes (analyze) or reads: ``store.path``, else the run's own."""
    return Path(cfg.store.path) if cfg.store.path else out / "store.zarr"


def open_store(cfg: DictConfig, out: Path) -> ct.store.Store:
    """The finished store a later stage reads; a missing or unfinished one is a clear error."""
    path = store_path(cfg, out)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(
            f"{cfg.stage} reads a dataset store, and there is none at {path}: run "
            "`crp-toolkit analyze store.path=...` first and give the same store.path here"
        )
    store = ct.store.open(path)
    incomplete = store.incomplete_units()
    if incomplete:
        listed = "; ".join(f"unit {u}: {', '.join(why)}" for u, why in list(incomplete.items())[:5])
        raise RuntimeError(
            f"the store at {path} is unfinished ({len(incomplete)} units: {listed}): run "
            "`crp-toolkit analyze` again with the same store.path to finish it"
        )
    if (store.attrs["k"] or store.attrs["k_class"]) and not store.attrs.get("tables_merged"):
        if merge_when_complete(path):  # an earlier merge was interrupted: finish it
            log.info("merged the reference tables of %s (an earlier merge did not finish)", path)
            store = ct.store.open(path)
        else:
            report_unmerged(path)
    return store


def verify(cfg: DictConfig, out: Path, loaded: Loaded | None = None) -> None:
    """Decode every unit of the store and check it against its digest; name what is damaged
    (``verify.json``), failing when anything is."""
    path = store_path(cfg, out)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"there is no dataset store at {path}: give store.path=...")
    found = verify_store(path, progress=True)
    (out / "verify.json").write_text(json.dumps(found.to_dict(), indent=2))
    print(found.summary())
    if not found.ok:
        raise RuntimeError(f"the store at {path} is not sound; see {out / 'verify.json'}")


def open_run(run_dir: str | Path) -> tuple[DictConfig, Loaded, ct.store.Store]:
    """A finished run's config, its data and analyzer, and its store: for notebooks and the
    scripts in ``experiments/`` that build on a run."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return cfg, load(cfg), open_store(cfg, run_dir)


def class_names(dataset, classes: int) -> list[str]:
    """The dataset's class names (through a Subset), else the class indices."""
    names = getattr(getattr(dataset, "dataset", dataset), "classes", None)
    return list(names) if names is not None else [str(k) for k in range(classes)]


def dataset_description(cfg: DictConfig) -> str:
    """What identifies the data in the store's provenance: its config and the limit."""
    return OmegaConf.to_yaml(cfg.dataset) + f"limit={cfg.analysis.limit}"


def _shard(cfg: DictConfig) -> tuple[int, int]:
    """This process's shard: from torchrun's environment (one per rank, joined by a gloo
    process group), else from the config (``analysis.shard`` of ``analysis.shards``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        return int(os.environ["RANK"]), world
    return cfg.analysis.shard, cfg.analysis.shards
