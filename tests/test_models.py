"""Whole-model tests: torchvision architectures and the FashionMNIST fixture against zennit
0.4.6, conservation, batch independence, targets, refused inputs and models, and the promise
that the caller's model is never modified. Helpers and the zennit oracle: ``reference.py``."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torchvision
from reference import (
    PRESETS,
    assert_unchanged,
    bn_eps_zero,
    ours_composite,
    rel_err,
    state_snapshot,
    torchvision_model,
    zennit_canonizers,
    zennit_composite,
    zennit_fashion,
    zennit_relevance,
    zero_biases,
)
from torch import nn

import crp_toolkit as ct
from crp_toolkit.engine import ops
from crp_toolkit.engine.composites import Composite, FirstLayerMap, GlobalMap
from crp_toolkit.engine.rules import EpsilonRule, FlatRule, ZBoxRule

slow = pytest.mark.slow


def grid(first: tuple, second: tuple, default: set[tuple]) -> list:
    """All pairs of ``first`` x ``second``; those not in ``default`` are marked slow."""
    return [
        pytest.param(a, b, marks=() if (a, b) in default else slow) for a in first for b in second
    ]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Zoo:
    """Random-weight torchvision models built once per module (VGG16-BN takes seconds)."""

    def __init__(self) -> None:
        self.cache: dict[tuple, nn.Module] = {}

    def get(self, name: str, *, calibrated: bool = False, eps_zero: bool = False) -> nn.Module:
        key = (name, calibrated, eps_zero)
        if key not in self.cache:
            shape = (4, 3, 64, 64) if calibrated else None
            model = torchvision_model(name, calibrate_shape=shape)
            self.cache[key] = bn_eps_zero(model) if eps_zero else model
        return self.cache[key]


@pytest.fixture(scope="module")
def zoo():
    return Zoo()


@pytest.fixture(scope="module")
def fashion64(fashion_model, fashion_data):
    """The fixture model in float64 (eval, not canonized) and 16 images with labels."""
    x, y = fashion_data
    return copy.deepcopy(fashion_model).double(), x[:16].double(), y[:16]


# -- 1. agreement with zennit ------------------------------------------------------------------

# Default: two presets per model, every preset at least once (the fashion model runs all five).
TORCHVISION_DEFAULT = {
    ("vgg16_bn", "EpsilonPlusFlat"),
    ("resnet50", "EpsilonAlpha2Beta1Flat"),
    ("vgg16_bn", "EpsilonGammaBox"),
    ("resnet18", "EpsilonPlus"),
    ("resnet18", "EpsilonAlpha2Beta1"),
    ("resnet50", "EpsilonPlusFlat"),
}
TORCHVISION_CASES = [
    pytest.param(name, preset, 64, marks=() if (name, preset) in TORCHVISION_DEFAULT else slow)
    for name in ("vgg16_bn", "resnet18", "resnet50")
    for preset in PRESETS
] + [
    pytest.param(name, preset, 224, marks=slow)
    for name in ("vgg16_bn", "resnet18", "resnet50")
    for preset in ("EpsilonPlusFlat", "EpsilonGammaBox")
]


@pytest.mark.parametrize("name, preset, size", TORCHVISION_CASES)
def test_torchvision_matches_zennit(zoo, name, preset, size):
    """Each preset on a canonized torchvision model gives zennit's relevance (float64; BN eps
    set to 0 on both sides, see ``reference.bn_eps_zero``)."""
    model = zoo.get(name, eps_zero=True)
    x = randn(2, 3, size, size, seed=1)
    expl = ct.LRP(ct.canonize(model), ours_composite(preset, x))(x)
    composite = zennit_composite(preset, x, zennit_canonizers(name))
    expected = zennit_relevance(copy.deepcopy(model), composite, x, expl.target)
    assert expl.relevance.shape == x.shape
    assert expected.abs().max() > 0
    assert rel_err(expl.relevance, expected) < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_fashion_matches_zennit(fashion64, preset):
    """The fixture (reused ReLU, two input readers, residual add) against zennit with the same
    first-layer assignment and zennit's own BatchNorm merging; explains the true labels."""
    model, x, y = fashion64
    expl = ct.LRP(ct.canonize(bn_eps_zero(model)), ours_composite(preset, x))(x, y)
    wrapped, composite = zennit_fashion(bn_eps_zero(model), preset, x)
    expected = zennit_relevance(wrapped, composite, x, y)
    assert torch.equal(expl.target, y)
    assert rel_err(expl.relevance, expected) < 1e-5


def test_fashion_logit_output_relevance_matches_zennit(fashion64):
    """normalize_output_relevance=False starts from the logit, as zennit-crp does."""
    model, x, y = fashion64
    analyzer = ct.LRP(
        ct.canonize(bn_eps_zero(model)),
        ct.composites.EpsilonPlusFlat(),
        normalize_output_relevance=False,
    )
    expl = analyzer(x, y)
    wrapped, composite = zennit_fashion(bn_eps_zero(model), "EpsilonPlusFlat", x)
    expected = zennit_relevance(wrapped, composite, x, y, logit=True)
    assert rel_err(expl.relevance, expected) < 1e-5


def test_fashion_float32_close_to_float64(fashion_model, fashion_data):
    """The shipped float32 model gives the float64 result up to float32 precision."""
    x = fashion_data[0][:8]
    r32 = ct.LRP(ct.canonize(fashion_model), ct.composites.EpsilonPlusFlat())(x).relevance
    model64 = ct.canonize(copy.deepcopy(fashion_model).double())
    r64 = ct.LRP(model64, ct.composites.EpsilonPlusFlat())(x.double()).relevance
    assert r32.dtype == torch.float32
    assert rel_err(r32.double(), r64) < 1e-4


# -- 2. conservation ---------------------------------------------------------------------------

# Bias-free, canonized, BatchNorm statistics calibrated: relevance arriving at the input sums
# to the output relevance (1 per sample) up to what the stabilizers absorb.
RELU_ARCHS = ("resnet18", "vgg11_bn", "densenet121")
SIGN_ARCHS = ("mobilenet_v3_small", "efficientnet_b0")  # hardswish/SiLU, linear bottlenecks
CONSERVATION_TOL = {"EpsilonGammaBox": 5e-3}  # classic gamma: denominators nearer 0


def bias_free(zoo, name: str) -> nn.Module:
    key = (name, "bias-free")
    if key not in zoo.cache:
        zoo.cache[key] = zero_biases(ct.canonize(zoo.get(name, calibrated=True)))
    return zoo.cache[key]


@pytest.mark.parametrize(
    "name, preset",
    grid(
        RELU_ARCHS,
        PRESETS,
        {(n, p) for n in RELU_ARCHS for p in ("EpsilonPlusFlat", "EpsilonGammaBox")}
        | {("resnet18", p) for p in PRESETS},
    ),
)
def test_conservation_relu_architectures(zoo, name, preset):
    model = bias_free(zoo, name)
    x = randn(2, 3, 64, 64, seed=1)
    expl = ct.LRP(model, ours_composite(preset, x))(x)
    total = expl.relevance.sum((1, 2, 3))
    assert torch.allclose(
        total, torch.ones(2, dtype=total.dtype), atol=CONSERVATION_TOL.get(preset, 1e-4)
    )


def epsilon_composites(x: torch.Tensor) -> dict[str, Composite]:
    """Composites whose rules conserve relevance whatever the signs of inputs and weights."""
    return {
        "Epsilon": Composite(GlobalMap(EpsilonRule())),
        "Epsilon+Flat": Composite(GlobalMap(EpsilonRule()), FirstLayerMap(FlatRule())),
        "Epsilon+ZBox": Composite(
            GlobalMap(EpsilonRule()), FirstLayerMap(ZBoxRule(float(x.min()), float(x.max())))
        ),
    }


@pytest.mark.parametrize(
    "name, composite",
    grid(
        SIGN_ARCHS,
        ("Epsilon", "Epsilon+Flat", "Epsilon+ZBox"),
        {("mobilenet_v3_small", "Epsilon+ZBox"), ("efficientnet_b0", "Epsilon+Flat")},
    ),
)
def test_conservation_sign_changing_architectures(zoo, name, composite):
    """MobileNetV3 and EfficientNet (gates, hardswish/SiLU, stochastic depth, linear
    bottlenecks) conserve relevance under sign-agnostic rules."""
    model = bias_free(zoo, name)
    x = randn(2, 3, 64, 64, seed=1)
    expl = ct.LRP(model, epsilon_composites(x)[composite])(x)
    total = expl.relevance.sum((1, 2, 3))
    assert torch.allclose(total, torch.ones(2, dtype=total.dtype), atol=1e-4)


def _stabilized(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return torch.where(z >= 0, z + eps, z - eps)


def _kept_fraction(module: nn.Module, x: torch.Tensor, out: torch.Tensor, conv_rule: str):
    """The fraction of the relevance at each output of a bias-free layer that reaches its
    input under the rule (computed independently of the engine): 1 up to the stabilizer,
    except where the denominator of a sign-split part vanishes."""
    if isinstance(module, nn.Conv2d) and conv_rule in ("zplus", "alphabeta"):
        w = module.weight

        def conv(inp, weight):
            return module._conv_forward(inp, weight, None)

        xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        z_plus = conv(xp, wp) + conv(xn, wn)
        kept = z_plus / _stabilized(z_plus)
        if conv_rule == "alphabeta":
            z_minus = conv(xp, wn) + conv(xn, wp)
            kept = 2 * kept - z_minus / _stabilized(z_minus)
        return kept
    return out / _stabilized(out)  # epsilon (dense, average pooling), flat (z > 0)


@pytest.mark.parametrize(
    "preset",
    [
        "EpsilonPlus",
        pytest.param("EpsilonPlusFlat", marks=slow),
        "EpsilonAlpha2Beta1",
        pytest.param("EpsilonAlpha2Beta1Flat", marks=slow),
    ],
)
@pytest.mark.parametrize("name", SIGN_ARCHS)
def test_sign_split_rules_lose_exactly_the_empty_parts(zoo, name, preset):
    """With activations that can be negative, z+ (or z-) of a neuron can vanish while it still
    carries relevance, so ZPlus and AlphaBeta do not conserve (a property of the rules; e.g.
    AlphaBeta doubles the relevance where z- = 0). The input relevance must equal the output
    relevance minus exactly what those neurons lose, accounted layer by layer from the
    relevance recorded at each layer's output."""
    model = bias_free(zoo, name)
    x = randn(2, 3, 64, 64, seed=1)
    expl = ct.LRP(model, ours_composite(preset, x))(x, record=True)
    conv_rule = "zplus" if preset.startswith("EpsilonPlus") else "alphabeta"
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
        for n, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.AdaptiveAvgPool2d))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    lost = torch.zeros(2, dtype=x.dtype)
    for n, (inp, out) in seen.items():
        if n not in expl.relevances:
            continue  # reached by no relevance (the pooling inside squeeze-excitation gates)
        rule = "flat" if preset.endswith("Flat") and n == first else conv_rule
        with torch.no_grad():
            kept = _kept_fraction(model.get_submodule(n), inp, out, rule)
        lost += (expl.relevances[n] * (1 - kept)).flatten(1).sum(1)
    total = expl.relevance.sum((1, 2, 3))
    assert lost.abs().max() > 1e-3  # the effect is real on these models
    assert torch.allclose(total, 1 - lost, atol=1e-4)


@pytest.mark.parametrize(
    "name, preset",
    grid(
        ("densenet121", *SIGN_ARCHS),
        PRESETS,
        {("mobilenet_v3_small", p) for p in PRESETS}
        | {("densenet121", "EpsilonPlusFlat"), ("efficientnet_b0", "EpsilonGammaBox")},
    ),
)
def test_with_biases_runs_and_is_finite(zoo, name, preset):
    """Biases kept (they absorb relevance): the explanation runs, is finite and shaped like x,
    and the output is the model's own."""
    model = ct.canonize(zoo.get(name, calibrated=True))
    x = randn(2, 3, 64, 64, seed=1)
    expl = ct.LRP(model, ours_composite(preset, x))(x)
    assert expl.relevance.shape == x.shape and expl.relevance.dtype == x.dtype
    assert torch.isfinite(expl.relevance).all()
    assert not expl.relevance.requires_grad
    with torch.no_grad():
        assert torch.allclose(expl.output, model(x), rtol=1e-10, atol=1e-10)


# -- 3. batch independence ---------------------------------------------------------------------


