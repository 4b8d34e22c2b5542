"""Receptive fields: the input-space box every neuron position of a layer sees, traced
through the model's conv and pool geometry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from crp_toolkit.engine.graph import Layer
from crp_toolkit.engine.layout import layouts
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.engine.ops import BATCHNORM, CONCAT, ELEMENTWISE, GATE, SUM

# ops that map each spatial position to the same position of their inputs (when shapes agree)
_POINTWISE = (ELEMENTWISE, BATCHNORM, SUM, GATE, CONCAT)
_WINDOWS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ADAPTIVE = (nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)


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
    geometry see their whole input). Branches are united, and boxes clipped to the input. A
    token layer's patch tokens see what the positions they come from see (a ViT's patch, see
    ``engine.layout.TokenGrid``), indexed by their place on the grid."""
    graph = analyzer.graph
    target = graph.index(layer)
    grid = layouts(analyzer, input_shape).grids[target]
    if grid is not None:
        source = graph.layers[grid.source].name
        return ReceptiveField(layer, receptive_field(analyzer, source, input_shape).boxes)
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
