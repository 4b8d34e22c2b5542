"""Ops that only move, copy or drop values (issue #13): permute, transpose, reshape/view/
flatten/unflatten, roll, chunk/split/unbind, indexing and slicing (the class token ``x[:, 0]``),
expand, pad, concatenation with a parameter; the add of a positional-embedding parameter and
scaling by a parameter (ConvNeXt's layer scale); ConvNeXt and ShuffleNet explained.

Oracle for the re-indexing ops: the op applied to the input's own positions (an index map,
padding marked 0) says which input position each output position reads; the expected input
relevance scatters the output relevance back by that map. Everything runs in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.shufflenetv2 import ShuffleNetV2
from torchvision.models.swin_transformer import SwinTransformer

import crp_toolkit as ct
from crp_toolkit.engine.composites import Composite, GlobalMap, NameMap, TypeMap
from crp_toolkit.engine.rules import EpsilonRule, LayerNormRule, PassRule

DT = torch.float64
SHAPE = (2, 3, 4, 5)
pytestmark = pytest.mark.usefixtures("one_thread")


def _three_chunks(x: Tensor) -> Tensor:
    a, b, c = x.chunk(3, dim=1)
    return torch.cat([c, a, b, a], dim=1)


OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "permute": lambda x: x.permute(0, 2, 3, 1),
    "torch.permute": lambda x: torch.permute(x, (0, 3, 1, 2)),
    "transpose": lambda x: x.transpose(1, 3),
    "torch.transpose": lambda x: torch.transpose(x, 2, 3).contiguous(),
    "reshape": lambda x: x.reshape(x.shape[0], -1, 2),
    "view": lambda x: x.view(x.size(0), 3, -1),
    "flatten-unflatten": lambda x: x.flatten(2).unflatten(2, (5, 4)),
    "roll": lambda x: torch.roll(x, shifts=(1, -2), dims=(2, 3)),
    "chunk": lambda x: x.chunk(2, dim=1)[1],
    "chunks reordered and reused": _three_chunks,
    "split": lambda x: torch.split(x, [1, 2], dim=1)[0],
    "unbind": lambda x: x.unbind(2)[3],
    "class token": lambda x: x[:, 0],
    "slice": lambda x: x[:, 1:, ::2, -3:],
    "narrow": lambda x: x.narrow(3, 1, 3),
    "select": lambda x: x.select(1, 2),
    "flip": lambda x: x.flip(-1),
    "expand": lambda x: x[:, :1].expand(-1, 5, -1, -1),
    "pad": lambda x: F.pad(x, (1, 2, 0, 1)),
    "stack": lambda x: torch.stack([x[:, 0], x[:, 2]], dim=1),
}


class OpModel(nn.Module):
    def __init__(self, op: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


def _relevance(model: nn.Module, composite: Composite, x: Tensor, Rk: Tensor) -> Tensor:
    """Input relevance (K, *x.shape) for relevance ``Rk`` (K, *output shape) at the output."""
    analyzer = ct.LRP(model, composite)
    fp = analyzer.forward(x)
    pending, _ = analyzer.propagate(fp, {analyzer.graph.output_layer: Rk})
    return pending[-1]


def _scattered_back(op: Callable[[Tensor], Tensor], Rk: Tensor) -> Tensor:
    """The oracle: each output position's relevance added to the input position it reads."""
    positions = torch.arange(1, 1 + torch.Size(SHAPE).numel(), dtype=DT).reshape(SHAPE)
    read = op(positions).round().long().flatten()  # 0: a padded position, reads nothing
    k = Rk.shape[0]
    out = torch.zeros(k, 1 + positions.numel(), dtype=DT)
    out.index_add_(1, read, Rk.reshape(k, -1))
    return out[:, 1:].reshape(k, *SHAPE)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(OPS))
def test_relevance_goes_back_to_exactly_the_positions_read(name: str, k: int) -> None:
    op = OPS[name]
    x = torch.randn(SHAPE, dtype=DT)
    Rk = torch.randn(k, *op(x).shape, dtype=DT)
    got = _relevance(OpModel(op), Composite(), x, Rk)
    assert torch.allclose(got, _scattered_back(op, Rk), rtol=1e-12, atol=1e-12)


