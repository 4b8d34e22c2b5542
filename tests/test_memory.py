"""The forward pass's memory plan (``crp_toolkit.engine.memory``): cheap values the rules read
are recomputed by the relevance pass instead of kept, without changing a bit of the relevance,
held only while a reader below still needs them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.swin_transformer import SwinTransformer

import crp_toolkit as ct
from crp_toolkit.engine.lrp import REMEMBERED
from crp_toolkit.engine.memory import MAX_READ_ON_CHAIN

DT = torch.float64


def _vit(patch: int = 4) -> nn.Module:
    """3 blocks of width 64, 4 heads of width 16; 65 tokens (17 with ``patch=8``)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(32, patch, 3, 4, 64, 128, num_classes=7)
    nn.init.normal_(model.heads.head.weight, std=0.05)
    return model.to(DT).eval()


def _swin() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=7).to(DT).eval()


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return ct.canonize(torchvision.models.get_model(name, num_classes=7)).to(DT).eval()

    return make


MODELS = {
    "vit": _vit,
    "swin": _swin,
    "resnet18": _torchvision("resnet18"),
    "efficientnet_b0": _torchvision("efficientnet_b0"),  # squeeze-excitation gates
    "convnext_tiny": _torchvision("convnext_tiny"),
}
COMPOSITES = {
    "cplrp": ct.composites.CPLRP,
    "attnlrp": ct.composites.AttnLRP,
    "epsilon_plus": ct.composites.EpsilonPlus,
}
CASES = [
    ("vit", "cplrp"),
    ("vit", "attnlrp"),
    ("swin", "cplrp"),
    ("resnet18", "epsilon_plus"),
    ("efficientnet_b0", "epsilon_plus"),
    ("convnext_tiny", "epsilon_plus"),
]


def _input(seed: int = 1) -> Tensor:
    return torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _kept_bytes(values: dict) -> int:
    storages = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
        for v in values.values()
        if isinstance(v, Tensor)
    }
    return sum(storages.values())


