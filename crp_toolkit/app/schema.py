"""Config schemas (structured configs): a typo or a wrong type fails at start, naming the key.

One dataclass per config group; the group's YAML files in ``crp_toolkit/conf/<group>/`` fill
them. ``model``, ``dataset`` and ``composite`` are free-form ``_target_`` nodes (any class).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from crp_toolkit.store.zarr_store import StoreOptions

# `run` runs the others in this order (discover only with discover.methods, evaluate only on
# data with ground truth)
PIPELINE = ("explain", "analyze", "discover", "mine", "atlas", "evaluate")
STAGES = (*PIPELINE, "run", "verify")
# part of each run folder's name (``${run_id:}``): two runs started in the same second differ,
# and the ranks of one torchrun job (one TORCHELASTIC_RUN_ID) share theirs
JOB = os.environ.get("TORCHELASTIC_RUN_ID", "")
RUN_ID = JOB[:8] or f"{os.getpid()}-{uuid.uuid4().hex[:4]}"


@dataclass
class ConceptsConfig:
    layers: list[str] = field(default_factory=list)


@dataclass
class LoaderConfig:
    batch_size: int = 64
    num_workers: int = 2
    pin_memory: bool = True
    on_error: str = "skip"  # skip unreadable samples (listed in report.json), or "fail"


@dataclass
class ExplainConfig:
    indices: list[int] = field(default_factory=lambda: list(range(8)))
    target: int | None = None
    top_concepts: int = 4


# where the dataset store lives (null: store.zarr in the run's folder; analyze and run only),
# and what it holds: the fields of StoreOptions, the writer's own, under the same names
StoreConfig = make_dataclass(
    "StoreConfig",
    [
        ("path", str | None, None),
        *((f.name, get_type_hints(StoreOptions)[f.name], f.default) for f in fields(StoreOptions)),
    ],
)


@dataclass
class AnalysisConfig:
    target: str = "label"  # the class explained per sample: its label, or the "prediction"
    limit: int | None = None
    shard: int = 0  # this job's shard (a Hydra multirun sweeps it); torchrun sets it per rank
    shards: int = 1


@dataclass
class DiscoverConfig:
    methods: list[str] = field(default_factory=list)  # nmf, pca, dictionary, kmeans, sae
    layer: str | None = None  # None: the first of concepts.layers
    n_concepts: int = 16  # directions per basis
    source: str = "activation"  # or "relevance"-weighted activations
    seed: int = 0
    positions: int = 16  # positions sampled per image
    images: int | None = None  # the first N readable samples (None: all)
    epochs: int = 1
    sae_topk: int = 4


@dataclass
class MiningConfig:
    n_refs: int = 8  # reference samples per concept
    pool: str = "sum"  # relevance (activation) summed over space, or its "max"
    normalised: bool = True
    concepts: int | None = 16  # concepts per layer given localised references (null: all)
    prototypes: int = 3  # Gaussian mixture components per class (PCX)
    clusters: int = 6  # concept clusters per layer
    ablation_samples: int = 64
    ablation_steps: int = 16
    seed: int = 0


@dataclass
class AtlasConfig:
    formats: list[str] = field(default_factory=lambda: ["png"])  # png, pdf, svg
    width: float = 7.0  # inches
    dpi: int = 120
    font_size: float = 8.0
    cmap: str = "bwr"  # signed relevance
    palette: str = "tab10"  # categories (concepts in an atlas, clusters)
    inputs: list[int] = field(default_factory=lambda: list(range(4)))  # glocal figures
    concepts: int = 4  # concepts per input in the glocal figures
    graph_layers: list[str] | None = None  # attribution graphs' layers; None: conv and dense
    html: bool = True
    probe: Any = None  # a dataset config: labels from this annotated probe set (None: the data's)


@dataclass
class EvaluateConfig:
    top: int = 3  # most relevant concepts scored per class
    n_refs: int = 8  # reference samples per concept
    watermark_top: int = 16  # concepts of the watermark's class searched for the watermark
    threshold: float = 0.25  # recovered: this share of the references' relevance on the concept
    margin: float = 0.05  # ... and this much more than on any other ground-truth concept


@dataclass
class Config:
    stage: str = "explain"
    device: str = "cpu"
    seed: int = 0
    output_relevance: str = "one"  # start at the explained class with 1, or with its "logit"
    model: Any = MISSING
    dataset: Any = MISSING
    composite: Any = MISSING
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    discover: DiscoverConfig = field(default_factory=DiscoverConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    atlas: AtlasConfig = field(default_factory=AtlasConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def register() -> None:
    """The schema, and the ``run_id`` resolver the run folders' names use."""
    ConfigStore.instance().store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, replace=True)


def check_config(cfg: DictConfig) -> None:
    """Refuse values that would fail later (or silently do the wrong thing), all at once,
    naming each key, its value and what it must be."""
    problems = []
    for key, value in (
        ("store.chunk", cfg.store.chunk),
        ("loader.batch_size", cfg.loader.batch_size),
        ("analysis.shards", cfg.analysis.shards),
    ):
        if value < 1:
            problems.append(f"{key}={value} must be at least 1")
    if cfg.analysis.limit is not None and cfg.analysis.limit < 1:
        problems.append(f"analysis.limit={cfg.analysis.limit} must be at least 1 (or null: all)")
    if not 0 <= cfg.analysis.shard < max(cfg.analysis.shards, 1):
        problems.append(f"analysis.shard={cfg.analysis.shard} must be in 0..shards-1")
    if cfg.loader.num_workers < 0:
        problems.append(f"loader.num_workers={cfg.loader.num_workers} must be at least 0")
    if cfg.loader.on_error not in ("skip", "fail"):
        problems.append(f"loader.on_error={cfg.loader.on_error!r} must be 'skip' or 'fail'")
    if cfg.analysis.target not in ("label", "prediction"):
        problems.append(f"analysis.target={cfg.analysis.target!r} must be label or prediction")
    problems += _discover_problems(cfg)
    problems += _store_path_problems(cfg)
    if problems:
        raise ValueError("bad config: " + "; ".join(problems))


def _store_path_problems(cfg: DictConfig) -> list[str]:
    from crp_toolkit.store.zarr_store import store_path_problem

    problem = cfg.store.path and store_path_problem(cfg.store.path)
    return [f"store.path={cfg.store.path}: {problem}"] if problem else []


def _discover_problems(cfg: DictConfig) -> list[str]:
    from crp_toolkit.concepts.basis import SOURCES
    from crp_toolkit.concepts.learning import METHODS

    d, problems = cfg.discover, []
    unknown = [m for m in d.methods if m not in METHODS]
    if unknown:
        problems.append(f"discover.methods has unknown {unknown}: choose from {list(METHODS)}")
    if d.source not in SOURCES:
        problems.append(f"discover.source={d.source!r} must be one of {list(SOURCES)}")
    for key in ("n_concepts", "positions", "epochs", "sae_topk"):
        if d[key] < 1:
            problems.append(f"discover.{key}={d[key]} must be at least 1")
    if d.images is not None and d.images < 1:
        problems.append(f"discover.images={d.images} must be at least 1 (or null: all)")
    return problems
