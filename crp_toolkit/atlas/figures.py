"""Paper-style figures of single inputs (matplotlib, headless): concept heatmaps, the glocal
explanation (input, heatmap, top concepts with their references) and the concept atlas
(superpixels coloured by their dominant concept). Shared here: the figure style, saving in
several formats, and the conversion of images and relevance maps for display."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from crp_toolkit.atlas.heatmap import display_image, heatmap

FORMATS = ("png", "pdf", "svg")
# An image: (H, W), (H, W, 3) or (C, H, W) with C in (1, 3); uint8, or float (shown as is when
# within [0, 1], min-max scaled otherwise); numpy or torch.
Image = Any
# matplotlib reads text between "$" signs as math; figures show every string as given (class
# names, concept and layer names may hold "$"). Deliberate math text passes parse_math=True.
LITERAL_TEXT = {"text.parse_math": False}


@dataclass(frozen=True)
class FigureStyle:
    """How figures look and which files they become (the Hydra config group ``atlas``).

    ``width`` is in inches (heights follow from the content); ``cmap`` colours signed
    relevance; ``palette`` colours categories (concepts in an atlas, clusters)."""

    width: float = 7.0
    dpi: int = 150
    font_size: float = 8.0
    cmap: str = "bwr"
    palette: str = "tab10"
    formats: tuple[str, ...] = ("png",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))  # lists from a config
        if self.width <= 0 or self.dpi <= 0 or self.font_size <= 0:
            raise ValueError(
                f"width, dpi and font_size must be positive, got {self.width}, {self.dpi}, "
                f"{self.font_size}"
            )
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be a non-empty selection of {FORMATS}, got {bad}")
        for name in (self.cmap, self.palette):
            if name not in colormaps:
                raise ValueError(f"unknown matplotlib colour map {name!r}")

    def rc(self) -> dict[str, Any]:
        """matplotlib rc settings, applied while a figure is built (text shown literally)."""
        return {"font.size": self.font_size, "figure.dpi": self.dpi, **LITERAL_TEXT}


DEFAULT_STYLE = FigureStyle()


def save_figure(
    fig: Figure, path_stem: str | Path, style: FigureStyle, *, close: bool = True
) -> list[Path]:
    """Write ``fig`` as ``<path_stem>.<format>`` for every format of ``style`` (stems may contain
    dots, as layer names do); returns the paths. PDF and SVG carry no date, so that the same
    figure gives the same file."""
    paths = []
    for fmt in style.formats:
        path = Path(f"{path_stem}.{fmt}")
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
        fig.savefig(path, dpi=style.dpi, bbox_inches="tight", pad_inches=0.03, metadata=metadata)
        paths.append(path)
    if close:
        plt.close(fig)
    return paths


def to_numpy(a: Image) -> np.ndarray:
    """A numpy view of an array or tensor (float32 for tensors)."""
    return a.detach().float().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def as_rgb(image: Image) -> np.ndarray:
    """An image as float RGB (H, W, 3) in [0, 1] (see ``Image`` for what is accepted)."""
    a = to_numpy(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(
            f"an image must be (H, W), (H, W, 3) or (C, H, W) with C in (1, 3); got {a.shape}"
        )
    if a.dtype == np.uint8:
        return a / 255.0
    a = a.astype(np.float64)
    if a.min() < 0 or a.max() > 1:
        a = (a - a.min()) / (a.max() - a.min() + 1e-12)
    return a


def relevance_rgb(relevance: Image, cmap: str = "bwr") -> np.ndarray:
    """A signed relevance map, (H, W) or (C, H, W) summed over C, as a uint8 RGB heatmap."""
    r = torch.as_tensor(to_numpy(relevance).astype(np.float32))
    if r.dim() not in (2, 3):
        raise ValueError(f"a relevance map must be (H, W) or (C, H, W), got {tuple(r.shape)}")
    return heatmap(r[None], cmap=cmap)[0]


def palette_colours(n: int, palette: str = "tab10") -> np.ndarray:
    """``n`` distinct RGB colours (n, 3) from a categorical palette (spread over it when the
    palette is too short)."""
    cmap = colormaps[palette]
    colours = getattr(cmap, "colors", None)
    if colours is not None and n <= len(colours):
        return np.asarray(colours, dtype=np.float64)[:n, :3]
    return cmap(np.linspace(0, 1, n, endpoint=False))[:, :3]


def image_axes(ax, image: np.ndarray, title: str | None = None) -> None:
    """Show an image without ticks or frame."""
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize="small")


def concept_shares(scores: Tensor, features: Tensor) -> Tensor:
    """The share of the layer's absolute relevance held by each chosen concept, per sample."""
    return scores.gather(1, features) / scores.abs().sum(1, keepdim=True).clamp_min(1e-12)


