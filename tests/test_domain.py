"""The gradient domain (``LRP(domain=...)``, ``crp_toolkit.engine.domain``): a pass that
carries ``G`` with ``R = z * G`` gives the relevance the relevance domain gives, up to
rounding, for every rule's gradient form, reads less of the forward pass, and is chosen only
where every rule has a gradient form.

The relevance domain is run with a vanishing stabilizer (1e-30) where the gradient domain has
none: the same rules, since float64 outputs are never that small here.
"""

from __future__ import annotations

import pytest
import torch
from reference import rel_err, small_vit
from torch import Tensor, nn
from torch.nn import functional as F

import crp_toolkit as ct
from crp_toolkit.engine.composites import Composite, TypeMap
from crp_toolkit.engine.rules import EpsilonRule, LayerNormRule, ZPlusRule

DT = torch.float64
TINY = 1e-30
pytestmark = pytest.mark.usefixtures("one_thread")


def both(model: nn.Module, composite, *, stabilizer: float = 0.0, **kwargs):
    """Analyzers in the gradient domain (``composite(0)``) and in the relevance domain
    (``composite(TINY)``)."""
    gradient = ct.LRP(model, composite(stabilizer), normalize_output_relevance=False, **kwargs)
    relevance = ct.LRP(model, composite(TINY), normalize_output_relevance=False, **kwargs)
    assert (gradient.domain, relevance.domain) == ("gradient", "relevance")
    return gradient, relevance


PRESETS = {
    "cplrp": lambda eps: ct.composites.CPLRP(epsilon=eps),
    "attnlrp": lambda eps: ct.composites.AttnLRP(epsilon=eps, stabilizer=eps),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_domains_agree_on_a_vit_at_the_input_and_every_layer(preset):
    gradient, relevance = both(small_vit(), PRESETS[preset])
    x = torch.randn(2, 3, 16, 16, dtype=DT, generator=torch.Generator().manual_seed(1))
    got, want = gradient(x, [0, 2], record=True), relevance(x, [0, 2], record=True)
    assert rel_err(got.relevance, want.relevance) < 1e-10
    assert got.relevances.keys() == want.relevances.keys()
    worst = max(rel_err(got.relevances[k], want.relevances[k]) for k in want.relevances)
    assert worst < 1e-10
    assert rel_err(gradient(x, [0, 2]).relevance, want.relevance) < 1e-10  # nothing recorded


def test_the_gradient_domain_keeps_no_dense_output_and_less_on_a_vit():
    """LRP-0 dense layers and sums read nothing: the outputs of v, of the output projection
    and of fc2 (read by dense layers, sums and routing only) are freed, unlike in the
    relevance domain, and the forward pass keeps less than 70% of what that keeps."""
    gradient, relevance = both(small_vit(), PRESETS["cplrp"])
    x = torch.randn(4, 3, 16, 16, dtype=DT)
    fp_g, fp_r = gradient.forward(x), relevance.forward(x)
    block = "encoder.layers.encoder_layer_{}."
    names = ("self_attention.v_proj", "self_attention.out_proj", "mlp.3")
    freed = [block.format(i) + name for i in (0, 1) for name in names]
    for analyzer, fp, kept in ((gradient, fp_g, False), (relevance, fp_r, True)):
        nodes = [analyzer.graph.layers[analyzer.graph.index(name)].node for name in freed]
        assert [n in fp.plan.kept for n in nodes] == [kept] * len(freed)
    assert _kept_bytes(fp_g) < 0.7 * _kept_bytes(fp_r)  # 61% here, 60% on vit_b_16
    assert all(rstd.shape == (4, 17, 1) for _, rstd in fp_g.stashed.values())  # 1 / sigma


def _kept_bytes(fp) -> int:
    storages = {}
    for v in fp.values.values():
        if isinstance(v, Tensor) and any(s != 0 for s in v.stride()):
            storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(storages.values())


class ReluNet(nn.Module):
    """conv -> relu -> maxpool -> conv -> relu (+ skip) -> linear: exact zeros at the ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.relu1, self.relu2, self.pool = nn.ReLU(), nn.ReLU(), nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        a = self.pool(self.relu1(self.conv1(x)))
        return self.fc(torch.flatten(self.relu2(self.conv2(a)) + a, 1))


def epsilon_everywhere(eps: float) -> Composite:
    """Epsilon(eps) on convolutions, dense layers and sums; PassRule elsewhere."""
    return Composite(TypeMap({kind: EpsilonRule(eps) for kind in ("conv", "linear", "add")}))


def test_relevance_given_at_a_relu_enters_the_gradient_domain_at_the_next_division():
    """Relevance given where the activation is 0 (a dead ReLU) passes the ReLU as relevance
    and becomes ``G`` only at the convolution below, which divides by its own output: none
    is lost, as in the relevance domain; relevance given at two layers meets ``G`` there."""
    torch.manual_seed(0)
    gradient, relevance = both(ReluNet().to(DT).eval(), epsilon_everywhere)
    x = torch.randn(3, 3, 8, 8, dtype=DT)
    relu2 = gradient.graph.index("relu2")
    results = []
    for analyzer in (gradient, relevance):
        fp = analyzer.forward(x, keep=[relu2])
        assert (fp.value(relu2) == 0).any()
        generator = torch.Generator().manual_seed(2)
        R = torch.randn(1, *fp.value(relu2).shape, dtype=DT, generator=generator)
        top = analyzer.output_relevance(fp.output, torch.tensor([0, 1, 2]))[None]
        pending, _ = analyzer.propagate(fp, {analyzer.graph.output_layer: top, relu2: R})
        results.append(pending[-1])
    assert rel_err(*results) < 1e-10


def test_channel_conditions_agree_across_the_domains_on_a_cnn():
    torch.manual_seed(0)
    gradient, relevance = both(ReluNet().to(DT).eval(), epsilon_everywhere)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    conditions = [{"y": 1, "conv2": [c]} for c in range(6)]
    got = ct.CondAttribution(gradient)(x, conditions, record=["conv1"])
    want = ct.CondAttribution(relevance)(x, conditions, record=["conv1"])
    assert rel_err(got.heatmaps, want.heatmaps) < 1e-10
    assert rel_err(got.relevances["conv1"], want.relevances["conv1"]) < 1e-10
    stopped = gradient(x, 1, record=["conv2"], to_input=False)  # a pass that stops at conv2
    full = relevance(x, 1, record=["conv2"])
    assert rel_err(stopped.relevances["conv2"], full.relevances["conv2"]) < 1e-10


class Norms(nn.Module):
    """nn.LayerNorm, F.layer_norm (weights from call arguments) and nn.RMSNorm in a row."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.ln, self.rms = nn.Linear(6, 6), nn.LayerNorm(6), nn.RMSNorm(6)
        self.g, self.fc = nn.Parameter(torch.randn(6)), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.ln(self.fc0(x)))
        h = F.layer_norm(h, (6,), self.g, None, 1e-5)
        return self.fc(self.rms(h))


