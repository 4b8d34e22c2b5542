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
    watermark_class: int | None = None
    watermark_found: bool = False
    watermark_rank: int | None = None  # rank of the best watermark-matched concept, if any

    def mean(self, references: str, field: str) -> float:
        values = [getattr(s, field) for s in self.scores if s.references == references]
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
        for s in self.scores:
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
            lines += ["", f"Watermark found among class {name(self.watermark_class)}'s: {found}"]
        return "\n".join(lines)


def mass_accuracy(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each heatmap's positive relevance inside each mask: heatmaps (n, H, W) and
    masks (n, K, H, W) give (n, K); a heatmap with no positive relevance scores 0."""
    positive = np.clip(heatmaps, 0, None).astype(np.float64)
    inside = np.einsum("nhw,nkhw->nk", positive, masks.astype(np.float64))
    total = positive.reshape(len(positive), -1).sum(1, keepdims=True)
    return np.divide(inside, total, out=np.zeros_like(inside), where=total > 0)


def match_references(
    heatmaps: np.ndarray, masks: np.ndarray, presence: np.ndarray
) -> tuple[int, float, float]:
    """The ground-truth concept that one concept's references match best: its index, the mean
    relevance mass accuracy and the purity (share of references containing it)."""
    accuracy = mass_accuracy(heatmaps, masks).mean(0)
    best = int(np.argmax(accuracy))
    return best, float(accuracy[best]), float(presence[:, best].mean())
