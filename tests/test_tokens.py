"""Concepts in token layers: the feature axis of every layer, CRP with conditions on a vision
transformer's token layers (completeness on the whole model, AND-ed layers), and the dataset
pass into the store on a ViT layer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision
from conftest import cli
from reference import small_vit
from torch import nn
from torch.utils.data import TensorDataset

import crp_toolkit as ct
from crp_toolkit.engine.layout import feature_axes, layouts
from crp_toolkit.engine.receptive_field import receptive_field
from crp_toolkit.mining.ablation import masked_forward
from crp_toolkit.mining.localise import localise_references
from crp_toolkit.mining.references import reference_samples
from crp_toolkit.store import Study
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.zarr_store import StoreOptions

BLOCK = "encoder.layers.encoder_layer_{}.add#2"  # a block's output: the residual stream
MLP = "encoder.layers.encoder_layer_{}.mlp.3"  # the second MLP projection of a block
SOFTMAX = "encoder.layers.encoder_layer_0.self_attention.softmax"


@pytest.fixture(scope="module", params=["relevance", "gradient"])
def vit(request):
    """CP-LRP in the relevance domain (epsilon 1e-6) and, with epsilon 0, in the gradient
    domain."""
    epsilon = 1e-6 if request.param == "relevance" else 0.0
    composite = ct.composites.CPLRP(epsilon=epsilon)
    analyzer = ct.LRP(small_vit(), composite, normalize_output_relevance=False)
    assert analyzer.domain == request.param
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return analyzer, x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_feature_axes_follow_the_ops(vit):
    analyzer, _ = vit
    axes = feature_axes(analyzer, (3, 16, 16))
    graph = analyzer.graph
    assert axes[graph.index("conv_proj")] == 1  # patch embedding: channel-first
    assert axes[graph.index("permute")] == 2  # (B, patches, features)
    for block in (0, 1):
        assert axes[graph.index(BLOCK.format(block))] == 2
        assert axes[graph.index(MLP.format(block))] == 2
    assert axes[graph.index(SOFTMAX)] is None  # attention scores hold no features
    convnext = ct.LRP(torchvision.models.convnext_tiny().eval(), ct.composites.EpsilonPlus())
    axes = feature_axes(convnext, (3, 32, 32))
    channel_last = [layer.name for layer in convnext.graph.layers if axes[layer.index] == 3]
    assert "features.1.0.block.3" in channel_last  # the block's first Linear, on (B, h, w, C)
    assert axes[convnext.graph.index("features.1.0.block.0")] == 1  # its depthwise conv
    resnet = ct.LRP(ct.canonize(torchvision.models.resnet18().eval()), ct.composites.EpsilonPlus())
    assert set(feature_axes(resnet, (3, 32, 32)).values()) == {1}


def test_a_channel_of_a_token_layer_is_one_feature_summed_over_tokens(vit):
    analyzer, x = vit
    layer = BLOCK.format(0)
    expl = analyzer(x, 1, record=[layer])
    scores = ct.concept_relevances(analyzer, x, [layer], 1)[layer]
    torch.testing.assert_close(scores, expl.relevances[layer].sum(1))
    neurons = ct.CondAttribution(analyzer, {layer: ct.NeuronConcept()})
    tokens = expl.relevances[layer].shape[1]
    # neuron ids: feature * tokens + token; all tokens of feature 3 make channel 3
    every_token = neurons(x, [{"y": 1, layer: [3 * tokens + t for t in range(tokens)]}])
    channel = ct.CondAttribution(analyzer)(x, [{"y": 1, layer: [3]}])
    assert rel_err(every_token.relevance, channel.relevance) < 1e-10


@pytest.mark.parametrize("layer", [BLOCK.format(0), BLOCK.format(1)])
def test_channels_of_the_residual_stream_add_up_to_the_unconditional_heatmap(vit, layer):
    """Everything flows through a block's output: its channels' conditional heatmaps sum to
    the LRP heatmap (CP-LRP with epsilon 1e-9: nothing is lost but rounding)."""
    analyzer, x = vit
    crp = ct.CRP(analyzer, layer, ct.IndexedFeatures(*range(8)))(x, 2)
    unconditional = analyzer(x, 2, record=[layer])
    assert crp.relevance.shape == (2, 8, 3, 16, 16)
    assert rel_err(crp.relevance.sum(1), unconditional.relevance) < 1e-8
    torch.testing.assert_close(crp.scores, unconditional.relevances[layer].sum(1))


def test_conditions_on_two_token_layers_are_and_ed(vit):
    """Conditioning on block 1's channel c and on every channel of block 0 (which all of it
    flows through) gives channel c's heatmap; a channel of each keeps a part of it."""
    analyzer, x = vit
    attr = ct.CondAttribution(analyzer)
    one = attr(x, [{"y": 0, BLOCK.format(1): [5]}])
    both = attr(x, [{"y": 0, BLOCK.format(1): [5], BLOCK.format(0): list(range(8))}])
    assert rel_err(both.relevance, one.relevance) < 1e-10
    parts = attr(x, [{"y": 0, BLOCK.format(1): [5], BLOCK.format(0): [c]} for c in range(8)])
    summed = parts.relevance.reshape(2, 8, 3, 16, 16).sum(1)
    assert rel_err(summed, one.relevance) < 1e-8


