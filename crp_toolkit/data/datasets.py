"""Dataset adapters: arrays in .npz files and ImageFolder trees (any other Dataset by
Hydra ``_target_``). Every dataset yields ``(image tensor (C, H, W), label)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


class NpzDataset(Dataset):
    """Images and labels from an .npz file: uint8 or float, shaped (N, H, W), (N, H, W, C)
    or (N, C, H, W); values divided by ``scale``."""

    def __init__(
        self,
        path: str | Path,
        images_key: str = "images",
        labels_key: str = "labels",
        scale: float = 255.0,
    ) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"dataset file {path} does not exist")
        with np.load(path) as data:
            missing = [k for k in (images_key, labels_key) if k not in data]
            if missing:
                raise KeyError(f"{path} has no array(s) {missing}; it holds {sorted(data.files)}")
            images, labels = data[images_key], data[labels_key]
        self.images = _channels_first(images)
        self.labels = _integral(labels, path)
        self.scale = scale
        if len(self.images) != len(self.labels):
            raise ValueError(f"{path}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = torch.from_numpy(self.images[index].astype(np.float32) / self.scale)
        return image, int(self.labels[index])


def _integral(labels: np.ndarray, path: Path) -> np.ndarray:
    """The labels as int64; fractional (or non-numeric) ones are refused, naming them."""
    if not np.issubdtype(labels.dtype, np.number) or labels.ndim != 1:
        raise ValueError(f"{path}: labels must be a 1-D array of class ids, got {labels.dtype}")
    bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
    if bad.size:
        listed = ", ".join(f"sample {i}: {labels[i]}" for i in bad[:10])
        raise ValueError(f"{path}: labels must be integer class ids ({listed})")
    return labels.astype(np.int64)


def _channels_first(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return images.transpose(0, 3, 1, 2)
    return images


def image_folder(root: str | Path, resize: int, crop: int, mean, std) -> Dataset:
    """A torchvision ImageFolder with resize, centre crop and normalisation."""
    from torchvision import datasets, transforms

    if not Path(root).is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    transform = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(list(mean), list(std)),
        ]
    )
    return datasets.ImageFolder(str(root), transform=transform)
