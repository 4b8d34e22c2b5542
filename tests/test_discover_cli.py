"""`crp-toolkit run` with a basis configured, through the command line (real Hydra runs): it
discovers, analyses, mines (ablation included), draws and evaluates the basis beside the
channels; bad discover settings are refused before any work, a second discover keeps what the
store holds, `verify` names a damaged concept layer and the discover call that recomputes it,
and the atlas labels concepts from a separate annotated probe set (``atlas.probe``)."""

from __future__ import annotations

import json
import shutil
from html import escape

import numpy as np
import pytest
import zarr
from conftest import TINY_RUN, cli

import crp_toolkit as ct
from crp_toolkit.data.training import load_world_model
from crp_toolkit.data.world import ConceptWorld
from crp_toolkit.mining.labels import probe_labels
from crp_toolkit.store.bases import list_bases, load_basis
from crp_toolkit.store.results import list_results

TINY = (
    *TINY_RUN,
    "concepts.layers=[features.12]",
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
    mining = json.loads((run_dir / "mining.json").read_text())
    assert set(mining[BASIS]["ablation_area"]) == {"relevance", "activation", "random"}
    assert (run_dir / "figures" / f"{BASIS}_ablation.png").exists()
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


def test_verify_names_a_damaged_basis_layer_and_its_discover_call_recomputes_it(run_dir, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(run_dir / "store.zarr", store)
    (store / "layers" / BASIS / "act_max/c/1/0").unlink()
    found = cli("verify", f"store.path={store}", f"hydra.run.dir={tmp_path / 'bad'}")
    assert found.returncode != 0
    assert f"concept layer {BASIS}, unit 1: layers/{BASIS}/act_max/c/1/0: missing" in found.stdout
    report = json.loads((tmp_path / "bad/verify.json").read_text())
    assert not report["ok"] and list(report["concept_layers"][BASIS]) == ["1"]
    advice = next(line for line in found.stdout.splitlines() if "crp-toolkit discover" in line)
    overrides = advice.split("`")[1].split()[2:]  # the call verify names, as given
    assert f"store.path={store}" in overrides and "discover.methods=[pca]" in overrides
    data = [o for o in TINY if not o.startswith("discover.")]  # the store's model and data
    rerun = cli("discover", f"hydra.run.dir={tmp_path / 'again'}", *data, *overrides)
    assert rerun.returncode == 0, rerun.stderr
    sound = cli("verify", f"store.path={store}", f"hydra.run.dir={tmp_path / 'ok'}")
    assert sound.returncode == 0, sound.stdout
    original = zarr.open_group(run_dir / "store.zarr", mode="r")[f"layers/{BASIS}/act_max"][:]
    repaired = zarr.open_group(store, mode="r")[f"layers/{BASIS}/act_max"][:]
    np.testing.assert_array_equal(repaired, original)


PROBE = ("dataset@atlas.probe=concept_world", "atlas.probe.n=24", "atlas.probe.seed=7")


def test_the_atlas_labels_concepts_from_a_separate_probe_set(run_dir, tmp_path):
    store = run_dir / "store.zarr"
    run = cli("atlas", f"hydra.run.dir={tmp_path}", f"store.path={store}", *TINY, *PROBE)
    assert run.returncode == 0, run.stderr
    assert "probe labels features.12" in run.stderr  # the pass over the probe set
    index = (tmp_path / "atlas" / "index.html").read_text()
    analyzer = ct.LRP(ct.canonize(load_world_model()), ct.composites.EpsilonPlusFlat())
    probe, mined = ConceptWorld(24, seed=7), json.loads((run_dir / "mining.json").read_text())
    opened = ct.store.open(store)
    for layer, concept in (("features.12", None), (BASIS, load_basis(opened, BASIS).concept())):
        concepts = mined[layer]["concepts"]
        expected = probe_labels(  # as the atlas calls it: loader.batch_size images a pass
            analyzer,
            "features.12",
            probe,
            concepts=concepts,
            concept=concept,
            n_refs=3,
            batch_size=64,
        )
        for c in concepts:
            name, score = expected.of(c)
            assert f"<td>{escape(f'{name} ({score:.2f})')}</td>" in index, (layer, c)
    # kept in the store: a second atlas with the same probe set reads them back
    assert {"probe_labels/features.12", f"probe_labels/{BASIS}"} <= set(list_results(store))
    again = cli(
        "atlas", f"hydra.run.dir={tmp_path / 'again'}", f"store.path={store}", *TINY, *PROBE
    )
    assert again.returncode == 0, again.stderr
    assert "probe labels features.12" not in again.stderr
    assert (tmp_path / "again" / "atlas" / "index.html").read_text() == index


def test_a_probe_set_without_masks_is_refused_before_any_figure(run_dir, tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, images=np.zeros((4, 64, 64, 3), np.uint8), labels=np.zeros(4, np.int64))
    probe = ("dataset@atlas.probe=npz", f"atlas.probe.path={plain}")
    out = tmp_path / "out"
    store = run_dir / "store.zarr"
    run = cli("atlas", f"hydra.run.dir={out}", f"store.path={store}", *TINY, *probe)
    assert run.returncode != 0
    assert "has no named masks" in run.stderr
    assert not (out / "figures").exists()
    whole = cli("run", f"hydra.run.dir={tmp_path / 'run'}", *TINY, *probe)  # before analyze
    assert whole.returncode != 0 and "has no named masks" in whole.stderr
    assert not (tmp_path / "run" / "store.zarr").exists()
