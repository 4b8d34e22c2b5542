"""Clever-Hans watermark detection on the concept world (a figure and a table).

The world puts a spurious watermark on most images of one class. Which concepts of a layer
does the model use more on that class's watermarked images than on its clean ones (mean
per-sample normalised concept relevance, read from the store), how much of each such
concept's conditional relevance lies on the watermark, and how much does the class logit drop
when the watermark is painted out?

    python experiments/clever_hans.py RUN_DIR [--layer features.8] [--top 6]

RUN_DIR is a finished `crp-toolkit run` (or `make demo`) folder; writes
RUN_DIR/experiments/clever_hans.{png,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from matplotlib import pyplot as plt

from crp_toolkit.app.context import open_run
from crp_toolkit.data.world import CONCEPTS
from crp_toolkit.mining.discovery import base_dataset, ground_truth, mass_accuracy
from crp_toolkit.mining.localise import conditional_maps

MARK = CONCEPTS.index("watermark")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--layer", default=None, help="default: the store's first layer")
    p.add_argument("--top", type=int, default=6, help="concepts shown")
    args = p.parse_args()
    cfg, study = open_run(args.run)
    store = study.store
    layer = args.layer or store.layers[0]
    world = base_dataset(study.dataset)
    wclass = world.watermark_class
    labels, valid = store.samples("label")[:], store.samples("valid")[:]
    ids = np.flatnonzero(valid & (labels == wclass))
    masks, presence = ground_truth(study.dataset, ids)
    marked = presence[:, MARK]
    relevance = store.layer(layer)[:][ids].astype(np.float64)
    relevance /= np.maximum(np.abs(relevance).sum(1, keepdims=True), 1e-30)
    gap = relevance[marked].mean(0) - relevance[~marked].mean(0)
    top = np.argsort(-gap)[: args.top]

    images = study.images(ids[marked])
    pairs = np.repeat(np.arange(len(images)), len(top))
    concepts = np.tile(top, len(images))
    heat, _ = conditional_maps(
        study.analyzer, images[pairs], [wclass] * len(pairs), layer, concepts.tolist()
    )
    share = mass_accuracy(heat.numpy(), masks[marked][pairs][:, [MARK]])[:, 0]
    share = share.reshape(len(images), len(top)).mean(0)
    area = masks[marked][:, MARK].mean()
    drop = logit_drop(study.analyzer.model, images, masks[marked][:, MARK], wclass)

    out = args.run / "experiments"
    out.mkdir(exist_ok=True)
    names = [f"{layer}:{c}" for c in top]
    table = [
        f"# Clever-Hans watermark, class {world.classes[wclass]!r}, {layer}",
        "",
        f"{int(marked.sum())} watermarked and {int((~marked).sum())} clean samples of the class; "
        f"the watermark covers {area:.2%} of an image; painting it out lowers the class logit "
        f"by {drop:.1%} on average.",
        "",
        "| concept | relevance gap (marked - clean) | share of its relevance on the watermark |",
        "|---|---|---|",
        *(f"| {n} | {g:+.4f} | {s:.3f} |" for n, g, s in zip(names, gap[top], share)),
    ]
    (out / "clever_hans.md").write_text("\n".join(table) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), layout="constrained")
    axes[0].barh(names[::-1], gap[top][::-1], color="#c0392b")
    axes[0].set_xlabel("mean normalised relevance, marked - clean")
    axes[1].barh(names[::-1], share[::-1], color="#2e5cb8")
    axes[1].axvline(area, color="k", linestyle=":", label="watermark area")
    axes[1].set_xlabel("share of conditional relevance on the watermark")
    axes[1].legend(fontsize="small")
    fig.suptitle(f"Watermark on class {world.classes[wclass]!r}: logit -{drop:.0%} without it")
    fig.savefig(out / "clever_hans.png", dpi=150)
    print("\n".join(table))


def logit_drop(model, images: torch.Tensor, marks: np.ndarray, cls: int) -> float:
    """Mean relative drop of the class logit when the watermark pixels take the mean colour of
    the rest of the image."""
    clean = images.clone()
    for image, mark in zip(clean, torch.from_numpy(marks)):
        image[:, mark] = image[:, ~mark].mean(1, keepdim=True)
    with torch.no_grad():
        before, after = model(images)[:, cls], model(clean)[:, cls]
    return float(((before - after) / before.abs()).mean())


if __name__ == "__main__":
    main()
