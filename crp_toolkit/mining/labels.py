"""Concept labels from an annotated probe set: for each concept of a layer, the overlap of its
conditional relevance on its references with each named mask, the best label and its score.

The probe set is the study's dataset when it yields named masks per image (``concept_names``
and ``sample(i).masks``, as the built-in concept world does); the references are the concept's
RelMax samples, localised (their conditional heatmaps explaining each sample's class). The
overlap of a concept with a name is the mean relevance mass accuracy of its references' heatmaps
on that name's masks (see ``crp_toolkit.mining.discovery``). Labels are kept in the store
(``derived/labels/<layer>``), keyed by the references they were read from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from crp_toolkit.mining.discovery import base_dataset, ground_truth, has_ground_truth, mass_accuracy
from crp_toolkit.mining.localise import LocalisedReferences, localise_references
from crp_toolkit.mining.references import reference_samples
from crp_toolkit.mining.statistics import load_result, save_result
from crp_toolkit.store.study import Study
from crp_toolkit.store.tables import Spec

RELMAX = Spec("relevance", "sum", True)  # RelMax: normalised relevance summed over space


@dataclass(frozen=True)
class Overlap:
    """How the references of ``concepts`` meet the probe set's named masks: ``accuracy[j, g]``
    the mean mass accuracy of concept ``concepts[j]``'s references on name g, ``presence[j, g]``
    the share of its references showing g, ``best[r, j]`` the name each reference matches best
    (-1: no positive relevance)."""

    concepts: np.ndarray
    names: tuple[str, ...]
    accuracy: np.ndarray
    presence: np.ndarray
    best: np.ndarray


def check_probe_set(dataset) -> None:
    """Refuse a probe set without named masks, saying what it needs."""
    if not has_ground_truth(dataset):
        raise ValueError(
            f"the probe set ({type(base_dataset(dataset)).__name__}) has no named masks: "
            "labels and recovery need a dataset with concept_names and sample(i).masks (such "
            "as crp_toolkit.data.world.ConceptWorld)"
        )


def overlap(study: Study, refs: LocalisedReferences) -> Overlap:
    """The overlap of localised references with the named masks of the study's dataset."""
    check_probe_set(study.dataset)
    names = tuple(base_dataset(study.dataset).concept_names)
    k, n = refs.samples.shape
    accuracy = np.zeros((n, len(names)))
    presence = np.zeros((n, len(names)))
    best = np.full((k, n), -1, np.int64)
    for j in range(n):
        masks, present = ground_truth(study.dataset, refs.samples[:, j])
        each = mass_accuracy(refs.heatmaps[:, j], masks)  # (k, names)
        accuracy[j], presence[j] = each.mean(0), present.mean(0)
        best[:, j] = np.where(each.max(1) > 0, each.argmax(1), -1)
    return Overlap(np.asarray(refs.concepts), names, accuracy, presence, best)


@dataclass(frozen=True)
class ConceptLabels:
    """The best name of each of a layer's ``concepts`` and its score (mean mass accuracy of
    the concept's references on it), and the overlap with every name (``scores[j, g]``)."""

    layer: str
    names: list[str]
    concepts: np.ndarray
    label: np.ndarray  # index into names per concept
    score: np.ndarray
    scores: np.ndarray

    DIMS: ClassVar[dict[str, tuple[str, ...]]] = {
        "concepts": ("concept",),
        "label": ("concept",),
        "score": ("concept",),
        "scores": ("concept", "name"),
    }

    @property
    def name(self) -> str:
        return f"labels/{self.layer}"

    def of(self, concept: int) -> tuple[str, float]:
        """The label of ``concept`` and its score."""
        j = int(np.flatnonzero(self.concepts == concept)[0])
        return self.names[int(self.label[j])], float(self.score[j])


def concept_labels(
    study: Study,
    layer: str,
    *,
    concepts: Sequence[int] | None = None,
    n_refs: int = 8,
    spec: Spec = RELMAX,
    reuse: bool = True,
) -> ConceptLabels:
    """Labels of ``concepts`` (all by default) of ``layer`` from the study's annotated dataset,
    through their ``n_refs`` references by ``spec``; kept in the store (read back with ``reuse``
    when made from the same references)."""
    check_probe_set(study.dataset)
    table = reference_samples(
        study.store,
        layer,
        mode=spec.mode,
        pool=spec.pool,
        normalised=spec.normalised,
        n_refs=n_refs,
    )
    refs = localise_references(study, table, concepts=concepts)
    key = {"references": refs.key}
    found = load_result(study.store, ConceptLabels, f"labels/{layer}", key) if reuse else None
    if found is not None:
        return found
    o = overlap(study, refs)
    label = o.accuracy.argmax(1)
    score = o.accuracy[np.arange(len(label)), label]
    labels = ConceptLabels(layer, list(o.names), o.concepts, label, score, o.accuracy)
    save_result(study.store, labels, key)
    return labels
