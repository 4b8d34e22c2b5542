"""Composites (GUIDE s.3): what each primitive assigns, override order, the analyzer's
printout, refusal of layers left without a rule, per-call entries for a reused module, the
rules of each preset (assignment, and end to end against zennit 0.4.6's presets), the routing
primitive in the repr, op kinds checked, and preset parameters (also in the configs)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import zennit.composites as zc
from torch import Tensor, nn

import crp_toolkit as ct
from crp_toolkit.engine import ops
from crp_toolkit.engine.composites import (
    Composite,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    FirstLayerMap,
    FirstNTypeMap,
    GlobalMap,
    LastLayerMap,
    NameMap,
    RangeMap,
    Routing,
    TypeMap,
)
from crp_toolkit.engine.rules import (
    AlphaBetaRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    PassRule,
    Rule,
    ZBoxRule,
    ZPlusRule,
)

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class TwoBranch(nn.Module):
    """Shaped like the FashionMNIST fixture: two branches read x (conv1 and parallel.0), one
    ReLU instance is called three times.

    Layers: 0 conv1, 1 relu, 2 conv2, 3 parallel.0, 4 add, 5 relu#2, 6 pool, 7 flatten,
    8 linear1, 9 relu#3, 10 linear2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.parallel = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.linear1 = nn.Linear(4 * 3 * 3, 8)
        self.linear2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        main = self.conv2(self.relu(self.conv1(x)))
        h = self.pool(self.relu(main + self.parallel(x)))
        return self.linear2(self.relu(self.linear1(torch.flatten(h, 1))))


class TwoBranchSeparateReLUs(TwoBranch):
    """The same computation with one ReLU module per call."""

    def __init__(self) -> None:
        super().__init__()
        self.r2, self.r3 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        main = self.conv2(self.relu(self.conv1(x)))
        h = self.pool(self.r2(main + self.parallel(x)))
        return self.linear2(self.r3(self.linear1(torch.flatten(h, 1))))


