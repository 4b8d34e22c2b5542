"""Bad input is refused before work with a message that names what to change, and nothing
already written is lost: config values, store paths, NaN images, labels, store mismatches,
channel counts, run folders, an interrupted merge."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from conftest import FASHION_OVERRIDES, Images, cli
from omegaconf import OmegaConf

import crp_toolkit as ct
from crp_toolkit.app.context import open_store
from crp_toolkit.data.datasets import NpzDataset
from crp_toolkit.data.loading import BadLabelError, UnreadableSampleError, gather
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.zarr_store import StoreMismatchError, StoreOptions


class RawLabels(torch.utils.data.Dataset):
    """Images with their labels as given (a float stays a float)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def run_pass(analyzer, dataset, path, **options):
    return analyze_dataset(
        analyzer, dataset, ["conv2"], path, dataset_description="d", progress=False, **options
    )


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".creating-" in p.name)


@pytest.fixture
def small(fashion_data):
    x, y = fashion_data
    return x[:20].clone(), y[:20].clone()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loader_options": {"batch_size": 0}}, "'batch_size': 0"),
        ({"loader_options": {"on_error": "ignore"}}, "on_error must be 'skip' or 'fail'"),
    ],
)
def test_bad_pass_options_are_refused_before_the_store_exists(
    analyzer, small, tmp_path, options, message
):
    with pytest.raises(ValueError, match=message):
        run_pass(analyzer, Images(*small), tmp_path / "s.zarr", **options)
    assert not (tmp_path / "s.zarr").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("chunk", [0, -3])
def test_a_bad_chunk_is_refused_before_the_store_exists(analyzer, small, tmp_path, chunk):
    with pytest.raises(ValueError, match=f"'chunk': {chunk}"):
        run_pass(analyzer, Images(*small), tmp_path / "s.zarr", options=StoreOptions(chunk=chunk))
    assert not (tmp_path / "s.zarr").exists() and not leftovers(tmp_path)


def test_an_empty_dataset_is_refused(analyzer, tmp_path):
    empty = Images(torch.empty(0, 1, 28, 28), torch.empty(0))
    with pytest.raises(ValueError, match="the dataset is empty"):
        run_pass(analyzer, empty, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_a_foreign_folder_or_the_working_directory_is_never_a_store(
    analyzer, small, tmp_path, monkeypatch
):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="non-empty folder that is not a crp_toolkit store"):
        run_pass(analyzer, Images(*small), foreign)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    monkeypatch.chdir(foreign)
    with pytest.raises(FileExistsError, match="nothing was changed"):
        run_pass(analyzer, Images(*small), ".")
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"] and not leftovers(tmp_path)


