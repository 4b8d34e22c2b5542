"""Paper-style figures built from explanations (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from crp_toolkit.atlas.heatmap import display_image, heatmap  # noqa: E402


def concept_figure(x: Tensor, concepts, layer: str):
    """Per input (rows): the input, then the conditional heatmap of each top concept, titled
    with its share of the layer's absolute relevance."""
    n, k = concepts.features.shape
    fig, axes = plt.subplots(n, k + 1, figsize=(1.6 * (k + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(display_image(x[i]), cmap="gray")
        maps = heatmap(concepts.relevance[i])
        scores = concepts.scores[i]
        share = scores[concepts.features[i]] / scores.abs().sum().clamp_min(1e-12)
        for j in range(k):
            axes[i, j + 1].imshow(maps[j])
            axes[i, j + 1].set_title(
                f"{layer}:{int(concepts.features[i, j])} ({share[j]:.0%})", fontsize=7
            )
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig
