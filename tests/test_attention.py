"""Attention-aware LRP (issue #13): the attention canonizer, the AttnLRP and CP-LRP rules and
presets, against LXT 2.1 (GUIDE s.7, s.9).

1. Whole model: torchvision ``vit_b_16`` (at image_size=32, so float64 stays fast; the
   architecture is unchanged, only the patch grid is 2x2) with random weights, against LXT's
   efficient patch of torchvision's ``vision_transformer`` (CP-LRP inside
   ``nn.MultiheadAttention``, identity GELU, LayerNorm with the std constant) and input times
   gradient. That makes every linear layer LRP-0, so ours is CPLRP with a vanishing epsilon,
   the output relevance the logit (gradient 1 at the target). torchvision initialises the head
   to zeros; it is re-initialised here.
2. Each AttnLRP op rule against LXT's explicit functional rule (``lxt.explicit.functional``)
   on random inputs, with a vanishing epsilon on both sides (LXT stabilises with ``z + eps``,
   not sign-aware).
3. The canonizer: the explicit attention computes the module's function, or is refused.

LXT must be importable (it needs transformers < 5; ``make`` installs it with --no-deps);
without it these tests are skipped, and under CI they fail.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import Tensor, nn

import crp_toolkit as ct
from crp_toolkit.engine.attention import ExplicitAttention, explicit_attention
from crp_toolkit.engine.composites import Composite, TypeMap
from crp_toolkit.engine.rules import EpsilonRule, LayerNormRule, SoftmaxRule, UniformRule

DT = torch.float64
TINY = 1e-30  # a vanishing stabilizer: LRP-0 in float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _lxt(module: str):
    """An LXT module, or a skip (a failure under CI) naming why it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        reason = f"LXT not importable ({err}); pip install --no-deps 'lxt==2.1.*' 'transformers<5'"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def small_vit_b_16() -> nn.Module:
    """torchvision's vit_b_16 at image_size=32 (12 layers, 12 heads, width 768), float64,
    random weights, the zero-initialised head re-initialised."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32)
    nn.init.normal_(model.heads.head.weight, std=0.05)
    return model.to(DT).eval()


@pytest.fixture
def lxt_patched_vit():
    """LXT's efficient CP-LRP patch of torchvision's vision_transformer module, undone after
    the test (LXT patches the classes, for the whole process)."""
    efficient = _lxt("lxt.efficient")
    patch_map = _lxt("lxt.efficient.models.vit_torch").cp_LRP
    saved = {cls: cls.forward for cls in patch_map}
    efficient.monkey_patch(torchvision.models.vision_transformer, patch_map)
    try:
        yield
    finally:
        for cls, forward in saved.items():
            cls.forward = forward
            if "original_forward" in vars(cls):
                delattr(cls, "original_forward")


@pytest.mark.parametrize(
    ("epsilon", "domain"), [(TINY, "relevance"), (0.0, "gradient")], ids=["relevance", "gradient"]
)
def test_cplrp_on_vit_b_16_equals_lxt(lxt_patched_vit, epsilon, domain) -> None:
    """In the relevance domain with a vanishing epsilon, and with epsilon 0, which runs in the
    gradient domain as LXT does."""
    model = small_vit_b_16()
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 7])
    leaf = x.clone().requires_grad_()
    out = model(leaf)
    grad_out = torch.zeros_like(out).scatter_(1, target[:, None], 1.0)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    theirs = (leaf * grad).detach()
    ours = ct.LRP(model, ct.composites.CPLRP(epsilon=epsilon), normalize_output_relevance=False)
    assert ours.domain == domain
    expl = ours(x, target)
    assert rel_err(expl.relevance, theirs) < 1e-6
    assert rel_err(expl.output, out.detach()) < 1e-12


# -- 2. op rules against lxt.explicit.functional ---------------------------------------------


class Split(nn.Module):
    """``op(a, b)`` of two halves of the input (the last axis), so one input carries both."""

    def __init__(self, op: Callable[[Tensor, Tensor], Tensor], transpose_b: bool) -> None:
        super().__init__()
        self.op, self.transpose_b = op, transpose_b

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=-1)
        return self.op(a, b.transpose(-1, -2) if self.transpose_b else b)


def _ours(model: nn.Module, rules: dict, x: Tensor, R: Tensor) -> Tensor:
    analyzer = ct.LRP(model.to(DT).eval(), Composite(TypeMap(rules)))
    fp = analyzer.forward(x)
    pending, _ = analyzer.propagate(fp, {analyzer.graph.output_layer: R[None]})
    return pending[-1][0]


def _theirs(fn: Callable[..., Tensor], inputs: list[Tensor], R: Tensor) -> list[Tensor]:
    leaves = [t.clone().requires_grad_() for t in inputs]
    return list(torch.autograd.grad(fn(*leaves), leaves, R))


def _halves(x: Tensor, transpose_b: bool) -> list[Tensor]:
    a, b = x.chunk(2, dim=-1)
    return [a, b.transpose(-1, -2) if transpose_b else b]


def _joined(ra: Tensor, rb: Tensor, transpose_b: bool) -> Tensor:
    return torch.cat([ra, rb.transpose(-1, -2) if transpose_b else rb], dim=-1)


def test_softmax_rule_equals_lxt() -> None:
    F_lxt = _lxt("lxt.explicit.functional")
    x = torch.randn(2, 3, 6, 7, dtype=DT) * 3
    R = torch.randn_like(x)
    ours = _ours(SoftmaxOf(), {"softmax": SoftmaxRule()}, x, R)
    (theirs,) = _theirs(lambda t: F_lxt.softmax(t, -1), [x], R)
    assert rel_err(ours, theirs) < 1e-12


class SoftmaxOf(nn.Module):
    """A softmax inside the model (scaling by a constant passes relevance unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(x, dim=-1) * 2.0


def test_matmul_rule_equals_lxt() -> None:
    F_lxt = _lxt("lxt.explicit.functional")
    x = torch.randn(2, 3, 5, 8, dtype=DT)
    a, b = _halves(x, True)
    R = torch.randn(2, 3, 5, 5, dtype=DT)
    ours = _ours(Split(torch.matmul, True), {"matmul": UniformRule(TINY)}, x, R)
    ra, rb = _theirs(lambda p, q: F_lxt.matmul(p, q, epsilon=TINY), [a, b], R)
    assert rel_err(ours, _joined(ra, rb, True)) < 1e-10


def test_uniform_gate_equals_lxt_mul2() -> None:
    F_lxt = _lxt("lxt.explicit.functional")
    x = torch.randn(2, 5, 8, dtype=DT)
    R = torch.randn(2, 5, 4, dtype=DT)
    ours = _ours(Split(torch.mul, False), {"gate": UniformRule()}, x, R)
    ra, rb = _theirs(F_lxt.mul2, _halves(x, False), R)
    assert rel_err(ours, _joined(ra, rb, False)) < 1e-12


def test_sum_epsilon_equals_lxt_add2() -> None:
    F_lxt = _lxt("lxt.explicit.functional")
    x = torch.randn(2, 5, 8, dtype=DT)
    R = torch.randn(2, 5, 4, dtype=DT)
    ours = _ours(Split(torch.add, False), {"add": EpsilonRule(TINY)}, x, R)
    ra, rb = _theirs(lambda p, q: F_lxt.add2(p, q, epsilon=TINY), _halves(x, False), R)
    assert rel_err(ours, _joined(ra, rb, False)) < 1e-10


def test_linear_epsilon_equals_lxt() -> None:
    F_lxt = _lxt("lxt.explicit.functional")
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).to(DT)
    x = torch.randn(2, 3, 6, dtype=DT)
    R = torch.randn(2, 3, 4, dtype=DT)
    ours = _ours(nn.Sequential(linear), {"linear": EpsilonRule(TINY)}, x, R)
    (theirs,) = _theirs(
        lambda t: F_lxt.linear_epsilon(t, linear.weight, linear.bias, epsilon=TINY), [x], R
    )
    assert rel_err(ours, theirs) < 1e-10