class AllKinds(nn.Module):
    """One layer of every kind a preset has to cover (BatchNorm left un-canonized)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU()
        self.conv2 = nn.ConvTranspose2d(3, 3, 3, padding=1)
        self.maxpool = nn.MaxPool2d(2)
        self.avgpool = nn.AvgPool2d(2)
        self.linear1 = nn.Linear(24, 4)
        self.drop = nn.Dropout()
        self.act2 = nn.Tanh()
        self.linear2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(self.bn(self.conv1(x)))
        b = self.conv2(a)
        h = torch.cat([self.maxpool(a + b), self.avgpool(b)], dim=1)
        return self.linear2(self.act2(self.drop(self.linear1(torch.flatten(h, 1)))))


def rules_by_name(an: ct.LRP) -> dict[str, Rule]:
    return {layer.name: rule for layer, rule in zip(an.graph.layers, an.rules)}


def analyzer(model: nn.Module, *primitives) -> ct.LRP:
    return ct.LRP(model.eval(), Composite(*primitives))


E = EpsilonRule(0.125)  # a base rule for everything weighted, told apart by identity


@pytest.fixture(scope="module")
def two_branch() -> TwoBranch:
    torch.manual_seed(0)
    return TwoBranch().eval()


def test_two_branch_layer_names(two_branch: TwoBranch) -> None:
    names = ct.LRP(two_branch, Composite(GlobalMap(E))).graph.names()
    assert names == [
        "conv1",
        "relu",
        "conv2",
        "parallel.0",
        "add",
        "relu#2",
        "pool",
        "flatten",
        "linear1",
        "relu#3",
        "linear2",
    ]


# -- primitives ------------------------------------------------------------------------------
def test_global_map_reaches_weighted_layers_only(two_branch: TwoBranch) -> None:
    got = rules_by_name(analyzer(two_branch, GlobalMap(E)))
    weighted = {"conv1", "conv2", "parallel.0", "add", "linear1", "linear2"}
    assert {n for n, r in got.items() if r is E} == weighted
    assert all(isinstance(r, PassRule) for n, r in got.items() if n not in weighted)


def test_type_map_by_class(two_branch: TwoBranch) -> None:
    conv, dense = ZPlusRule(), EpsilonRule(0.5)
    got = rules_by_name(
        analyzer(two_branch, GlobalMap(E), TypeMap({nn.Conv2d: conv, nn.Linear: dense}))
    )
    assert [n for n, r in got.items() if r is conv] == ["conv1", "conv2", "parallel.0"]
    assert [n for n, r in got.items() if r is dense] == ["linear1", "linear2"]
    assert got["add"] is E
    relu = PassRule()
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), TypeMap({nn.ReLU: relu})))
    assert [n for n, r in got.items() if r is relu] == ["relu", "relu#2", "relu#3"]


class MyConv(nn.Conv2d):
    """A user subclass of a torch.nn layer (defined outside torch.nn)."""


def test_type_map_by_class_matches_subclasses() -> None:
    model = nn.Sequential(MyConv(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    conv = ZPlusRule()
    got = rules_by_name(analyzer(model, GlobalMap(E), TypeMap({nn.Conv2d: conv})))
    assert got["0"] is conv and got["2"] is E


def test_type_map_by_kind(two_branch: TwoBranch) -> None:
    conv, dense, add, pool = ZPlusRule(), EpsilonRule(0.5), EpsilonRule(0.25), PassRule()
    got = rules_by_name(
        analyzer(two_branch, TypeMap({"conv": conv, "linear": dense, "add": add, "maxpool": pool}))
    )
    assert [n for n, r in got.items() if r is conv] == ["conv1", "conv2", "parallel.0"]
    assert [n for n, r in got.items() if r is dense] == ["linear1", "linear2"]
    assert [n for n, r in got.items() if r is add] == ["add"]
    assert [n for n, r in got.items() if r is pool] == ["pool"]


def test_name_map_regex_in_full(two_branch: TwoBranch) -> None:
    a, b = ZPlusRule(), FlatRule()
    got = rules_by_name(
        analyzer(two_branch, GlobalMap(E), NameMap({r"conv\d": a, r"parallel\.0": b}))
    )
    assert [n for n, r in got.items() if r is a] == ["conv1", "conv2"]
    assert [n for n, r in got.items() if r is b] == ["parallel.0"]
    # matched in full: "conv" names no layer, "linear" neither
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), NameMap({"conv": a, "linear": a})))
    assert all(r is not a for r in got.values())
    # within one NameMap the first matching pattern wins
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), NameMap({"conv1": a, "conv.*": b})))
    assert got["conv1"] is a and got["conv2"] is b


def test_range_map(two_branch: TwoBranch) -> None:
    conv, add = ZPlusRule(), EpsilonRule(0.5)
    got = rules_by_name(
        analyzer(two_branch, GlobalMap(E), RangeMap(range(2, 5), {"conv": conv, "add": add}))
    )
    assert [n for n, r in got.items() if r is conv] == ["conv2", "parallel.0"]
    assert [n for n, r in got.items() if r is add] == ["add"]
    assert got["conv1"] is E
    # a bare rule goes to every layer in the range
    gamma = GammaRule()
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), RangeMap(range(2, 4), gamma)))
    assert [n for n, r in got.items() if r is gamma] == ["conv2", "parallel.0"]


def test_first_layer_map_takes_every_layer_reading_the_input(two_branch: TwoBranch) -> None:
    flat = FlatRule()
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), FirstLayerMap(flat)))
    assert [n for n, r in got.items() if r is flat] == ["conv1", "parallel.0"]
    # a type map restricts it: no dense layer reads the input here
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), FirstLayerMap({"linear": flat})))
    assert all(r is not flat for r in got.values())


def test_first_layer_map_looks_through_parameter_free_layers() -> None:
    model = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    flat = FlatRule()
    got = rules_by_name(analyzer(model, GlobalMap(E), FirstLayerMap(flat)))
    assert [n for n, r in got.items() if r is flat] == ["2"]


def test_last_layer_map(two_branch: TwoBranch) -> None:
    last = EpsilonRule(0.0)
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), LastLayerMap(last)))
    assert [n for n, r in got.items() if r is last] == ["linear2"]


def test_first_n_type_map(two_branch: TwoBranch) -> None:
    conv, dense = ZPlusRule(), EpsilonRule(0.5)
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), FirstNTypeMap(2, {"conv": conv})))
    assert [n for n, r in got.items() if r is conv] == ["conv1", "conv2"]
    got = rules_by_name(
        analyzer(two_branch, GlobalMap(E), FirstNTypeMap(3, {"conv": conv, nn.Linear: dense}))
    )
    assert [n for n, r in got.items() if r is conv] == ["conv1", "conv2", "parallel.0"]
    assert all(r is not dense for r in got.values())
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), FirstNTypeMap(1, {nn.Linear: dense})))
    assert [n for n, r in got.items() if r is dense] == ["linear1"]


def test_later_primitives_override_earlier(two_branch: TwoBranch) -> None:
    a, b = ZPlusRule(), GammaRule()
    got = rules_by_name(
        analyzer(two_branch, GlobalMap(E), TypeMap({"conv": a}), NameMap({"conv2": b}))
    )
    assert got["conv1"] is a and got["conv2"] is b and got["parallel.0"] is a
    got = rules_by_name(
        analyzer(two_branch, GlobalMap(E), NameMap({"conv2": b}), TypeMap({"conv": a}))
    )
    assert got["conv2"] is a
    # routing defaults (PassRule on activations) are overridden too
    relu2 = PassRule()
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), NameMap({"relu#2": relu2})))
    assert got["relu#2"] is relu2 and got["relu"] is not relu2 and got["relu#3"] is not relu2
    # FirstLayerMap, LastLayerMap after GlobalMap; GlobalMap last wipes them again
    flat = FlatRule()
    got = rules_by_name(analyzer(two_branch, GlobalMap(E), FirstLayerMap(flat), LastLayerMap(a)))
    assert got["conv1"] is flat and got["linear2"] is a
    got = rules_by_name(analyzer(two_branch, FirstLayerMap(flat), LastLayerMap(a), GlobalMap(E)))
    assert got["conv1"] is E and got["linear2"] is E


def test_repr_lists_every_layer_with_its_rule(two_branch: TwoBranch) -> None:
    an = ct.LRP(two_branch, EpsilonPlusFlat())
    text = repr(an)
    lines = text.splitlines()[1:]
    assert len(lines) == len(an.graph.layers)
    for line, layer, rule in zip(lines, an.graph.layers, an.rules):
        assert layer.name in line.split() and repr(rule) in line, line
    assert "FlatRule" in next(line for line in lines if "parallel.0" in line.split())


def test_layer_without_rule_is_refused_with_its_name(two_branch: TwoBranch) -> None:
    composite = Composite(NameMap({"conv1": EpsilonRule(), "parallel.0": EpsilonRule()}))
    with pytest.raises(ct.UnsupportedLayerError, match=r"'conv2' \(Conv2d") as err:
        ct.LRP(two_branch, composite)
    assert "NameMap" in str(err.value) or "TypeMap" in str(err.value)  # says how to add one


def test_reused_module_gets_one_entry_per_call(two_branch: TwoBranch) -> None:
    an = ct.LRP(two_branch, EpsilonPlus())
    relus = [
        (layer.name, layer.index) for layer in an.graph.layers if layer.module is two_branch.relu
    ]
    assert relus == [("relu", 1), ("relu#2", 5), ("relu#3", 9)]
    assert all(isinstance(an.rules[i], PassRule) for _, i in relus)
    # the reused instance explains like three separate ones
    model = copy.deepcopy(two_branch).to(DT)
    separate = TwoBranchSeparateReLUs().to(DT).eval()
    separate.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    x = torch.randn(3, 1, 6, 6, dtype=DT)
    got = ct.LRP(model, EpsilonPlus())(x, 1).relevance
    want = ct.LRP(separate, EpsilonPlus())(x, 1).relevance
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# -- presets ---------------------------------------------------------------------------------
ROUTED = {"bn": PassRule, "act": PassRule, "maxpool": PassRule, "cat": PassRule}
ROUTED |= {"flatten": PassRule, "drop": PassRule, "act2": PassRule}


def _assert_base(got: dict[str, Rule]) -> None:
    """All presets: dense, sum and average pooling -> Epsilon; routing layers -> Pass."""
    for name in ("linear1", "linear2", "add", "avgpool"):
        assert type(got[name]) is EpsilonRule, name
    for name, cls in ROUTED.items():
        assert type(got[name]) is cls, name


@pytest.mark.parametrize(
    "preset, conv1, conv2",
    [
        (EpsilonPlus, ZPlusRule, ZPlusRule),
        (EpsilonPlusFlat, FlatRule, ZPlusRule),
        (EpsilonAlpha2Beta1, AlphaBetaRule, AlphaBetaRule),
        (EpsilonAlpha2Beta1Flat, FlatRule, AlphaBetaRule),
        (lambda: EpsilonGammaBox(-1.0, 2.0), ZBoxRule, GammaRule),
    ],
    ids=["EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "Box"],
)
def test_preset_assigns_the_guide_rules(preset, conv1, conv2) -> None:
    got = rules_by_name(ct.LRP(AllKinds().eval(), preset()))
    assert set(got) == {"conv1", "conv2", "add", "avgpool", "linear1", "linear2", *ROUTED}
    _assert_base(got)
    assert type(got["conv1"]) is conv1 and type(got["conv2"]) is conv2
    for rule in got.values():
        if isinstance(rule, AlphaBetaRule):
            assert (rule.alpha, rule.beta) == (2.0, 1.0)
        if isinstance(rule, GammaRule):
            assert rule.gamma == 0.25
        if isinstance(rule, ZBoxRule):
            assert (rule.low, rule.high) == (-1.0, 2.0)
        if isinstance(rule, EpsilonRule):
            assert rule.stabilizer == 1e-6


@pytest.mark.parametrize(
    "preset, first",
    [
        (EpsilonPlusFlat, FlatRule),
        (EpsilonAlpha2Beta1Flat, FlatRule),
        (lambda: EpsilonGammaBox(0.0, 1.0), ZBoxRule),
    ],
    ids=["EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat", "Box"],
)
def test_preset_first_layer_rule_on_every_branch(two_branch: TwoBranch, preset, first) -> None:
    got = rules_by_name(ct.LRP(two_branch, preset()))
    assert type(got["conv1"]) is first and type(got["parallel.0"]) is first
    assert type(got["conv2"]) is not first


def test_flat_presets_flatten_a_first_dense_layer() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    for preset in (EpsilonPlusFlat, EpsilonAlpha2Beta1Flat):
        got = rules_by_name(ct.LRP(mlp, preset()))
        assert type(got["1"]) is FlatRule and type(got["3"]) is EpsilonRule
    # EpsilonGammaBox's box rule is for the first conv: a first dense layer stays Epsilon
    got = rules_by_name(ct.LRP(mlp, EpsilonGammaBox(0.0, 1.0)))
    assert type(got["1"]) is EpsilonRule


class Chain(nn.Module):
    """A plain chain with distinct ReLU modules (zennit's hooks are per module)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 5, 1),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (EpsilonPlus, zc.EpsilonPlus),
        (EpsilonPlusFlat, zc.EpsilonPlusFlat),
        (EpsilonAlpha2Beta1, zc.EpsilonAlpha2Beta1),
        (EpsilonAlpha2Beta1Flat, zc.EpsilonAlpha2Beta1Flat),
        (lambda: EpsilonGammaBox(-2.0, 2.5), lambda: zc.EpsilonGammaBox(-2.0, 2.5)),
    ],
    ids=["EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "Box"],
)
def test_preset_matches_zennit_on_a_chain(ours, theirs) -> None:
    torch.manual_seed(0)
    model = Chain().to(DT).eval()
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            with torch.no_grad():
                m.bias.normal_(0.0, 0.3)
    x = torch.randn(3, 2, 8, 8, dtype=DT)
    target = torch.tensor([0, 2, 1])
    got = ct.LRP(model, ours())(x, target).relevance
    xg = x.clone().requires_grad_()
    with theirs().context(model) as modified:
        out = modified(xg)
        (want,) = torch.autograd.grad(out, xg, torch.eye(3, dtype=DT)[target])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


