"""The concept world's two shipped models, the CNN and the ViT: they classify the test world,
training them is deterministic, and ``crp-toolkit run model=concept_world_vit`` runs every
stage on the ViT's token layers, evaluate (scored against the world's ground truth) and a
learned basis included (real Hydra runs)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli

import crp_toolkit as ct
from crp_toolkit.data.training import TrainConfig, accuracy, load_world_model, materialize, train
from crp_toolkit.data.world import ConceptWorld

BLOCK = "encoder.layers.encoder_layer_{}.add#2"


@pytest.fixture(scope="module")
def test_world():
    return materialize(ConceptWorld(1200, seed=1))


@pytest.mark.parametrize("architecture", ["cnn", "vit"])
def test_the_shipped_models_classify_the_test_world(architecture, test_world):
    """Accuracy on the 1,200 test images (seed 1, never trained on); the README says 1.0 for
    the CNN and 0.98 for the ViT (measured when the weights were made)."""
    model = load_world_model(architecture=architecture)
    assert accuracy(model, *test_world) >= 0.97


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


def test_crp_toolkit_run_on_the_world_vit(tmp_path):
    """Explain, analyze, discover, mine, atlas and evaluate on two token layers of the ViT,
    chosen (with CP-LRP) by the model config alone."""
    run = cli(
        "run",
        f"hydra.run.dir={tmp_path}",
        "model=concept_world_vit",
        "analysis.limit=40",
        "store.chunk=20",
        "explain.indices=[0]",
        "mining.n_refs=3",
        "mining.concepts=2",
        "mining.prototypes=1",
        "mining.clusters=2",
        "mining.ablation_samples=4",
        "mining.ablation_steps=2",
        "atlas.inputs=[0]",
        "atlas.concepts=1",
        "evaluate.top=1",
        "evaluate.n_refs=3",
        "evaluate.watermark_top=2",
        "discover.methods=[nmf]",
        "discover.n_concepts=4",
        "discover.positions=4",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    store = ct.store.open(tmp_path / "store.zarr")
    basis = f"{BLOCK.format(3)}@nmf4"
    assert store.layers == [BLOCK.format(3), BLOCK.format(1), basis] and store.complete
    assert store.attrs["layers"][BLOCK.format(3)] == [64, 8, 8]
    assert store.attrs["provenance"]["composite"].startswith("CPLRP(")
    recovered = json.loads((tmp_path / "evaluate" / "recovery.json").read_text())
    assert {r["layer"] for r in recovered} == {BLOCK.format(3), BLOCK.format(1), basis}
    assert (tmp_path / "atlas" / "index.html").exists()
    assert list((tmp_path / "figures").glob(f"{BLOCK.format(3)}_[0-9]*.png"))
