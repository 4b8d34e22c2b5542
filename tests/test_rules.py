"""Rule-level correctness of the LRP engine (GUIDE s.3, s.4, s.7).

1. Every rule on single layers against zennit 0.4.6's corresponding rule.
2. Every rule against a slow dense-matrix re-implementation of GUIDE s.3's formulas.
3. The analytic cases of GUIDE s.4 (RelevancePropagation.jl, zennit-crp).
4. Properties: parameter checks, generalised vs classic gamma, linearity in R, batch
   independence.
5. A new rule is one class defined here: it explains its layers, what it reads decides what
   the forward pass keeps, and it is refused on layers it does not fit.

Relevance is started at a layer's output with an arbitrary (random) tensor R through
``an.propagate``; zennit's relevance is ``autograd.grad(output, input, grad_outputs=R)``
inside ``composite.context(model)``. Everything runs in float64.

Known differences from zennit 0.4.6, accounted for below:
- zennit's WSquare squares the bias; ours drops it (GUIDE s.3: "no bias"), so WSquare is
  compared on bias-free layers and ours is checked separately to ignore the bias.
- ZeroRule's stabilizer is 1e-9; its zennit equivalent is ``Epsilon(epsilon=1e-9)``.
- zennit hooks no rule on max pooling (its relevance is the gradient, i.e. winner takes
  all) and its Pass rule cannot change shapes, so our PassRule on max pooling is compared
  with the plain gradient.
- zennit 0.4.6's Gamma is the classic gamma rule; GeneralizedGammaRule (zennit >= 0.5) is
  checked against the dense reference only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import zennit.rules as zr
from reference import ZennitCrpCase
from torch import Tensor, nn
from zennit.composites import NameMapComposite

import crp_toolkit as ct
from crp_toolkit.engine.composites import Composite, NameMap, TypeMap
from crp_toolkit.engine.graph import Layer
from crp_toolkit.engine.rules import (
    AlphaBetaRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    GeneralizedGammaRule,
    LayerValues,
    PassRule,
    Rule,
    WSquareRule,
    ZBoxRule,
    ZeroRule,
    ZPlusRule,
)

DT = torch.float64
TOL = 1e-10


# -- helpers ---------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


def _s(d: Tensor, eps: float) -> Tensor:
    """GUIDE s.3: s(d) = d + eps * sign0(d), sign0(0) = +1."""
    return torch.where(d >= 0, d + eps, d - eps)


def _p(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def _n(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def rel_err(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference, relative to the largest magnitude of the reference."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def only(rule: Rule) -> Composite:
    """Composite that gives ``rule`` to every layer (single-layer models)."""
    return Composite(NameMap({".*": rule}))


def ours(model: nn.Module, composite: Composite, x: Tensor, R: Tensor) -> Tensor:
    """Our input relevance for output relevance ``R`` (shaped like the model output)."""
    an = ct.LRP(model, composite)
    fp = an.forward(x)
    pending, _ = an.propagate(fp, {an.graph.output_layer: R[None]})
    return pending[-1][0]


def ours_k(model: nn.Module, composite: Composite, x: Tensor, Rk: Tensor) -> Tensor:
    """Like ``ours`` with a leading concept axis: ``Rk`` (K, B, ...) -> (K, *x.shape)."""
    an = ct.LRP(model, composite)
    fp = an.forward(x)
    pending, _ = an.propagate(fp, {an.graph.output_layer: Rk})
    return pending[-1]


def zennit_relevance(model: nn.Module, hook_or_composite, x: Tensor, R: Tensor) -> Tensor:
    """zennit's input relevance: the modified gradient inside the composite's context."""
    composite = hook_or_composite
    if not hasattr(composite, "context"):
        composite = NameMapComposite([(("0",), hook_or_composite)])
    x = x.clone().requires_grad_()
    with composite.context(model) as modified:
        out = modified(x)
        (grad,) = torch.autograd.grad(out, x, grad_outputs=R)
    return grad


def randomize_bias(layer: nn.Module) -> nn.Module:
    """Biases of both signs and of the weights' size, so b+ / b- splits matter."""
    if getattr(layer, "bias", None) is not None:
        with torch.no_grad():
            layer.bias.normal_(0.0, 0.5)
    return layer


def single(layer: nn.Module) -> nn.Module:
    return nn.Sequential(layer).to(DT).eval()