# -- routing, checked kinds, preset parameters -----------------------------------------------
def test_composite_repr_starts_with_the_routing_primitive() -> None:
    for composite in (EpsilonPlus(), Composite(GlobalMap(E))):
        lines = repr(composite).splitlines()
        assert lines[1].strip().startswith("Routing(") and "'maxpool': PassRule()" in lines[1]
        assert repr(composite) == repr(copy.deepcopy(composite))  # deterministic: an identity
    assert "GlobalMap(rule=EpsilonRule(stabilizer=0.125))" in repr(Composite(GlobalMap(E)))


def test_routing_can_be_replaced() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    relu = PassRule()
    composite = Composite(GlobalMap(E), routing=Routing({nn.ReLU: relu}))
    assert rules_by_name(ct.LRP(model, composite))["1"] is relu
    assert "Routing(rules={<class 'torch.nn.modules.activation.ReLU'>" in repr(composite)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TypeMap({"Conv": ZPlusRule()}),
        lambda: FirstNTypeMap(1, {"dense": EpsilonRule()}),
        lambda: FirstLayerMap({"convolution": FlatRule()}),
        lambda: RangeMap(range(3), {"Linear": EpsilonRule()}),
    ],
    ids=["TypeMap", "FirstNTypeMap", "FirstLayerMap", "RangeMap"],
)
def test_unknown_kind_is_refused_naming_the_known_ones(make) -> None:
    with pytest.raises(ValueError, match=r"unknown op kind.*known kinds: .*conv.*linear"):
        make()


