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
- softmax and products of two activations (attention scores, attention times values): none,
  and none wherever an axis cannot be followed: such a layer is not a concept layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch

from crp_toolkit.engine.graph import Layer

CHANNEL_FIRST = ("conv", "batchnorm", "avgpool", "maxpool")
CHANNEL_LAST = ("linear", "layernorm")
SAME_AS_INPUT = ("activation", "add", "gate", "concat")
MOVING = ("permute", "transpose", "swapaxes", "swapdims", "movedim")
Shape = tuple[int, ...]

_CACHE: WeakKeyDictionary = WeakKeyDictionary()  # analyzer -> {input shape: axes}


def feature_axes(analyzer, input_shape: Sequence[int]) -> dict[int, int | None]:
    """The feature axis of every layer's output (by layer index; -1: the model input) for
    inputs of ``input_shape`` (without the batch axis); one probe forward pass of a single
    zero sample per analyzer and input shape."""
    key = tuple(int(s) for s in input_shape)
    known = _CACHE.setdefault(analyzer, {})
    if key not in known:
        probe = torch.zeros(1, *key, dtype=_dtype(analyzer), device=_device(analyzer))
        fp = analyzer.forward(probe, keep=range(len(analyzer.graph.layers)))
        shapes = {-1: (1, *key)}
        shapes |= {layer.index: _shape(fp.value(layer.index)) for layer in analyzer.graph.layers}
        known[key] = axes_from_shapes(analyzer.graph.layers, shapes)
    return known[key]


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