def test_layer_norm_rule_equals_lxt() -> None:
    F_lxt = _lxt("lxt.explicit.functional")
    torch.manual_seed(0)
    norm = nn.LayerNorm(6).to(DT)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 3, 6, dtype=DT)
    R = torch.randn_like(x)
    ours = _ours(nn.Sequential(norm), {"layernorm": LayerNormRule(TINY)}, x, R)
    (theirs,) = _theirs(
        lambda t: F_lxt.layer_norm_grad_fn.apply(t, norm.weight, norm.bias, norm.eps, TINY),
        [x],
        R,
    )
    assert rel_err(ours, theirs) < 1e-10


def test_rms_norm_rule_equals_lxt() -> None:
    F_lxt = _lxt("lxt.explicit.functional")
    torch.manual_seed(0)
    norm = nn.RMSNorm(6, eps=1e-6).to(DT)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 6, dtype=DT)
    R = torch.randn_like(x)
    ours = _ours(nn.Sequential(norm), {"layernorm": LayerNormRule(TINY)}, x, R)
    (theirs,) = _theirs(lambda t: F_lxt.rms_norm_identity(t, norm.weight, norm.eps), [x], R)
    assert rel_err(ours, theirs) < 1e-10


# -- 3. the attention canonizer --------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_attention_computes_the_modules_function(batch_first: bool) -> None:
    """Self- and cross-attention; the q, k, v projections are slices of the packed weight,
    sharing its memory, so they see every update of the module's parameters."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).to(DT).eval()
    x, memory = torch.randn(3, 4, 8, dtype=DT), torch.randn(3, 4, 8, dtype=DT)
    explicit = ExplicitAttention(mha, "attention")
    with torch.no_grad():
        for key in (x, memory):
            want, want_weights = mha(x, key, key)
            got, got_weights = explicit(x, key, key)
            assert rel_err(got, want) < 1e-12 and rel_err(got_weights, want_weights) < 1e-12
        mha.in_proj_weight.mul_(2)  # an update of the packed weight reaches the slices
        assert rel_err(explicit(x, x, x)[0], mha(x, x, x)[0]) < 1e-12
    thirds = zip((explicit.q_proj, explicit.k_proj, explicit.v_proj), mha.in_proj_weight.chunk(3))
    assert all(p.weight.data_ptr() == w.data_ptr() for p, w in thirds)
    assert explicit.out_proj is mha.out_proj


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (6, 5)])
def test_explicit_window_attention_computes_the_modules_function(v2: bool, size) -> None:
    """Swin's shifted-window attention (relative position bias, shift mask, padding; v2's
    cosine attention) written out computes what torchvision's module does."""
    from torchvision.models import swin_transformer as swin

    from crp_toolkit.engine.window_attention import ExplicitWindowAttention

    torch.manual_seed(0)
    cls = swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention
    module = cls(8, [4, 4], [2, 2], num_heads=2).to(DT).eval()
    x = torch.randn(2, *size, 8, dtype=DT)
    with torch.no_grad():
        assert rel_err(ExplicitWindowAttention(module)(x), module(x)) < 1e-12


