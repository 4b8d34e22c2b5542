"""The built-in concept world: images whose true concepts are known, so discoveries can be
scored.

Every image (RGB, 64x64 by default) shows one *key object* that defines its class and one or
two distractor objects that match no class rule. An object has a shape (circle, square,
triangle), a colour (red, green, blue), a texture (plain, stripes, dots) and maybe a part: a
dark grey *stem* below its body, like a lollipop stick. Class 4 (a square with a stem, not blue)
needs the stem; the other rules ignore parts, so stems appear at random (``PART_RATE``) on their
key objects and on distractors, where a stem is allowed only if the object still matches no
rule. Some concepts are shared across classes (red: classes 0 and 5; circle: 0 and 3; square: 1
and 4; stem: all). A spurious watermark appears on most images of one class (and rarely
elsewhere), for Clever-Hans experiments. Each sample is generated from ``(seed, index)`` alone,
with its ground truth: which concepts are present and a pixel mask for each (shape, colour and
texture masks cover an object's body, the stem's mask only the stem).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.models.vision_transformer import VisionTransformer

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
TEXTURES = ("plain", "stripes", "dots")
PARTS = ("stem",)
PART_RATE = 0.3  # chance that a random object carries a part
CONCEPTS = SHAPES + COLOURS + TEXTURES[1:] + PARTS + ("watermark",)
RGB = {"red": (0.85, 0.15, 0.12), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.3, 0.9)}
STEM_GREY = 0.15
Disc = tuple[int, int, int]  # radius, centre row, centre column


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    texture: str
    part: str | None = None


@dataclass(frozen=True)
class Rule:
    """What a key object must be; None matches anything."""

    shape: str | None = None
    colour: str | None = None
    texture: str | None = None
    not_colour: str | None = None
    part: str | None = None


CLASS_RULES = (
    Rule("circle", colour="red"),  # 0: red circle
    Rule("square", colour="blue"),  # 1: blue square
    Rule("triangle", colour="green"),  # 2: green triangle
    Rule("circle", texture="stripes", not_colour="red"),  # 3: striped circle, not red
    Rule("square", not_colour="blue", part="stem"),  # 4: square with a stem, not blue
    Rule("triangle", colour="red"),  # 5: red triangle
)
CLASSES = (
    "red circle",
    "blue square",
    "green triangle",
    "striped circle",
    "stemmed square",
    "red triangle",
)


def matches(obj: WorldObject, rule: Rule) -> bool:
    """Whether an object satisfies a class rule."""
    return (
        rule.shape in (None, obj.shape)
        and rule.colour in (None, obj.colour)
        and rule.texture in (None, obj.texture)
        and rule.not_colour != obj.colour
        and rule.part in (None, obj.part)
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
    shape, colour, texture = (kinds[rng.integers(3)] for kinds in (SHAPES, COLOURS, TEXTURES))
    part = PARTS[rng.integers(len(PARTS))] if rng.random() < PART_RATE else None
    return WorldObject(shape, colour, texture, part)


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
    """A sample of class ``label``: its key object and 1-2 distractors."""
    objects = [key_object(rng, label)] + [distractor(rng) for _ in range(rng.integers(1, 3))]
    image, masks = draw(rng, objects, size, watermark)
    concepts = masks.reshape(len(CONCEPTS), -1).any(1)
    return WorldSample(image, label, concepts, masks)


def draw(
    rng: np.random.Generator, objects: list[WorldObject], size: int, watermark: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Draw objects at non-overlapping places on a noisy background: the image (3, size, size)
    and the mask of each concept (n_concepts, size, size), holding only visible pixels."""
    image = 0.45 + 0.08 * rng.standard_normal((3, size, size))
    masks = np.zeros((len(CONCEPTS), size, size), dtype=bool)
    taken: list[Disc] = []
    for obj in objects:
        r, cy, cx = _place(rng, size, obj.part, taken)
        taken += _footprint(obj.part, r, cy, cx)
        body = _shape_mask(obj.shape, size, r, cy, cx)
        shade = _texture(obj.texture, size, rng)
        colour = np.array(RGB[obj.colour])[:, None, None] * (0.9 + 0.2 * rng.random())
        seen = [obj.shape, obj.colour] + ([obj.texture] if obj.texture != "plain" else [])
        image, masks = _paint(image, masks, body, colour * shade, seen)
        if obj.part is not None:
            stem = _stem_mask(size, r, cy, cx) & ~body
            grey = STEM_GREY * (0.8 + 0.4 * rng.random())
            image, masks = _paint(image, masks, stem, grey, [obj.part])
    if watermark:
        image, masks = _paint(image, masks, _watermark_mask(size), 1.0, ["watermark"])
    return np.clip(image, 0, 1).astype(np.float32), masks


def _paint(
    image: np.ndarray,
    masks: np.ndarray,
    region: np.ndarray,
    value: np.ndarray | float,
    concepts: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``value`` over ``region``, which then shows only ``concepts``."""
    masks = masks & ~region
    masks[[CONCEPTS.index(c) for c in concepts]] |= region
    return np.where(region, value, image), masks


def _place(
    rng: np.random.Generator, size: int, part: str | None, taken: list[Disc]
) -> tuple[int, int, int]:
    """A radius and centre whose footprint keeps clear of the ``taken`` discs (the last try
    if none does in 200)."""
    for _ in range(200):
        r = int(rng.integers(size // 9, size // 6 + 1))
        cy, cx = (int(v) for v in rng.integers(r + 1, size - r - 10, size=2))
        if not any(_overlap(a, b) for a in _footprint(part, r, cy, cx) for b in taken):
            return r, cy, cx
    return r, cy, cx


def _overlap(a: Disc, b: Disc) -> bool:
    """Whether two discs come closer than 2 pixels."""
    (q, y, x), (p, v, u) = a, b
    return (y - v) ** 2 + (x - u) ** 2 <= (q + p + 2) ** 2


def _stem_size(r: int) -> tuple[int, int]:
    """Length below the body and half-width of the stem of an object of radius ``r``."""
    return 2 * r // 3 + 2, r // 4 + 1


def _footprint(part: str | None, r: int, cy: int, cx: int) -> list[Disc]:
    """Discs covering an object: its body and, with a part, its stem."""
    if part is None:
        return [(r, cy, cx)]
    length, _ = _stem_size(r)
    return [(r, cy, cx), (length // 2 + 1, cy + r + length // 2, cx)]


def _stem_mask(size: int, r: int, cy: int, cx: int) -> np.ndarray:
    """The stem's bar, from the body's centre down past its bottom (the body hides the top)."""
    length, half_width = _stem_size(r)
    y, x = np.mgrid[:size, :size]
    return (y > cy) & (y <= cy + r + length) & (abs(x - cx) <= half_width)


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


class ConceptWorldViT(VisionTransformer):
    """A small vision transformer for the concept world: torchvision's ``VisionTransformer``
    on 64x64 images in 8x8 patches (an 8x8 token grid plus the class token), 4 blocks of width
    64 with 4 heads. The same architecture as torchvision's ViTs, so everything that explains
    those explains this one; a block's output is ``encoder.layers.encoder_layer_<i>.add#2``."""

    def __init__(self, classes: int = len(CLASSES), width: int = 64, depth: int = 4) -> None:
        super().__init__(
            image_size=64,
            patch_size=8,
            num_layers=depth,
            num_heads=4,
            hidden_dim=width,
            mlp_dim=2 * width,
            num_classes=classes,
        )
