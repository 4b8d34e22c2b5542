"""The concept world's two shipped models, the CNN and the ViT: they classify the test world,
training them is deterministic, and ``crp-toolkit run model=concept_world_vit`` runs every
stage on the ViT's token layers, evaluate (scored against the world's ground truth) and a
learned basis included (real Hydra runs)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, cli
from hydra import compose, initialize_config_module

import crp_toolkit as ct
from crp_toolkit.app.schema import register
from crp_toolkit.data.training import TrainConfig, accuracy, load_world_model, materialize, train
from crp_toolkit.data.world import ConceptWorld

BLOCK = "encoder.layers.encoder_layer_{}.add#2"


@pytest.fixture(scope="module")
def held_out():
    return materialize(ConceptWorld(1200, seed=1))


@pytest.mark.parametrize("architecture", ["cnn", "vit"])
def test_the_shipped_models_classify_the_test_world(architecture, held_out):
    """Accuracy on the 1,200 test images (seed 1, never trained on); the README says 1.0 for
    the CNN and 0.98 for the ViT (measured when the weights were made)."""
    model = load_world_model(architecture=architecture)
    assert accuracy(model, *held_out) >= 0.97


@pytest.mark.parametrize("architecture", ["cnn", "vit"])
def test_training_is_deterministic(architecture):
    config = TrainConfig(architecture, train_size=96, test_size=32, epochs=1, batch_size=32)
    (first, scores), (second, again) = train(config), train(config)
    assert scores == again
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_an_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'.*'cnn', 'vit'"):
        load_world_model(architecture="resnet")


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """Explain, analyze, discover, mine, atlas and evaluate on two token layers of the ViT,
    chosen (with CP-LRP) by the model config alone."""
    out = tmp_path_factory.mktemp("vit_run")
    run = cli(
        "run",
        f"hydra.run.dir={out}",
        "model=concept_world_vit",
        *TINY_RUN,
        "discover.methods=[nmf]",
        "discover.n_concepts=4",
        "discover.positions=4",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_crp_toolkit_run_on_the_world_vit(vit_run):
    store = ct.store.open(vit_run / "store.zarr")
    basis = f"{BLOCK.format(3)}@nmf4"
    assert store.layers == [BLOCK.format(3), BLOCK.format(1), basis] and store.complete
    assert store.attrs["layers"][BLOCK.format(3)] == [64, 8, 8]
    assert store.attrs["provenance"]["composite"].startswith("CPLRP(")
    recovered = json.loads((vit_run / "evaluate" / "recovery.json").read_text())
    assert {r["layer"] for r in recovered} == {BLOCK.format(3), BLOCK.format(1), basis}
    assert (vit_run / "atlas" / "index.html").exists()
    assert list((vit_run / "figures").glob(f"{BLOCK.format(3)}_[0-9]*.png"))


def test_the_vits_attribution_graphs_follow_the_residual_stream():
    """The model config's ``atlas.graph_layers`` (the residual stream after each attention and
    MLP) hold every concept of a graph, where by default every dense layer of the attention
    and the MLP would."""
    register()
    with initialize_config_module("crp_toolkit.conf", version_base=None):
        layers = list(compose("config", ["model=concept_world_vit"]).atlas.graph_layers)
    analyzer = ct.LRP(load_world_model(architecture="vit"), ct.composites.CPLRP())
    x = ConceptWorld(4, seed=1)[0][0][None]
    graph = ct.attribution_graph(analyzer, x, BLOCK.format(3), 5, layers=layers)
    assert {node.layer for node in graph.nodes} <= set(layers)
    children = {child.layer for parent, child, _ in graph.edges if parent == graph.root}
    assert children == {"encoder.layers.encoder_layer_3.add"}  # the residual after attention
    default = ct.attribution_graph(analyzer, x, BLOCK.format(3), 5)
    assert any(".mlp." in node.layer for node in default.nodes)


def test_an_unknown_graph_layer_is_refused_before_any_figure(vit_run, tmp_path):
    run = cli(
        "atlas",
        f"hydra.run.dir={tmp_path}",
        f"store.path={vit_run / 'store.zarr'}",
        "model=concept_world_vit",
        "analysis.limit=40",
        "atlas.graph_layers=[encoder.layers.encoder_layer_9.add]",
    )
    assert run.returncode != 0
    assert "atlas.graph_layers names layers the model does not have" in run.stderr
    assert not (tmp_path / "figures").exists()