def test_exclude_parallel_drops_the_residual_bypass_of_an_mlp(vit):
    """The MLP of block 1 is a branch beside the residual stream: with exclude_parallel its
    channels keep only what flows through it, less than everything."""
    analyzer, x = vit
    attr = ct.CondAttribution(analyzer)
    every = [{"y": 0, MLP.format(1): list(range(8))}]
    through = attr(x, every, exclude_parallel=True).relevance
    with_bypass = attr(x, every, exclude_parallel=False).relevance
    total = analyzer(x, 0).relevance
    assert rel_err(with_bypass, total) < 1e-8  # the bypass kept: all relevance
    assert rel_err(through, total) > 1e-3  # the bypass dropped: only the MLP's share


def test_a_layer_without_features_is_refused(vit):
    """The attention weights (tokens x tokens) have no feature axis; under AttnLRP relevance
    reaches them (under CP-LRP a condition there is refused as unreached)."""
    _, x = vit
    analyzer = ct.LRP(small_vit(), ct.composites.AttnLRP())
    with pytest.raises(ValueError, match="has no feature axis"):
        ct.CondAttribution(analyzer)(x, [{"y": 0, SOFTMAX: [0]}])


@pytest.fixture(scope="module")
def vit_store(vit, tmp_path_factory):
    """A store of 12 random images through the ViT, block 1's output with relevance maps."""
    analyzer, _ = vit
    images = torch.randn(12, 3, 16, 16, dtype=torch.float64, generator=torch.Generator())
    data = TensorDataset(images, torch.arange(12) % 3)
    path = tmp_path_factory.mktemp("vit") / "vit.zarr"
    analyze_dataset(
        analyzer,
        data,
        [BLOCK.format(1)],
        path,
        dataset_description="random images",
        options=StoreOptions(chunk=4, maps=True),
        progress=False,
    )
    return ct.store.open(path), data


def test_the_store_keeps_a_token_layer_on_its_patch_grid(vit, vit_store):
    """Per sample, the features x the 4 x 4 patch grid (the class token kept apart): relevance
    summed over every token (class token included), maps and maxima over the patches."""
    analyzer, _ = vit
    store, data = vit_store
    layer = BLOCK.format(1)
    assert store.attrs["layers"][layer] == [8, 4, 4]
    images, labels = data.tensors
    expected = ct.concept_relevances(analyzer, images, [layer], labels)[layer]
    stored = torch.from_numpy(store.layer(layer)[:]).double()
    torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-6)
    tokens = analyzer(images, labels, record=[layer]).relevances[layer]  # (N, 17, 8)
    patches = tokens[:, 1:].transpose(1, 2).reshape(12, 8, 4, 4)
    maps = torch.from_numpy(store.layer(layer, "maps")[:].astype("float64"))
    torch.testing.assert_close(maps, patches, rtol=1e-2, atol=1e-3)  # float16 maps
    rel_max = torch.from_numpy(store.layer(layer, "rel_max")[:]).double()
    torch.testing.assert_close(rel_max, patches.flatten(2).max(2).values, rtol=1e-5, atol=1e-6)


def test_a_patch_token_sees_its_patch(vit):
    analyzer, _ = vit
    field = receptive_field(analyzer, BLOCK.format(1), (3, 16, 16))
    assert field.boxes.shape == (4, 4, 4)
    for i in range(4):
        for j in range(4):
            assert tuple(field.box((i, j))) == (4 * i, 4 * i + 4, 4 * j, 4 * j + 4)


