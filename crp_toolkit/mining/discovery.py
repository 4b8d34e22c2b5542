"""Scored discovery: on data whose true concepts are known (the built-in concept world), do the
concepts a layer uses for a class match real visual concepts?

For each of a class's most relevant concepts and each way of choosing reference samples
(relevance or activation maximisation), the references' conditional heatmaps (relevance while
explaining each reference's class) are compared with the ground-truth pixel masks:

- *matched* concept: the ground-truth concept whose masks hold the largest mean share of the
  references' positive relevance;
- *relevance mass accuracy*: that mean share (1: all positive relevance lies on the concept);
- *purity*: the share of references that contain the matched concept at all.

The watermark check asks whether a top concept of the class the watermark correlates with is
matched to the watermark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from torch.utils.data import Dataset, Subset

from crp_toolkit.mining.localise import LocalisedReferences, localise_references
from crp_toolkit.mining.references import MODES, reference_samples
from crp_toolkit.mining.statistics import ClassStatistics, top_concepts
from crp_toolkit.store.study import Study


@dataclass(frozen=True)
class ConceptScore:
    """How well one concept's references match the ground truth."""

    layer: str
    cls: int
    rank: int  # the concept's rank among the class's most relevant concepts (0: most)
    concept: int
    references: str  # "relevance" (RelMax) or "activation" (ActMax)
    matched: str  # ground-truth concept name
    mass_accuracy: float
    purity: float


