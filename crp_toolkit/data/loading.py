"""Feeding data to the pipeline: a DataLoader with workers and pinned memory, tolerant of
samples that cannot be read (skipped and reported, or failing the run, by config)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class UnreadableSampleError(RuntimeError):
    """A sample of the dataset could not be read."""


@dataclass
class Batch:
    """Images, labels and dataset indices of the samples that could be read."""

    images: Tensor
    labels: Tensor
    indices: list[int]
    skipped: list[dict] = field(default_factory=list)  # {"index": i, "error": "..."}

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (what a DataLoader with ``pin_memory`` calls), so
        it can be copied to the GPU while the GPU works."""
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())


class _Tolerant(Dataset):
    """Wraps a dataset so a failing sample comes back as an error record, not an exception
    that would kill a DataLoader worker."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, label = self.dataset[index]
        except Exception as err:  # any reader error: a corrupt file, a bad array...
            return index, None, f"{type(err).__name__}: {err}"
        return index, torch.as_tensor(image), int(label)


def _collate(items):
    good = [(i, x, y) for i, x, y in items if x is not None]
    bad = [{"index": i, "error": e} for i, x, e in items if x is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), [], bad)
    images = torch.stack([x for _, x, _ in good])
    labels = torch.tensor([y for _, _, y in good])
    return Batch(images, labels, [i for i, _, _ in good], bad)


def grouped(
    dataset: Dataset,
    groups: Sequence[Sequence[int]],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    on_error: str = "skip",
):
    """Yield one :class:`Batch` per group of dataset indices, in order, all read by one
    DataLoader (its workers live across groups and read ahead). Unreadable samples are
    listed in ``Batch.skipped`` (``on_error="skip"``) or raise UnreadableSampleError
    (``"fail"``) naming the sample and what went wrong."""
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    bad = [i for group in groups for i in group if not 0 <= i < len(dataset)]
    if bad:
        raise IndexError(f"indices {bad[:10]} out of range for a dataset of {len(dataset)}")
    if not groups:
        return
    loader = DataLoader(
        _Tolerant(dataset),
        batch_sampler=[list(group) for group in groups],
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        collate_fn=_collate,
    )
    for batch in loader:
        if batch.skipped and on_error == "fail":
            first = batch.skipped[0]
            raise UnreadableSampleError(
                f"sample {first['index']} could not be read ({first['error']}); "
                "set loader.on_error=skip to skip unreadable samples and list them in the report"
            )
        yield batch


def batches(
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    *,
    batch_size: int = 64,
    **loader_options,
):
    """Yield :class:`Batch` es of ``batch_size`` of ``dataset`` (in index order); the
    options are ``grouped``'s."""
    indices = list(range(len(dataset)) if indices is None else indices)
    groups = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    yield from grouped(dataset, groups, **loader_options)


def first_readable(dataset: Dataset, tries: int = 64) -> Tensor:
    """The first sample image that can be read (for shape and class-count checks)."""
    tolerant, tries = _Tolerant(dataset), min(tries, len(dataset))
    for i in range(tries):
        _, image, _ = tolerant[i]
        if image is not None:
            return image
    raise UnreadableSampleError(f"none of the first {tries} samples could be read")


def gather(dataset: Dataset, indices: Sequence[int], **loader_options) -> Batch:
    """All readable samples among ``indices`` as one batch, with the skipped ones listed."""
    parts = list(batches(dataset, indices, **loader_options))
    kept = [b for b in parts if b.indices]
    skipped = [s for b in parts for s in b.skipped]
    if not kept:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), [], skipped)
    images = torch.cat([b.images for b in kept])
    labels = torch.cat([b.labels for b in kept])
    return Batch(images, labels, [i for b in kept for i in b.indices], skipped)


__all__ = ["Batch", "UnreadableSampleError", "batches", "first_readable", "gather", "grouped"]