@pytest.mark.parametrize("mode", ["relevance", "activation"])
def test_references_of_a_vit_layer_are_localised_on_patches(vit, vit_store, mode):
    analyzer, _ = vit
    store, data = vit_store
    layer = BLOCK.format(1)
    table = reference_samples(store, layer, mode=mode, n_refs=3)
    study = Study(store, analyzer, data, "random images")
    found = localise_references(study, table, concepts=[0, 5], cache=False)
    assert found.heatmaps.shape == (3, 2, 16, 16) and found.positions.shape == (3, 2, 2)
    for r in range(3):
        for j in range(2):
            i, k = found.positions[r, j]
            assert tuple(found.boxes[r, j]) == (4 * i, 4 * i + 4, 4 * k, 4 * k + 4)
    if mode == "relevance":  # the box holds the patch where the concept's relevance peaks
        maps = store.layer(layer, "maps")[:]
        for r in range(3):
            sample, concept = int(found.samples[r, 0]), 0
            peak = np.unravel_index(np.argmax(maps[sample, concept]), (4, 4))
            assert tuple(found.positions[r, 0]) == tuple(int(p) for p in peak)


HEADS = "encoder.layers.encoder_layer_1.self_attention.matmul#2"  # attention times values
OUT_PROJ = "encoder.layers.encoder_layer_1.self_attention.out_proj"


def test_attention_heads_are_concepts_of_an_attention_layer(vit):
    """Attention times values is (B, heads, tokens, head features): a head's concept is its
    slice; the heads together carry what flows through the attention branch, as the output
    projection's channels together do, and the heads' heatmaps add up to it."""
    analyzer, x = vit
    assert feature_axes(analyzer, (3, 16, 16))[analyzer.graph.index(HEADS)] == 1
    attr = ct.CondAttribution(analyzer)
    heads = attr(x, [{"y": 2, HEADS: [0, 1]}]).relevance
    projected = attr(x, [{"y": 2, OUT_PROJ: list(range(8))}]).relevance
    assert rel_err(heads, projected) < 1e-10
    each = attr(x[:1], [{"y": 2, HEADS: [h]} for h in (0, 1)]).relevance  # one row per head
    assert rel_err(each.sum(0), heads[0]) < 1e-10
    recorded = analyzer(x, 2, record=[HEADS]).relevances[HEADS]  # (B, heads, tokens, d)
    scores = ct.concept_relevances(analyzer, x, [HEADS], 2)[HEADS]
    torch.testing.assert_close(scores, recorded.flatten(2).sum(2))


def test_the_attribution_graph_runs_across_blocks(vit):
    analyzer, x = vit
    root = BLOCK.format(1)
    graph = ct.attribution_graph(analyzer, x[:1], root, 4, target=1, widths=(2, 2))
    first = {child.layer for parent, child, _ in graph.edges if parent.layer == root}
    # what feeds a block's output: its MLP, its attention, and through the residual stream
    # the layers before (down to the patch embedding)
    assert {MLP.format(1), OUT_PROJ, MLP.format(0), "conv_proj"} <= first
    expected = ct.concept_relevances(analyzer, x[:1], [root], 1)[root][0, 4]
    assert graph.relevance[ct.ConceptNode(root, 4)] == pytest.approx(float(expected), rel=1e-8)


def test_an_attribution_graph_over_layers_relevance_does_not_reach_is_refused(vit):
    """Under CP-LRP no relevance reaches the q projection: naming it is refused up front."""
    analyzer, x = vit
    q_proj = "encoder.layers.encoder_layer_1.self_attention.q_proj"
    assert analyzer.graph.index(q_proj) not in analyzer.reachable()
    with pytest.raises(ValueError, match=r"no relevance reaches \['encoder.*q_proj'\]"):
        ct.attribution_graph(analyzer, x[:1], BLOCK.format(1), 0, layers=[q_proj])
    with pytest.raises(ValueError, match="no relevance reaches"):
        ct.attribution_graph(analyzer, x[:1], q_proj, 0)


def test_a_condition_on_a_layer_relevance_does_not_reach_is_refused(vit):
    """A condition on the q projection would give zero heatmaps whatever the input: refused
    before the forward pass, as from an inner start layer relevance reaching neither."""
    analyzer, x = vit
    q_proj = "encoder.layers.encoder_layer_1.self_attention.q_proj"
    attr = ct.CondAttribution(analyzer)
    with pytest.raises(ValueError, match=r"no relevance reaches \['encoder.*q_proj'\]"):
        attr(x, [{"y": 0, q_proj: [1]}])
    with pytest.raises(ValueError, match=r"no relevance reaches \['encoder.*layer_1.*mlp.3'\]"):
        attr(x, [{MLP.format(1): [0]}], start_layer=BLOCK.format(0))
    below = attr(x, [{MLP.format(0): [0]}], start_layer=BLOCK.format(0))  # reached from there
    assert below.relevance.abs().sum() > 0