def test_staging_is_cleaned_up_when_creating_the_store_fails(analyzer, small, tmp_path):
    """Provenance that cannot be stored fails after the arrays were made aside."""
    with pytest.raises(TypeError):
        run_pass(analyzer, Images(*small), tmp_path / "s.zarr", config={"model": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_nan_image_is_named_by_its_dataset_index(analyzer, small, tmp_path):
    x, y = small
    x[13, 0, 5, 5] = float("nan")
    x[17, 0, 0, 0] = float("inf")
    report = run_pass(analyzer, Images(x, y), tmp_path / "s.zarr", options=StoreOptions(chunk=8))
    assert [s["index"] for s in report.skipped] == [13, 17]
    assert all("NaN or inf" in s["error"] for s in report.skipped)
    valid = ct.store.open(report.path).samples("valid")[:]
    assert list(np.flatnonzero(~valid)) == [13, 17]
    with pytest.raises(UnreadableSampleError, match="sample 13 could not be read"):
        run_pass(analyzer, Images(x, y), tmp_path / "t.zarr", loader_options={"on_error": "fail"})


def test_labels_that_are_not_class_ids_are_refused_naming_the_samples(analyzer, small, tmp_path):
    x, y = small
    fractional = y.double()
    fractional[4] = 2.5
    with pytest.raises(BadLabelError, match=r"sample 4: label 2\.5 is not an integer") as err:
        run_pass(analyzer, RawLabels(x, fractional), tmp_path / "a.zarr")
    assert len(str(err.value)) < 200  # the samples at fault, not the whole batch
    integral = y.double()  # 3.0 is a class id
    assert run_pass(analyzer, RawLabels(x, integral), tmp_path / "b.zarr").computed
    wrong = y.clone()
    wrong[[2, 9]] = torch.tensor([-1, 10])
    with pytest.raises(BadLabelError, match=r"sample 2: label -1 not in 0\.\.9, sample 9"):
        run_pass(analyzer, Images(x, wrong), tmp_path / "c.zarr")
    with pytest.raises(BadLabelError, match="sample 2: label -1"):
        gather(Images(x, wrong), [0, 1, 2], classes=10)


def test_an_npz_with_fractional_labels_is_refused_at_load(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match=r"sample 1: 1\.5"):
        NpzDataset(path)


def test_a_store_mismatch_names_only_the_keys_that_differ(analyzer, small, tmp_path):
    run_pass(analyzer, Images(*small), tmp_path / "s.zarr")
    with pytest.raises(StoreMismatchError) as err:
        analyze_dataset(
            analyzer, Images(*small), ["conv2"], tmp_path / "s.zarr", dataset_description="e"
        )
    message = str(err.value)
    assert message.count("store has") == 1 and "dataset: store has" in message
    assert "composite" not in message and len(message) < 400


def test_bad_config_values_are_all_named_before_work(tmp_path):
    run = cli(
        "analyze",
        f"hydra.run.dir={tmp_path / 'run'}",
        "store.chunk=0",
        "loader.batch_size=-1",
        "analysis.limit=0",
        "loader.on_error=ignore",
    )
    assert run.returncode != 0
    for named in (
        "store.chunk=0",
        "loader.batch_size=-1",
        "analysis.limit=0",
        "loader.on_error='ignore'",
    ):
        assert named in run.stderr
    assert not (tmp_path / "run" / "store.zarr").exists()


def test_the_working_directory_as_store_path_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    run = cli("analyze", "store.path=.", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode != 0
    assert "is a non-empty folder that is not a crp_toolkit store" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]


@pytest.mark.fashion
def test_images_with_the_wrong_channel_count_say_what_the_model_expects(tmp_path):
    data = [o for o in FASHION_OVERRIDES if o.startswith("dataset")]
    run = cli("explain", f"hydra.run.dir={tmp_path / 'run'}", *data)  # 1-channel, RGB model
    assert run.returncode != 0
    assert "the dataset's images have shape (1, 28, 28)" in run.stderr
    assert "expects (batch, 3, ...)" in run.stderr


def test_explain_refuses_negative_and_out_of_range_labels(tmp_path):
    path = tmp_path / "d.npz"
    images = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.array([0, -1, 2, 9]))
    run = cli(
        "explain",
        f"hydra.run.dir={tmp_path / 'run'}",
        "dataset=npz",
        f"dataset.path={path}",
        "explain.indices=[0,1,2,3]",
    )
    assert run.returncode != 0
    assert "sample 1: label -1 not in 0..5, sample 3: label 9 not in 0..5" in run.stderr
    assert not (tmp_path / "run" / "heatmaps.png").exists()


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    command = [sys.executable, "-m", "crp_toolkit", "explain", "explain.indices=[0]"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(run.wait(timeout=600) == 0 for run in runs)
    folders = sorted((tmp_path / "outputs" / "explain").iterdir())
    assert len(folders) == 2
    assert all((folder / "report.json").exists() for folder in folders)


def test_a_run_folder_in_use_by_a_live_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".crp_toolkit_run").write_text(f"{other.pid} ")
        run = cli("explain", f"hydra.run.dir={out}", "explain.indices=[0]")
    finally:
        other.kill()
        other.wait()
    assert run.returncode != 0
    assert f"in use by another run (pid {other.pid})" in run.stderr
    assert not (out / "heatmaps.png").exists()
    again = cli("explain", f"hydra.run.dir={out}", "explain.indices=[0]")  # its holder is gone
    assert again.returncode == 0, again.stderr


def _interrupted_merge(path, holder: int) -> None:
    """The state a merge killed half-way leaves: the lock, part of the results, no flag."""
    group = zarr.open_group(path, mode="r+")
    del group.attrs["tables_merged"]
    del group["derived/tables/conv2"]
    path.with_name(f"{path.name}.merging").write_text(f"{socket.gethostname()} {holder}")


def test_mine_finishes_an_interrupted_merge(store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(store.path, path)
    before = ct.store.open(path).group["derived/tables/conv2/relevance-sum-normalised/samples"][:]
    dead = subprocess.Popen(["true"])
    dead.wait()
    _interrupted_merge(path, dead.pid)
    cfg = OmegaConf.create({"stage": "mine", "store": {"path": str(path)}})
    opened = open_store(cfg, tmp_path)
    assert opened.attrs["tables_merged"]
    assert not path.with_name("s.zarr.merging").exists()
    after = opened.group["derived/tables/conv2/relevance-sum-normalised/samples"][:]
    np.testing.assert_array_equal(after, before)


def test_mine_says_so_when_another_process_is_merging(store, tmp_path, caplog):
    path = tmp_path / "s.zarr"
    shutil.copytree(store.path, path)
    busy = subprocess.Popen(["sleep", "60"])
    try:
        _interrupted_merge(path, busy.pid)
        cfg = OmegaConf.create({"stage": "mine", "store": {"path": str(path)}})
        with caplog.at_level(logging.WARNING):
            opened = open_store(cfg, tmp_path)
    finally:
        busy.kill()
        busy.wait()
    assert not opened.attrs.get("tables_merged")
    assert f"{busy.pid}" in caplog.text and "not merged" in caplog.text


def test_analyze_lists_unreadable_samples_in_its_report(tmp_path):
    from test_app import _folder_overrides, _image_folder

    root = _image_folder(tmp_path / "data", classes=6, corrupt=True)
    out = tmp_path / "run"
    run = cli("analyze", f"hydra.run.dir={out}", *_folder_overrides(root), "store.chunk=4")
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert [s["index"] for s in report["skipped"]] == [0]
    assert "UnidentifiedImageError" in report["skipped"][0]["error"]
    assert "sample 0 could not be read" in run.stdout + run.stderr  # logged (Hydra: stdout)
    assert report["computed"] == list(range(4)) and report["recomputed"] == {}
    assert not ct.store.open(out / "store.zarr").samples("valid")[0]
