"""Model canonizers. Each returns a modified copy; the caller's model is never touched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from crp_toolkit.engine.graph import Layer, trace


def canonize(model: nn.Module) -> nn.Module:
    """Copy of ``model`` with every BatchNorm that directly follows a conv or dense layer
    folded into that layer's weight and bias (running statistics and eps included), the
    BatchNorm replaced by ``nn.Identity``. BatchNorms elsewhere (e.g. after a concatenation in
    DenseNet) stay and get the PassRule."""
    model = copy.deepcopy(model)
    graph = trace(model)
    calls: dict[nn.Module, int] = {}
    for layer in graph.layers:
        if layer.module is not None:
            calls[layer.module] = calls.get(layer.module, 0) + 1
    for layer in graph.layers:
        producer = _foldable_producer(graph.layers, layer, calls)
        if producer is not None:
            _fold(producer.module, layer.module)
            _replace(model, str(layer.node.target), nn.Identity())
    return model


def _foldable_producer(layers: list[Layer], bn: Layer, calls: dict[nn.Module, int]) -> Layer | None:
    if bn.kind != "batchnorm" or calls[bn.module] != 1 or len(bn.inputs) != 1 or bn.inputs[0] < 0:
        return None
    producer = layers[bn.inputs[0]]
    if producer.kind not in ("conv", "linear") or calls[producer.module] != 1:
        return None
    if len(producer.node.users) != 1:
        return None  # the un-normalised output is used elsewhere too
    if getattr(producer.module, "transposed", False) and producer.module.groups != 1:
        return None
    return producer


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    scale = (bn.running_var + bn.eps).rsqrt()
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    out_dim = 1 if getattr(layer, "transposed", False) else 0
    shape = [1] * layer.weight.dim()
    shape[out_dim] = -1
    layer.weight.mul_(scale.reshape(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    new_bias = bias * scale + shift
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def strip_softmax(model: nn.Module) -> nn.Module:
    """Copy of ``model`` without a final softmax (or log-softmax), so it returns logits."""
    model = copy.deepcopy(model)
    graph = trace(model)
    last = graph.layers[graph.output_layer]
    if last.kind != "softmax":
        return model
    if last.module is not None and isinstance(model, nn.Sequential) and model[-1] is last.module:
        return model[:-1]
    gm = graph.module
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (last.node.all_input_nodes[0],)
    gm.graph.erase_node(last.node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