def bounds(shape: torch.Size, seed: int = 7) -> tuple[Tensor, Tensor]:
    """Deterministic input-shaped ZBox bounds, low < 0 < high, varying per element."""
    g = torch.Generator().manual_seed(seed)
    low = -1.0 - torch.rand(shape, generator=g, dtype=DT)
    high = 1.0 + torch.rand(shape, generator=g, dtype=DT)
    return low, high


# -- 1. single layers against zennit 0.4.6 ---------------------------------------------------
# Each entry: x -> (our rule, zennit hook). Factories take the input so ZBox bounds can be
# shaped like it: "zbox-sample" (1, *x.shape[1:]) broadcast over the batch, "zbox-batch"
# shaped exactly like x (per-sample bounds).
RuleFactory = Callable[[Tensor], tuple[Rule, object]]


def _zbox_sample(x: Tensor) -> tuple[Rule, object]:
    low, high = bounds(torch.Size((1, *x.shape[1:])))
    return ZBoxRule(low, high), zr.ZBox(low, high)


def _zbox_batch(x: Tensor) -> tuple[Rule, object]:
    low, high = bounds(x.shape)
    return ZBoxRule(low, high), zr.ZBox(low, high)


RULES: dict[str, RuleFactory] = {
    "zero": lambda x: (ZeroRule(), zr.Epsilon(epsilon=1e-9)),
    "epsilon": lambda x: (EpsilonRule(), zr.Epsilon()),
    "epsilon-0.5": lambda x: (EpsilonRule(0.5), zr.Epsilon(epsilon=0.5)),
    "gamma": lambda x: (GammaRule(), zr.Gamma()),
    "gamma-1": lambda x: (GammaRule(1.0), zr.Gamma(gamma=1.0)),
    "wsquare": lambda x: (WSquareRule(), zr.WSquare()),  # compared on bias-free layers
    "flat": lambda x: (FlatRule(), zr.Flat()),
    "zbox-scalar": lambda x: (ZBoxRule(-2.0, 3.0), zr.ZBox(-2.0, 3.0)),
    "zbox-sample": _zbox_sample,
    "zbox-batch": _zbox_batch,
    "alphabeta-2-1": lambda x: (AlphaBetaRule(2, 1), zr.AlphaBeta(2.0, 1.0)),
    "alphabeta-1-0": lambda x: (AlphaBetaRule(1, 0), zr.AlphaBeta(1.0, 0.0)),
    "zplus": lambda x: (ZPlusRule(), zr.ZPlus()),
}

# Each entry: () -> (layer, input shape). Small, with stride/padding/dilation/groups variety.
LAYERS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "linear": lambda: (nn.Linear(7, 5), (3, 7)),
    "linear-3d-input": lambda: (nn.Linear(5, 4), (2, 3, 5)),
    "conv1d-s2-p1-g2": lambda: (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9)),
    "conv2d-p1": lambda: (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
    "conv2d-s2-p2-d2-g2": lambda: (
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        (2, 4, 7, 7),
    ),
    "conv2d-nobias": lambda: (nn.Conv2d(3, 4, 2, stride=2, bias=False), (2, 3, 6, 6)),
    "conv2d-same": lambda: (nn.Conv2d(2, 3, (3, 5), padding="same"), (2, 2, 5, 6)),
    "conv3d": lambda: (nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (2, 2, 4, 4, 3)),
    "convT1d-s2-d2": lambda: (nn.ConvTranspose1d(2, 3, 3, stride=2, dilation=2), (2, 2, 4)),
    "convT2d-s2-g2": lambda: (
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        (2, 4, 3, 3),
    ),
}