class SelfAttention(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))


def test_the_callers_model_keeps_its_attention_module() -> None:
    model = SelfAttention(nn.MultiheadAttention(8, 2, batch_first=True)).to(DT).eval()
    copied = explicit_attention(model)
    assert isinstance(model.attention, nn.MultiheadAttention)
    assert isinstance(copied.attention, ExplicitAttention) and copied.head is model.head
    ct.LRP(model, ct.composites.AttnLRP())(torch.randn(2, 4, 8, dtype=DT))
    assert isinstance(model.attention, nn.MultiheadAttention)


class DoubledAttention(nn.MultiheadAttention):
    """A subclass whose forward does more than its base class's."""

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return 2 * out, weights


def test_attention_written_out_wrongly_is_refused() -> None:
    model = SelfAttention(DoubledAttention(8, 2, batch_first=True)).eval()
    with pytest.raises(ct.UnsupportedLayerError, match="'attention'.*does not compute"):
        ct.LRP(model, ct.composites.AttnLRP())


def test_attention_that_cannot_be_written_out_is_refused() -> None:
    model = SelfAttention(nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True))
    with pytest.raises(ct.UnsupportedLayerError, match=r"'attention'.*bias_k.*register"):
        ct.LRP(model.eval(), ct.composites.AttnLRP())


class Fused(nn.Module):
    """Attention through F.scaled_dot_product_attention (as timm's fused path)."""

    def __init__(self, mask: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj, self.mask = nn.Linear(8, 24), nn.Linear(8, 3), mask

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.mask)
        return self.proj(out.transpose(1, 2).flatten(2).mean(1))


