"""Training the concept world's models (a CNN and a small ViT): deterministic, minutes on 2
CPU cores; their weights ship with the package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from crp_toolkit.data.world import ConceptWorld, ConceptWorldCNN, ConceptWorldViT

ASSETS = Path(__file__).parent / "assets"
ARCHITECTURES: dict[str, type[nn.Module]] = {"cnn": ConceptWorldCNN, "vit": ConceptWorldViT}


def weights_path(architecture: str) -> Path:
    """Where the shipped weights of an architecture (``cnn`` or ``vit``) live."""
    return ASSETS / f"concept_world_{architecture}.pt"


@dataclass(frozen=True)
class TrainConfig:
    """How a concept-world model is trained: AdamW (decoupled weight decay; with none it is
    Adam) with a one-cycle schedule on ``train_size`` images of the training world (seed 0),
    tested on ``test_size`` images of seed 1."""

    architecture: str = "cnn"
    train_size: int = 6000
    test_size: int = 1200
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 2  # torch threads: part of the recipe (sums are ordered by the threads)


TRAINING = {  # the recipes of the shipped weights
    "cnn": TrainConfig(),
    "vit": TrainConfig("vit", train_size=40000, epochs=12, lr=1e-3, weight_decay=0.05, threads=1),
}


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


def model_class(architecture: str) -> type[nn.Module]:
    """The model class of a concept-world architecture name, refusing unknown names."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[architecture]


def train(config: TrainConfig = TrainConfig()) -> tuple[nn.Module, dict[str, float]]:
    """Train a concept-world model on the training world (seed 0) with ``config.threads``
    torch threads; report train and test accuracy (test world: seed 1)."""
    make = model_class(config.architecture)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        train_x, train_y = materialize(ConceptWorld(config.train_size, seed=0))
        test_x, test_y = materialize(ConceptWorld(config.test_size, seed=1))
        model = fit(make(), train_x, train_y, config)
        scores = {
            "train_accuracy": accuracy(model, train_x, train_y),
            "test_accuracy": accuracy(model, test_x, test_y),
        }
    finally:
        torch.set_num_threads(threads)
    return model, scores


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> nn.Module:
    """``config.epochs`` epochs of AdamW with a one-cycle schedule over whole batches of
    (x, y) in a seeded order; the model in eval mode."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    per_epoch = len(x) // config.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, total_steps=config.epochs * per_epoch
    )
    generator = torch.Generator().manual_seed(config.seed)
    progress = tqdm(total=config.epochs * per_epoch, desc="training")
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(config.batch_size)[:per_epoch]:
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    return model.eval()


def load_world_model(path: str | Path | None = None, architecture: str = "cnn") -> nn.Module:
    """A shipped concept-world model, ``cnn`` or ``vit`` (made by
    experiments/train_concept_world.py), in eval mode; ``path``: other weights of it."""
    make = model_class(architecture)
    path = Path(path) if path is not None else weights_path(architecture)
    if not path.exists():
        raise FileNotFoundError(
            f"no concept-world weights at {path}; make them with "
            f"`python experiments/train_concept_world.py --architecture {architecture}`"
        )
    model = make()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
