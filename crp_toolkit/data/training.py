"""Training the concept world's CNN: deterministic, a couple of minutes on 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from crp_toolkit.data.world import ConceptWorld, ConceptWorldCNN

WEIGHTS = Path(__file__).parent / "assets" / "concept_world_cnn.pt"


@dataclass(frozen=True)
class TrainConfig:
    train_size: int = 6000
    test_size: int = 1200
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def materialize(world: ConceptWorld) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 3, H, W) and labels (N,) of a world, generated once."""
    samples = [world.sample(i) for i in tqdm(range(len(world)), desc="generating", leave=False)]
    images = torch.from_numpy(np.stack([s.image for s in samples]))
    return images, torch.tensor([s.label for s in samples])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(b).argmax(1) for b in images.split(256)])
    return float((predictions == labels).float().mean())


def train(config: TrainConfig = TrainConfig()) -> tuple[ConceptWorldCNN, dict[str, float]]:
    """Train ConceptWorldCNN on the training world (seed 0); report train and test accuracy
    (test world: seed 1)."""
    torch.manual_seed(config.seed)
    train_x, train_y = materialize(ConceptWorld(config.train_size, seed=0))
    test_x, test_y = materialize(ConceptWorld(config.test_size, seed=1))
    model = ConceptWorldCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * (len(train_x) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    progress = tqdm(total=steps, desc="training")
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for batch in order.split(config.batch_size)[: len(train_x) // config.batch_size]:
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    model.eval()
    scores = {
        "train_accuracy": accuracy(model, train_x, train_y),
        "test_accuracy": accuracy(model, test_x, test_y),
    }
    return model, scores


def load_world_model(path: str | Path = WEIGHTS) -> ConceptWorldCNN:
    """The shipped concept-world CNN (made by experiments/train_concept_world.py)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no concept-world weights at {path}; make them with "
            "`python experiments/train_concept_world.py`"
        )
    model = ConceptWorldCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
