"""Train the concept world's CNN and write the weights that ship with the package.

    python experiments/train_concept_world.py [--out crp_toolkit/data/assets/concept_world_cnn.pt]

Deterministic (fixed seeds); a few minutes on 2 CPU cores. Prints train and test accuracy.
"""

from __future__ import annotations

import argparse
import json

import torch

from crp_toolkit.data.training import WEIGHTS, TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, scores = train(TrainConfig(epochs=args.epochs))
    torch.save(model.state_dict(), args.out)
    print(json.dumps(scores, indent=2))
    print(f"weights written to {args.out}")


if __name__ == "__main__":
    main()