def test_ablation_switches_off_features_of_a_token_layer(vit):
    """Concept ablation masks a token layer's features (every token), as a hook zeroing
    that feature of the block's output does."""
    analyzer, x = vit
    keep = torch.ones(2, 8, dtype=torch.float64)
    keep[:, 3] = 0
    ablated = masked_forward(analyzer, x, BLOCK.format(0), keep)
    model = small_vit()
    block = model.encoder.layers.encoder_layer_0

    def zero_feature(module, inputs, output):
        output = output.clone()
        output[..., 3] = 0
        return output

    block.register_forward_hook(zero_feature)
    with torch.no_grad():
        torch.testing.assert_close(ablated, model(x))
    with pytest.raises(ValueError, match="has no feature axis"):
        masked_forward(analyzer, x, SOFTMAX, keep)


def test_crp_toolkit_run_on_a_vision_transformer(tmp_path):
    """Every stage on a ViT from the command line (a real Hydra run): a model class with its
    state_dict, random images in an .npz file, CP-LRP, a block's output as the concept layer;
    evaluate skips itself (no ground truth)."""
    torch.save(small_vit().float().state_dict(), tmp_path / "vit.pt")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((24, 3, 16, 16)).astype("float32")
    np.savez(tmp_path / "data.npz", images=images, labels=np.arange(24) % 3)
    vit = {"image_size": 16, "patch_size": 4, "num_layers": 2, "num_heads": 2}
    vit |= {"hidden_dim": 8, "mlp_dim": 16, "num_classes": 3}
    run = cli(
        "run",
        f"hydra.run.dir={tmp_path / 'out'}",
        "model=state_dict",
        "model.module._target_=torchvision.models.vision_transformer.VisionTransformer",
        *[f"+model.module.{key}={value}" for key, value in vit.items()],
        f"model.weights={tmp_path / 'vit.pt'}",
        "dataset=npz",
        f"dataset.path={tmp_path / 'data.npz'}",
        "dataset.scale=1.0",
        "composite=cp_lrp",
        f"concepts.layers=['{BLOCK.format(1)}']",
        "store.chunk=12",
        "loader.num_workers=0",
        "mining.concepts=2",
        "mining.ablation_samples=6",
        "mining.prototypes=1",
        "atlas.inputs=[0]",
        "atlas.concepts=2",
        "explain.indices=[0,1]",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    store = ct.store.open(out / "store.zarr")
    assert store.attrs["layers"][BLOCK.format(1)] == [8, 4, 4] and store.complete
    sheets = list((out / "figures").glob(f"{BLOCK.format(1)}_[0-9]*.png"))
    assert len(sheets) == 2 and (out / "atlas" / "index.html").exists()
    assert "evaluate skipped" in run.stdout + run.stderr


class WideTokens(nn.Module):
    """Patch tokens of a non-square input (8 x 16 pixels: a 2 x 4 grid of 4-pixel patches),
    a dense layer on every token, mean over tokens, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 4, stride=4)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, 8, 6)
        return self.head(torch.relu(self.mix(tokens)).mean(1))


def test_a_non_square_grid_follows_the_patch_embedding():
    torch.manual_seed(0)
    analyzer = ct.LRP(WideTokens().eval(), ct.composites.EpsilonPlus())
    found = layouts(analyzer, (3, 8, 16))
    index = analyzer.graph.index("mix")
    assert found.axes[index] == 2
    grid = found.grids[index]
    assert (grid.prefix, grid.height, grid.width) == (0, 2, 4)
    field = receptive_field(analyzer, "mix", (3, 8, 16))
    assert tuple(field.box((1, 3))) == (4, 8, 12, 16)


def test_register_and_distillation_tokens_are_kept_apart():
    """timm's DINOv2 with 4 registers and DeiT with its distillation token: the tokens before
    the patch grid (class, registers, distillation) are counted as its prefix."""
    try:
        import timm
    except ImportError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"timm not importable ({err}); pip install 'crp_toolkit[timm]'")
    for name, size, prefix in [
        ("vit_small_patch14_reg4_dinov2", 28, 5),
        ("deit_tiny_distilled_patch16_224", 32, 2),
    ]:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, img_size=size, num_classes=3).eval()
        analyzer = ct.LRP(model, ct.composites.CPLRP())
        grid = layouts(analyzer, (3, size, size)).grids[analyzer.graph.index("blocks.0.add#2")]
        assert (grid.prefix, grid.height, grid.width) == (prefix, 2, 2), name


def test_a_head_out_of_range_is_refused(vit):
    analyzer, x = vit
    with pytest.raises(ValueError, match=r"it has 2 concepts .* valid ids are 0..1"):
        ct.CondAttribution(analyzer)(x, [{"y": 0, HEADS: [2]}])