def test_scaled_dot_product_attention_is_written_out() -> None:
    torch.manual_seed(0)
    model = Fused().to(DT).eval()
    x = torch.randn(2, 5, 8, dtype=DT)
    analyzer = ct.LRP(model, ct.composites.AttnLRP())
    kinds = [layer.kind for layer in analyzer.graph.layers]
    assert kinds.count("matmul") == 2 and kinds.count("softmax") == 1
    expl = analyzer(x)
    with torch.no_grad():
        assert rel_err(expl.output, model(x)) < 1e-12
    assert torch.isfinite(expl.relevance).all()


def test_masked_scaled_dot_product_attention_is_refused() -> None:
    with pytest.raises(ct.UnsupportedLayerError, match=r"scaled_dot_product_attention.*is_causal"):
        ct.LRP(Fused(mask=True).eval(), ct.composites.AttnLRP())


@pytest.mark.parametrize("preset", [ct.composites.AttnLRP, ct.composites.CPLRP])
def test_transformer_presets_conserve_on_a_bias_free_vit(preset) -> None:
    """With biases, positional embedding and class token zero and vanishing epsilons, CP-LRP
    conserves relevance exactly (attention is linear in v); AttnLRP's softmax rule does not
    (its deep Taylor expansion at x keeps a bias-like term), so it is only checked finite."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    nn.init.normal_(model.heads.head.weight)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith(("pos_embedding", "class_token")):
                p.zero_()
    model = model.to(DT).eval()
    x = torch.randn(3, 3, 16, 16, dtype=DT)
    expl = ct.LRP(model, preset(epsilon=TINY))(x)
    total = expl.relevance.sum((1, 2, 3))
    if preset is ct.composites.CPLRP:
        assert torch.allclose(total, torch.ones(3, dtype=DT), atol=1e-8)
    else:
        assert torch.isfinite(total).all()


def test_cplrp_keeps_nothing_for_the_attention_scores_and_explains_bit_for_bit() -> None:
    """Under CP-LRP no relevance reaches ``q k^T``, its scaling or the softmax (the rules say
    so with ``passes_to``, and hand those inputs None), so the forward pass frees the scores
    once the softmax has run; the relevance is bit for bit that of a pass keeping every
    layer's output (where every layer may be a start of a relevance pass)."""
    analyzer = ct.LRP(small_vit_b_16(), ct.composites.CPLRP())
    layers = analyzer.graph.layers
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    lean, full = analyzer.forward(x), analyzer.forward(x, keep=range(len(layers)))
    scores = [la for la in layers if la.kind == "matmul" and la.gate is None]
    assert len(scores) == 12 and not any(la.node in lean.values for la in scores)
    init = {analyzer.graph.output_layer: torch.ones_like(lean.output)[None]}
    for layer, rule in zip(layers, analyzer.rules, strict=True):  # the declarations hold
        given = analyzer.relevance_in(full, layer, torch.ones_like(full.value(layer.index))[None])
        passes = rule.passes_to(layer)
        assert all(r is None for k, r in enumerate(given) if k not in passes), layer.name
    ours, theirs = (analyzer.propagate(fp, init)[0][-1] for fp in (lean, full))
    assert torch.equal(ours, theirs)


def test_presets_print_their_rules() -> None:
    text = repr(ct.composites.AttnLRP(gamma=0.25))
    assert "SoftmaxRule()" in text and "UniformRule(stabilizer=1e-06)" in text
    assert "GammaRule(gamma=0.25" in text
    assert "ConstantWeightsRule(stabilizer=1e-06)" in repr(ct.composites.CPLRP())


# -- 4. bad input ----------------------------------------------------------------------------


class ErfMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(self.fc(x))


class Block(nn.Module):
    """A transformer block whose MLP calls an op without a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = ErfMlp()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return self.head((x + self.mlp(x)).mean(1))


def test_an_op_without_rule_in_a_transformer_is_refused_naming_where() -> None:
    with pytest.raises(ct.UnsupportedLayerError) as info:
        ct.LRP(Block().eval(), ct.composites.AttnLRP())
    message = str(info.value)
    assert "op 'erf' (call_function) inside 'mlp' of type ErfMlp (traced node 'erf')" in message
    assert "register_function_op" in message


def test_attention_without_a_transformer_composite_says_which_to_use() -> None:
    with pytest.raises(
        ct.UnsupportedLayerError, match=r"'attention\.matmul'.*UniformRule.*AttnLRP\(\)"
    ):
        ct.LRP(SelfAttention(nn.MultiheadAttention(8, 2, batch_first=True)).eval())
