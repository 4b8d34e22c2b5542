"""Where the features of each layer's output lie: the *feature axis* of every layer.

A conv layer's output is channel-first (batch, channels, *spatial): its features are axis 1.
A transformer's token layers are (batch, tokens, features): axis 2, the last; ConvNeXt's
channel-last blocks are (batch, h, w, channels). Concepts (channels, neurons, directions) are
defined along the feature axis, so CRP and the dataset pass need it for every layer they
condition on or record. It follows from the ops, in execution order, starting from the
channel-first model input:

- conv, batch norm and pooling layers: axis 1; dense layers and layer norms: the last axis;
- elementwise ops, sums and gates: their input's axis;
- re-indexing ops: where the input's feature axis went (permute, transpose, movedim by their
  arguments; concatenation, slicing, chunks, rolls and pads keep every axis; reshapes and
  indexing that drop or merge axes by the shapes: an axis kept with its size and the axes
  before it, or the last axis kept with its size);
- products of two activations shaped (batch, heads, tokens, ...) (attention scores,
  attention times values): axis 1, the heads, so an attention head is a concept there;
- softmax: none, and none wherever an axis cannot be followed: such a layer is not a
  concept layer.

A token layer (batch, tokens, features) whose tokens come from a channel-first layer's
positions (a ViT's patch embedding, flattened) has a :class:`TokenGrid`: the last
``height * width`` tokens are those positions, row by row, and the ``prefix`` tokens before
them (class and register tokens) are kept apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from crp_toolkit.engine.graph import Layer

CHANNEL_FIRST = ("conv", "batchnorm", "avgpool", "maxpool")
CHANNEL_LAST = ("linear", "layernorm")
SAME_AS_INPUT = ("activation", "add", "gate", "concat")
MOVING = ("permute", "transpose", "swapaxes", "swapdims", "movedim")
Shape = tuple[int, ...]

_CACHE: WeakKeyDictionary = WeakKeyDictionary()  # analyzer -> {input shape: layouts}


@dataclass(frozen=True)
class TokenGrid:
    """Where a token layer's tokens come from: ``prefix`` tokens (class, registers), then the
    ``height x width`` positions of layer ``source`` (channel-first), row by row."""

    prefix: int
    height: int
    width: int
    source: int

    def patches(self, values: Tensor) -> Tensor:
        """Feature-first token values (B, C, tokens) -> the patch tokens (B, C, h, w)."""
        return values[:, :, self.prefix :].reshape(*values.shape[:2], self.height, self.width)


@dataclass(frozen=True)
class Layouts:
    """Per layer index (-1: the model input): its feature axis, and its token grid."""

    axes: dict[int, int | None]
    grids: dict[int, TokenGrid | None]


def layouts(analyzer, input_shape: Sequence[int]) -> Layouts:
    """Every layer's feature axis and token grid for inputs of ``input_shape`` (without the
    batch axis): one probe forward pass of a single zero sample per analyzer and input
    shape."""
    key = tuple(int(s) for s in input_shape)
    known = _CACHE.setdefault(analyzer, {})
    if key not in known:
        probe = torch.zeros(1, *key, dtype=_dtype(analyzer), device=_device(analyzer))
        fp = analyzer.forward(probe, keep=range(len(analyzer.graph.layers)))
        shapes = {-1: (1, *key)}
        shapes |= {layer.index: _shape(fp.value(layer.index)) for layer in analyzer.graph.layers}
        axes = axes_from_shapes(analyzer.graph.layers, shapes)
        known[key] = Layouts(axes, grids_from_shapes(analyzer.graph.layers, shapes, axes))
    return known[key]


def feature_axes(analyzer, input_shape: Sequence[int]) -> dict[int, int | None]:
    """The feature axis of every layer's output (by layer index; -1: the model input)."""
    return layouts(analyzer, input_shape).axes


