"""timm vision transformers (issue #13): ``vit_*``, ``deit_*`` (with its distillation token)
and the DINOv2 architecture ``vit_small_patch14_dinov2`` (layer scale), random weights, small
``img_size``, float64. Their fused attention (``F.scaled_dot_product_attention``) is written out
by the engine; a model switched to timm's unfused path (``fused_attn = False``, whose mask
helpers are opaque to tracing) is switched back by the attention canonizer, in a copy.

timm is an optional extra (``crp_toolkit[timm]``, in the dev extra): without it these tests
are skipped, and under CI they fail.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from reference import assert_unchanged, state_snapshot
from torch import nn

import crp_toolkit as ct

DT = torch.float64
TINY = 1e-30
pytestmark = pytest.mark.usefixtures("one_thread")

try:
    import timm
except ImportError as err:  # pragma: no cover - depends on the environment
    if os.environ.get("CI"):
        raise
    pytest.skip(
        f"timm not importable ({err}); pip install 'crp_toolkit[timm]'", allow_module_level=True
    )

# constructor -> input size (multiples of the patch size, small)
MODELS = {
    "vit_tiny_patch16_224": 32,
    "deit_tiny_distilled_patch16_224": 32,
    "vit_small_patch14_dinov2": 28,
}


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    size = MODELS[name]
    model = timm.create_model(name, pretrained=False, img_size=size, num_classes=5)
    return model.to(DT).eval()


def _bias_free(model: nn.Module) -> nn.Module:
    """A copy whose biases and added parameters (positional embedding, class, distillation and
    register tokens) are zero, so nothing but the rules can absorb relevance."""
    model = copy.deepcopy(model)
    added = ("bias", "pos_embed", "cls_token", "dist_token", "reg_token")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(added):
                p.zero_()
    return model


def _unfused(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_transformer_is_explained_and_conserves(name: str) -> None:
    model = _bias_free(make(name))
    x = torch.randn(2, 3, MODELS[name], MODELS[name], dtype=DT)
    before = state_snapshot(model)
    analyzer = ct.LRP(model, ct.composites.CPLRP(epsilon=TINY))
    assert sum(layer.kind == "softmax" for layer in analyzer.graph.layers) == len(model.blocks)
    expl = analyzer(x)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.allclose(expl.output, model(x), rtol=1e-12, atol=1e-12)
    total = expl.relevance.sum((1, 2, 3))
    assert torch.allclose(total, torch.ones(2, dtype=DT), atol=1e-8)
    keeping = ct.LRP(model, ct.composites.CPLRP(epsilon=TINY), recompute=False)
    assert torch.equal(expl.relevance, keeping(x).relevance)  # recomputing changes no bit
    assert torch.equal(analyzer(x).relevance, expl.relevance)  # planned with the sizes known


@pytest.mark.parametrize("preset", [ct.composites.AttnLRP, ct.composites.CPLRP])
def test_a_model_on_the_unfused_path_is_explained_as_the_fused_one(preset) -> None:
    model = make("vit_tiny_patch16_224")
    unfused = _unfused(model)
    before = state_snapshot(unfused)
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    fused = ct.LRP(model, preset())(x, 1).relevance
    explicit = ct.LRP(unfused, preset())(x, 1).relevance
    assert_unchanged(unfused, before)
    assert not any(getattr(m, "fused_attn", False) for m in unfused.modules())
    assert torch.equal(fused, explicit)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_gradient_domain_gives_timm_transformers_the_relevance_domains_relevance(name):
    """CP-LRP with epsilon 0 (gradient domain: fused qkv, layer scale, distillation and
    register tokens) against a vanishing epsilon (relevance domain): the same relevance."""
    model = make(name)
    x = torch.randn(2, 3, MODELS[name], MODELS[name], dtype=DT)
    gradient = ct.LRP(model, ct.composites.CPLRP(epsilon=0.0))
    relevance = ct.LRP(model, ct.composites.CPLRP(epsilon=TINY))
    assert (gradient.domain, relevance.domain) == ("gradient", "relevance")
    got, want = gradient(x, 1).relevance, relevance(x, 1).relevance
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10
