"""The FashionMNIST fixture: zennit-crp's small test CNN, and its 5,000 validation images.

The module reuses one ReLU instance at three places, and reads the input through two
parallel branches: a good test of per-call rule assignment and of first-layer detection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


class FashionCNN(nn.Module):
    """conv1-bn1-relu-conv2-bn2 in parallel with parallel.0-parallel.1, added, then
    relu-maxpool-linear1-relu-linear2 (10 logits). Input (B, 1, 28, 28) in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.parallel = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2, bias=False), nn.BatchNorm2d(16))
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.linear1 = nn.Linear(576, 120)
        self.linear2 = nn.Linear(120, 10)

    def forward(self, x: Tensor) -> Tensor:
        main = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        h = self.pool(self.relu(main + self.parallel(x)))
        return self.linear2(self.relu(self.linear1(torch.flatten(h, 1))))


def load_fashion_model(state_dict: str | Path) -> FashionCNN:
    """The trained fixture model, in evaluation mode."""
    model = FashionCNN()
    model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    return model.eval()


def load_fashion_data(npz: str | Path, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Images as float (N, 1, 28, 28) in [0, 1] and labels (N,)."""
    with np.load(npz) as data:
        images, labels = data["val_set"][:limit], data["targets"][:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))
