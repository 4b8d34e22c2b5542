"""Dataset-level figures of concepts: the concept sheet (references, class statistics,
attribution graph), the layer map (2-D embedding with thumbnails), per-class concept
importance, prototypes and ablation curves. Inputs are plain arrays and small dataclasses,
so that any mining result can feed them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from crp_toolkit.atlas.figures import (
    DEFAULT_STYLE,
    LITERAL_TEXT,
    FigureStyle,
    Image,
    as_rgb,
    image_axes,
    palette_colours,
    to_numpy,
)
from crp_toolkit.concepts.attribution_graph import AttributionGraph, ConceptNode

POSITIVE, NEGATIVE = "#c0392b", "#2e5cb8"  # signed bars and edges: red +, blue -


@dataclass(frozen=True)
class ConceptSheet:
    """What is known of one concept: its RelMax and ActMax reference images (localised or
    whole), the classes that use it most as (class name, relevance) pairs, most first, and
    optionally its attribution graph."""

    name: str
    relmax: Sequence[Image]
    actmax: Sequence[Image] = ()
    classes: Sequence[tuple[str, float]] = ()
    graph: AttributionGraph | None = None


def _grid(fig: Figure, spec, images: Sequence[Image], title: str) -> None:
    """``images`` in a near-square grid inside ``spec``, titled above its first row."""
    cols = max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, math.ceil(len(images) / cols))
    cells = spec.subgridspec(rows, cols, wspace=0.05, hspace=0.05)
    for k in range(rows * cols):
        ax = fig.add_subplot(cells[k // cols, k % cols])
        ax.set_axis_off()
        if k < len(images):
            image_axes(ax, as_rgb(images[k]))
        if k == cols // 2:
            ax.set_title(title, fontsize="medium")


def concept_sheet_figure(sheet: ConceptSheet, *, style: FigureStyle = DEFAULT_STYLE) -> Figure:
    """One concept on one page: RelMax and ActMax references side by side, a bar chart of the
    classes that use it most and its attribution graph (when given)."""
    if not sheet.relmax:
        raise ValueError(f"concept sheet {sheet.name!r} needs at least one RelMax reference")
    sides = [("RelMax", sheet.relmax)] + ([("ActMax", sheet.actmax)] if sheet.actmax else [])
    lower = [p for p in ("classes", "graph") if getattr(sheet, p)]
    with plt.rc_context(style.rc()):
        height = style.width / len(sides) * 0.9 + (style.width * 0.45 if lower else 0)
        fig = plt.figure(figsize=(style.width, height), layout="constrained")
        fig.suptitle(sheet.name)
        outer = fig.add_gridspec(2 if lower else 1, 1, height_ratios=[2, 1] if lower else None)
        top = outer[0].subgridspec(1, len(sides), wspace=0.08)
        for i, (title, images) in enumerate(sides):
            _grid(fig, top[i], images, title)
        if lower:
            bottom = outer[1].subgridspec(1, len(lower), width_ratios=[1, 1.6][: len(lower)])
            if sheet.classes:
                class_bars(fig.add_subplot(bottom[0]), sheet.classes)
            if sheet.graph is not None:
                draw_attribution_graph(fig.add_subplot(bottom[-1]), sheet.graph)
    return fig


@plt.rc_context(LITERAL_TEXT)  # on axes of any figure, names are shown as given
def class_bars(ax, classes: Sequence[tuple[str, float]]) -> None:
    """Horizontal bars of (class name, relevance), the first on top."""
    names = [name for name, _ in classes]
    values = np.array([value for _, value in classes], dtype=np.float64)
    y = np.arange(len(names))
    ax.barh(y, values, color=np.where(values >= 0, POSITIVE, NEGATIVE))
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel("relevance")
    ax.set_title("top classes", fontsize="medium")
    ax.spines[["top", "right"]].set_visible(False)


def tree_layout(graph: AttributionGraph) -> dict[ConceptNode, tuple[float, float]]:
    """Positions of the graph's nodes as a top-down tree: the root at depth 0, each node at
    the depth where it is first reached; within a depth, children follow their parents'
    order, spread evenly over [0, 1]."""
    levels = [[graph.root]]
    placed = {graph.root}
    while True:
        nxt = []
        for parent in levels[-1]:
            for child, _ in graph.children(parent):
                if child not in placed:
                    placed.add(child)
                    nxt.append(child)
        if not nxt:
            break
        levels.append(nxt)
    return {
        node: ((i + 0.5) / len(level), -float(depth))
        for depth, level in enumerate(levels)
        for i, node in enumerate(level)
    }


@plt.rc_context(LITERAL_TEXT)
def draw_attribution_graph(ax, graph: AttributionGraph, max_width: float = 8.0) -> None:
    """The attribution graph as a tree of lower-layer concepts; an edge's width is
    proportional to the share of the parent's relevance flowing through the child (red
    positive, blue negative), and it is labelled with that share."""
    pos = tree_layout(graph)
    for parent, child, fraction in graph.edges:
        (x0, y0), (x1, y1) = pos[parent], pos[child]
        ax.plot(
            [x0, x1],
            [y0, y1],
            color=POSITIVE if fraction >= 0 else NEGATIVE,
            linewidth=max(0.3, max_width * abs(fraction)),
            alpha=0.7,
            solid_capstyle="round",
            zorder=1,
        )
        ax.text(  # nearer the child, where edges of one parent fan out
            0.4 * x0 + 0.6 * x1,
            0.4 * y0 + 0.6 * y1,
            f"{fraction:.0%}",
            fontsize="x-small",
            ha="center",
            va="center",
            zorder=3,
        )
    for node, (x, y) in pos.items():
        ax.text(
            x,
            y,
            f"{node.layer}\n{node.concept}",
            ha="center",
            va="center",
            fontsize="small",
            zorder=2,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "grey"},
        )
    depth = max(-y for _, y in pos.values())
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-depth - 0.5, 0.5)
    ax.set_axis_off()
    ax.set_title(f"attribution graph (class {graph.target})", fontsize="medium")


def layer_map_figure(
    embedding: Image,
    thumbnails: Sequence[Image],
    clusters: Sequence[int],
    *,
    title: str | None = None,
    thumbnail_size: float = 0.45,
    style: FigureStyle = DEFAULT_STYLE,
) -> Figure:
    """A layer's concepts in a 2-D embedding (C, 2): a reference thumbnail at each point,
    framed in its cluster's colour (cluster -1, noise, in grey). ``thumbnail_size`` is the
    side of a thumbnail in inches."""
    points = to_numpy(embedding).astype(np.float64)
    labels = np.asarray(clusters, dtype=int)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"the embedding must be (n_concepts, 2), got {points.shape}")
    if not len(points) == len(thumbnails) == len(labels):
        raise ValueError(
            f"{len(points)} points need as many thumbnails ({len(thumbnails)}) and cluster "
            f"labels ({len(labels)})"
        )
    ids = sorted(set(labels.tolist()) - {-1})
    colours = dict(zip(ids, palette_colours(len(ids), style.palette)))
    colours[-1] = np.array([0.6, 0.6, 0.6])
    with plt.rc_context(style.rc()):
        fig, ax = plt.subplots(figsize=(style.width, style.width * 0.8), layout="constrained")
        for c in sorted(colours):
            chosen = labels == c
            if chosen.any():
                name = "noise" if c == -1 else f"cluster {c}"
                ax.scatter(*points[chosen].T, s=8, color=colours[c], label=name)
        for point, thumb, c in zip(points, thumbnails, labels):
            rgb = as_rgb(thumb)
            zoom = thumbnail_size * 72 / max(rgb.shape[:2])  # offset images are sized in points
            box = AnnotationBbox(
                OffsetImage(rgb, zoom=zoom),
                tuple(point),
                frameon=True,
                pad=0.15,
                bboxprops={"edgecolor": colours[c], "linewidth": 2},
            )
            ax.add_artist(box)
        ax.margins(0.12)
        ax.legend(loc="best", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(title)
    return fig


def class_importance_figure(
    importance: Image,
    class_names: Sequence[str],
    concept_names: Sequence[str],
    *,
    title: str | None = None,
    style: FigureStyle = DEFAULT_STYLE,
) -> Figure:
    """Per-class concept importance as a (classes x concepts) matrix, coloured around zero,
    with the values written in when the matrix is small."""
    m = to_numpy(importance).astype(np.float64)
    if m.shape != (len(class_names), len(concept_names)):
        raise ValueError(
            f"importance {m.shape} must be (classes, concepts) = "
            f"({len(class_names)}, {len(concept_names)})"
        )
    scale = float(np.abs(m).max()) or 1.0
    with plt.rc_context(style.rc()):
        cell = style.width / (len(concept_names) + 4)
        fig, ax = plt.subplots(
            figsize=(style.width, max(2.0, cell * (len(class_names) + 3))), layout="constrained"
        )
        im = ax.imshow(m, cmap=style.cmap, vmin=-scale, vmax=scale, aspect="auto")
        ax.set_xticks(range(len(concept_names)), concept_names, rotation=60, ha="right")
        ax.set_yticks(range(len(class_names)), class_names)
        if m.size <= 150:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize="x-small")
        fig.colorbar(im, ax=ax, label="relevance", shrink=0.8)
        ax.set_title(title or "concept importance per class")
    return fig


@dataclass(frozen=True)
class PrototypeView:
    """One prototype: its name, its nearest samples and its mean concept-relevance profile
    (one value per concept)."""

    name: str
    samples: Sequence[Image]
    profile: Image


def prototype_figure(
    prototypes: Sequence[PrototypeView],
    *,
    concept_names: Sequence[str] | None = None,
    top: int = 3,
    style: FigureStyle = DEFAULT_STYLE,
) -> Figure:
    """Per prototype (rows): its nearest samples and a bar chart of its concept-relevance
    profile, with its ``top`` concepts named."""
    if not prototypes:
        raise ValueError("a prototype figure needs at least one prototype")
    profiles = [to_numpy(p.profile).astype(np.float64).ravel() for p in prototypes]
    n_concepts = len(profiles[0])
    if any(len(p) != n_concepts for p in profiles):
        raise ValueError("every prototype's profile must have the same number of concepts")
    names = (
        list(concept_names) if concept_names is not None else [str(c) for c in range(n_concepts)]
    )
    if len(names) != n_concepts:
        raise ValueError(f"{len(names)} concept names for {n_concepts} concepts")
    n_samples = max(len(p.samples) for p in prototypes)
    cell = style.width / (n_samples + 4)
    with plt.rc_context(style.rc()):
        fig = plt.figure(figsize=(style.width, cell * 1.35 * len(prototypes)), layout="constrained")
        grid = fig.add_gridspec(len(prototypes), n_samples + 1, width_ratios=[1] * n_samples + [4])
        for i, (proto, profile) in enumerate(zip(prototypes, profiles)):
            for j in range(n_samples):
                ax = fig.add_subplot(grid[i, j])
                ax.set_axis_off()
                if j < len(proto.samples):
                    image_axes(ax, as_rgb(proto.samples[j]), proto.name if j == 0 else None)
            ax = fig.add_subplot(grid[i, -1])
            ax.bar(
                range(n_concepts),
                profile,
                color=np.where(profile >= 0, POSITIVE, NEGATIVE),
                width=0.9,
            )
            for c in np.argsort(-profile)[: min(top, n_concepts)]:
                ax.annotate(
                    names[c],
                    (c, profile[c]),
                    fontsize="x-small",
                    ha="center",
                    va="bottom",
                    xytext=(0, 1),
                    textcoords="offset points",
                )
            ax.axhline(0, color="black", linewidth=0.5)
            ax.set_xticks([])
            ax.spines[["top", "right"]].set_visible(False)
            ax.set_ylabel("relevance", fontsize="small")
    return fig


@dataclass(frozen=True)
class AblationCurve:
    """One ablation run: the model's score (output, accuracy) after removing ``removed``
    concepts (or a fraction of them) in some order, optionally with a spread (e.g. the
    standard deviation over random orders) drawn as a band."""

    label: str
    removed: Image
    score: Image
    spread: Image | None = None

    def __post_init__(self) -> None:
        x, y = self.points()
        if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
            raise ValueError(
                f"ablation curve {self.label!r}: removed and score must be 1-D, of equal length"
                f" and at least 2 points, got {x.shape} and {y.shape}"
            )
        if (np.diff(x) <= 0).any():
            raise ValueError(f"ablation curve {self.label!r}: removed must increase")
        if self.spread is not None and to_numpy(self.spread).shape != y.shape:
            raise ValueError(f"ablation curve {self.label!r}: spread must match score")

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        return (to_numpy(self.removed).astype(np.float64), to_numpy(self.score).astype(np.float64))

    @property
    def auc(self) -> float:
        """Area under the curve (trapezoids) divided by the removal range: the mean score over
        the range, comparable between curves with different x units."""
        x, y = self.points()
        return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


def ablation_figure(
    curves: Sequence[AblationCurve],
    *,
    xlabel: str = "concepts removed",
    ylabel: str = "model output",
    title: str | None = None,
    style: FigureStyle = DEFAULT_STYLE,
) -> Figure:
    """Ablation curves (e.g. by relevance, by activation, at random) with their AUC in the
    legend: the steeper the drop, the more the order finds the concepts the model uses."""
    if not curves:
        raise ValueError("an ablation figure needs at least one curve")
    colours = palette_colours(len(curves), style.palette)
    with plt.rc_context(style.rc()):
        fig, ax = plt.subplots(figsize=(style.width, style.width * 0.6), layout="constrained")
        for curve, colour in zip(curves, colours):
            x, y = curve.points()
            ax.plot(
                x,
                y,
                color=colour,
                marker="o",
                markersize=3,
                label=f"{curve.label} (AUC {curve.auc:.3g})",
            )
            if curve.spread is not None:
                s = to_numpy(curve.spread).astype(np.float64)
                ax.fill_between(x, y - s, y + s, color=colour, alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.spines[["top", "right"]].set_visible(False)
        if title:
            ax.set_title(title)
    return fig


def grouped_bars_figure(
    groups: Sequence[str],
    panels: dict[str, dict[str, Image]],
    *,
    ylim: tuple[float, float] | None = (0.0, 1.0),
    style: FigureStyle = DEFAULT_STYLE,
) -> Figure:
    """One panel per entry of ``panels`` (title -> {series label -> one value per group}):
    bars grouped by ``groups``, one colour per series (e.g. RelMax vs ActMax scores per class)."""
    if not panels:
        raise ValueError("a bar figure needs at least one panel")
    with plt.rc_context(style.rc()):
        fig, axes = plt.subplots(
            len(panels), 1, figsize=(style.width, 2.2 * len(panels)), layout="constrained"
        )
        for ax, (title, series) in zip(np.atleast_1d(axes), panels.items()):
            width = 0.8 / max(len(series), 1)
            colours = palette_colours(len(series), style.palette)
            for i, ((label, values), colour) in enumerate(zip(series.items(), colours)):
                x = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
                ax.bar(x, to_numpy(values), width, color=colour, label=label)
            ax.set_xticks(np.arange(len(groups)), groups)
            ax.set_title(title)
            if ylim:
                ax.set_ylim(*ylim)
            ax.spines[["top", "right"]].set_visible(False)
            ax.legend(fontsize="small")
    return fig


__all__ = [
    "AblationCurve",
    "ConceptSheet",
    "PrototypeView",
    "ablation_figure",
    "class_importance_figure",
    "concept_sheet_figure",
    "draw_attribution_graph",
    "grouped_bars_figure",
    "layer_map_figure",
    "prototype_figure",
    "tree_layout",
]
