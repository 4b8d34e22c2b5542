"""Model adapters: torchvision classifiers by name and any class plus a state_dict, with
weights always from local files (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn


def _load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def torchvision_model(name: str, weights: str | None = None, num_classes: int = 1000) -> nn.Module:
    """``torchvision.models.<name>`` in eval mode, with a local state_dict when given
    (random weights otherwise)."""
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown torchvision model {name!r}; available: {', '.join(available)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if weights is not None:
        model.load_state_dict(_load_state(weights))
    return model.eval()


def from_state_dict(module: nn.Module, weights: str | Path) -> nn.Module:
    """An instantiated module (Hydra ``_target_``) with its weights loaded, in eval mode."""
    module.load_state_dict(_load_state(weights))
    return module.eval()
