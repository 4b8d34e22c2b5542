"""Localised reference samples: where a concept sits in each of its reference samples.

For every reference sample s of concept c (a :class:`ReferenceTable` column) this computes

- the concept's conditional heatmap on s, from its relevance while explaining the class the
  store explains for s (label or prediction), never from its activation (CRP's reference
  heatmaps; zennit-crp issue #11), batched over many (sample, concept) pairs per call;
- the exact input-space box of the receptive field of the concept's maximal neuron (for
  relevance references the argmax of its conditional relevance at the layer, for activation
  references the store's ``act_argmax``), traced through the model's conv and pool geometry;
- a square crop of the input around that box, resized to a fixed size, and a view of the input
  darkened where the normalised heatmap is low.

Results are cached in the store under ``derived/localised/...``, keyed by everything that
changes them (composite, model and dataset fingerprints, references, view options).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur
from tqdm import tqdm

from crp_toolkit.concepts.conditional import OUTPUT, CondAttribution
from crp_toolkit.data.loading import gather
from crp_toolkit.engine.graph import Layer
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.engine.ops import BATCHNORM, CONCAT, ELEMENTWISE, GATE, SUM
from crp_toolkit.mining.references import ReferenceTable
from crp_toolkit.store.results import read_result, write_result
from crp_toolkit.store.zarr_store import (
    Store,
    StoreMismatchError,
    dataset_fingerprint,
    model_fingerprint,
)

# ops that map each spatial position to the same position of their inputs (when shapes agree)
_POINTWISE = (ELEMENTWISE, BATCHNORM, SUM, GATE, CONCAT)
_WINDOWS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ADAPTIVE = (nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)


# -- receptive fields ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ReceptiveField:
    """Input-space boxes of every neuron position of a layer.

    ``boxes[position]`` is ``(start_0, stop_0, start_1, stop_1, ...)`` (half-open, one pair per
    spatial axis of the input; for images ``(y0, y1, x0, x1)``). ``boxes`` has the layer's
    spatial shape in front; a layer without spatial axes (dense units) covers the whole input.
    """

    layer: str
    boxes: np.ndarray

    def box(self, position: Sequence[int]) -> np.ndarray:
        return self.boxes[tuple(int(p) for p in position)]


def receptive_field(analyzer: LRP, layer: str, input_shape: Sequence[int]) -> ReceptiveField:
    """Trace the input region every neuron of ``layer`` sees, for inputs of ``input_shape``
    (channels, *spatial), from the kernel, stride, padding and dilation of the conv and pooling
    modules on the way (pointwise ops keep positions; dense layers, reshapes and ops of unknown
    geometry see their whole input). Branches are united, and boxes clipped to the input."""
    graph = analyzer.graph
    target = graph.index(layer)
    like = next(analyzer.model.parameters(), torch.zeros(()))
    probe = torch.zeros(1, *input_shape, dtype=like.dtype, device=like.device)
    fp = analyzer.forward(probe, keep=range(len(graph.layers)))

    def spatial(index: int) -> tuple[int, ...]:
        return tuple(fp.value(index).shape[2:])

    image, out = spatial(-1), spatial(target)
    extents: dict[int, Extent] = {}
    if len(out) == len(image):
        extents[target] = [(np.arange(n), np.arange(n)) for n in out]
    for index in range(target, -1, -1):
        if index not in extents:
            continue
        current, extent = graph.layers[index], extents.pop(index)
        for source in current.inputs:
            found = _through(current, extent, spatial(index), spatial(source))
            extents[source] = _union(extents[source], found) if source in extents else found
    final = extents.get(-1)
    grids = np.meshgrid(*[np.arange(n) for n in out], indexing="ij")
    columns = []
    for axis, n in enumerate(image):
        if final is None:  # dense units, or a path through an op that mixes all positions
            columns += [np.zeros(out, np.int64), np.full(out, n, np.int64)]
        else:
            lo, hi = final[axis]
            columns += [lo[grids[axis]], hi[grids[axis]] + 1]
    return ReceptiveField(layer, np.stack(columns, -1).astype(np.int64))


# per spatial axis, inclusive (low, high) positions of a tensor for every traced neuron position;
# None: the whole tensor
Extent = list[tuple[np.ndarray, np.ndarray]] | None


def _through(layer: Layer, extent: Extent, out_shape, in_shape) -> Extent:
    """What a layer's output intervals cover of one of its inputs."""
    module = layer.module
    if extent is None or not len(extent) == len(in_shape) == len(out_shape):
        return None
    axes = len(in_shape)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        window = (module.kernel_size, module.stride, _left_padding(module), module.dilation)
    elif isinstance(module, _WINDOWS):
        stride = module.stride or module.kernel_size
        window = (module.kernel_size, stride, module.padding, getattr(module, "dilation", 1))
    elif isinstance(module, _ADAPTIVE):
        sizes = zip(extent, in_shape, out_shape, strict=True)
        mapped = [(lo * i // o, -(-(hi + 1) * i // o) - 1) for (lo, hi), i, o in sizes]
        return _clip(mapped, in_shape)
    elif layer.op in _POINTWISE and in_shape == out_shape:
        return extent
    else:  # dense, reshape, functional pools, transposed convs: the whole input
        return None
    k, s, p, d = (_per_axis(v, axes) for v in window)
    mapped = [
        (lo * s[a] - p[a], hi * s[a] - p[a] + d[a] * (k[a] - 1))
        for a, (lo, hi) in enumerate(extent)
    ]
    return _clip(mapped, in_shape)


def _union(a: Extent, b: Extent) -> Extent:
    if a is None or b is None:
        return None
    return [
        (np.minimum(la, lb), np.maximum(ha, hb)) for (la, ha), (lb, hb) in zip(a, b, strict=True)
    ]


def _per_axis(value, axes: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * axes


def _left_padding(module: nn.Module) -> tuple[int, ...]:
    """Padding before the first element per axis (``'same'`` pads the smaller half first)."""
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    if module.padding == "same":
        pairs = zip(module.dilation, module.kernel_size, strict=True)
        return tuple(d * (k - 1) // 2 for d, k in pairs)
    return module.padding


def _clip(extent, shape) -> Extent:
    return [
        (np.clip(lo, 0, n - 1), np.clip(hi, 0, n - 1))
        for (lo, hi), n in zip(extent, shape, strict=True)
    ]


# -- views of a reference ---------------------------------------------------------------------
@dataclass(frozen=True)
class ViewOptions:
    """How crops and dimmed views are drawn: ``crop_size`` pixels a side; the heatmap is
    blurred (gaussian, ``blur`` pixels sigma, 0 for none), divided by its maximum, and pixels
    below ``threshold`` are darkened to ``dim`` of their value."""

    crop_size: int = 64
    dim: float = 0.3
    threshold: float = 0.2
    blur: float = 1.0

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be a positive number of pixels, got {self.crop_size}")
        if not (0 <= self.dim <= 1 and 0 <= self.threshold < 1 and self.blur >= 0):
            raise ValueError(
                "need 0 <= dim <= 1, 0 <= threshold < 1 and blur >= 0, got "
                f"dim={self.dim}, threshold={self.threshold}, blur={self.blur}"
            )


def crop_window(box: Sequence[int], height: int, width: int) -> tuple[int, int, int, int]:
    """The smallest square (y0, y1, x0, x1) centred on ``box`` that contains it, moved to lie
    inside the image (and cut to the image where the image is smaller than the square)."""
    y0, y1, x0, x1 = (int(v) for v in box)
    side = max(y1 - y0, x1 - x0)

    def place(lo: int, hi: int, size: int) -> tuple[int, int]:
        length = min(side, size)
        start = min(max(lo - (length - (hi - lo)) // 2, 0), size - length)
        return start, start + length

    return (*place(y0, y1, height), *place(x0, x1, width))


def crop(image: Tensor, window: Sequence[int], size: int) -> Tensor:
    """``image`` (C, H, W) cut to ``window`` and resized to (C, size, size) (bilinear, with
    antialiasing when shrinking)."""
    y0, y1, x0, x1 = (int(v) for v in window)
    part = image[None, :, y0:y1, x0:x1].float()
    shrink = size < max(y1 - y0, x1 - x0)
    out = F.interpolate(part, (size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out[0]


def dim_background(image: Tensor, heatmap: Tensor, view: ViewOptions) -> Tensor:
    """``image`` (C, H, W) darkened to ``view.dim`` where the heatmap (H, W), blurred and
    divided by its maximum, is below ``view.threshold`` (all of it when nothing is positive)."""
    heat = heatmap.float()[None]
    if view.blur > 0:
        radius = math.ceil(3 * view.blur)
        heat = gaussian_blur(heat[None], [2 * radius + 1] * 2, [view.blur] * 2)[0]
    top = heat.max()
    keep = heat >= view.threshold * top if top > 0 else torch.zeros_like(heat, dtype=torch.bool)
    return image.float() * torch.where(keep, 1.0, view.dim)


# -- provenance and cache ---------------------------------------------------------------------
def check_provenance(analyzer: LRP, dataset, store: Store, dataset_description: str) -> dict:
    """The store's provenance, after checking that ``analyzer``'s model and ``dataset`` are the
    ones the store was made from (same fingerprints); a mismatch is refused."""
    provenance = dict(store.attrs.get("provenance", {}))
    found = {
        "model": model_fingerprint(analyzer.model),
        "dataset": dataset_fingerprint(dataset, dataset_description),
    }
    wrong = [name for name, value in found.items() if provenance.get(name) != value]
    if wrong:
        raise StoreMismatchError(
            f"the {' and '.join(wrong)} given here differ from those the store at {store.path} "
            f"was made from (fingerprints {found} here, {provenance.get('model')!r} / "
            f"{provenance.get('dataset')!r} in the store); pass the analyzer of the same "
            "(canonized) model and the same dataset with the same dataset_description"
        )
    return provenance


def _cache_name(kind: str, key: Mapping) -> str:
    """The derived-result name for a cache entry: ``<kind>/<hash of the key>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"{kind}/{digest}"


def analysis_key(analyzer: LRP, provenance: Mapping) -> dict:
    """What fixes the numbers an analyzer computes on the store's samples."""
    return {
        "composite": repr(analyzer.composite),
        "model": provenance["model"],
        "dataset": provenance["dataset"],
        "explain": provenance["explain"],
        "output_relevance": "one" if analyzer.normalize_output_relevance else "logit",
    }


# -- localised references -----------------------------------------------------------------------
@dataclass(frozen=True)
class LocalisedReferences:
    """Reference samples of ``concepts`` of ``layer``, localised; entry ``[r, j]`` belongs to
    the r-th reference of concept ``concepts[j]``.

    ``samples``/``classes`` (k, n): sample ids and the class explained for them;
    ``positions`` (k, n, spatial axes of the layer): the concept's maximal neuron;
    ``heatmaps`` (k, n, H, W): conditional heatmaps; ``boxes``/``windows`` (k, n, 4):
    receptive field and crop window as (y0, y1, x0, x1), half-open; ``crops``
    (k, n, C, S, S) and ``dimmed`` (k, n, C, H, W), float16 images for display.
    ``from_cache``: read back from the store.
    """

    layer: str
    mode: str
    target: str
    normalised: bool
    concepts: np.ndarray
    samples: np.ndarray
    classes: np.ndarray
    positions: np.ndarray
    heatmaps: np.ndarray
    boxes: np.ndarray
    windows: np.ndarray
    crops: np.ndarray
    dimmed: np.ndarray
    key: dict
    from_cache: bool = False


_ARRAYS = {
    "concepts": ("concept",),
    "samples": ("rank", "concept"),
    "classes": ("rank", "concept"),
    "positions": ("rank", "concept", "axis"),
    "heatmaps": ("rank", "concept", "y", "x"),
    "boxes": ("rank", "concept", "edge"),
    "windows": ("rank", "concept", "edge"),
    "crops": ("rank", "concept", "channel", "crop_y", "crop_x"),
    "dimmed": ("rank", "concept", "channel", "y", "x"),
}


def localise_references(
    analyzer: LRP,
    dataset,
    store: Store,
    references: ReferenceTable,
    *,
    dataset_description: str,
    concepts: Sequence[int] | None = None,
    k: int | None = None,
    view: ViewOptions = ViewOptions(),
    batch_size: int = 32,
    cache: bool = True,
    progress: bool = False,
) -> LocalisedReferences:
    """Localise the ``k`` best references (all rows of the table by default) of ``concepts``
    (all by default) of the table's layer, as described in the module docstring. With
    ``cache``, a result computed before for the same key is read back from the store, and a
    new one is written there. With ``progress``, a bar of the references done on stderr."""
    ids, samples = _selection(references, concepts, k)
    provenance = check_provenance(analyzer, dataset, store, dataset_description)
    meta = {
        "layer": references.layer,
        "mode": references.mode,
        "target": references.target,
        "normalised": references.normalised,
    }
    key = {
        **analysis_key(analyzer, provenance),
        **meta,
        "k": int(samples.shape[0]),
        "concepts": ids.tolist(),
        "samples": hashlib.sha256(samples.astype(np.int64).tobytes()).hexdigest()[:20],
        "view": asdict(view),
    }
    name = _cache_name(f"localised/{references.layer}", key)
    if cache:
        found = read_result(store.path, name)
        if found is not None and found.attrs.get("key") == key:
            arrays = {a: found.arrays[a] for a in _ARRAYS}
            return LocalisedReferences(**meta, **arrays, key=key, from_cache=True)
    images = read_samples(dataset, samples.ravel())
    if images.dim() != 4:
        raise ValueError(f"localised references need images (C, H, W), got {images.shape[1:]}")
    classes = store.samples(provenance["explain"]).vindex[samples]  # reads only their chunks
    concept_of = np.broadcast_to(ids, samples.shape).ravel()
    desc = f"localise {references.layer} ({references.mode})"
    with tqdm(total=len(images), desc=desc, unit="ref", leave=False, disable=not progress) as bar:
        heatmaps, layer_maps = conditional_maps(
            analyzer, images, classes.ravel(), references.layer, concept_of, batch_size, bar=bar
        )
    if references.mode == "activation":
        rows, columns = np.broadcast_arrays(samples, ids[None, :])
        argmax = store.layer(references.layer, "act_argmax").vindex[rows, columns]
        spatial = tuple(store.attrs["layers"][references.layer][1:])
        positions = _unravel(argmax.ravel(), spatial)
    else:
        flat = layer_maps.flatten(1).argmax(1).numpy()
        positions = _unravel(flat, tuple(layer_maps.shape[1:]))
    field = receptive_field(analyzer, references.layer, tuple(images.shape[1:]))
    boxes = np.stack([field.box(p) for p in positions])
    height, width = images.shape[2:]
    windows = np.array([crop_window(b, height, width) for b in boxes])
    crops = torch.stack([crop(x, w, view.crop_size) for x, w in zip(images, windows, strict=True)])
    dimmed = torch.stack(
        [dim_background(x, h, view) for x, h in zip(images, heatmaps, strict=True)]
    )
    shape = samples.shape
    arrays = {
        "concepts": ids,
        "samples": samples,
        "classes": classes,
        "positions": positions.reshape(*shape, -1).astype(np.int64),
        "heatmaps": heatmaps.reshape(*shape, height, width).numpy(),
        "boxes": boxes.reshape(*shape, 4),
        "windows": windows.reshape(*shape, 4),
        # views are for display: float16 halves the cache (heatmaps stay float32)
        "crops": crops.reshape(*shape, *crops.shape[1:]).numpy().astype(np.float16),
        "dimmed": dimmed.reshape(*shape, *dimmed.shape[1:]).numpy().astype(np.float16),
    }
    if cache:
        write_result(store.path, name, arrays, dims=_ARRAYS, attrs={"key": key, **meta})
    return LocalisedReferences(**meta, **arrays, key=key)


def conditional_maps(
    analyzer: LRP,
    images: Tensor,
    classes: Sequence[int],
    layer: str,
    concepts: Sequence[int],
    batch_size: int = 32,
    bar: tqdm | None = None,
) -> tuple[Tensor, Tensor]:
    """For pairs (image i, concept ``concepts[i]``), explaining ``classes[i]``: the input
    heatmap of the concept (P, H, W) and the relevance of its channel at ``layer`` (P, ...),
    as ``CondAttribution`` gives them for ``{"y": classes[i], layer: [concepts[i]]}``, with
    ``batch_size`` pairs per call (every pair its own row), each call advancing ``bar``."""
    attribution = CondAttribution(analyzer)
    like = next(analyzer.model.parameters(), images)
    heat, maps = [], []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        conditions = [
            {OUTPUT: int(y), layer: [int(c)]}
            for y, c in zip(classes[part], concepts[part], strict=True)
        ]
        x = images[part].to(device=like.device, dtype=like.dtype)
        result = attribution(x, conditions, record=[layer])
        chosen = torch.as_tensor(np.asarray(concepts[part]), device=x.device)
        relevance = result.relevances[layer]
        heat.append(result.heatmaps.float().cpu())
        maps.append(relevance[torch.arange(len(x), device=x.device), chosen].float().cpu())
        if bar is not None:
            bar.update(len(x))
    return torch.cat(heat), torch.cat(maps)


def _selection(
    references: ReferenceTable, concepts: Sequence[int] | None, k: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Concept ids and their (k, n) reference samples, checked against the table."""
    available = references.samples.shape[1]
    ids = np.arange(available) if concepts is None else np.asarray(list(concepts), np.int64)
    bad = [int(i) for i in ids if not 0 <= i < available]
    if bad or ids.size == 0:
        raise ValueError(
            f"concept ids {bad or 'none'} not valid for layer {references.layer!r}: give ids "
            f"in 0..{available - 1}"
        )
    rows = references.samples.shape[0]
    k = rows if k is None else k
    if not 1 <= k <= rows:
        raise ValueError(f"k must be between 1 and the table's {rows} references, got {k}")
    return ids, references.samples[:k, ids].astype(np.int64)


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


def _unravel(flat: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    """Flat positions (P,) as (P, spatial axes) indices; (P, 0) for a layer without space."""
    if not spatial:
        return np.zeros((len(flat), 0), np.int64)
    return np.stack(np.unravel_index(flat, spatial), -1)
