"""Views of reference samples for display: a square crop around the receptive field's box,
resized, and the image darkened where the concept's heatmap is low. Made at draw time from
localised references (``mining.localise``), so the store keeps only the geometry and the
heatmaps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from crp_toolkit.mining.localise import LocalisedReferences
from crp_toolkit.store.study import Study


@dataclass(frozen=True)
class ViewOptions:
    """How crops and dimmed views are drawn: ``crop_size`` pixels a side; the heatmap is
    blurred (gaussian, ``blur`` pixels sigma, 0 for none), divided by its maximum, and pixels
    below ``threshold`` are darkened to ``dim`` of their value."""

    crop_size: int = 64
    dim: float = 0.3
    threshold: float = 0.2
    blur: float = 1.0

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be a positive number of pixels, got {self.crop_size}")
        if not (0 <= self.dim <= 1 and 0 <= self.threshold < 1 and self.blur >= 0):
            raise ValueError(
                "need 0 <= dim <= 1, 0 <= threshold < 1 and blur >= 0, got "
                f"dim={self.dim}, threshold={self.threshold}, blur={self.blur}"
            )


def crop_window(box: Sequence[int], height: int, width: int) -> tuple[int, int, int, int]:
    """The smallest square (y0, y1, x0, x1) centred on ``box`` that contains it, moved to lie
    inside the image (and cut to the image where the image is smaller than the square)."""
    y0, y1, x0, x1 = (int(v) for v in box)
    side = max(y1 - y0, x1 - x0)

    def place(lo: int, hi: int, size: int) -> tuple[int, int]:
        length = min(side, size)
        start = min(max(lo - (length - (hi - lo)) // 2, 0), size - length)
        return start, start + length

    return (*place(y0, y1, height), *place(x0, x1, width))


def crop(image: Tensor, window: Sequence[int], size: int) -> Tensor:
    """``image`` (C, H, W) cut to ``window`` and resized to (C, size, size) (bilinear, with
    antialiasing when shrinking)."""
    y0, y1, x0, x1 = (int(v) for v in window)
    part = image[None, :, y0:y1, x0:x1].float()
    shrink = size < max(y1 - y0, x1 - x0)
    out = F.interpolate(part, (size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out[0]


def dim_background(image: Tensor, heatmap: Tensor, view: ViewOptions) -> Tensor:
    """``image`` (C, H, W) darkened to ``view.dim`` where the heatmap (H, W), blurred and
    divided by its maximum, is below ``view.threshold`` (all of it when nothing is positive)."""
    heat = heatmap.float()[None]
    if view.blur > 0:
        radius = math.ceil(3 * view.blur)
        heat = gaussian_blur(heat[None], [2 * radius + 1] * 2, [view.blur] * 2)[0]
    top = heat.max()
    keep = heat >= view.threshold * top if top > 0 else torch.zeros_like(heat, dtype=torch.bool)
    return image.float() * torch.where(keep, 1.0, view.dim)


@dataclass(frozen=True)
class ReferenceViews:
    """Display views of localised references, entry ``[r, j]`` as in
    :class:`LocalisedReferences`: ``windows`` (n_refs, n, 4) the square crop windows
    (y0, y1, x0, x1) around each box, ``crops`` (n_refs, n, C, S, S) the input cut to them and
    resized, ``dimmed`` (n_refs, n, C, H, W) the input darkened where the heatmap is low."""

    windows: np.ndarray
    crops: np.ndarray
    dimmed: np.ndarray


def reference_views(
    study: Study, references: LocalisedReferences, view: ViewOptions = ViewOptions()
) -> ReferenceViews:
    """The crops and dimmed views of every localised reference (images read from the study's
    dataset)."""
    shape = references.samples.shape
    images = study.images(references.samples.ravel())
    height, width = images.shape[2:]
    windows = np.array([crop_window(b, height, width) for b in references.boxes.reshape(-1, 4)])
    heatmaps = torch.from_numpy(references.heatmaps.reshape(-1, height, width))
    crops = torch.stack([crop(x, w, view.crop_size) for x, w in zip(images, windows, strict=True)])
    dimmed = torch.stack(
        [dim_background(x, h, view) for x, h in zip(images, heatmaps, strict=True)]
    )
    return ReferenceViews(
        windows.reshape(*shape, 4),
        crops.reshape(*shape, *crops.shape[1:]).numpy(),
        dimmed.reshape(*shape, *dimmed.shape[1:]).numpy(),
    )
