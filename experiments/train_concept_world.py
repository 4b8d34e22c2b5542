"""Train the concept world's CNN (or its ViT) and write the weights that ship with the package.

    python experiments/train_concept_world.py [--model cnn|vit] [--epochs N] [--out PATH]

Deterministic (fixed seeds); a few minutes on 2 CPU cores. Prints train and test accuracy.
"""

from __future__ import annotations

import argparse
import json

import torch

from crp_toolkit.data.training import VIT_WEIGHTS, WEIGHTS, TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("cnn", "vit"), default="cnn")
    parser.add_argument("--out", default=None, help="default: the shipped weights' path")
    parser.add_argument("--epochs", type=int, default=None, help="default: 6 (cnn), 40 (vit)")
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 (cnn), 1e-3 (vit)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    vit = args.model == "vit"
    config = TrainConfig(
        epochs=args.epochs or (40 if vit else TrainConfig.epochs),
        lr=args.lr or (1e-3 if vit else TrainConfig.lr),
    )
    model, scores = train(config, args.model)
    args.out = args.out or str(VIT_WEIGHTS if vit else WEIGHTS)
    torch.save(model.state_dict(), args.out)
    print(json.dumps(scores, indent=2))
    print(f"weights written to {args.out}")


if __name__ == "__main__":
    main()
