"""Feeding data to the pipeline: a DataLoader with workers and pinned memory, tolerant of
samples that cannot be read or hold NaN/inf (skipped and reported, or failing the run, by
config); labels that are not integral, or out of range for the model, are refused, naming the
dataset indices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class UnreadableSampleError(RuntimeError):
    """A sample of the dataset could not be read."""


class BadLabelError(ValueError):
    """Labels of the dataset are not class ids of the model."""


def _label(label) -> int:
    """An integral label as int; a fractional or non-numeric one raises ValueError."""
    value = label.item() if hasattr(label, "item") else label
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"label {value!r} is not an integer class id")
    return int(value)


@dataclass
class Batch:
    """Images, labels and dataset indices of the samples that could be read."""

    images: Tensor
    labels: Tensor
    indices: list[int]
    skipped: list[dict] = field(default_factory=list)  # {"index": i, "error": "..."}
    bad_labels: list[tuple[int, str]] = field(default_factory=list)  # (index, what is wrong)

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
        image = torch.as_tensor(image)
        if image.is_floating_point() and not torch.isfinite(image).all():
            return index, None, "the image contains NaN or inf"
        try:
            return index, image, _label(label)
        except (TypeError, ValueError) as err:
            return index, image, err  # a bad label is refused, not skipped


def _collate(items):
    wrong = [(i, str(y)) for i, x, y in items if x is not None and isinstance(y, Exception)]
    good = [(i, x, y) for i, x, y in items if x is not None and not isinstance(y, Exception)]
    bad = [{"index": i, "error": e} for i, x, e in items if x is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), [], bad, wrong)
    images = torch.stack([x for _, x, _ in good])
    labels = torch.tensor([y for _, _, y in good])
    return Batch(images, labels, [i for i, _, _ in good], bad, wrong)


def _bad_labels(found: Sequence[tuple[int, str]]) -> str:
    listed = ", ".join(f"sample {i}: {why}" for i, why in found[:10])
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    return f"bad labels ({listed}{more}); labels must be integer class ids of the model"


def check_labels(batch: Batch, classes: int) -> None:
    """Refuse labels outside ``[0, classes)``, naming the samples (at most 10) and values."""
    out = (batch.labels < 0) | (batch.labels >= classes)
    found = [
        (batch.indices[j], f"label {int(batch.labels[j])} not in 0..{classes - 1}")
        for j in out.nonzero().flatten().tolist()
    ]
    if found:
        raise BadLabelError(_bad_labels(found))


def grouped(
    dataset: Dataset,
    groups: Sequence[Sequence[int]],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    on_error: str = "skip",
    classes: int | None = None,
):
    """Yield one :class:`Batch` per group of dataset indices, in order, all read by one
    DataLoader (its workers live across groups and read ahead). Unreadable samples (and
    images holding NaN or inf) are listed in ``Batch.skipped`` (``on_error="skip"``) or raise
    UnreadableSampleError (``"fail"``) naming the sample and what went wrong. Labels that are
    not integers, or (given ``classes``) not in ``[0, classes)``, raise BadLabelError."""
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
        if batch.bad_labels:
            raise BadLabelError(_bad_labels(batch.bad_labels))
        if classes is not None:
            check_labels(batch, classes)
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
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: check its path (and analysis.limit)")
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


def read_samples(dataset, ids: np.ndarray) -> Tensor:
    """The images of samples ``ids`` (repeats allowed), in that order; refused when one of
    them cannot be read."""
    batch = gather(dataset, np.unique(ids).tolist())
    missing = sorted(set(ids.tolist()) - set(batch.indices))
    if missing:
        raise ValueError(
            f"samples {missing[:10]} cannot be read from the dataset ({batch.skipped[:1]}); "
            "is it the dataset the store was made from?"
        )
    row = {s: i for i, s in enumerate(batch.indices)}
    return batch.images[[row[int(s)] for s in ids]]


__all__ = [
    "BadLabelError",
    "Batch",
    "UnreadableSampleError",
    "check_labels",
    "batches",
    "first_readable",
    "gather",
    "grouped",
    "read_samples",
]
