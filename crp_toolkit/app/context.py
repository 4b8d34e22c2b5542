"""What the stages share: the model, dataset and analyzer made from the config, the run's
folder, and the store of a run, opened as a :class:`Study` (fingerprints checked once)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

import crp_toolkit as ct
from crp_toolkit.app.schema import JOB
from crp_toolkit.data.loading import first_readable
from crp_toolkit.store.analysis import report_unmerged
from crp_toolkit.store.concept_layers import missing_unit_files
from crp_toolkit.store.study import Study
from crp_toolkit.store.tables import merge_when_complete

log = logging.getLogger("crp_toolkit")


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


def store_path(cfg: DictConfig, out: Path) -> Path:
    """The store this run writes (analyze) or reads: ``store.path``, else the run's own."""
    return Path(cfg.store.path) if cfg.store.path else out / "store.zarr"


def open_store(cfg: DictConfig, out: Path, *, bases: bool = True) -> ct.store.Store:
    """The finished store a later stage reads; a missing or unfinished one is a clear error,
    and so (with ``bases``) is one whose learned bases' concept layers lost files."""
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
    if bases:
        check_concept_layers(store)
    if (store.attrs["table_size"] or store.attrs["class_table_size"]) and not store.attrs.get(
        "tables_merged"
    ):
        if merge_when_complete(path):  # an earlier merge was interrupted: finish it
            log.info("merged the reference tables of %s (an earlier merge did not finish)", path)
            store = ct.store.open(path)
        else:
            report_unmerged(path)
    return store


def check_concept_layers(store: ct.store.Store) -> None:
    """Refuse a store whose learned bases' concept layers lost chunk files (they would read as
    zeros), naming them and how to recompute them."""
    lost = {
        name: found
        for name in store.attrs.get("concept_layers", {})
        if (found := missing_unit_files(store.group, store.path, name, store.layout))
    }
    if lost:
        listed = "; ".join(
            f"{name}: {', '.join(files[:3])} missing" for name, files in lost.items()
        )
        raise RuntimeError(
            f"the store at {store.path} lost files of learned bases ({listed}): run "
            f"`crp-toolkit verify store.path={store.path}`, which names the `crp-toolkit "
            "discover` call that recomputes them"
        )


def open_study(
    cfg: DictConfig, out: Path, loaded: Loaded | None = None, *, bases: bool = True
) -> Study:
    """The run's finished store with its analyzer and dataset (made from the config unless
    ``loaded`` is given), their fingerprints checked against the store's; with ``bases``, its
    learned bases' concept layers checked for lost files (``discover``, which recomputes them,
    opens it without)."""
    loaded = loaded or load(cfg)
    store = open_store(cfg, out, bases=bases)
    return Study(store, loaded.analyzer, loaded.dataset, loaded.description)


def open_run(run_dir: str | Path) -> tuple[DictConfig, Study]:
    """A finished run's config and its study (store, analyzer, dataset): for notebooks and the
    scripts in ``experiments/`` that build on a run."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return cfg, open_study(cfg, run_dir)


def class_names(dataset, classes: int) -> list[str]:
    """The dataset's class names (through a Subset), else the class indices."""
    names = getattr(getattr(dataset, "dataset", dataset), "classes", None)
    return list(names) if names is not None else [str(k) for k in range(classes)]


def dataset_description(cfg: DictConfig) -> str:
    """What identifies the data in the store's provenance: its config and the limit."""
    return OmegaConf.to_yaml(cfg.dataset) + f"limit={cfg.analysis.limit}"