def test_batch_equals_per_sample_vgg(zoo):
    model = ct.canonize(zoo.get("vgg11_bn", calibrated=True))
    x = randn(3, 3, 64, 64, seed=2)
    analyzer = ct.LRP(model, ct.composites.EpsilonGammaBox(float(x.min()), float(x.max())))
    batch = analyzer(x)
    for i in range(len(x)):
        single = analyzer(x[i : i + 1])
        assert torch.equal(single.target, batch.target[i : i + 1])
        assert rel_err(single.relevance[0], batch.relevance[i]) < 1e-10


@pytest.mark.parametrize("preset", ["EpsilonPlusFlat", "EpsilonAlpha2Beta1"])
def test_batch_equals_per_sample_fashion(fashion64, preset):
    model, x, y = fashion64
    analyzer = ct.LRP(ct.canonize(model), ours_composite(preset, x))
    batch = analyzer(x[:8], y[:8], record=["conv2", "linear1"])
    for i in range(8):
        single = analyzer(x[i : i + 1], y[i : i + 1], record=["conv2", "linear1"])
        assert rel_err(single.relevance[0], batch.relevance[i]) < 1e-10
        for name in ("conv2", "linear1"):
            assert rel_err(single.relevances[name][0], batch.relevances[name][i]) < 1e-10


