"""`crp-toolkit run` with a basis configured, through the command line (real Hydra runs): it
discovers, analyses, mines, draws and evaluates the basis beside the channels; bad discover
settings are refused before any work, and a second discover keeps what the store holds."""

from __future__ import annotations

import json

import pytest
from conftest import cli

import crp_toolkit as ct
from crp_toolkit.store.bases import list_bases
from crp_toolkit.store.results import list_results

TINY = (
    "analysis.limit=40",
    "store.chunk=20",
    "concepts.layers=[features.12]",
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
    "discover.methods=[pca]",
    "discover.n_concepts=4",
    "discover.positions=4",
)
BASIS = "features.12@pca4"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run = cli("run", f"hydra.run.dir={out}", *TINY)
    assert run.returncode == 0, run.stderr
    assert "discover features.12: 100%" in run.stderr  # the sampling pass shows its progress
    return out


def test_run_discovers_the_basis_and_every_stage_reads_it(run_dir):
    store = ct.store.open(run_dir / "store.zarr")
    assert store.layers == ["features.12", BASIS]
    assert list_bases(store) == [BASIS]
    results = list_results(store.path)
    assert f"statistics/{BASIS}" in results and f"labels/{BASIS}" in results
    assert json.loads((run_dir / "discover.json").read_text())[BASIS]["positions_seen"] == 160
    scores = (run_dir / "evaluate" / "scores.md").read_text()
    assert "## Recovery: channels against every basis" in scores
    assert "| features.12 | 64 |" in scores and f"| {BASIS} | 4 |" in scores
    recovered = json.loads((run_dir / "evaluate" / "recovery.json").read_text())
    assert [r["layer"] for r in recovered] == ["features.12", BASIS]
    assert json.loads((run_dir / "evaluate" / "scores.json").read_text()).keys() == {
        "features.12",
        BASIS,
    }
    index = (run_dir / "atlas" / "index.html").read_text()
    assert BASIS in index and "<th>label</th>" in index
    assert list(run_dir.glob("figures/features.12@pca4_*.png"))  # its concept sheets
    # the inputs' concept atlases with the basis's concepts, beside the channels' ones
    assert (run_dir / "figures" / "concept_atlas_0_pca4.png").exists()
    assert (run_dir / "figures" / "concept_atlas_0.png").exists()


def test_a_second_discover_reuses_the_basis_and_loses_nothing(run_dir, tmp_path):
    store = run_dir / "store.zarr"
    before = list_results(store)
    run = cli("discover", f"hydra.run.dir={tmp_path}", f"store.path={store}", *TINY)
    assert run.returncode == 0, run.stderr
    assert list_results(store) == before
    assert ct.store.open(store).layers == ["features.12", BASIS]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("discover.n_concepts=65",), "K=65 directions for a layer of 64 channels"),
        (("discover.methods=[ica]",), "discover.methods has unknown ['ica']"),
        (("discover.source=gradient",), "discover.source='gradient' must be one of"),
    ],
)
def test_bad_discover_settings_are_refused_before_any_work(tmp_path, overrides, message):
    run = cli("run", f"hydra.run.dir={tmp_path}", *TINY, *overrides)
    assert run.returncode != 0
    assert message in run.stderr
    assert not (tmp_path / "store.zarr").exists() and not (tmp_path / "heatmaps.png").exists()


def test_discover_without_a_method_says_what_to_give(run_dir, tmp_path):
    store = run_dir / "store.zarr"
    run = cli("discover", f"hydra.run.dir={tmp_path}", f"store.path={store}", "discover.methods=[]")
    assert run.returncode != 0
    assert "give discover.methods, e.g. discover.methods=[nmf,pca]" in run.stderr