def concept_figure(x: Tensor, concepts, layer: str):
    """Per input (rows): the input, then the conditional heatmap of each top concept, titled
    with its share of the layer's absolute relevance."""
    n, k = concepts.features.shape
    shares = concept_shares(concepts.scores, concepts.features)
    fig, axes = plt.subplots(n, k + 1, figsize=(1.6 * (k + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(display_image(x[i]), cmap="gray")
        maps = heatmap(concepts.relevance[i])
        for j in range(k):
            axes[i, j + 1].imshow(maps[j])
            title = f"{layer}:{int(concepts.features[i, j])} ({shares[i, j]:.0%})"
            axes[i, j + 1].set_title(title, fontsize=7, parse_math=False)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class ConceptPanel:
    """One concept of an input: its name, its share of the layer's relevance on the input,
    its conditional relevance on the input ((H, W) or (C, H, W)) and reference images of it
    from the dataset (localised crops or whole samples)."""

    name: str
    share: float
    relevance: Image
    references: Sequence[Image] = ()


def concept_panels(
    expl, sample: int, layer: str, references: Mapping[int, Sequence[Image]] | None = None
) -> list[ConceptPanel]:
    """The panels of one sample of a :class:`CRPExplanation`, with the reference images of
    each concept id taken from ``references`` (none where it has no entry)."""
    if not 0 <= sample < expl.features.shape[0]:
        raise IndexError(f"sample {sample} out of range for {expl.features.shape[0]} samples")
    references = references or {}
    shares = concept_shares(expl.scores, expl.features)[sample]
    ids = [int(c) for c in expl.features[sample]]
    return [
        ConceptPanel(
            f"{layer}:{c}",
            float(shares[j]),
            expl.relevance[sample, j],
            tuple(references.get(c, ())),
        )
        for j, c in enumerate(ids)
    ]


def glocal_figure(
    image: Image,
    relevance: Image,
    panels: Sequence[ConceptPanel],
    *,
    title: str | None = None,
    style: FigureStyle = DEFAULT_STYLE,
) -> Figure:
    """The glocal explanation of one input: the input and its heatmap on the left; per concept
    (rows) its conditional heatmap, titled with its share of relevance, and its reference
    images from the dataset."""
    if not panels:
        raise ValueError("a glocal figure needs at least one concept panel")
    n_ref = max(len(p.references) for p in panels)
    rows = len(panels)
    cell = style.width / (n_ref + 2.4)
    with plt.rc_context(style.rc()):
        fig = plt.figure(figsize=(style.width, max(rows, 2) * cell * 1.2), layout="constrained")
        outer = fig.add_gridspec(1, 2, width_ratios=[1, n_ref + 1.2])
        left = outer[0].subgridspec(2, 1)
        image_axes(fig.add_subplot(left[0]), as_rgb(image), title or "input")
        image_axes(fig.add_subplot(left[1]), relevance_rgb(relevance, style.cmap), "relevance")
        right = outer[1].subgridspec(rows, n_ref + 1)
        for i, panel in enumerate(panels):
            heat = relevance_rgb(panel.relevance, style.cmap)
            image_axes(fig.add_subplot(right[i, 0]), heat, f"{panel.name} ({panel.share:.0%})")
            for j in range(n_ref):
                ax = fig.add_subplot(right[i, j + 1])
                ax.set_axis_off()
                if j < len(panel.references):
                    image_axes(ax, as_rgb(panel.references[j]), "references" if j == 0 else None)
    return fig


def superpixels(
    image: Image, n_segments: int = 64, compactness: float = 10.0, sigma: float = 1.0
) -> np.ndarray:
    """SLIC superpixels of an image: region labels (H, W), 0 to n_regions - 1. The Gaussian
    smoothing ``sigma`` keeps pixel noise from fusing everything into a few regions."""
    from skimage.segmentation import slic  # imported here: skimage is slow to import

    if n_segments < 1:
        raise ValueError(f"n_segments must be at least 1, got {n_segments}")
    segments = slic(
        as_rgb(image), n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0
    )
    return np.unique(segments, return_inverse=True)[1].reshape(segments.shape)


def _maps(concept_maps: Image) -> np.ndarray:
    m = to_numpy(concept_maps).astype(np.float64)
    if m.ndim == 4:
        m = m.sum(1)
    if m.ndim != 3:
        raise ValueError(f"concept maps must be (K, H, W) or (K, C, H, W), got {tuple(m.shape)}")
    return m


def dominant_concepts(
    segments: np.ndarray, concept_maps: Image, *, min_share: float = 0.1
) -> np.ndarray:
    """Per region, the index of the concept whose conditional relevance summed over the region
    is largest; -1 where no concept has positive relevance there, or where the winner's
    relevance per pixel is below ``min_share`` of the densest region's (so that a large,
    faintly relevant background stays unpainted)."""
    maps = _maps(concept_maps)
    if maps.shape[1:] != segments.shape:
        raise ValueError(
            f"concept maps {maps.shape[1:]} and superpixels {segments.shape} differ in size"
        )
    n = int(segments.max()) + 1
    sums = np.stack(
        [np.bincount(segments.ravel(), weights=m.ravel(), minlength=n) for m in maps], axis=1
    )
    best = sums.argmax(1)
    density = sums.max(1) / np.maximum(np.bincount(segments.ravel(), minlength=n), 1)
    keep = (density > 0) & (density >= min_share * density.max())
    return np.where(keep, best, -1)


def atlas_overlay(
    image: Image,
    segments: np.ndarray,
    dominant: np.ndarray,
    colours: np.ndarray,
    *,
    alpha: float = 0.6,
) -> np.ndarray:
    """The input (RGB float) with every region blended with its dominant concept's colour and
    the borders between differently coloured areas drawn in white."""
    from skimage.segmentation import find_boundaries  # imported here: skimage is slow to import

    rgb = as_rgb(image)
    owner = dominant[segments]
    painted = owner >= 0
    out = rgb.copy()
    out[painted] = (1 - alpha) * rgb[painted] + alpha * colours[owner[painted]]
    out[find_boundaries(owner, mode="inner")] = 1.0
    return out


def concept_atlas_figure(
    image: Image,
    concept_maps: Image,
    names: Sequence[str],
    references: Sequence[Sequence[Image]] = (),
    *,
    segments: np.ndarray | None = None,
    n_segments: int = 64,
    min_share: float = 0.1,
    style: FigureStyle = DEFAULT_STYLE,
) -> Figure:
    """The concept atlas of one input (as in the CRP paper): superpixels coloured by the concept
    that dominates their conditional relevance (``concept_maps``: one map per concept, (K, H,
    W) or (K, C, H, W)), and a legend giving each concept's colour, its share of the painted
    area and a strip of its reference images."""
    maps = _maps(concept_maps)
    if len(names) != len(maps) or (references and len(references) != len(maps)):
        raise ValueError(
            f"{len(maps)} concept maps need as many names ({len(names)}) and reference strips "
            f"({len(references)})"
        )
    segments = superpixels(image, n_segments) if segments is None else segments
    dominant = dominant_concepts(segments, maps, min_share=min_share)
    colours = palette_colours(len(maps), style.palette)
    owner = dominant[segments]
    area = np.bincount(owner[owner >= 0], minlength=len(maps)) / max((owner >= 0).sum(), 1)
    n_ref = max((len(r) for r in references), default=0)
    rows = len(maps)
    cell = style.width / (n_ref + 1 + 0.6 * rows + 1)
    with plt.rc_context(style.rc()):
        fig = plt.figure(figsize=(style.width, max(rows, 3) * cell * 1.15), layout="constrained")
        outer = fig.add_gridspec(1, 2, width_ratios=[0.6 * rows + 0.5, n_ref + 1])
        overlay = atlas_overlay(image, segments, dominant, colours)
        image_axes(fig.add_subplot(outer[0]), overlay, "concept atlas")
        legend = outer[1].subgridspec(rows, n_ref + 1)
        for i, name in enumerate(names):
            swatch = np.broadcast_to(colours[i], (4, 4, 3))
            image_axes(fig.add_subplot(legend[i, 0]), swatch, f"{name} ({area[i]:.0%})")
            strip = references[i] if references else ()
            for j in range(n_ref):
                ax = fig.add_subplot(legend[i, j + 1])
                ax.set_axis_off()
                if j < len(strip):
                    image_axes(ax, as_rgb(strip[j]))
    return fig


__all__ = [
    "DEFAULT_STYLE",
    "FORMATS",
    "ConceptPanel",
    "FigureStyle",
    "as_rgb",
    "atlas_overlay",
    "concept_atlas_figure",
    "concept_figure",
    "concept_panels",
    "concept_shares",
    "dominant_concepts",
    "glocal_figure",
    "palette_colours",
    "relevance_rgb",
    "save_figure",
    "superpixels",
]