@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_a_pass_stopped_at_the_lowest_recorded_layer_records_the_same_relevance(zoo, name):
    """``to_input=False`` (what the dataset pass uses) skips the layers below the lowest
    recorded one and leaves every recorded relevance bit for bit as the full pass gives it,
    also where residual branches join below a recorded layer."""
    analyzer = ct.LRP(ct.canonize(copy.deepcopy(zoo.get(name))), ct.composites.EpsilonPlusFlat())
    names = [layer.name for layer in analyzer.graph.layers]
    record = [names[len(names) // 3], names[len(names) // 2], names[-3]]
    x = randn(2, 3, 64, 64, seed=3)
    full = analyzer(x, record=record)
    short = analyzer(x, record=record, to_input=False)
    assert short.relevance is None and full.relevance is not None
    for layer in record:
        assert torch.equal(short.relevances[layer], full.relevances[layer]), layer
    # and its forward pass frees what only the skipped layers would read
    index = [analyzer.graph.index(layer) for layer in record]
    held = [analyzer.forward(x, keep=index, above=above) for above in (-1, min(index))]
    sizes = [_held_bytes(fp) for fp in held]
    assert sizes[1] < sizes[0] / 2, sizes


def _held_bytes(fp) -> int:
    tensors = [v for v in fp.values.values() if isinstance(v, torch.Tensor)]
    tensors += [indices for indices, _ in fp.pooled.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


# -- 4. targets --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_analyzer(fashion64):
    model, x, y = fashion64
    return ct.LRP(ct.canonize(model), ct.composites.EpsilonPlusFlat()), x[:4], y[:4]


def test_target_none_is_argmax(fashion_analyzer):
    analyzer, x, _ = fashion_analyzer
    expl = analyzer(x)
    assert torch.equal(expl.target, expl.output.argmax(1))
    assert torch.equal(expl.relevance, analyzer(x, expl.target).relevance)
    assert torch.equal(expl.relevance, ct.analyze(x, analyzer).relevance)


def test_target_int_list_and_tensor(fashion_analyzer):
    analyzer, x, y = fashion_analyzer
    as_int = analyzer(x, 3)
    assert as_int.target.tolist() == [3, 3, 3, 3]
    assert torch.equal(as_int.relevance, analyzer(x, torch.tensor(3)).relevance)
    assert torch.equal(as_int.relevance, ct.analyze(x, analyzer, 3).relevance)
    per_sample = analyzer(x, y)
    assert torch.equal(per_sample.target, y)
    assert torch.equal(per_sample.relevance, analyzer(x, y.tolist()).relevance)
    for i in range(len(x)):  # each sample explains its own target
        alone = analyzer(x, int(y[i])).relevance[i]
        assert rel_err(per_sample.relevance[i], alone) < 1e-12
    # different classes give different explanations
    assert not torch.allclose(analyzer(x, 0).relevance, analyzer(x, 1).relevance)


def test_unnormalized_output_relevance_scales_by_logit(fashion64):
    model, x, y = fashion64
    canonized = ct.canonize(model)
    unit = ct.LRP(canonized, ct.composites.EpsilonPlus())(x, y)
    logit = ct.LRP(canonized, ct.composites.EpsilonPlus(), normalize_output_relevance=False)(x, y)
    value = unit.output.gather(1, y[:, None]).flatten()
    assert torch.allclose(logit.relevance, unit.relevance * value[:, None, None, None], rtol=1e-10)
    # every rule is linear in the relevance, so the totals scale by the logit too
    assert torch.allclose(
        logit.relevance.sum((1, 2, 3)) / unit.relevance.sum((1, 2, 3)), value, rtol=1e-10
    )


@pytest.mark.parametrize(
    "target, message",
    [
        (10, r"out of range.*10 classes"),
        (-1, r"out of range"),
        (torch.tensor([0, 1, 2, 10]), r"out of range"),
        ([0, 1, 2], r"3 targets for a batch of 4"),
        (torch.zeros(5, dtype=torch.long), r"5 targets for a batch of 4"),
    ],
)
def test_bad_target_refused(fashion_analyzer, target, message):
    analyzer, x, _ = fashion_analyzer
    with pytest.raises(ValueError, match=message):
        analyzer(x, target)


# -- 5. refused inputs and models --------------------------------------------------------------


def _small_cnn(channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).eval()


class CallCounter:
    """Counts forward calls of a module (to show that a refusal comes before any work)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


BAD_INPUTS = {
    "nan": (lambda: torch.full((2, 1, 8, 8), float("nan")), ValueError, r"NaN or inf"),
    "inf": (
        lambda: torch.zeros(2, 1, 8, 8).index_fill_(0, torch.tensor([1]), float("inf")),
        ValueError,
        r"NaN or inf \(samples \[1\]\)",
    ),
    "channels": (lambda: torch.zeros(2, 3, 8, 8), ValueError, r"\(2, 3, 8, 8\).*'0'.*\(batch, 1"),
    "ndim": (lambda: torch.zeros(1, 8, 8), ValueError, r"\(1, 8, 8\).*4 dimensions"),
    "integer": (lambda: torch.zeros(2, 1, 8, 8, dtype=torch.long), TypeError, r"floating.*int64"),
    "not a tensor": (lambda: [[0.0]], TypeError, r"floating-point torch.Tensor, got list"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_refused_before_work(case):
    make, error, message = BAD_INPUTS[case]
    model = ct.canonize(_small_cnn())
    analyzer = ct.LRP(model, ct.composites.EpsilonPlusFlat())
    counter = CallCounter(model[0])
    with pytest.raises(error, match=message):
        analyzer(make())
    assert counter.calls == 0


def test_training_mode_refused(fashion_model):
    model = copy.deepcopy(fashion_model).train()
    analyzer = ct.LRP(model, ct.composites.EpsilonPlus())
    counter = CallCounter(model.conv1)
    with pytest.raises(ValueError, match=r"'bn1' \(BatchNorm2d\) is in training mode.*eval\(\)"):
        analyzer(torch.zeros(2, 1, 28, 28))
    assert counter.calls == 0
    # dropout in training mode too
    dropout = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    with pytest.raises(ValueError, match=r"'1' \(Dropout\) is in training mode"):
        ct.LRP(dropout)(torch.zeros(2, 4))


class FunctionalSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = _small_cnn()

    def forward(self, x):
        return torch.softmax(self.features(x), dim=1)


def _softmax_models() -> dict[str, nn.Module]:
    return {
        "sequential": nn.Sequential(*_small_cnn(), nn.Softmax(dim=1)).eval(),
        "functional": FunctionalSoftmax().eval(),
    }


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_softmax_output_refused_naming_strip_softmax(kind):
    model = _softmax_models()[kind]
    with pytest.raises(ValueError, match=r"softmax.*strip_softmax"):
        ct.LRP(model, ct.composites.EpsilonPlus())


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_softmax_output_refused(kind):
    """Whatever the error type, a softmax output is refused when the analyzer is built."""
    with pytest.raises((ValueError, TypeError), match=r"softmax"):
        ct.LRP(_softmax_models()[kind], ct.composites.EpsilonPlus())


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_strip_softmax_gives_logits(kind):
    model = _softmax_models()[kind]
    before = state_snapshot(model)
    stripped = ct.strip_softmax(model)
    assert_unchanged(model, before)
    assert stripped is not model
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        logits = stripped(x)
        assert torch.allclose(logits.softmax(1), model(x), atol=1e-6)
    expl = ct.LRP(ct.canonize(stripped), ct.composites.EpsilonPlus())(x)
    assert expl.relevance.shape == x.shape and torch.isfinite(expl.relevance).all()
    assert torch.allclose(expl.output, logits, atol=1e-6)
    # a model without softmax comes back as an equivalent copy
    again = ct.strip_softmax(stripped)
    assert again is not stripped
    with torch.no_grad():
        assert torch.equal(again(x), logits)


class WithMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(self.conv(x).abs().mean((2, 3)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return torch.sort(self.conv(x), dim=1).values


class WithSort(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(self.block(x).mean((2, 3)))


class WithErf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(torch.erf(self.conv(x)).mean((2, 3)))


class WithModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.shrink = nn.Softshrink()
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(self.shrink(self.conv(x)).mean((2, 3)))


UNSUPPORTED = {
    "method": (WithMethod, r"'abs' \(call_method\)", "register"),
    "function in submodule": (WithSort, r"'sort' \(call_function\) inside 'block'", "register"),
    "function": (WithErf, r"'erf' \(call_function\)", "register_function_op"),
    "module": (WithModule, r"'shrink' of type Softshrink", r"register_module_op\(Softshrink"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_op_refused_with_path_type_and_remedy(case):
    cls, where, how = UNSUPPORTED[case]
    model = cls().eval()
    with pytest.raises(ct.UnsupportedLayerError, match=where) as info:
        ct.LRP(model, ct.composites.EpsilonPlus())
    assert isinstance(info.value, TypeError)
    assert re.search(how, str(info.value))


@pytest.fixture
def private_registry():
    """Registrations made by a test disappear after it."""
    with ops.scoped_ops():
        yield


def test_registering_as_the_error_says_makes_it_work(private_registry):
    x = torch.randn(2, 1, 8, 8)
    ops.register_function_op(torch.erf, ops.ELEMENTWISE)
    expl = ct.LRP(WithErf().eval(), ct.composites.EpsilonPlus())(x)
    assert torch.isfinite(expl.relevance).all()
    ops.register_module_op(nn.Softshrink, ops.ELEMENTWISE)
    expl = ct.LRP(WithModule().eval(), ct.composites.EpsilonPlus())(x)
    assert torch.isfinite(expl.relevance).all()


def test_registrations_in_a_scope_are_gone_after_it():
    with ops.scoped_ops() as registry:
        ops.register_function_op(torch.erf, ops.ELEMENTWISE)
        assert ops.current_ops() is registry and torch.erf in registry.functions
        ct.LRP(WithErf().eval(), ct.composites.EpsilonPlus())
    assert torch.erf not in ops.current_ops().functions
    with pytest.raises(ct.UnsupportedLayerError, match="register_function_op"):
        ct.LRP(WithErf().eval(), ct.composites.EpsilonPlus())


def test_remedy_named_for_unsupported_module_exists():
    with pytest.raises(ct.UnsupportedLayerError) as info:
        ct.LRP(WithModule().eval(), ct.composites.EpsilonPlus())
    for suggested in re.findall(r"\bops\.(\w+)", str(info.value)):
        assert hasattr(ops, suggested), f"the message names ops.{suggested}, which does not exist"


def test_registering_a_method_as_the_error_says_makes_it_work(private_registry):
    with pytest.raises(ct.UnsupportedLayerError, match=r"register_method_op\('abs'"):
        ct.LRP(WithMethod().eval(), ct.composites.EpsilonPlus())
    ops.register_method_op("abs", ops.ELEMENTWISE)
    ct.LRP(WithMethod().eval(), ct.composites.EpsilonPlus())


# -- 6. the caller's model is never modified ---------------------------------------------------


class Hooked(nn.Module):
    """A small model with in-place ReLUs, frozen parameters, hooks and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.linear = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.linear(torch.flatten(self.relu(self.bn(self.conv(x))), 1))


def _hooked_model() -> nn.Module:
    torch.manual_seed(0)
    model = Hooked()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)
        model.bn.bias.uniform_(-1, 1)
    model.conv.weight.requires_grad_(False)
    model.conv.register_forward_hook(lambda m, i, o: None)
    model.linear.register_forward_pre_hook(lambda m, i: None)
    model.register_full_backward_hook(lambda m, gi, go: None)
    return model.eval()


def _caller_model(case: str, fashion_model: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    if case == "hooked":
        return _hooked_model(), torch.randn(2, 1, 8, 8)
    if case == "fashion":
        return fashion_model, torch.rand(2, 1, 28, 28)
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval(), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("case", ["hooked", "fashion", "resnet18"])
def test_callers_model_is_never_modified(fashion_model, case):
    """canonize, strip_softmax, LRP(...) and explaining leave the caller's model alone:
    values, requires_grad flags, hooks, training and in-place flags (``state_snapshot``)."""
    model, x = _caller_model(case, fashion_model)
    before = state_snapshot(model)
    canonized = ct.canonize(model)
    assert_unchanged(model, before)
    stripped = ct.strip_softmax(model)
    assert_unchanged(model, before)
    for subject in (model, canonized, stripped):
        analyzer = ct.LRP(subject, ct.composites.EpsilonPlusFlat())
        assert_unchanged(model, before)
        snapshot = state_snapshot(subject)
        analyzer(x)
        analyzer(x, 1, record=True)
        assert_unchanged(subject, snapshot)  # explaining leaves even the analysed model alone
    assert_unchanged(model, before)
    with torch.no_grad():
        assert rel_err(canonized(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", ["fashion", "resnet18", "vgg11_bn"])
def test_canonize_folds_every_batchnorm_and_keeps_the_function(zoo, fashion_model, name):
    if name == "fashion":
        model, x = fashion_model, torch.rand(4, 1, 28, 28)
    else:
        model = copy.deepcopy(zoo.get(name, calibrated=True)).float()
        x = torch.randn(4, 3, 64, 64)
    canonized = ct.canonize(model)
    assert canonized is not model
    keys = canonized.state_dict().keys()
    assert not [k for k in keys if re.search(r"running_|num_batches_tracked", k)]
    assert not [m for m in canonized.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(keys) < len(model.state_dict())
    shared = {id(p) for p in model.parameters()} & {id(p) for p in canonized.parameters()}
    assert not shared
    with torch.no_grad():
        expected, got = model(x), canonized(x)
    assert rel_err(got, expected) < 1e-5


# -- 7. the FashionMNIST fixture's structure ---------------------------------------------------


def _printed_rules(analyzer) -> dict[str, str]:
    """Layer name -> rule name, parsed from print(analyzer)."""
    rules = {}
    for line in repr(analyzer).splitlines()[1:]:
        _, name, _, rule = line.split(maxsplit=3)
        rules[name] = rule.split("(")[0]
    return rules


def test_fashion_reused_relu_is_three_layers(fashion_model):
    analyzer = ct.LRP(ct.canonize(fashion_model), ct.composites.EpsilonPlusFlat())
    printed = repr(analyzer)
    for name in ("relu", "relu#2", "relu#3"):
        assert re.search(rf"^\s+\d+\s+{re.escape(name)}\s+ReLU\s+PassRule", printed, re.M), printed
    assert "relu#4" not in printed
    rules = _printed_rules(analyzer)
    assert list(rules).index("relu") < list(rules).index("relu#2") < list(rules).index("relu#3")


@pytest.mark.parametrize("preset", ["EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox"])
def test_fashion_first_layer_rule_on_both_input_readers(fashion_model, preset):
    first = "ZBoxRule" if preset == "EpsilonGammaBox" else "FlatRule"
    rest = {"EpsilonPlusFlat": "ZPlusRule", "EpsilonAlpha2Beta1Flat": "AlphaBetaRule"}
    analyzer = ct.LRP(ct.canonize(fashion_model), ours_composite(preset, torch.rand(1, 1, 28, 28)))
    rules = _printed_rules(analyzer)
    assert rules["conv1"] == first and rules["parallel.0"] == first
    assert rules["conv2"] == rest.get(preset, "GammaRule")
    assert rules["linear1"] == rules["linear2"] == "EpsilonRule"
    assert rules["pool"] == "PassRule"
    assert [r for n, r in rules.items() if n.endswith("add")] == ["EpsilonRule"]
