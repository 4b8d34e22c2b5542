"""A study: a finished dataset store with the analyzer and dataset it was made from, their
fingerprints checked once, when the study is made; what mining and the app work with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from crp_toolkit._version import __version__
from crp_toolkit.data.loading import read_samples
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.store.zarr_store import (
    Store,
    StoreMismatchError,
    dataset_fingerprint,
    model_fingerprint,
)


def output_relevance(analyzer: LRP) -> str:
    """How the analyzer starts relevance at the output: ``"one"`` or the ``"logit"``."""
    return "one" if analyzer.normalize_output_relevance else "logit"


def make_provenance(
    analyzer: LRP, dataset: Dataset, description: str, target: str, config: dict | None = None
) -> dict:
    """What a store records of how it was made (fingerprints, composite, explained class)."""
    return {
        "model": model_fingerprint(analyzer.model),
        "dataset": dataset_fingerprint(dataset, description),
        "composite": repr(analyzer.composite),
        "target": target,
        "output_relevance": output_relevance(analyzer),
        "package_version": __version__,
        "config": config or {},
    }


def check_provenance(analyzer: LRP, dataset: Dataset, store: Store, description: str) -> dict:
    """The store's provenance, after checking that ``analyzer``'s model and ``dataset`` are the
    ones the store was made from (same fingerprints); a mismatch is refused."""
    provenance = dict(store.attrs.get("provenance", {}))
    found = {
        "model": model_fingerprint(analyzer.model),
        "dataset": dataset_fingerprint(dataset, description),
    }
    wrong = [name for name, value in found.items() if provenance.get(name) != value]
    if wrong:
        raise StoreMismatchError(
            f"the {' and '.join(wrong)} given here differ from those the store at {store.path} "
            f"was made from (fingerprints {found} here, {provenance.get('model')!r} / "
            f"{provenance.get('dataset')!r} in the store); pass the analyzer of the same "
            "(canonized) model and the same dataset with the same dataset_description"
        )
    return provenance


@dataclass(frozen=True)
class Study:
    """``store`` with the ``analyzer`` and ``dataset`` (described by ``description``, as when
    the store was made) it was made from; making one checks the fingerprints (a mismatch
    raises :class:`StoreMismatchError`), and ``provenance`` is the store's, checked."""

    store: Store
    analyzer: LRP
    dataset: Dataset
    description: str
    provenance: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        checked = check_provenance(self.analyzer, self.dataset, self.store, self.description)
        object.__setattr__(self, "provenance", checked)

    @property
    def target(self) -> str:
        """Which class the store explains per sample: ``"label"`` or ``"prediction"``."""
        return self.provenance["target"]

    @property
    def key(self) -> dict:
        """What fixes the numbers the analyzer computes on the store's samples."""
        return {
            "composite": repr(self.analyzer.composite),
            "model": self.provenance["model"],
            "dataset": self.provenance["dataset"],
            "target": self.target,
            "output_relevance": output_relevance(self.analyzer),
        }

    def classes(self, ids: np.ndarray) -> np.ndarray:
        """The explained classes of samples ``ids`` (any shape; reads only their chunks)."""
        return self.store.samples(self.target).vindex[ids]

    def images(self, ids: Sequence[int] | np.ndarray) -> Tensor:
        """The images of samples ``ids`` (repeats allowed), in that order."""
        return read_samples(self.dataset, np.asarray(ids))
