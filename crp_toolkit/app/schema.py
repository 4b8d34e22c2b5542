"""Config schemas (structured configs): a typo or a wrong type fails at start, naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

STAGES = ("explain", "analyze")


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


@dataclass
class AnalysisConfig:
    store: str | None = None
    chunk: int = 256
    explain: str = "label"
    limit: int | None = None
    shard: int = 0  # this job's shard (a Hydra multirun sweeps it); torchrun sets it per rank
    shards: int = 1
    maps: bool = False  # also store relevance maps at each layer's resolution (float16)


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
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