def _setup(layer_id: str, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    layer, shape = LAYERS[layer_id]()
    model = single(randomize_bias(layer))
    x = torch.randn(shape, dtype=DT)
    with torch.no_grad():
        R = torch.randn_like(model(x))
    return model, x, R


@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("rule_id", list(RULES))
def test_rule_matches_zennit(rule_id: str, layer_id: str) -> None:
    model, x, R = _setup(layer_id)
    if rule_id == "wsquare":
        model[0].bias = None  # zennit squares the bias, ours drops it (see module docstring)
    rule, hook = RULES[rule_id](x)
    got = ours(model, only(rule), x, R)
    want = zennit_relevance(model, hook, x, R)
    assert got.shape == x.shape
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("layer_id", ["linear", "conv2d-s2-p2-d2-g2"])
@pytest.mark.parametrize("rule_id", list(RULES))
def test_rule_after_relu_matches_zennit(rule_id: str, layer_id: str) -> None:
    """Behind a ReLU the engine knows the input is >= 0 and skips the x- terms."""
    model, x, R = _setup(layer_id)
    if rule_id == "wsquare":
        model[0].bias = None
    chain = nn.Sequential(nn.ReLU(), model[0]).eval()
    rule, hook = RULES[rule_id](x)
    got = ours(chain, Composite(NameMap({"0": PassRule(), "1": rule})), x, R)
    zennit = NameMapComposite([(("0",), zr.Pass()), (("1",), hook)])
    assert rel_err(got, zennit_relevance(chain, zennit, x, R)) < TOL


@pytest.mark.parametrize("layer_id", ["linear", "conv2d-s2-p2-d2-g2", "convT2d-s2-g2"])
def test_wsquare_ignores_bias(layer_id: str) -> None:
    model, x, R = _setup(layer_id)
    with_bias = ours(model, only(WSquareRule()), x, R)
    model[0].bias = None
    without_bias = ours(model, only(WSquareRule()), x, R)
    assert rel_err(with_bias, without_bias) < TOL
    # zennit 0.4.6 squares the bias instead: the documented difference is real
    model, x, R = _setup(layer_id)
    assert rel_err(with_bias, zennit_relevance(model, zr.WSquare(), x, R)) > 1e-6


@pytest.mark.parametrize(
    "layer",
    [
        pytest.param(lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), id="reflect"),
        pytest.param(lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular"), id="circular"),
    ],
)
def test_conv_padding_mode_matches_zennit(layer) -> None:
    torch.manual_seed(0)
    conv = layer()
    model = single(randomize_bias(conv))
    x = torch.randn((2, 2, 5, 5)[: conv.weight.dim()], dtype=DT)
    with torch.no_grad():
        R = torch.randn_like(model(x))
    for rule, hook in [(EpsilonRule(), zr.Epsilon()), (ZPlusRule(), zr.ZPlus())]:
        assert rel_err(ours(model, only(rule), x, R), zennit_relevance(model, hook, x, R)) < TOL


AVGPOOLS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "avg1d": lambda: (nn.AvgPool1d(3), (2, 3, 9)),
    "avg2d": lambda: (nn.AvgPool2d(2), (2, 3, 6, 6)),
    "avg2d-s2-p1": lambda: (nn.AvgPool2d(3, stride=2, padding=1), (2, 3, 7, 7)),
    "avg2d-nopadcount-ceil": lambda: (
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        (2, 3, 6, 6),
    ),
    "avg3d": lambda: (nn.AvgPool3d(2), (2, 2, 4, 4, 4)),
    "adaptive-avg2d": lambda: (nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 7, 8)),
}


@pytest.mark.parametrize("pool_id", list(AVGPOOLS))
def test_avgpool_epsilon_matches_zennit_norm(pool_id: str) -> None:
    torch.manual_seed(0)
    pool, shape = AVGPOOLS[pool_id]()
    model = single(pool)
    x = torch.randn(shape, dtype=DT)
    with torch.no_grad():
        R = torch.randn_like(model(x))
    got = ours(model, only(EpsilonRule()), x, R)
    assert rel_err(got, zennit_relevance(model, zr.Norm(), x, R)) < TOL