@dataclass(frozen=True)
class DiscoveryScores:
    """Every scored (class, concept, reference kind), and the watermark finding."""

    scores: list[ConceptScore]
    top: int  # concepts scored per class (the watermark's class is searched deeper)
    watermark_class: int | None = None
    watermark_share: float | None = None  # best mean share of RelMax relevance on the mark

    @property
    def watermark_rank(self) -> int | None:
        """Rank of the watermark class's first concept whose RelMax references match the
        watermark best, or None."""
        hits = [
            s.rank
            for s in self.scores
            if (s.cls, s.references, s.matched) == (self.watermark_class, "relevance", "watermark")
        ]
        return min(hits) if hits else None

    @property
    def watermark_found(self) -> bool:
        return self.watermark_rank is not None

    def headline(self) -> list[ConceptScore]:
        """The scores of each class's ``top`` concepts."""
        return [s for s in self.scores if s.rank < self.top]

    def mean(self, references: str, field: str) -> float:
        values = [getattr(s, field) for s in self.headline() if s.references == references]
        return float(np.mean(values)) if values else float("nan")

    def rows(self) -> list[dict]:
        return [asdict(s) for s in self.scores]

    def markdown(self, class_names: Sequence[str] | None = None) -> str:
        """The scores as a Markdown table, then the means per reference kind."""
        name = (lambda k: class_names[k]) if class_names else str
        lines = [
            "| class | rank | concept | references | matched | mass accuracy | purity |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.headline():
            lines.append(
                f"| {name(s.cls)} | {s.rank} | {s.layer}:{s.concept} | {s.references} | "
                f"{s.matched} | {s.mass_accuracy:.2f} | {s.purity:.2f} |"
            )
        lines += ["", "| references | mean mass accuracy | mean purity |", "|---|---|---|"]
        for kind in sorted({s.references for s in self.scores}):
            lines.append(
                f"| {kind} | {self.mean(kind, 'mass_accuracy'):.3f} | "
                f"{self.mean(kind, 'purity'):.3f} |"
            )
        if self.watermark_class is not None:
            found = f"yes, rank {self.watermark_rank}" if self.watermark_found else "no"
            lines += [
                "",
                f"Watermark matched by a top concept of class {name(self.watermark_class)}: "
                f"{found}; the best share of such a concept's RelMax relevance on the watermark: "
                f"{self.watermark_share:.3f}",
            ]
        return "\n".join(lines)


def mass_accuracy(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each heatmap's positive relevance inside each mask: heatmaps (n, H, W) and
    masks (n, K, H, W) give (n, K); a heatmap with no positive relevance scores 0."""
    positive = np.clip(heatmaps, 0, None).astype(np.float64)
    inside = np.einsum("nhw,nkhw->nk", positive, masks.astype(np.float64))
    total = positive.reshape(len(positive), -1).sum(1, keepdims=True)
    return np.divide(inside, total, out=np.zeros_like(inside), where=total > 0)


@dataclass(frozen=True)
class Match:
    """How one concept's references match the ground truth: ``accuracy[j]``, the mean mass
    accuracy for ground-truth concept j; ``best``, the best-matching one; ``purity``, the
    share of references containing it."""

    accuracy: np.ndarray
    best: int
    purity: float


def match_references(heatmaps: np.ndarray, masks: np.ndarray, presence: np.ndarray) -> Match:
    """Match one concept's references (their heatmaps (n, H, W)) to the ground truth (masks
    (n, K, H, W), presence (n, K))."""
    accuracy = mass_accuracy(heatmaps, masks).mean(0)
    best = int(np.argmax(accuracy))
    return Match(accuracy, best, float(presence[:, best].mean()))


def _unwrap(dataset: Dataset, index: int) -> tuple[Dataset, int]:
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    return dataset, index


def base_dataset(dataset: Dataset) -> Dataset:
    """The dataset under any ``Subset`` wrappers (where ground truth and names live)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def has_ground_truth(dataset: Dataset) -> bool:
    """Whether samples carry ground-truth concepts (``sample(i)`` with masks, as the concept
    world's do)."""
    base = base_dataset(dataset)
    return hasattr(base, "sample") and hasattr(base, "concept_names")


def ground_truth(dataset: Dataset, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel masks (n, K, H, W) and presence (n, K) of the ground-truth concepts of samples."""
    found = [_unwrap(dataset, int(i)) for i in samples]
    truth = [base.sample(index) for base, index in found]
    return np.stack([t.masks for t in truth]), np.stack([t.concepts for t in truth])


def score_discovery(
    study: Study,
    stats: ClassStatistics,
    *,
    top: int = 3,
    n_refs: int = 8,
    watermark_top: int = 16,
) -> DiscoveryScores:
    """Score the ``top`` most relevant concepts of every class (by ``stats``, a layer's class
    statistics; ``watermark_top`` of the watermark's class) through their ``n_refs`` RelMax and
    ActMax references, localised on the store's samples; see the module docstring."""
    dataset = study.dataset
    if not has_ground_truth(dataset):
        raise ValueError(
            "scored discovery needs ground-truth concepts (a dataset with sample(i).masks, such "
            "as crp_toolkit.data.world.ConceptWorld)"
        )
    base = base_dataset(dataset)
    names = list(base.concept_names)
    wclass = getattr(base, "watermark_class", None)
    depth = {y: max(top, watermark_top) if y == wclass else top for y in range(len(stats.counts))}
    ranked = {y: top_concepts(stats, y, n) for y, n in depth.items() if stats.counts[y]}
    chosen = sorted({int(c) for concepts in ranked.values() for c in concepts})
    scores, matches_by_mode = [], {}
    for mode in MODES:
        table = reference_samples(
            study.store,
            stats.layer,
            mode=mode,
            pool=stats.pool,
            normalised=stats.normalised,
            n_refs=n_refs,
        )
        found = localise_references(study, table, concepts=chosen)
        matches = matches_by_mode[mode] = _match_all(found, dataset)
        for y, concepts in ranked.items():
            for rank, c in enumerate(concepts):
                m = matches[int(c)]
                accuracy = float(m.accuracy[m.best])
                scores.append(
                    ConceptScore(
                        stats.layer, y, rank, int(c), mode, names[m.best], accuracy, m.purity
                    )
                )
    share = None
    if wclass in ranked and "watermark" in names:
        mark = names.index("watermark")
        relmax = matches_by_mode["relevance"]
        share = max(float(relmax[int(c)].accuracy[mark]) for c in ranked[wclass])
    return DiscoveryScores(scores, top, wclass, share)


def _match_all(found: LocalisedReferences, dataset: Dataset) -> dict[int, Match]:
    """Per concept of ``found``, how its references match the ground truth."""
    out = {}
    for j, concept in enumerate(found.concepts):
        masks, presence = ground_truth(dataset, found.samples[:, j])
        out[int(concept)] = match_references(found.heatmaps[:, j], masks, presence)
    return out