@pytest.mark.parametrize(("model", "composite"), CASES)
def test_recomputing_changes_no_bit_of_the_relevance(model: str, composite: str) -> None:
    """Relevance at the input and at a recorded layer, and a pass that stops at that layer,
    are bit for bit those of an analyzer that keeps every value a rule reads."""
    net = MODELS[model]()
    lean = ct.LRP(net, COMPOSITES[composite]())
    keeping = ct.LRP(net, COMPOSITES[composite](), recompute=False)
    assert lean.forward(_input()).plan.recomputes, "nothing was recomputed"
    dense = [la.name for la in lean.graph.layers if la.kind in ("linear", "conv")]
    middle = dense[len(dense) // 2]
    for kwargs in ({}, {"record": [middle]}, {"record": [middle], "to_input": False}):
        ours, theirs = lean(_input(), **kwargs), keeping(_input(), **kwargs)
        assert torch.equal(ours.output, theirs.output)
        if kwargs.get("to_input", True):
            assert torch.equal(ours.relevance, theirs.relevance)
        for name in kwargs.get("record", []):
            assert torch.equal(ours.relevances[name], theirs.relevances[name])


@pytest.mark.parametrize(("model", "composite"), CASES)
def test_recomputed_values_are_held_only_while_a_reader_below_needs_them(
    model: str, composite: str
) -> None:
    analyzer = ct.LRP(MODELS[model](), COMPOSITES[composite]())
    fp = analyzer.forward(_input())
    held_after: dict[int, list[int]] = {}
    propagate_one = analyzer.relevance_in

    def watched(fp_, layer, R):
        given = propagate_one(fp_, layer, R)
        held_after[layer.index] = [fp_.plan.last_reader[n] for n in fp_.recomputed]
        return given

    analyzer.relevance_in = watched  # type: ignore[method-assign]
    init = {analyzer.graph.output_layer: torch.ones_like(fp.output)[None]}
    analyzer.propagate(fp, init)
    assert held_after and fp.recomputed == {}
    for index, readers in held_after.items():  # each still has a reader at or below `index`
        assert all(reader <= index for reader in readers), (index, readers)


def test_a_vit_keeps_dense_outputs_and_recomputes_the_rest() -> None:
    """On a ViT the forward pass keeps the dense layers' outputs (their epsilon
    denominators) and recomputes GELU outputs and the attention weights from them, and most
    of the residual stream: it keeps a value of it (a sum or a LayerNorm output) where a
    chain of recomputation would grow too long, at most two per block. The attention
    weights come from q and k, which no rule reads under CP-LRP: the forward pass keeps q
    and k instead of the weights, which are larger with 65 tokens and heads of width 16. The
    kept tensors take less than 60% of what keeping every read value takes (50% on vit_b_16
    at 224x224)."""
    analyzer = ct.LRP(_vit(), ct.composites.CPLRP())
    keeping = ct.LRP(_vit(), ct.composites.CPLRP(), recompute=False)
    x = _input()
    first, lean, full = analyzer.forward(x), analyzer.forward(x[:1]), keeping.forward(x)
    kinds = {layer.node: layer.kind for layer in analyzer.graph.layers}
    for fp in (first, lean):  # without sizes (assumed) and with them (measured)
        kept = [kinds[n] for n in fp.plan.kept if n in kinds]
        recomputed = {kinds[n] for n in fp.plan.recomputes}
        assert {"layernorm", "add", "activation", "softmax", "matmul"} <= recomputed
        assert not {"activation", "softmax", "matmul"} & set(kept)
        assert kept.count("linear") == 3 * 6 + 1  # q, k, v, out, fc1, fc2 (three blocks); head
        assert kept.count("layernorm") + kept.count("add") <= 2 * 3
        assert all(kinds[n] != "linear" for n in fp.plan.recomputes)
    assert _kept_bytes(analyzer.forward(x).values) < 0.6 * _kept_bytes(full.values)


def test_attention_weights_smaller_than_q_and_k_are_kept_once_sizes_are_known() -> None:
    """With 17 tokens and heads of width 16 the attention weights take fewer bytes than q
    and k. The first forward pass on inputs of a shape, without sizes, assumes the weights
    larger and keeps q and k; from the second on (sizes measured, whatever the batch) it
    keeps the weights, fewer bytes, and the relevance stays bit for bit the same."""
    analyzer = ct.LRP(_vit(patch=8), ct.composites.CPLRP())
    x = _input()
    first = analyzer.forward(x)
    plan = analyzer.forward(x[:1]).plan
    kinds = {layer.node: layer.kind for layer in analyzer.graph.layers}
    kept = [kinds[n] for n in plan.kept if n in kinds]
    assert kept.count("softmax") == 3 and kept.count("linear") == 3 * 4 + 1
    assert "softmax" not in {kinds[n] for n in first.plan.kept if n in kinds}
    assert _kept_bytes(analyzer.forward(x).values) < _kept_bytes(first.values)
    keeping = ct.LRP(_vit(patch=8), ct.composites.CPLRP(), recompute=False)
    assert torch.equal(analyzer(x).relevance, keeping(x).relevance)


def test_chains_of_recomputation_are_bounded() -> None:
    """No recomputed value lies above a chain of more than ``MAX_READ_ON_CHAIN`` other read
    values recomputed first (so work and holding stay bounded on a long residual stream)."""
    analyzer = ct.LRP(_vit(), ct.composites.AttnLRP())
    plan = analyzer.forward(_input()).plan
    longest = 0
    for program in plan.recomputes.values():
        chain: dict = {}  # step -> read recomputed values on the longest chain ending there
        for step in program:
            below = [chain[s] for s in step.all_input_nodes if s in chain]
            chain[step] = (step in plan.recomputes) + max(below, default=0)
        longest = max(longest, chain[program[-1]])
    assert longest == MAX_READ_ON_CHAIN + 1


def test_several_relevance_passes_recompute_nothing() -> None:
    """``reuse=True`` (CRP: many passes over one forward) keeps every read value instead."""
    analyzer = ct.LRP(_vit(), ct.composites.CPLRP())
    assert analyzer.forward(_input(), reuse=True).plan.recomputes == {}
    assert (
        ct.LRP(_vit(), ct.composites.CPLRP(), recompute=False).forward(_input()).plan.recomputes
        == {}
    )


def test_an_analyzer_remembers_a_bounded_number_of_plans():
    """Inputs of many sizes (a fully convolutional model) do not grow the plan cache without
    bound; the newest shape's plan is kept, and every call still explains its input."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model = nn.Sequential(model, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    analyzer = ct.LRP(model, ct.composites.EpsilonPlus())
    for size in range(4, 4 + REMEMBERED + 6):
        x = torch.randn(1, 3, size, size)
        assert analyzer(x, 1).relevance.shape == x.shape
        analyzer(x, 1)  # a second call, with the sizes known
    assert len(analyzer._plans) <= REMEMBERED and len(analyzer._sizes) <= REMEMBERED
    assert any(key[-1] is not None and key[-1][0] == (3, size, size) for key in analyzer._plans)