def test_the_norm_rules_gradient_forms_read_only_their_stashed_sigma():
    def rules(eps: float) -> Composite:
        return Composite(TypeMap({"linear": EpsilonRule(eps), "layernorm": LayerNormRule(eps)}))

    torch.manual_seed(0)
    gradient, relevance = both(Norms().to(DT).eval(), rules)
    x = torch.randn(5, 6, dtype=DT)
    assert rel_err(gradient(x, 1).relevance, relevance(x, 1).relevance) < 1e-10
    fp = gradient.forward(x)
    norms = [la for la in gradient.graph.layers if la.kind == "layernorm"]
    assert len(norms) == 3 and {la.index for la in norms} == set(fp.stashed)
    assert all(fp.reads[la.index] == (False, False, False) for la in norms)


def test_the_domain_is_chosen_only_where_every_rule_has_a_gradient_form():
    model = ReluNet().to(DT).eval()
    assert ct.LRP(model, epsilon_everywhere(0.0)).domain == "gradient"
    assert ct.LRP(model, epsilon_everywhere(1e-6)).domain == "relevance"  # a stabilizer
    mixed = Composite(
        TypeMap({"conv": ZPlusRule(), "linear": EpsilonRule(0), "add": EpsilonRule(0)})
    )
    assert ct.LRP(model, mixed).domain == "relevance"
    with pytest.raises(ValueError, match=r"'conv1' \(ZPlusRule.*domain='relevance'"):
        ct.LRP(model, mixed, domain="gradient")
    with pytest.raises(ValueError, match="domain must be one of"):
        ct.LRP(model, mixed, domain="grad")
    assert ct.LRP(model, epsilon_everywhere(0.0), domain="relevance").domain == "relevance"


def test_relevance_at_a_layer_the_forward_pass_did_not_keep_is_refused():
    torch.manual_seed(0)
    analyzer = ct.LRP(ReluNet().to(DT).eval(), epsilon_everywhere(0.0))
    fp = analyzer.forward(torch.randn(1, 3, 8, 8, dtype=DT))
    add = analyzer.graph.index("add")  # read by the flatten for its shape only
    with pytest.raises(ValueError, match=r"layer \d+ \('add'\).*keep="):
        analyzer.propagate(fp, {add: torch.ones(1, 1, 6, 4, 4, dtype=DT)})
    fp = analyzer.forward(torch.randn(1, 3, 8, 8, dtype=DT), keep=[add])
    pending, _ = analyzer.propagate(fp, {add: torch.ones(1, 1, 6, 4, 4, dtype=DT)})
    assert pending[-1].shape == (1, 1, 3, 8, 8)
