"""The whole pipeline through the command line (`crp-toolkit run`: explain, analyze, mine,
atlas, evaluate) on a small concept world, and its HTML atlas in headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from browser import Browser, check_site
from conftest import ROOT, cli
from PIL import Image

import crp_toolkit as ct

SMALL = (
    "analysis.limit=120",
    "store.chunk=50",
    "explain.indices=[0,1]",
    "mining.n_refs=4",
    "mining.concepts=3",
    "mining.prototypes=2",
    "mining.clusters=3",
    "mining.ablation_samples=8",
    "mining.ablation_steps=4",
    "atlas.inputs=[0,1]",
    "atlas.concepts=2",
    "atlas.formats=[png,svg]",
    "evaluate.top=2",
    "evaluate.n_refs=4",
    "evaluate.watermark_top=4",
)
LAYERS = ("features.12", "features.8")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The run's output folder and what it wrote to stderr."""
    out = tmp_path_factory.mktemp("run")
    run = cli("run", f"hydra.run.dir={out}", *SMALL)
    assert run.returncode == 0, run.stderr
    assert f"results in {out}" in run.stdout
    return out, run.stderr


@pytest.fixture(scope="module")
def run_dir(pipeline):
    return pipeline[0]


def test_mine_and_atlas_show_their_progress(pipeline):
    bars = (
        "mine: 100%",
        "localise features.12 (relevance)",
        "localise features.8 (activation)",
        "ablation features.8",
        "concept sheets features.12",
        "prototypes features.8",
        "input figures",
    )
    assert [bar for bar in bars if bar not in pipeline[1]] == []


def test_run_writes_every_stage_and_records_its_config(run_dir):
    assert (run_dir / "heatmaps.png").is_file()  # explain
    store = ct.store.open(run_dir / "store.zarr")  # analyze
    assert store.complete and store.attrs["n_samples"] == 120
    mined = json.loads((run_dir / "mining.json").read_text())  # mine
    assert set(mined) == set(LAYERS) and all(len(m["concepts"]) == 3 for m in mined.values())
    figures = run_dir / "figures"  # atlas
    for stem in ("glocal_0", "concept_atlas_1", "features.8_map", "features.12_ablation"):
        assert Image.open(figures / f"{stem}.png").size[0] > 100
        assert (figures / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    assert (run_dir / "atlas" / "index.html").is_file()
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["stage"] == "run" and config["mining"]["n_refs"] == 4


def test_mined_results_are_kept_in_the_store(run_dir):
    kept = ct.store.list_results(run_dir / "store.zarr")
    for layer in LAYERS:
        for name in (f"statistics/{layer}", f"prototypes/{layer}", f"ablation/{layer}"):
            assert name in kept
        assert f"similarity/{layer}/relevance" in kept
        assert sum(k.startswith(f"localised/{layer}/") for k in kept) >= 2  # RelMax and ActMax


def test_evaluate_scores_every_class_for_both_reference_kinds(run_dir):
    report = json.loads((run_dir / "evaluate" / "scores.json").read_text())
    assert set(report) == set(LAYERS)
    for found in report.values():
        for kind in ("relevance", "activation"):
            assert 0 < found["mass_accuracy"][kind] <= 1 and 0 < found["purity"][kind] <= 1
            rows = [r for r in found["scores"] if r["references"] == kind and r["rank"] < 2]
            assert sorted({r["cls"] for r in rows}) == list(range(6)) and len(rows) == 12
        assert 0 <= found["watermark_share"] <= 1
    table = (run_dir / "evaluate" / "scores.md").read_text()
    assert "| red circle | 0 |" in table and "mean mass accuracy" in table
    assert (run_dir / "evaluate" / "discovery_features.8.png").is_file()


def test_the_atlas_of_a_real_run_renders_in_chromium(run_dir, tmp_path):
    index = run_dir / "atlas" / "index.html"
    with Browser() as browser:
        pages = check_site(browser, index)
        browser.navigate(index.as_uri())
        rows = browser.evaluate("document.querySelectorAll('table.concepts tbody tr').length")
        shot = browser.screenshot(tmp_path / "atlas.png")
    assert len(pages) == 1 + 2 * 3 + 6 + 2 * 6 * 2  # index, concepts, classes, prototypes
    assert rows == 2 * 3
    assert np.asarray(Image.open(shot)).std() > 0


def test_a_later_stage_reuses_the_store_and_its_cached_results(run_dir, tmp_path):
    run = cli("atlas", f"hydra.run.dir={tmp_path}", f"store.path={run_dir / 'store.zarr'}", *SMALL)
    assert run.returncode == 0, run.stderr
    before = ct.store.list_results(run_dir / "store.zarr")
    assert (tmp_path / "figures" / "features.12_map.png").is_file()
    assert ct.store.list_results(run_dir / "store.zarr") == before  # nothing new to compute
    assert "concept sheets features.8" in run.stderr and "localise" not in run.stderr


def test_a_stage_without_its_store_says_how_to_make_one(tmp_path):
    run = cli("mine", f"hydra.run.dir={tmp_path}", f"store.path={tmp_path / 'none.zarr'}")
    assert run.returncode != 0
    assert "run `crp-toolkit analyze store.path=...` first" in run.stderr


@pytest.mark.parametrize(
    "script, output",
    [
        ("clever_hans.py", "clever_hans.md"),
        ("relmax_vs_actmax.py", "relmax_vs_actmax_features.12.png"),
    ],
)
def test_experiment_scripts_make_their_figure_from_a_run(run_dir, script, output):
    run = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), str(run_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    made = run_dir / "experiments" / output
    assert made.stat().st_size > 500
    if output.endswith(".md"):
        rows = [line for line in made.read_text().splitlines() if line.startswith("| features")]
        assert len(rows) == 6  # the default --top
