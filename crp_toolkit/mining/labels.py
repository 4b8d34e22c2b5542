"""Concept labels from an annotated probe set: for each concept of a layer, the overlap of its
conditional relevance on its references with each named mask, the best label and its score.

The probe set is the study's dataset when it yields named masks per image (``concept_names``
and ``sample(i).masks``, as the built-in concept world does); the references are the concept's
RelMax samples, localised (their conditional heatmaps explaining each sample's class). Any
other annotated dataset can be the probe set too (:func:`probe_labels`): the references are
then found in it by one CRP pass. The
overlap of a concept with a name is the mean relevance mass accuracy of its references' heatmaps
on that name's masks (see ``crp_toolkit.mining.discovery``). Labels are kept in the store
(``derived/labels/<layer>``), keyed by the references they were read from; labels from a probe
set beside them (``derived/probe_labels/<layer>``), keyed by the probe set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from crp_toolkit.concepts.concepts import ChannelConcept, Concept, concept_on
from crp_toolkit.concepts.crp import CRP, IndexedFeatures
from crp_toolkit.data.loading import gather
from crp_toolkit.engine.layout import feature_axes
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.mining.discovery import base_dataset, ground_truth, has_ground_truth, mass_accuracy
from crp_toolkit.mining.localise import LocalisedReferences, localise_references
from crp_toolkit.mining.references import references_by
from crp_toolkit.mining.statistics import load_result, save_result
from crp_toolkit.store.bases import layer_concept
from crp_toolkit.store.study import Study
from crp_toolkit.store.tables import Spec
from crp_toolkit.store.zarr_store import dataset_fingerprint

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


@dataclass(frozen=True)
class ProbeLabels(ConceptLabels):
    """:class:`ConceptLabels` read from a separate annotated probe set, kept beside the store's
    own labels (``derived/probe_labels/<layer>``)."""

    @property
    def name(self) -> str:
        return f"probe_labels/{self.layer}"


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
    table = references_by(study.store, layer, spec, n_refs)
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


def probe_labels(
    analyzer: LRP,
    layer: str,
    probe: Dataset,
    *,
    concepts: Sequence[int] | None = None,
    concept: Concept | None = None,
    n_refs: int = 8,
    batch_size: int = 16,
    progress: bool = False,
) -> ConceptLabels:
    """Labels of ``concepts`` (all by default) of ``layer`` from any annotated ``probe`` set,
    not the store's data: each concept's ``n_refs`` probe images of highest normalised
    relevance (RelMax over the probe set, explaining each image's label), and the overlap of
    their conditional heatmaps with the probe set's named masks. ``concept``: what the ids
    are (channels by default, or a learned basis). One CRP pass over the probe set,
    ``batch_size`` images at a time; memory holds each concept's best references only."""
    check_probe_set(probe)
    if n_refs < 1 or n_refs > len(probe):
        raise ValueError(f"n_refs={n_refs} must be between 1 and the probe set's {len(probe)}")
    first = gather(probe, [0])
    count = _concept_count(analyzer, layer, concept, first.images)
    ids = list(range(count)) if concepts is None else [int(c) for c in concepts]
    crp = CRP(analyzer, layer, IndexedFeatures(*ids), concept=concept)
    best = _Best(len(ids), n_refs)
    chunks = range(0, len(probe), batch_size)
    for start in tqdm(chunks, desc=f"probe labels {layer}", unit="batch", disable=not progress):
        batch = gather(probe, list(range(start, min(start + batch_size, len(probe)))))
        if not batch.indices:
            continue
        e = crp(batch.images, batch.labels)
        normalised = e.scores / e.scores.abs().sum(1, keepdim=True).clamp_min(1e-12)
        best.add(normalised[:, ids].T, e.heatmaps.transpose(0, 1), batch.indices)
    names = tuple(base_dataset(probe).concept_names)
    accuracy = np.stack(
        [
            mass_accuracy(heat, ground_truth(probe, samples)[0]).mean(0)
            for heat, samples in zip(best.heatmaps, best.samples, strict=True)
        ]
    )
    label = accuracy.argmax(1)
    score = accuracy[np.arange(len(ids)), label]
    return ProbeLabels(layer, list(names), np.asarray(ids), label, score, accuracy)


def stored_probe_labels(
    study: Study,
    layer: str,
    probe: Dataset,
    description: str,
    *,
    concepts: Sequence[int] | None = None,
    n_refs: int = 8,
    batch_size: int = 16,
    progress: bool = False,
) -> ProbeLabels:
    """:func:`probe_labels` of the study's analyzer, kept in the study's store under
    ``derived/probe_labels/<layer>`` and read back when made from the same probe set (its
    fingerprint from ``description`` and samples), concepts and ``n_refs``. ``layer``: a layer
    of the store, a learned basis's concept layer (``features.12@nmf16``) included."""
    key = {
        "probe": dataset_fingerprint(probe, description),
        "concepts": None if concepts is None else [int(c) for c in concepts],
        "n_refs": int(n_refs),
    }
    found = load_result(study.store, ProbeLabels, f"probe_labels/{layer}", key)
    if found is not None:
        return found
    model_layer, concept = layer_concept(study.store, layer)
    labels = probe_labels(
        study.analyzer,
        model_layer,
        probe,
        concepts=concepts,
        concept=concept,
        n_refs=n_refs,
        batch_size=batch_size,
        progress=progress,
    )
    labels = replace(labels, layer=layer)
    save_result(study.store, labels, key)
    return labels


def _concept_count(analyzer: LRP, layer: str, concept: Concept | None, x: Tensor) -> int:
    index = analyzer.graph.index(layer)
    fp = analyzer.forward(x, keep=[index])
    axis = feature_axes(analyzer, x.shape[1:])[index]
    return concept_on(concept or ChannelConcept(), axis, layer).count(fp.value(index))


class _Best:
    """Per concept, the ``n`` highest-scoring samples seen so far and their heatmaps (ties:
    the earlier sample first, as the store's tables order them)."""

    def __init__(self, concepts: int, n: int) -> None:
        self.n = n
        self.scores = [np.empty(0) for _ in range(concepts)]
        self.samples = [np.empty(0, np.int64) for _ in range(concepts)]
        self.heatmaps = [np.empty((0, 0, 0)) for _ in range(concepts)]

    def add(self, scores: Tensor, heatmaps: Tensor, samples: Sequence[int]) -> None:
        """``scores`` (concepts, batch), ``heatmaps`` (concepts, batch, H, W)."""
        ids = np.asarray(samples, np.int64)
        for j in range(len(self.scores)):
            s = np.concatenate([self.scores[j], scores[j].double().cpu().numpy()])
            i = np.concatenate([self.samples[j], ids])
            h = heatmaps[j].float().cpu().numpy()
            h = np.concatenate([self.heatmaps[j], h]) if len(self.heatmaps[j]) else h
            keep = np.lexsort((i, -s))[: self.n]
            self.scores[j], self.samples[j], self.heatmaps[j] = s[keep], i[keep], h[keep]
