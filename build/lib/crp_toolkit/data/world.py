"""The built-in concept world: images whose true concepts are known, so discoveries can be
scored.

Every image (RGB, 64x64 by default) shows one *key object* that defines its class and one or
two distractor objects that match no class rule. An object has a shape (circle, square,
triangle), a colour (red, green, blue) and a texture (plain, stripes, dots). Some concepts are
shared across classes (red: classes 0 and 5; circle: 0 and 3). A spurious watermark appears on
most images of one class (and rarely elsewhere), for Clever-Hans experiments. Each sample is
generated from ``(seed, index)`` alone, with its ground truth: which concepts are present and a
pixel mask for each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
TEXTURES = ("plain", "stripes", "dots")
CONCEPTS = ("circle", "square", "triangle", "red", "green", "blue", "stripes", "dots", "watermark")
RGB = {"red": (0.85, 0.15, 0.12), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.3, 0.9)}

# class -> rule on the key object (shape, colour, texture); None matches anything
CLASS_RULES: tuple[tuple[str | None, str | None, str | None, str | None], ...] = (
    ("circle", "red", None, None),  # 0: red circle
    ("square", "blue", None, None),  # 1: blue square
    ("triangle", "green", None, None),  # 2: green triangle
    ("circle", None, "stripes", "red"),  # 3: striped circle, not red
    ("square", None, "dots", "blue"),  # 4: dotted square, not blue
    ("triangle", "red", None, None),  # 5: red triangle
)
CLASSES = (
    "red circle",
    "blue square",
    "green triangle",
    "striped circle",
    "dotted square",
    "red triangle",
)


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    texture: str


def matches(obj: WorldObject, rule: tuple) -> bool:
    shape, colour, texture, not_colour = rule
    return (
        (shape is None or obj.shape == shape)
        and (colour is None or obj.colour == colour)
        and (texture is None or obj.texture == texture)
        and (not_colour is None or obj.colour != not_colour)
    )


def class_of(obj: WorldObject) -> int | None:
    """The class an object defines, or None for a distractor."""
    return next((k for k, rule in enumerate(CLASS_RULES) if matches(obj, rule)), None)


@dataclass(frozen=True)
class WorldSample:
    """One image (3, H, W) float in [0, 1], its label, concept presence (n_concepts,) and
    pixel masks (n_concepts, H, W)."""

    image: np.ndarray
    label: int
    concepts: np.ndarray
    masks: np.ndarray


@dataclass(frozen=True)
class ConceptWorld(Dataset):
    """A deterministic dataset of ``n`` samples; ``seed`` picks the split (train 0, test 1).

    ``watermark_class`` gets the watermark with probability ``watermark_rate``, other classes
    with ``watermark_noise``.
    """

    n: int = 6000
    seed: int = 0
    size: int = 64
    watermark_class: int = 0
    watermark_rate: float = 0.8
    watermark_noise: float = 0.05

    classes = CLASSES
    concept_names = CONCEPTS

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        s = self.sample(index)
        return torch.from_numpy(s.image), s.label

    def sample(self, index: int) -> WorldSample:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a world of {self.n} samples")
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(len(CLASSES)))
        return render(rng, label, self.size, self._watermark(rng, label))

    def _watermark(self, rng: np.random.Generator, label: int) -> bool:
        rate = self.watermark_rate if label == self.watermark_class else self.watermark_noise
        return bool(rng.random() < rate)

    def labels(self) -> np.ndarray:
        return np.array([self.sample(i).label for i in range(self.n)])


def _random_object(rng: np.random.Generator) -> WorldObject:
    return WorldObject(SHAPES[rng.integers(3)], COLOURS[rng.integers(3)], TEXTURES[rng.integers(3)])


def key_object(rng: np.random.Generator, label: int) -> WorldObject:
    while True:
        obj = _random_object(rng)
        if class_of(obj) == label:
            return obj


def distractor(rng: np.random.Generator) -> WorldObject:
    while True:
        obj = _random_object(rng)
        if class_of(obj) is None:
            return obj


def render(rng: np.random.Generator, label: int, size: int, watermark: bool) -> WorldSample:
    """Draw the key object and 1-2 distractors at non-overlapping places."""
    objects = [key_object(rng, label)] + [distractor(rng) for _ in range(rng.integers(1, 3))]
    image = 0.45 + 0.08 * rng.standard_normal((3, size, size))
    masks = np.zeros((len(CONCEPTS), size, size), dtype=bool)
    boxes: list[tuple[int, int, int]] = []
    for obj in objects:
        r, cy, cx = _place(rng, size, boxes)
        boxes.append((r, cy, cx))
        shape_mask = _shape_mask(obj.shape, size, r, cy, cx)
        shade = _texture(obj.texture, size, rng)
        colour = np.array(RGB[obj.colour])[:, None, None] * (0.9 + 0.2 * rng.random())
        image = np.where(shape_mask, colour * shade, image)
        masks[CONCEPTS.index(obj.shape)] |= shape_mask
        masks[CONCEPTS.index(obj.colour)] |= shape_mask
        if obj.texture != "plain":
            masks[CONCEPTS.index(obj.texture)] |= shape_mask
    if watermark:
        mark = _watermark_mask(size)
        image = np.where(mark, 1.0, image)
        masks[CONCEPTS.index("watermark")] = mark
    concepts = masks.reshape(len(CONCEPTS), -1).any(1)
    return WorldSample(np.clip(image, 0, 1).astype(np.float32), label, concepts, masks)


def _place(rng: np.random.Generator, size: int, boxes) -> tuple[int, int, int]:
    for _ in range(200):
        r = int(rng.integers(size // 9, size // 6 + 1))
        cy, cx = (int(v) for v in rng.integers(r + 1, size - r - 10, size=2))
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 2) ** 2 for q, y, x in boxes):
            return r, cy, cx
    return r, cy, cx


def _shape_mask(shape: str, size: int, r: int, cy: int, cx: int) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    if shape == "square":
        return (abs(y - cy) <= r * 0.85) & (abs(x - cx) <= r * 0.85)
    top = cy - r
    return (y >= top) & (y <= cy + r) & (abs(x - cx) <= (y - top) * 0.6)


def _texture(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    if texture == "stripes":
        return np.where(((x + y + int(rng.integers(4))) // 3) % 2 == 0, 1.0, 0.35)
    if texture == "dots":
        return np.where((y % 4 < 2) & (x % 4 < 2), 0.3, 1.0)
    return np.ones((size, size))


def _watermark_mask(size: int) -> np.ndarray:
    """A small white cross in the bottom-right corner."""
    mask = np.zeros((size, size), dtype=bool)
    c = size - 6
    for d in range(-3, 4):
        mask[c + d, c + d] = mask[c + d, c - d] = True
    return mask


class ConceptWorldCNN(nn.Module):
    """A small CNN for the concept world: four conv blocks and a linear classifier."""

    def __init__(self, classes: int = len(CLASSES), width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, width // 2),
            nn.MaxPool2d(2),
            *block(width // 2, width),
            nn.MaxPool2d(2),
            *block(width, width * 2),
            nn.MaxPool2d(2),
            *block(width * 2, width * 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width * 2, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
