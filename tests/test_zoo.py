"""Every classification constructor of ``torchvision.models`` (issue #13), random weights,
float64 (float32 above 400M parameters, see below): traced, explained, the output the
model's own, and relevance conserved on a bias-free copy (BatchNorm statistics calibrated on
random batches, then folded; every bias, positional embedding and class token zero) under
CP-LRP (epsilon on conv/dense/sums, LayerNorm with the std constant, attention weights
constant), layer by layer: the relevance a layer hands down equals what reached it, less
exactly what its rule drops, ``R (1 - z / s(z))`` for the epsilon-type rules, nothing for
routing. (Checked per layer: with random weights some denominators are tiny, single
relevances reach 1e12 with both signs, and a whole-model sum cancels to float64 noise,
although every layer conserves.)

``make test`` runs the cheapest constructor of each family (wide ResNets count as ResNets,
v2 variants as their family; Swin v2's cosine attention is checked in test_attention.py); the
full list is marked slow.

The two constructors above 400M parameters (vit_h_14, regnet_y_128gf) run in float32: in
float64 the model and its canonized copy alone take 10 GB. Their checks are scaled to float32
rounding: TOLERANCE gives, per dtype, the output's tolerances and the per-layer conservation
tolerance (a fraction of the relevance reaching the layer).
"""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from reference import calibrate_bn
from torch import nn

import crp_toolkit as ct
from crp_toolkit.engine.rules import PassRule, stabilize

FLOAT32_ABOVE = 400_000_000  # parameters
# dtype -> the output's rtol and atol against the model's own, the conservation tolerance.
# Measured per-layer conservation errors: about 2e-16 (float64) and 6e-8 (float32) of the
# relevance reaching a layer (vit_b_32, regnet_y_400mf, vit_h_14). The model's own forward runs
# nn.MultiheadAttention's kernels, the traced one the explicit ops: on vit_h_14 in float32 the
# logits (up to 6.8) differ by up to 6e-6, hence float32's atol.
TOLERANCE = {torch.float64: (1e-10, 1e-12, 1e-9), torch.float32: (1e-5, 1e-4, 1e-5)}
ALL = torchvision.models.list_models(module=torchvision.models)
CHEAPEST = {
    "alexnet",
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "resnet18",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "swin_t",
    "vgg11",
    "vit_b_32",
}
# Input sizes where 64 does not fit: Inception's stem, MaxViT's 7x7 partitions; the ViTs are
# built for 32x32 (image_size), 28x28 for patches of 14; the rest take 64x64.
SIZE = {"inception_v3": 80, "maxvit_t": 224, "vit_h_14": 28}
pytestmark = pytest.mark.usefixtures("one_thread")


def _params() -> list:
    return [pytest.param(name, marks=() if name in CHEAPEST else pytest.mark.slow) for name in ALL]


def _size(name: str) -> int:
    return SIZE.get(name, 32 if name.startswith("vit") else 64)


def _build(name: str) -> nn.Module:
    """The constructor's model with random weights (float64, or float32 above FLOAT32_ABOVE
    parameters), BatchNorm statistics calibrated."""
    torch.manual_seed(0)
    kwargs = {"image_size": _size(name)} if name.startswith("vit") else {}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    big = sum(p.numel() for p in model.parameters()) > FLOAT32_ABOVE
    model = model.to(torch.float32 if big else torch.float64)
    if name.startswith("vit"):  # torchvision initialises the head to zeros
        nn.init.normal_(model.heads.head.weight, std=0.05)
    return calibrate_bn(model, (4, 3, _size(name), _size(name)))


def _bias_free(model: nn.Module) -> nn.Module:
    """``model`` (a copy the test owns) with every bias, positional embedding and class token
    zeroed in place."""
    added = ("bias", "pos_embedding", "class_token")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(added):
                p.zero_()
    return model


@pytest.mark.parametrize("name", _params())
def test_every_torchvision_classifier_is_explained_and_conserves(name: str) -> None:
    model = _bias_free(ct.canonize(_build(name)))
    dtype = next(model.parameters()).dtype
    x = torch.randn(2, 3, _size(name), _size(name), dtype=dtype)
    analyzer = ct.LRP(model, ct.composites.CPLRP())
    expl = analyzer(x)
    rtol, atol, conservation = TOLERANCE[dtype]
    with torch.no_grad():
        assert torch.allclose(expl.output, model(x), rtol=rtol, atol=atol)
    assert expl.relevance.shape == x.shape and torch.isfinite(expl.relevance).all()
    assert _unconserving_layers(analyzer, x, conservation) == []
    keeping = ct.LRP(model, ct.composites.CPLRP(), recompute=False)  # recomputing changes no bit
    assert torch.equal(expl.relevance, keeping(x).relevance)
    assert torch.equal(analyzer(x).relevance, expl.relevance)  # planned with the sizes known


@pytest.mark.parametrize("name", _params())
def test_the_gradient_domain_gives_every_classifier_the_relevance_domains_relevance(name):
    """CP-LRP with epsilon 0 runs in the gradient domain (``R = z * G``, LXT's way); with a
    vanishing epsilon in the relevance domain: the same relevance, up to rounding."""
    model = ct.canonize(_build(name))
    dtype = next(model.parameters()).dtype
    x = torch.randn(2, 3, _size(name), _size(name), dtype=dtype)
    gradient = ct.LRP(model, ct.composites.CPLRP(epsilon=0.0), normalize_output_relevance=False)
    relevance = ct.LRP(model, ct.composites.CPLRP(epsilon=1e-30), normalize_output_relevance=False)
    assert (gradient.domain, relevance.domain) == ("gradient", "relevance")
    got, want = gradient(x).relevance, relevance(x).relevance
    tolerance = 1e-8 if dtype == torch.float64 else 1e-3
    assert float((got - want).abs().max() / want.abs().max()) < tolerance


@torch.no_grad()
def _unconserving_layers(analyzer: ct.LRP, x: torch.Tensor, tolerance: float) -> list[str]:
    """Layers whose input relevance differs from their output relevance less what the rule
    drops (``R (1 - z / s(z))``; PassRule drops nothing) by more than ``tolerance`` times the
    relevance reaching them (rounding)."""
    fp = analyzer.forward(x, reuse=True, keep=range(len(analyzer.graph.layers)))
    graph = analyzer.graph
    pending = {graph.output_layer: analyzer.output_relevance(fp.output, fp.output.argmax(1))[None]}
    bad = []
    for index in range(graph.output_layer, -1, -1):
        R = pending.pop(index, None)
        if R is None:
            continue
        layer, rule = graph.layers[index], analyzer.rules[index]
        given = analyzer.relevance_in(fp, layer, R)
        if isinstance(rule, PassRule):
            kept = R
        else:
            z = fp.value(index)
            kept = R * z / stabilize(z, rule.stabilizer)
        handed = sum(r.sum() for r in given if r is not None)
        if abs(float(handed - kept.sum())) > tolerance * float(R.abs().sum()) + 1e-300:
            bad.append(f"{layer.name} ({type(rule).__name__}): {float(kept.sum())} -> {handed}")
        for source, r in zip(layer.inputs, given, strict=True):
            if r is not None:
                pending[source] = pending[source] + r if source in pending else r
    return bad


def test_the_families_of_the_default_run_cover_the_list() -> None:
    family = lambda name: re.sub(r"(_v\d)?[_\d].*$", "", name.removeprefix("wide_"))  # noqa: E731
    assert {family(n) for n in CHEAPEST} == {family(n) for n in ALL}
    assert set(ALL) >= CHEAPEST