def grids_from_shapes(
    layers: Sequence[Layer], shapes: dict[int, Shape], axes: dict[int, int | None]
) -> dict[int, TokenGrid | None]:
    """The token grid of every token layer (batch, tokens, features): made where a reshape
    flattens a channel-first (batch, C, h, w) output into (batch, C, h * w), and carried by
    every later token layer with at least ``h * w`` tokens (the extra ones in front)."""
    grids: dict[int, TokenGrid | None] = {-1: None}
    for layer in layers:
        shape, axis = shapes[layer.index], axes[layer.index]
        found = [grids[i] for i in layer.inputs if grids.get(i) is not None]
        grid = None
        if len(shape) == 3 and axis is not None:
            tokens = shape[3 - axis]  # the axis that is neither batch nor features
            if _flattens_positions(layer, shapes, axes, shape):
                grid = TokenGrid(0, *shapes[layer.inputs[0]][2:], source=layer.inputs[0])
            elif found and tokens >= found[0].height * found[0].width:
                g = found[0]
                grid = TokenGrid(tokens - g.height * g.width, g.height, g.width, g.source)
        grids[layer.index] = grid
    return grids


def _flattens_positions(layer: Layer, shapes, axes, shape: Shape) -> bool:
    if layer.kind != "reshape" or not layer.inputs:
        return False
    before = shapes[layer.inputs[0]]
    return (
        axes[layer.inputs[0]] == 1
        and len(before) == 4
        and shape == (before[0], before[1], before[2] * before[3])
    )


def axes_from_shapes(layers: Sequence[Layer], shapes: dict[int, Shape]) -> dict[int, int | None]:
    """Every layer's feature axis from its op and the output shapes of all layers."""
    axes: dict[int, int | None] = {-1: 1}
    for layer in layers:
        first = layer.inputs[0] if layer.inputs else -1
        axes[layer.index] = layer_axis(layer, axes[first], shapes[first], shapes[layer.index])
    return axes


def layer_axis(layer: Layer, axis: int | None, before: Shape, after: Shape) -> int | None:
    """The feature axis of ``layer``'s output, given its first input's axis and shape."""
    if len(after) < 2:
        return None
    if layer.kind in CHANNEL_FIRST:
        return 1
    if layer.kind in CHANNEL_LAST:
        return len(after) - 1
    if layer.kind == "matmul" and len(after) == 4:
        return 1  # attention heads
    if axis is None or layer.kind not in (*SAME_AS_INPUT, "reshape", "index", "concat"):
        return None
    if layer.kind in SAME_AS_INPUT:
        return axis + len(after) - len(before)  # broadcasting adds leading axes
    return moved_axis(layer, axis, before, after)


def moved_axis(layer: Layer, axis: int, before: Shape, after: Shape) -> int | None:
    """Where a re-indexing op puts the input's feature ``axis``."""
    name = _op_name(layer)
    args = _int_args(layer)
    ndim = len(before)
    if name == "permute" and len(args) == ndim:
        return [a % ndim for a in args].index(axis)
    if name in ("transpose", "swapaxes", "swapdims") and len(args) == 2:
        a, b = (x % ndim for x in args)
        return {a: b, b: a}.get(axis, axis)
    if name == "movedim" and len(args) == 2:
        order = [d for d in range(ndim) if d != args[0] % ndim]
        order.insert(args[1] % ndim, args[0] % ndim)
        return order.index(axis)
    if layer.kind == "index" and name not in MOVING and len(after) == ndim:
        return axis  # slices, chunks, rolls, pads: the same axes, some of them shorter
    if axis == ndim - 1 and after[-1] == before[-1]:
        return len(after) - 1
    if len(after) > axis and after[: axis + 1] == before[: axis + 1]:
        return axis
    return None


def _op_name(layer: Layer) -> str:
    target = layer.node.target
    return (target if isinstance(target, str) else getattr(target, "__name__", "")).strip("_")


def _int_args(layer: Layer) -> list[int]:
    """The integer arguments after the tensor (dims given inline or as one tuple)."""
    rest = list(layer.node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    if not rest:
        rest = [v for v in layer.node.kwargs.values() if isinstance(v, int)]
    return [a for a in rest if isinstance(a, int)] if all(isinstance(a, int) for a in rest) else []


def _shape(value) -> Shape:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _dtype(analyzer) -> torch.dtype:
    return next((p.dtype for p in analyzer.model.parameters()), torch.float32)


def _device(analyzer) -> torch.device:
    return next((p.device for p in analyzer.model.parameters()), torch.device("cpu"))
