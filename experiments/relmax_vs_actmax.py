"""RelMax vs ActMax reference samples (the CRP paper's comparison), as a figure.

For the most relevant concepts of a layer: a row of localised RelMax references (samples where
the concept is most relevant) above a row of ActMax references (where it is most active), each
crop titled with the share of its conditional relevance that lies on the concept the
references match best in the ground truth (relevance mass accuracy, concept world only).

    python experiments/relmax_vs_actmax.py RUN_DIR [--layer features.12] [--concepts 4]

Writes RUN_DIR/experiments/relmax_vs_actmax_<layer>.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib import pyplot as plt

from crp_toolkit.app.context import open_run
from crp_toolkit.app.mine import most_relevant
from crp_toolkit.atlas.figures import as_rgb
from crp_toolkit.atlas.views import reference_views
from crp_toolkit.mining.discovery import (
    base_dataset,
    ground_truth,
    has_ground_truth,
    match_references,
)
from crp_toolkit.mining.localise import localise_references
from crp_toolkit.mining.references import reference_samples
from crp_toolkit.mining.statistics import class_statistics

KINDS = {"relevance": "RelMax", "activation": "ActMax"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--layer", default=None, help="default: the store's first layer")
    p.add_argument("--concepts", type=int, default=4)
    p.add_argument("--k", type=int, default=6, help="references per concept")
    args = p.parse_args()
    cfg, study = open_run(args.run)
    store = study.store
    layer = args.layer or store.layers[0]
    concepts = most_relevant(class_statistics(store, layer), args.concepts)
    truth = has_ground_truth(study.dataset)
    fig, axes = plt.subplots(
        2 * len(concepts), args.k, figsize=(1.3 * args.k, 2.7 * len(concepts)), squeeze=False
    )
    for mode_row, mode in enumerate(KINDS):
        table = reference_samples(store, layer, mode=mode, n_refs=args.k)
        found = localise_references(study, table, concepts=concepts)
        dimmed = reference_views(study, found).dimmed
        for j, concept in enumerate(concepts):
            row = axes[2 * j + mode_row]
            label = ""
            if truth:
                masks, presence = ground_truth(study.dataset, found.samples[:, j])
                m = match_references(found.heatmaps[:, j], masks, presence)
                name = base_dataset(study.dataset).concept_names[m.best]
                label = f" ({name} {m.accuracy[m.best]:.2f})"
            for r, ax in enumerate(row):
                ax.imshow(as_rgb(dimmed[r, j]))
                ax.set_axis_off()
            row[0].set_title(f"{layer}:{concept} {KINDS[mode]}{label}", loc="left", fontsize=8)
    fig.tight_layout()
    out = args.run / "experiments"
    out.mkdir(exist_ok=True)
    fig.savefig(out / f"relmax_vs_actmax_{layer}.png", dpi=130)
    print(out / f"relmax_vs_actmax_{layer}.png")


if __name__ == "__main__":
    main()