def test_a_registered_kind_is_known_in_its_scope_only() -> None:
    with ops.scoped_ops():
        ops.register_module_op(nn.Softshrink, ops.Op("shrink", elementwise=True))
        model = nn.Sequential(nn.Linear(3, 3), nn.Softshrink(), nn.Linear(3, 2)).eval()
        shrink = PassRule()
        got = rules_by_name(ct.LRP(model, Composite(GlobalMap(E), TypeMap({"shrink": shrink}))))
        assert got["1"] is shrink
    with pytest.raises(ValueError, match="'shrink'"):
        TypeMap({"shrink": PassRule()})


def test_preset_parameters_reach_the_rules_and_the_repr() -> None:
    presets = [
        (EpsilonPlus, EpsilonPlus(epsilon=0.5, stabilizer=0.25)),
        (EpsilonPlusFlat, EpsilonPlusFlat(epsilon=0.5, stabilizer=0.25)),
        (EpsilonAlpha2Beta1, EpsilonAlpha2Beta1(epsilon=0.5, stabilizer=0.25)),
        (EpsilonAlpha2Beta1Flat, EpsilonAlpha2Beta1Flat(epsilon=0.5, stabilizer=0.25)),
        (lambda: EpsilonGammaBox(0.0, 1.0), EpsilonGammaBox(0.0, 1.0, 0.5, 0.5, 0.25)),
    ]
    for default, changed in presets:
        assert repr(changed) != repr(default())
        got = rules_by_name(ct.LRP(AllKinds().eval(), changed))
        for name in ("linear1", "linear2", "add", "avgpool"):
            assert got[name].stabilizer == 0.5, name
        assert got["conv1"].stabilizer == got["conv2"].stabilizer == 0.25
        assert getattr(got["conv2"], "gamma", 0.5) == 0.5


def test_preset_configs_expose_the_parameters_with_todays_defaults() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    folder = Path(ct.__file__).parent / "conf" / "composite"
    for path in sorted(folder.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert cfg.epsilon == 1e-6 and cfg.stabilizer == 1e-6, path.name
        cls = type(instantiate(cfg))
        bounds = [cfg.low, cfg.high] if cls is EpsilonGammaBox else []
        assert repr(instantiate(cfg)) == repr(cls(*bounds)), path.name