class Tokens(nn.Module):
    """A class token concatenated, a positional embedding added, a layer scale applied."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 5, dtype=DT))
        self.pos = nn.Parameter(torch.randn(1, 4, 5, dtype=DT))
        self.scale = nn.Parameter(torch.rand(5, dtype=DT) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.scale * (x + self.pos)


def test_parameters_entering_as_inputs_absorb_their_share() -> None:
    """The class token's positions and the positional embedding's share of each sum keep
    their relevance (like a bias); the layer scale passes it on unchanged."""
    torch.manual_seed(0)
    model = Tokens()
    x = torch.randn(2, 3, 5, dtype=DT)
    R = torch.randn(1, 2, 4, 5, dtype=DT)
    composite = Composite(TypeMap({"add": EpsilonRule(1e-12)}))
    got = _relevance(model, composite, x, R)[0]
    with torch.no_grad():
        summed = torch.cat([model.token.expand(2, -1, -1), x], 1) + model.pos
    stabilized = torch.where(summed >= 0, summed + 1e-12, summed - 1e-12)
    expected = (torch.cat([torch.zeros(2, 1, 5, dtype=DT), x], 1) * R[0] / stabilized)[:, 1:]
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def _bias_free(model: nn.Module) -> nn.Module:
    """A copy with every bias zero, so the epsilon rule conserves relevance."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


def _calibrated(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """BatchNorm statistics from random batches (random weights keep their scale)."""
    generator = torch.Generator().manual_seed(0)
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape, dtype=DT, generator=generator))
    return model.eval()


def small_convnext() -> nn.Module:
    """torchvision's ConvNeXt (permutes, channel-last and channel-first LayerNorm, layer
    scale, stochastic depth), two narrow stages."""
    torch.manual_seed(0)
    settings = [CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)]
    model = ConvNeXt(settings, stochastic_depth_prob=0.1, layer_scale=0.5, num_classes=7)
    return model.to(DT).eval()


def small_shufflenet() -> nn.Module:
    """torchvision's ShuffleNetV2 (chunk, channel shuffle by view-transpose-view)."""
    torch.manual_seed(0)
    model = ShuffleNetV2([1, 2, 1], [8, 16, 32, 64, 96], num_classes=7)
    return _calibrated(model.to(DT), (4, 3, 32, 32))


EPSILON_EVERYWHERE = Composite(
    GlobalMap(EpsilonRule(1e-12)), TypeMap({"layernorm": LayerNormRule(1e-12)})
)


@pytest.mark.parametrize("make", [small_convnext, small_shufflenet])
def test_cnn_with_permutes_and_shuffles_conserves(make: Callable[[], nn.Module]) -> None:
    model = _bias_free(ct.canonize(make()))
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    expl = ct.LRP(model, EPSILON_EVERYWHERE)(x)
    with torch.no_grad():
        assert torch.equal(expl.output, model(x))
    total = expl.relevance.sum((1, 2, 3))
    assert torch.allclose(total, torch.ones(2, dtype=DT), atol=1e-8)


def small_swin() -> nn.Module:
    """torchvision's Swin (shifted windows: roll, pad, partition, patch merging), 2 stages."""
    torch.manual_seed(0)
    model = SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=7)
    return model.to(DT).eval()


@pytest.mark.parametrize("make", [small_convnext, small_shufflenet, small_swin])
def test_values_read_only_for_their_shape_are_stand_ins(make: Callable[[], nn.Module]) -> None:
    """Routing ops (re-indexing, reshape, gates) read only their inputs' shapes, so where
    nothing else reads a tensor (ShuffleNet's concatenation before the shuffle, Swin's rolled
    and padded maps) the forward pass keeps a one-element stand-in; the relevance is bit for
    bit that of a pass keeping every layer's output."""
    analyzer = ct.LRP(ct.canonize(make()), ct.composites.CPLRP())
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    lean = analyzer.forward(x)
    full = analyzer.forward(x, keep=range(len(analyzer.graph.layers)))
    stand_ins = [
        v
        for v in lean.values.values()
        if isinstance(v, Tensor) and v.numel() > 1 and v.untyped_storage().nbytes() == v.itemsize
    ]
    assert stand_ins
    init = {analyzer.graph.output_layer: torch.ones_like(lean.output)[None]}
    ours, theirs = (analyzer.propagate(fp, init)[0][-1] for fp in (lean, full))
    assert torch.equal(ours, theirs)


def test_channel_first_layernorm_is_traced_through() -> None:
    """torchvision's LayerNorm2d subclasses nn.LayerNorm but normalises over channels after a
    permute; the engine traces into it (permute, F.layer_norm, permute) instead of taking it
    for a plain LayerNorm over the last dimension."""
    analyzer = ct.LRP(small_convnext(), ct.composites.EpsilonPlus())
    layers = {layer.name: layer for layer in analyzer.graph.layers}
    assert layers["features.0.1.layer_norm"].kind == "layernorm"
    assert layers["features.0.1.permute"].kind == "index"
    assert "features.0.1" not in layers


def test_index_ops_can_be_given_a_rule_by_kind() -> None:
    composite = Composite(NameMap({".*": PassRule()}), TypeMap({"index": PassRule()}))
    analyzer = ct.LRP(OpModel(OPS["permute"]), composite)
    assert [layer.kind for layer in analyzer.graph.layers] == ["index"]
