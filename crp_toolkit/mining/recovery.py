"""Concept recovery: how many of the ground-truth concepts of an annotated dataset (the concept
world's shapes, colours, textures, the stem and the watermark) a layer's concepts recover, for
channels and for every learned basis alike.

A one-to-one matching (Hungarian, ``scipy.optimize.linear_sum_assignment``) pairs concepts with
ground-truth concepts to maximise the summed overlap (mean relevance mass accuracy of a
concept's RelMax references on the ground-truth masks, ``crp_toolkit.mining.labels``). A
ground-truth concept is *recovered* when its partner puts at least ``threshold`` of its
references' positive relevance on it and is *about* it: that overlap leads the partner's
overlap with every other ground-truth concept by at least ``margin`` (the concept world's shape,
colour and texture masks of an object cover the same pixels, so only a concept whose references
vary in the other attributes singles one out). Beside the count:

- purity and mass accuracy of the matched pairs (purity: the share of the concept's references
  that show the matched ground-truth concept);
- *redundancy*: the mean absolute cosine similarity between the concepts' relevance vectors over
  the dataset (how alike a basis's concepts are; 0: orthogonal);
- *polysemanticity*: per concept, how many distinct ground-truth concepts its references match
  best, averaged over concepts (1: every reference shows the same concept).

A basis's residual concept is what the basis leaves out, not one of its concepts: it is left
out of all four.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from crp_toolkit.concepts.basis import split_concept_layer
from crp_toolkit.mining.labels import RELMAX, Overlap, check_probe_set, overlap
from crp_toolkit.mining.localise import localise_references
from crp_toolkit.mining.references import read_chunks, references_by
from crp_toolkit.store.study import Study
from crp_toolkit.store.tables import Spec


@dataclass(frozen=True)
class Recovery:
    """What one layer (channels or a basis) recovers; see the module docstring."""

    layer: str
    concepts: int  # concepts scored (a basis's residual not counted)
    ground_truth: int
    recovered: int
    recovered_names: list[str]
    matched: dict[str, int]  # ground-truth name -> its partner concept
    mass_accuracy: float  # mean over the matched pairs
    purity: float
    recovered_mass_accuracy: float  # mean over the recovered ones (nan if none)
    redundancy: float
    polysemanticity: float
    threshold: float
    margin: float

    def row(self) -> dict:
        return asdict(self)


def match(accuracy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one matching of concepts (rows) to ground-truth concepts (columns) with the
    largest summed ``accuracy``: (concept rows, ground-truth columns)."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(accuracy, maximize=True)


def runner_up(accuracy: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """For each matched pair, the concept's largest overlap with any other ground-truth
    concept."""
    others = accuracy[rows].copy()
    others[np.arange(len(rows)), cols] = -np.inf
    return others.max(1) if others.shape[1] > 1 else np.zeros(len(rows))


def redundancy(study: Study, layer: str, concepts: np.ndarray) -> float:
    """Mean absolute cosine similarity between distinct concepts' relevance vectors over the
    store's readable samples, read a chunk at a time."""
    if len(concepts) < 2:
        return 0.0
    gram = np.zeros((len(concepts), len(concepts)))
    for part, keep in read_chunks(study.store, layer, Spec("relevance", "sum", False)):
        values = part.scores[keep][:, concepts].astype(np.float64)
        gram += values.T @ values
    norm = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    cosine = np.abs(gram / norm[:, None] / norm[None, :])
    off = ~np.eye(len(concepts), dtype=bool)
    return float(cosine[off].mean())


def polysemanticity(found: Overlap) -> float:
    """Mean number of distinct ground-truth concepts a concept's references match best."""
    counts = [len(set(found.best[:, j][found.best[:, j] >= 0])) for j in range(found.best.shape[1])]
    return float(np.mean(counts)) if counts else float("nan")


def recovery(
    study: Study,
    layer: str,
    *,
    n_refs: int = 8,
    threshold: float = 0.25,
    margin: float = 0.05,
    spec: Spec = RELMAX,
    progress: bool = False,
) -> Recovery:
    """Score ``layer``'s concepts (all channels, or a basis's directions) against the ground
    truth of the study's annotated dataset through their ``n_refs`` references; see the module
    docstring."""
    check_probe_set(study.dataset)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n = study.store.shape(layer)[0]
    concepts = np.arange(n - 1 if split_concept_layer(layer)[1] else n)  # no residual
    table = references_by(study.store, layer, spec, n_refs)
    refs = localise_references(study, table, concepts=concepts.tolist(), progress=progress)
    found = overlap(study, refs)
    rows, cols = match(found.accuracy)
    accuracy = found.accuracy[rows, cols]
    purity = found.presence[rows, cols]
    hit = (accuracy >= threshold) & (accuracy - runner_up(found.accuracy, rows, cols) >= margin)
    return Recovery(
        layer=layer,
        concepts=len(concepts),
        ground_truth=len(found.names),
        recovered=int(hit.sum()),
        recovered_names=[found.names[c] for c in cols[hit]],
        matched={found.names[c]: int(concepts[r]) for r, c in zip(rows, cols, strict=True)},
        mass_accuracy=float(accuracy.mean()),
        purity=float(purity.mean()),
        recovered_mass_accuracy=float(accuracy[hit].mean()) if hit.any() else float("nan"),
        redundancy=redundancy(study, layer, concepts),
        polysemanticity=polysemanticity(found),
        threshold=threshold,
        margin=margin,
    )


def recovery_markdown(results: list[Recovery]) -> str:
    """Channels against every basis: one row per layer."""
    lines = [
        "| concepts | n | recovered | of | mass accuracy (matched) | purity (matched) | "
        "redundancy | polysemanticity | recovered concepts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.layer} | {r.concepts} | {r.recovered} | {r.ground_truth} | "
            f"{r.mass_accuracy:.3f} | {r.purity:.3f} | {r.redundancy:.3f} | "
            f"{r.polysemanticity:.2f} | {', '.join(r.recovered_names) or '-'} |"
        )
    return "\n".join(lines)
