"""Signed relevance heatmaps: red for positive relevance, blue for negative, white for none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from torch import Tensor

from crp_toolkit.engine.explanation import Explanation


def heatmap(
    expl,
    *,
    cmap: str = "bwr",
    percentile: float = 99.5,
    overlay: Tensor | None = None,
    alpha: float = 0.6,
) -> np.ndarray:
    """RGB heatmap images, uint8 shaped (rows, height, width, 3).

    ``expl`` is any :class:`Explanation` (its ``heatmaps``, one image per row: per sample for
    LRP, per sample and feature for CRP, sample-major) or a relevance tensor (batch, channels,
    h, w) or (batch, h, w). Relevance is summed over channels and scaled symmetrically around
    zero per image (by the ``percentile`` of its absolute values) so that zero is white. With
    ``overlay`` (the input images, (batch, c, h, w) in [0, 1]) the heatmap is blended over a
    grey version of the input.
    """
    maps = _as_maps(expl)
    scale = np.percentile(np.abs(maps).reshape(len(maps), -1), percentile, axis=1)
    scale = np.where(scale > 0, scale, 1.0)[:, None, None]
    normed = np.clip(maps / scale, -1.0, 1.0) * 0.5 + 0.5
    rgb = colormaps[cmap](normed)[..., :3]
    if overlay is not None:
        grey = overlay.detach().float().cpu().mean(1).numpy()[..., None]
        rgb = alpha * rgb + (1 - alpha) * np.clip(grey, 0, 1)
    return (rgb * 255).round().astype(np.uint8)


def heatmap_figure(
    expl, *, inputs: Tensor | None = None, titles: list[str] | None = None, **kwargs
):
    """A matplotlib figure: one column per sample, inputs on top when given."""
    import matplotlib.pyplot as plt

    images = heatmap(expl, **kwargs)
    rows = 2 if inputs is not None else 1
    fig, axes = plt.subplots(rows, len(images), figsize=(2 * len(images), 2 * rows), squeeze=False)
    for i, image in enumerate(images):
        if inputs is not None:
            axes[0, i].imshow(display_image(inputs[i]), cmap="gray")
        axes[-1, i].imshow(image)
        if titles:
            axes[0, i].set_title(titles[i], fontsize=9, parse_math=False)  # "$" kept as is
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_heatmaps(expl, directory: str | Path, prefix: str = "heatmap", **kwargs) -> list[Path]:
    """Write one PNG per sample; returns their paths."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(heatmap(expl, **kwargs)):
        path = directory / f"{prefix}_{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _as_maps(expl: Explanation | Tensor) -> np.ndarray:
    """(rows, h, w) maps: an explanation's heatmaps with their row axes (sample, feature)
    flattened, or a relevance tensor summed over its channels."""
    if isinstance(expl, Explanation):
        maps = expl.heatmaps
    elif expl.dim() in (3, 4):
        maps = expl.sum(1) if expl.dim() == 4 else expl
    else:
        raise ValueError(
            f"heatmaps need relevance shaped (batch, [channels,] h, w), got {tuple(expl.shape)}"
        )
    if maps.dim() < 3:
        raise ValueError(f"heatmaps need images, got heatmaps shaped {tuple(maps.shape)}")
    maps = maps.detach().float().cpu()
    return maps.reshape(-1, *maps.shape[-2:]).numpy()


def display_image(image: Tensor) -> np.ndarray:
    """An input image (C, H, W) scaled to [0, 1] for imshow (grey for one channel)."""
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    return img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy()


__all__ = ["heatmap", "heatmap_figure", "save_heatmaps"]