class MeanPool(nn.Module):
    """Global average pooling written inside forward (the ``mean`` method)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class FunctionalPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2)


def test_avgpool_written_in_forward_is_epsilon() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, dtype=DT)
    R = torch.randn(2, 3, dtype=DT)
    want = x * (R / _s(x.mean((2, 3)), 1e-6))[..., None, None] / (4 * 6)
    assert rel_err(ours(MeanPool(), only(EpsilonRule()), x, R), want) < TOL
    # functional average pooling equals the module version (compared with zennit above)
    R2 = torch.randn(2, 3, 2, 3, dtype=DT)
    want2 = zennit_relevance(single(nn.AvgPool2d(2)), zr.Norm(), x, R2)
    assert rel_err(ours(FunctionalPool(), only(EpsilonRule()), x, R2), want2) < TOL


class TwoDense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_sum_of_branches_is_split_proportionally(eps: float) -> None:
    """GUIDE s.3: a sum of branches gets the epsilon rule, R_a = a * R / s(a + b)."""
    torch.manual_seed(0)
    model = TwoDense().to(DT).eval()
    x = torch.randn(3, 4, dtype=DT)
    R = torch.randn(3, 3, dtype=DT)
    an = ct.LRP(model, Composite(TypeMap({"linear": ZeroRule(), "add": EpsilonRule(eps)})))
    a, b = an.graph.index("a"), an.graph.index("b")
    _, recorded = an.propagate(an.forward(x), {an.graph.output_layer: R[None]}, record=[a, b])
    with torch.no_grad():
        za, zb = model.a(x), model.b(x)
    s = R / _s(za + zb, eps)
    assert rel_err(recorded[a][0], za * s) < TOL
    assert rel_err(recorded[b][0], zb * s) < TOL


MAXPOOLS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "max1d": lambda: (nn.MaxPool1d(2), (2, 3, 8)),
    "max2d": lambda: (nn.MaxPool2d(2), (2, 3, 6, 6)),
    "max2d-overlap": lambda: (nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 7, 7)),
    "max3d": lambda: (nn.MaxPool3d(2), (2, 2, 4, 4, 4)),
    "adaptive-max2d": lambda: (nn.AdaptiveMaxPool2d((2, 3)), (2, 3, 7, 8)),
}


@pytest.mark.parametrize("pool_id", list(MAXPOOLS))
def test_maxpool_pass_is_winner_takes_all(pool_id: str) -> None:
    torch.manual_seed(0)
    pool, shape = MAXPOOLS[pool_id]()
    model = single(pool)
    x = torch.randn(shape, dtype=DT)
    with torch.no_grad():
        R = torch.randn_like(model(x))
    got = ours(model, only(PassRule()), x, R)
    # zennit leaves max pooling to the gradient: R goes to each window's arg-max
    want = zennit_relevance(model, NameMapComposite([]), x, R)
    assert rel_err(got, want) < TOL
    # independently: scatter R to the arg-max index of each window; conservation per sample
    pool.return_indices = True
    _, index = pool(x)
    winners = torch.zeros_like(x).flatten(2).scatter_add_(2, index.flatten(2), R.flatten(2))
    assert rel_err(got, winners.view_as(x)) < TOL
    assert torch.allclose(got.flatten(1).sum(1), R.flatten(1).sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "act",
    [nn.ReLU, lambda: nn.LeakyReLU(0.1), nn.Tanh, nn.SiLU, nn.GELU, nn.Sigmoid],
    ids=["relu", "leaky", "tanh", "silu", "gelu", "sigmoid"],
)
def test_pass_on_activation_matches_zennit(act) -> None:
    torch.manual_seed(0)
    model = single(act())
    x = torch.randn(2, 3, 4, dtype=DT)
    R = torch.randn(2, 3, 4, dtype=DT)
    got = ours(model, only(PassRule()), x, R)
    assert torch.equal(got, R)
    assert torch.equal(got, zennit_relevance(model, zr.Pass(), x, R))


# -- 2. a dense-matrix re-implementation of GUIDE s.3 ----------------------------------------
def reference(name: str, W: Tensor, M: Tensor, b: Tensor, x: Tensor, R: Tensor, **kw) -> Tensor:
    """R_in for one sample, straight from GUIDE s.3's table.

    ``W`` (m, n) is the layer as a dense matrix, ``M`` its connectivity (the matrix of the
    layer with all weights set to 1), ``b`` (m,) the bias per output, ``x`` (n,), ``R`` (m,).
    """
    eps = kw.get("eps", 1e-6)
    if name in ("zero", "epsilon"):
        z = W @ x + b
        return x * (W.T @ (R / _s(z, eps)))
    if name == "gamma":
        g = kw["gamma"]
        Wg, bg = W + g * _p(W), b + g * _p(b)
        return x * (Wg.T @ (R / _s(Wg @ x + bg, eps)))
    if name == "generalized-gamma":
        g = kw["gamma"]
        up, down = W + g * _p(W), W + g * _n(W)
        z = W @ x + b
        xp, xn = _p(x), _n(x)
        # outputs > 0: favour positive contributions (x+ up(W), x- down(W), bias up(b))
        Rp = torch.where(z > 0, R, torch.zeros_like(R))
        u = Rp / _s(up @ xp + down @ xn + b + g * _p(b), eps)
        out = xp * (up.T @ u) + xn * (down.T @ u)
        # outputs < 0: favour negative contributions (x+ down(W), x- up(W), bias down(b))
        Rn = torch.where(z < 0, R, torch.zeros_like(R))
        u = Rn / _s(down @ xp + up @ xn + b + g * _n(b), eps)
        return out + xp * (down.T @ u) + xn * (up.T @ u)
    if name in ("zplus", "alphabeta"):
        alpha, beta = kw.get("alpha", 1.0), kw.get("beta", 0.0)
        xp, xn = _p(x), _n(x)
        zp = _p(W) @ xp + _n(W) @ xn + _p(b)
        up = R / _s(zp, eps)
        out = alpha * (xp * (_p(W).T @ up) + xn * (_n(W).T @ up))
        if beta:
            zn = _n(W) @ xp + _p(W) @ xn + _n(b)
            un = R / _s(zn, eps)
            out = out - beta * (xp * (_n(W).T @ un) + xn * (_p(W).T @ un))
        return out
    if name == "zbox":
        low = torch.as_tensor(kw["low"], dtype=x.dtype).expand_as(x)
        high = torch.as_tensor(kw["high"], dtype=x.dtype).expand_as(x)
        z = W @ x - _p(W) @ low - _n(W) @ high  # the bias cancels
        u = R / _s(z, eps)
        return x * (W.T @ u) - low * (_p(W).T @ u) - high * (_n(W).T @ u)
    if name == "flat":
        return M.T @ (R / _s(M @ torch.ones_like(x), eps))
    if name == "wsquare":
        W2 = W * W
        return W2.T @ (R / _s(W2 @ torch.ones_like(x), eps))
    raise ValueError(name)


def _dense_linear(layer: nn.Linear, in_shape) -> tuple[Tensor, Tensor, Tensor]:
    W = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else torch.zeros(W.shape[0], dtype=DT)
    return W, torch.ones_like(W), b


def _dense_conv(layer: nn.Conv2d, in_shape) -> tuple[Tensor, Tensor, Tensor]:
    def as_matrix(weight: Tensor) -> Tensor:
        def f(v: Tensor) -> Tensor:
            return F.conv2d(
                v.reshape(1, *in_shape),
                weight,
                None,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            ).flatten()

        return torch.func.jacrev(f)(torch.zeros(prod(in_shape), dtype=DT))

    weight = layer.weight.detach()
    W = as_matrix(weight)
    M = as_matrix(torch.ones_like(weight))
    positions = W.shape[0] // layer.out_channels
    b = layer.bias.detach().repeat_interleave(positions)
    return W, M, b


DENSE_CASES = {
    "linear": (lambda: nn.Linear(6, 5), (3, 6), _dense_linear),
    "conv2d": (
        lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2),
        (2, 2, 5, 5),
        _dense_conv,
    ),
}

# id -> (our rule, reference name, reference kwargs); "low"/"high" of "batch" are filled per
# sample from input-shaped bounds.
DENSE_RULES: dict[str, tuple[Callable[[Tensor], Rule], str, dict]] = {
    "zero": (lambda x: ZeroRule(), "zero", {"eps": 1e-9}),
    "epsilon-0.5": (lambda x: EpsilonRule(0.5), "epsilon", {"eps": 0.5}),
    "gamma": (lambda x: GammaRule(), "gamma", {"gamma": 0.25}),
    "gamma-0.7": (lambda x: GammaRule(0.7), "gamma", {"gamma": 0.7}),
    "generalized-gamma": (lambda x: GeneralizedGammaRule(), "generalized-gamma", {"gamma": 0.25}),
    "generalized-gamma-1": (
        lambda x: GeneralizedGammaRule(1.0),
        "generalized-gamma",
        {"gamma": 1.0},
    ),
    "zplus": (lambda x: ZPlusRule(), "zplus", {}),
    "alphabeta-2-1": (lambda x: AlphaBetaRule(2, 1), "alphabeta", {"alpha": 2.0, "beta": 1.0}),
    "alphabeta-1-0": (lambda x: AlphaBetaRule(1, 0), "alphabeta", {"alpha": 1.0, "beta": 0.0}),
    "zbox-scalar": (lambda x: ZBoxRule(-2.0, 3.0), "zbox", {"low": -2.0, "high": 3.0}),
    "zbox-input-shaped": (lambda x: ZBoxRule(*bounds(x.shape)), "zbox", {"bounds": True}),
    "flat": (lambda x: FlatRule(), "flat", {}),
    "wsquare-with-bias": (lambda x: WSquareRule(), "wsquare", {}),  # reference has no bias
}


@pytest.mark.parametrize("case_id", list(DENSE_CASES))
@pytest.mark.parametrize("rule_id", list(DENSE_RULES))
def test_rule_matches_dense_reference(rule_id: str, case_id: str) -> None:
    torch.manual_seed(1)
    make, shape, to_dense = DENSE_CASES[case_id]
    model = single(randomize_bias(make()))
    x = torch.randn(shape, dtype=DT)  # both signs: leaky inputs
    with torch.no_grad():
        out = model(x)
    R = torch.randn_like(out)
    make_rule, name, kw = DENSE_RULES[rule_id]
    got = ours(model, only(make_rule(x)), x, R)

    W, M, b = to_dense(model[0], shape[1:])
    if name == "generalized-gamma":  # both output signs must occur
        assert (out > 0).any() and (out < 0).any()
    low, high = bounds(x.shape)
    for i in range(x.shape[0]):
        args = dict(kw)
        if args.pop("bounds", False):
            args.update(low=low[i].flatten(), high=high[i].flatten())
        want = reference(name, W, M, b, x[i].flatten(), R[i].flatten(), **args)
        assert rel_err(got[i].flatten(), want) < TOL, i


# -- 3. analytic cases of GUIDE s.4 ----------------------------------------------------------
def test_relevancepropagation_jl_zero_rule_dense() -> None:
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
        layer.bias.copy_(torch.tensor([7.0, 8.0]))
    model = single(layer)
    x = torch.tensor([[1.0, 2.0]], dtype=DT)
    R = torch.tensor([[1 / 3, 2 / 3]], dtype=DT)
    an = ct.LRP(model, only(ZeroRule()))
    fp = an.forward(x)
    pending, _ = an.propagate(fp, {an.graph.output_layer: R[None]})
    got = pending[-1]
    assert got.shape == (1, 1, 2)
    want = torch.tensor([17 / 90, 316 / 675], dtype=DT)
    torch.testing.assert_close(got[0, 0], want, rtol=1e-8, atol=0)


@pytest.mark.parametrize("rule", [ZeroRule(), EpsilonRule()], ids=["zero", "epsilon"])
def test_zennit_crp_analytic_case(rule: Rule) -> None:
    model = ZennitCrpCase().to(DT).eval()
    x = torch.tensor([[-1.0, 1.0]], dtype=DT)
    composite = Composite(TypeMap({"linear": rule}))
    an = ct.LRP(model, composite, normalize_output_relevance=False)
    e = an(x, 0, record=["layer1", "layer2", "layer3"])
    assert float(e.output[0, 0]) == 10.0
    tol = {"rtol": 1e-5, "atol": 1e-5}  # the stabilizer (<= 1e-6) is the only deviation
    torch.testing.assert_close(e.relevances["layer3"], torch.tensor([[10.0]], dtype=DT))
    torch.testing.assert_close(e.relevances["layer1"], torch.tensor([[1.0, 4.0]], dtype=DT), **tol)
    torch.testing.assert_close(e.relevances["layer2"], torch.tensor([[5.0, 0.0]], dtype=DT), **tol)
    torch.testing.assert_close(e.relevance, torch.tensor([[-11.0, 21.0]], dtype=DT), **tol)


# -- 4. properties ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", [ZeroRule(0.5), EpsilonRule(0.5)], ids=["zero", "epsilon"])
def test_stabilizer_sign_of_zero_is_positive(rule: Rule) -> None:
    """s(0) = +eps: x = [1, 1], W = [[1, -1]], b = 0 gives z = 0, so R_in = x * W * R / eps."""
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = torch.tensor([[1.0, 1.0]], dtype=DT)
    got = ours(single(layer), only(rule), x, torch.tensor([[1.0]], dtype=DT))
    torch.testing.assert_close(got, torch.tensor([[2.0, -2.0]], dtype=DT), rtol=1e-14, atol=0)


def test_alphabeta_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match=r"alpha - beta = 1"):
        AlphaBetaRule(3, 1)
    with pytest.raises(ValueError, match=r">= 0"):
        AlphaBetaRule(-1, -2)
    AlphaBetaRule(2, 1), AlphaBetaRule(1, 0)  # noqa: B018  (accepted)


def test_zbox_needs_bounds() -> None:
    with pytest.raises(ValueError, match="bounds"):
        ZBoxRule()


@pytest.mark.parametrize("layer_id", ["linear", "conv2d-p1", "convT2d-s2-g2"])
@pytest.mark.parametrize("gamma", [0.25, 1.0])
def test_generalized_gamma_is_gamma_on_positive_inputs_and_outputs(
    layer_id: str, gamma: float
) -> None:
    model, x, R = _setup(layer_id)
    x = x.abs()
    with torch.no_grad():
        model[0].bias.fill_(5.0 + float(model[0].weight.abs().sum()))  # every output > 0
        assert (model(x) > 0).all()
    got = ours(model, only(GeneralizedGammaRule(gamma)), x, R)
    want = ours(model, only(GammaRule(gamma)), x, R)
    assert rel_err(got, want) < TOL
    # after a ReLU the engine knows the inputs are >= 0 and drops the x- terms
    chain = nn.Sequential(nn.ReLU(), model[0]).eval()
    rules = NameMap({"0": PassRule(), "1": GeneralizedGammaRule(gamma)})
    got_chain = ours(chain, Composite(rules), x, R)
    assert rel_err(got_chain, want) < TOL


# All rules of section 1 plus the generalised gamma rule, as (x -> our rule).
ALL_RULES: dict[str, Callable[[Tensor], Rule]] = {
    **{k: (lambda x, f=f: f(x)[0]) for k, f in RULES.items()},
    "generalized-gamma": lambda x: GeneralizedGammaRule(),
}


@pytest.mark.parametrize("layer_id", ["linear", "conv2d-s2-p2-d2-g2"])
@pytest.mark.parametrize("rule_id", list(ALL_RULES))
def test_rule_is_linear_in_relevance(rule_id: str, layer_id: str) -> None:
    model, x, R1 = _setup(layer_id)
    R2 = torch.randn_like(R1)
    composite = only(ALL_RULES[rule_id](x))
    r1, r2 = ours(model, composite, x, R1), ours(model, composite, x, R2)
    assert rel_err(ours(model, composite, x, R1 + R2), r1 + r2) < TOL
    assert rel_err(ours(model, composite, x, -2.5 * R1), -2.5 * r1) < TOL
    # a concept axis (K, B, ...) gives each relevance as if propagated alone
    stacked = ours_k(model, composite, x, torch.stack([R1, R2, R1 + R2]))
    assert rel_err(stacked[0], r1) < TOL and rel_err(stacked[1], r2) < TOL
    assert rel_err(stacked[2], r1 + r2) < TOL
    # a forward pass kept for several relevance passes (cached denominators) changes nothing
    an = ct.LRP(model, composite)
    fp = an.forward(x, reuse=True)
    for R, r in [(R1, r1), (R2, r2), (R1, r1)]:
        pending, _ = an.propagate(fp, {an.graph.output_layer: R[None]})
        assert rel_err(pending[-1][0], r) < TOL


@pytest.mark.parametrize("layer_id", ["linear", "conv2d-s2-p2-d2-g2", "convT1d-s2-d2"])
@pytest.mark.parametrize("rule_id", [k for k in ALL_RULES if k != "zbox-batch"])
def test_samples_are_independent(rule_id: str, layer_id: str) -> None:
    model, x, R = _setup(layer_id)
    x, R = torch.cat([x, -x[:1]]), torch.cat([R, R[:1]])  # at least 3 samples
    composite = only(ALL_RULES[rule_id](x))
    batch = ours(model, composite, x, R)
    for i in range(x.shape[0]):
        alone = ours(model, composite, x[i : i + 1], R[i : i + 1])
        assert rel_err(batch[i : i + 1], alone) < TOL, i


def test_zbox_per_sample_bounds_follow_their_sample() -> None:
    model, x, R = _setup("conv2d-p1")
    low, high = bounds(x.shape)
    batch = ours(model, only(ZBoxRule(low, high)), x, R)
    for i in range(x.shape[0]):
        alone = ours(
            model, only(ZBoxRule(low[i : i + 1], high[i : i + 1])), x[i : i + 1], R[i : i + 1]
        )
        assert rel_err(batch[i : i + 1], alone) < TOL


# -- 5. a new rule is one class ----------------------------------------------------------------
@dataclass(repr=False)
class UniformRule(Rule):
    """A toy rule for dense layers: every input gets ``sum(R) / n`` (reads no tensor)."""

    fits: ClassVar[str] = "dense layers"

    def is_compatible(self, layer: Layer) -> bool:
        return layer.kind == "linear"

    def reads_inputs(self, layer: Layer) -> bool:
        return False

    def relevance_in(self, values: LayerValues, R: Tensor) -> list[Tensor | None]:
        n = values.layer.module.in_features
        return [R.sum(-1, keepdim=True).expand(*R.shape[:-1], n) / n]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(DT).eval()


def test_a_rule_defined_outside_the_engine_explains_its_layers() -> None:
    model, x = _mlp(), torch.randn(3, 4, dtype=DT)
    R = torch.randn(3, 2, dtype=DT)
    an = ct.LRP(model, Composite(TypeMap({"linear": EpsilonRule()}), NameMap({"2": UniformRule()})))
    assert repr(UniformRule()) in repr(an)
    pending, recorded = an.propagate(an.forward(x), {2: R[None]}, record=[1])
    torch.testing.assert_close(recorded[1][0], R.sum(-1, keepdim=True).expand(3, 3) / 3)
    # the layer below follows with its own rule, from the toy rule's relevance
    below = ct.LRP(model[:1], only(EpsilonRule()))
    want, _ = below.propagate(below.forward(x), {0: recorded[1]})
    torch.testing.assert_close(pending[-1], want[-1], rtol=1e-12, atol=0)


def test_what_a_rule_reads_decides_what_the_forward_pass_keeps() -> None:
    """The ReLU's output feeds only the toy rule, which reads no input: it is freed and not
    recomputed. Epsilon reads it: it is recomputed from the kept dense output, or kept."""
    model, x = _mlp(), torch.randn(3, 4, dtype=DT)
    relu = lambda an: an.graph.layers[1].node  # noqa: E731
    toy = ct.LRP(
        model, Composite(TypeMap({"linear": EpsilonRule()}), NameMap({"2": UniformRule()}))
    )
    fp = toy.forward(x)
    assert relu(toy) not in fp.values and relu(toy) not in fp.plan.recomputes
    epsilon = ct.LRP(model, Composite(TypeMap({"linear": EpsilonRule()})))
    fp = epsilon.forward(x)
    assert relu(epsilon) not in fp.values and relu(epsilon) in fp.plan.recomputes
    keeping = ct.LRP(model, Composite(TypeMap({"linear": EpsilonRule()})), recompute=False)
    assert relu(keeping) in keeping.forward(x).values


def test_a_rule_is_refused_on_layers_it_does_not_fit() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)).eval()
    with pytest.raises(ct.UnsupportedLayerError, match=r"UniformRule .*'0'.*fits dense layers"):
        ct.LRP(model, Composite(TypeMap({"conv": UniformRule(), "linear": EpsilonRule()})))
    with pytest.raises(ct.UnsupportedLayerError, match=r"PassRule .*'2'.*weighted rule"):
        ct.LRP(model, Composite(TypeMap({"conv": EpsilonRule(), "linear": PassRule()})))


@pytest.mark.parametrize(
    "live, kind",
    [(range(16, 24), slice), ([1, 5, 30], Tensor), ([], slice), (range(32), type(None))],
)
def test_a_dense_transpose_multiplies_only_the_live_features(live, kind) -> None:
    """Relevance on some output features of a dense layer (v's third of a fused q, k, v
    projection, a channel concept) multiplies only those rows of the weight, as a slice when
    they are one run, and equals the full product; with most features live, all are used."""
    from crp_toolkit.engine.ops import DENSE, live_features

    torch.manual_seed(0)
    weight, x = torch.randn(32, 8, dtype=DT), torch.randn(3, 5, 8, dtype=DT)
    grad = torch.zeros(1, 3, 5, 32, dtype=DT)
    grad[..., list(live)] = torch.randn(1, 3, 5, len(live), dtype=DT)
    grad[0, 0, 0] = 0.0  # a dead first row does not settle it
    assert isinstance(live_features(grad), kind)
    got = DENSE.transpose_params(grad, x, nn.Linear(8, 32), weight)
    assert got.shape == (1, 3, 5, 8) and rel_err(got, grad @ weight) < 1e-13
