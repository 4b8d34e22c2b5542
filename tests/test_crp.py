"""Concept Relevance Propagation: semantics of GUIDE s.4, against zennit-crp 0.6.0 and
analytic cases, linearity on whole models, concept types and the attribution graph."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from crp.attribution import CondAttribution as ZennitCondAttribution
from reference import ZennitCrpCase, ZennitFashion
from torch import nn
from zennit.composites import EpsilonPlus as ZennitEpsilonPlus

import crp_toolkit as ct
from crp_toolkit.engine.composites import Composite, GlobalMap
from crp_toolkit.engine.rules import EpsilonRule, ZeroRule


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def fashion_setup(fashion_model, fashion_data):
    model = ct.canonize(fashion_model).double()
    x = fashion_data[0][:4].double()
    analyzer = ct.LRP(model, ct.composites.EpsilonPlus(), normalize_output_relevance=False)
    return model, x, analyzer


CONDITIONS = {
    "conv2": [{"y": 1, "conv2": [3, 2, 1]}],
    "parallel": [{"y": 2, "parallel.0": [0, 5]}],
    "both": [{"y": 2, "linear1": [3, 4], "conv2": [5]}],
    "conv2-and-parallel": [{"y": 7, "conv2": [1, 9], "parallel.0": [4]}],
    "all-conv2-channels": [{"y": 0, "conv2": [c]} for c in range(16)],
    "per-sample": [{"y": y, "conv2": [1]} for y in (0, 3, 5, 9)],
}


@pytest.mark.parametrize("exclude_parallel", [True, False])
@pytest.mark.parametrize("case", list(CONDITIONS))
def test_conditional_heatmaps_match_zennit_crp(fashion_setup, case, exclude_parallel):
    model, x, analyzer = fashion_setup
    conditions = CONDITIONS[case]
    if case == "conv2-and-parallel" and exclude_parallel:  # refused, as zennit-crp does
        with pytest.raises(ValueError, match="must lie on one path"):
            ct.CondAttribution(analyzer)(x, conditions)
        return
    layers = ["conv2", "parallel.0", "linear1"]
    zennit = ZennitCondAttribution(ZennitFashion(copy.deepcopy(model)))
    prefixed = [{k if k == "y" else f"m.{k}": v for k, v in c.items()} for c in conditions]
    theirs = zennit(
        x.clone().requires_grad_(),
        prefixed,
        ZennitEpsilonPlus(),
        record_layer=[f"m.{name}" for name in layers],
        exclude_parallel=exclude_parallel,
    )
    ours = ct.CondAttribution(analyzer)(
        x, conditions, record=layers, exclude_parallel=exclude_parallel
    )
    assert ours.heatmaps.shape == theirs.heatmap.shape
    assert rel_err(ours.heatmaps, theirs.heatmap) < 1e-5
    conditioned = {k for c in conditions for k in c}
    for name in layers:
        if name in conditioned:
            continue  # zennit-crp records post-mask (and twice with exclude_parallel)
        if f"m.{name}" in theirs.relevances:
            assert rel_err(ours.relevances[name], theirs.relevances[f"m.{name}"]) < 1e-5


def test_recorded_relevance_is_pre_mask(fashion_setup):
    """zennit-crp records after the mask under torch 2; ours before, so ours * mask = theirs."""
    model, x, analyzer = fashion_setup
    ours = ct.CondAttribution(analyzer)(
        x, [{"y": 1, "conv2": [3, 2]}], record=["conv2"], exclude_parallel=False
    )
    zennit = ZennitCondAttribution(ZennitFashion(copy.deepcopy(model)))
    theirs = zennit(
        x.clone().requires_grad_(),
        [{"y": 1, "m.conv2": [3, 2]}],
        ZennitEpsilonPlus(),
        record_layer=["m.conv2"],
        exclude_parallel=False,
    )
    mask = torch.zeros(16, 1, 1, dtype=x.dtype)
    mask[[3, 2]] = 1
    assert rel_err(ours.relevances["conv2"] * mask, theirs.relevances["m.conv2"]) < 1e-10
    unconditional = analyzer(x, 1, record=["conv2"]).relevances["conv2"]
    assert rel_err(ours.relevances["conv2"], unconditional) < 1e-12


def test_analytic_case_from_zennit_crp():
    model = ZennitCrpCase().double()
    x = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    analyzer = ct.LRP(model, Composite(GlobalMap(ZeroRule())), normalize_output_relevance=False)
    attribution = ct.CondAttribution(analyzer)
    full = attribution(x, [{"y": 0}], record=["layer1", "layer2"])
    torch.testing.assert_close(full.relevance[0], torch.tensor([-11.0, 21.0], dtype=x.dtype))
    torch.testing.assert_close(
        full.relevances["layer1"][0], torch.tensor([1.0, 4.0], dtype=x.dtype)
    )
    torch.testing.assert_close(
        full.relevances["layer2"][0], torch.tensor([5.0, 0.0], dtype=x.dtype)
    )
    cond = attribution(x, [{"y": 0, "layer1": [0], "layer2": []}], exclude_parallel=False)
    torch.testing.assert_close(cond.relevance[0], torch.tensor([-1.0, 2.0], dtype=x.dtype))


def test_parallel_conditions_with_exclude_parallel_are_refused():
    analyzer = ct.LRP(ZennitCrpCase(), Composite(GlobalMap(EpsilonRule())))
    with pytest.raises(ValueError, match="one path"):
        ct.CondAttribution(analyzer)(torch.ones(1, 2), [{"y": 0, "layer1": [0], "layer2": [1]}])


def test_exclude_parallel_drops_the_bypass(fashion_setup):
    """Through conv2 only (exclude) + through parallel.0 only = everything (unconditional)."""
    _, x, analyzer = fashion_setup
    attribution = ct.CondAttribution(analyzer)
    main = attribution(x[:1], [{"y": 0, "conv2": list(range(16))}])
    bypass = attribution(x[:1], [{"y": 0, "parallel.0": list(range(16))}])
    full = analyzer(x[:1], 0).relevance
    torch.testing.assert_close(main.relevance + bypass.relevance, full)
    kept = attribution(x[:1], [{"y": 0, "conv2": list(range(16))}], exclude_parallel=False)
    torch.testing.assert_close(kept.relevance, full)


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random-weight models have vanishing signals; set BatchNorm statistics from data."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def cut_layers(graph, kinds=("conv", "activation")) -> list[str]:
    """Layers that every path from input to output passes through: nothing computed before
    the layer is read after it."""
    cuts = []
    for layer in graph.layers:
        after = graph.descendants(layer.index)
        before = graph.ancestors(layer.index)
        reads = {i for j in after for i in graph.layers[j].inputs}
        spans = len(before) + len(after) + 1 == len(graph.layers)
        if layer.kind in kinds and spans and reads <= after | {layer.index}:
            cuts.append(layer.name)
    return cuts


ARCHITECTURES = {
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_channel_heatmaps_sum_to_the_unconditional_heatmap(arch):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    model = ct.canonize(
        calibrated(ARCHITECTURES[arch]().double(), torch.randn(4, 3, 32, 32).double())
    )
    analyzer = ct.LRP(model, ct.composites.EpsilonPlusFlat())
    cuts = cut_layers(analyzer.graph)
    layer = cuts[len(cuts) // 2]
    channels = ct.concept_relevances(analyzer, x, [layer])[layer].shape[1]
    crp = ct.CRP(analyzer, layer, ct.IndexedFeatures(*range(channels)))
    expl = crp(x)
    full = analyzer(x).relevance
    assert expl.relevance.shape == (1, channels, *x.shape[1:])
    assert rel_err(expl.relevance.sum(1), full) < 1e-8


def test_linearity_on_the_fashion_model(fashion_setup):
    _, x, analyzer = fashion_setup
    for layer in ("linear1", "relu#2"):
        n = 120 if layer == "linear1" else 16
        heat = ct.CondAttribution(analyzer)(x[:2], [{"y": 3, layer: [c]} for c in range(n)])
        summed = heat.relevance.reshape(2, n, *x.shape[1:]).sum(1)
        assert rel_err(summed, analyzer(x[:2], 3).relevance) < 1e-10


def test_top_n_features_pick_the_most_relevant_channels(fashion_setup):
    _, x, analyzer = fashion_setup
    expl = ct.CRP(analyzer, "conv2", ct.TopNFeatures(4))(x)
    scores = ct.concept_relevances(analyzer, x, ["conv2"])["conv2"]
    assert expl.features.shape == (4, 4)
    torch.testing.assert_close(expl.features, scores.topk(4, dim=1).indices)
    # each heatmap is the conditional heatmap of that sample and channel
    one = ct.CondAttribution(analyzer)(
        x[1:2], [{"y": int(expl.target[1]), "conv2": [int(expl.features[1, 2])]}]
    )
    torch.testing.assert_close(expl.relevance[1, 2], one.relevance[0])


def test_indexed_features_and_chunking_agree(fashion_setup):
    _, x, analyzer = fashion_setup
    a = ct.CRP(analyzer, "conv2", ct.IndexedFeatures(1, 2, 10))(x, 3)
    b = ct.CRP(analyzer, "conv2", ct.IndexedFeatures(1, 2, 10), memory_budget=1)(x, 3)
    assert a.features.tolist() == [[1, 2, 10]] * 4
    torch.testing.assert_close(a.relevance, b.relevance)
    assert (a.target == 3).all()


def test_results_come_in_the_order_given(fashion_setup):
    _, x, analyzer = fashion_setup
    attribution = ct.CondAttribution(analyzer)
    conditions = [{"y": 1, "conv2": [4]}, {"y": 2, "parallel.0": [1]}, {"y": 3}]
    together = attribution(x[:2], conditions)
    assert together.relevance.shape == (6, *x.shape[1:])  # sample-major: 2 samples x 3 conditions
    for row in range(6):
        sample, cond = divmod(row, 3)
        alone = attribution(x[sample : sample + 1], [conditions[cond]])
        torch.testing.assert_close(together.relevance[row], alone.relevance[0])
    paired = attribution(x[:3], conditions)  # as many conditions as samples: paired up
    for row in range(3):
        alone = attribution(x[row : row + 1], [conditions[row]])
        torch.testing.assert_close(paired.relevance[row], alone.relevance[0])


def test_every_analyzer_answers_in_one_vocabulary(fashion_setup):
    """LRP, CRP and CondAttribution results are Explanations: the same names mean the same
    things (relevance, heatmaps over the input's channels, relevances/activations of
    recorded layers, output and target per row), whichever analyzer made them."""
    _, x, analyzer = fashion_setup
    lrp = ct.analyze(x, analyzer, 3, record=["conv2", "linear1"])
    crp_analyzer = ct.CRP(analyzer, "conv2", ct.IndexedFeatures(1, 6))
    crp = ct.analyze(x, crp_analyzer, 3, record=["conv1", "conv2"])
    conditions = [{"y": 3, "conv2": [c]} for c in (1, 6)]
    cond = ct.analyze(x, ct.CondAttribution(analyzer), conditions=conditions, record=["conv1"])
    for result in (lrp, crp, cond):
        assert isinstance(result, ct.Explanation)
    assert lrp.heatmaps.shape == (4, 28, 28)
    assert crp.heatmaps.shape == (4, 2, 28, 28) and cond.heatmaps.shape == (8, 28, 28)
    torch.testing.assert_close(lrp.heatmaps, lrp.relevance.sum(1))
    # rows: CondAttribution is sample-major; CRP is (sample, feature)
    torch.testing.assert_close(cond.heatmaps.reshape(4, 2, 28, 28), crp.heatmaps)
    torch.testing.assert_close(
        cond.relevances["conv1"].reshape(4, 2, *crp.relevances["conv1"].shape[2:]),
        crp.relevances["conv1"],
    )
    torch.testing.assert_close(crp.activations["conv1"], lrp_activation(analyzer, x, "conv1"))
    assert cond.sample.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and (cond.target == 3).all()
    torch.testing.assert_close(cond.output, lrp.output[cond.sample])
    assert (crp.target == 3).all() and (lrp.target == 3).all()
    # relevance recorded at the conditioned layer is before its mask: the unconditional one
    torch.testing.assert_close(crp.relevances["conv2"][:, 1], lrp.relevances["conv2"])


def lrp_activation(analyzer, x, layer):
    return analyzer(x, record=[layer]).activations[layer]


def test_a_pass_stopped_above_the_input_has_no_heatmaps(fashion_setup):
    _, x, analyzer = fashion_setup
    short = analyzer(x, record=["linear1"], to_input=False)
    with pytest.raises(ValueError, match="to_input=True"):
        _ = short.heatmaps


def test_neuron_concepts_sum_to_their_channel(fashion_setup):
    _, x, analyzer = fashion_setup
    neurons = ct.CondAttribution(analyzer, {"conv2": ct.NeuronConcept()})
    channel = 5
    ids = list(range(channel * 144, (channel + 1) * 144))  # conv2 output is 16 x 12 x 12
    per_neuron = neurons(x[:1], [{"y": 2, "conv2": [i]} for i in ids])
    whole = ct.CondAttribution(analyzer)(x[:1], [{"y": 2, "conv2": [channel]}])
    torch.testing.assert_close(per_neuron.relevance.sum(0), whole.relevance[0])


def test_direction_concepts_decompose_exactly(fashion_setup):
    _, x, analyzer = fashion_setup
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64)).Q  # spans channel space
    directions = ct.CondAttribution(analyzer, {"conv2": ct.DirectionConcept(basis)})
    parts = directions(x[:1], [{"y": 4, "conv2": [k]} for k in range(16)])
    channels = ct.CondAttribution(analyzer)(x[:1], [{"y": 4, "conv2": list(range(16))}])
    torch.testing.assert_close(parts.relevance.sum(0), channels.relevance[0])
    identity = ct.CondAttribution(
        analyzer, {"conv2": ct.DirectionConcept(torch.eye(16, dtype=torch.float64))}
    )
    as_channel = identity(x[:1], [{"y": 4, "conv2": [7]}])
    torch.testing.assert_close(
        as_channel.relevance,
        ct.CondAttribution(analyzer)(x[:1], [{"y": 4, "conv2": [7]}]).relevance,
    )


def test_start_layer_with_initial_relevance(fashion_setup):
    _, x, analyzer = fashion_setup
    attribution = ct.CondAttribution(analyzer)
    recorded = attribution(x[:2], [{"y": 6}], record=["linear1"]).relevances["linear1"]
    restarted = attribution(x[:2], [{"conv2": [2]}], start_layer="linear1", init_rel=recorded)
    direct = attribution(x[:2], [{"y": 6, "conv2": [2]}])
    torch.testing.assert_close(restarted.relevance, direct.relevance)


def test_bad_conditions_get_clear_errors(fashion_setup):
    _, x, analyzer = fashion_setup
    with pytest.raises(KeyError, match="Valid layer names: conv1"):
        ct.CRP(analyzer, "conv9", ct.TopNFeatures(3))
    with pytest.raises(ValueError, match="more concepts than layer 'conv2' has"):
        ct.CRP(analyzer, "conv2", ct.TopNFeatures(17))(x)
    with pytest.raises(ValueError, match="out of range"):
        ct.CRP(analyzer, "conv2", ct.IndexedFeatures(3, 16))(x)
    with pytest.raises(ValueError, match="out of range"):
        ct.CondAttribution(analyzer)(x, [{"y": 0, "conv2": [99]}])
    with pytest.raises(ValueError, match="'y'"):
        ct.CondAttribution(analyzer)(x, [{"conv2": [1]}])
    with pytest.raises(ValueError, match="out of range"):
        ct.CondAttribution(analyzer)(x, [{"y": 10}])


def test_concept_relevance_vectors(fashion_setup):
    _, x, analyzer = fashion_setup
    raw = ct.concept_relevances(analyzer, x, ["conv2", "linear1"])
    normed = ct.concept_relevances(analyzer, x, ["conv2", "linear1"], abs_norm=True)
    assert raw["conv2"].shape == (4, 16) and raw["linear1"].shape == (4, 120)
    torch.testing.assert_close(normed["conv2"].abs().sum(1), torch.ones(4, dtype=x.dtype))
    torch.testing.assert_close(
        normed["conv2"], raw["conv2"] / raw["conv2"].abs().sum(1, keepdim=True)
    )
    layer = analyzer(x, record=["linear1"]).relevances["linear1"]
    torch.testing.assert_close(raw["linear1"], layer)


def test_attribution_graph_follows_the_model_graph(fashion_setup):
    _, x, analyzer = fashion_setup
    graph = ct.attribution_graph(analyzer, x[:1], "linear1", 5, widths=(2, 2))
    children = {child.layer for child, _ in graph.children(graph.root)}
    assert children == {"conv2", "parallel.0"}  # both branches feed linear1
    assert len(graph.nodes) == len(set(graph.nodes))
    grandchildren = {
        c.layer for node, _ in graph.children(graph.root) for c, _ in graph.children(node)
    }
    assert grandchildren == {"conv1"}  # parallel.0 reads the input: a leaf
    # the edge fraction is the child's conditional relevance over the parent's
    parent_rel = graph.relevance[graph.root]
    child, fraction = graph.children(graph.root)[0]
    cond = ct.CondAttribution(analyzer)(
        x[:1], [{"y": graph.target, "linear1": [5]}], record=[child.layer]
    ).relevances[child.layer]
    expected = float(cond[0, child.concept].sum()) / parent_rel
    assert fraction == pytest.approx(expected, rel=1e-9)


def test_attribution_graph_full_width_accounts_for_all_relevance():
    """On a bias-free chain with full width, the children's fractions sum to one."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 3, bias=False),
    ).double()
    analyzer = ct.LRP(model, ct.composites.EpsilonPlus())
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    graph = ct.attribution_graph(
        analyzer,
        x,
        "2",
        int(analyzer(x, record=["2"]).relevances["2"].sum((0, 2, 3)).argmax()),
        widths=(6,),
    )
    assert sum(f for _, f in graph.children(graph.root)) == pytest.approx(1.0, rel=1e-5)
