"""Shared fixtures: the FashionMNIST fixture from ../shared/data/fashion (never copied here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crp_toolkit as ct
from crp_toolkit.data.fashion import load_fashion_data, load_fashion_model
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.zarr_store import StoreOptions

SHARED = Path(os.environ.get("CRP_TOOLKIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FASHION_DIR = SHARED / "data" / "fashion"
# The fixture on the command line, as a user's own model class and .npz data would be given.
FASHION_OVERRIDES = (
    "model=state_dict",
    "model.module._target_=crp_toolkit.data.fashion.FashionCNN",
    f"model.weights={FASHION_DIR / 'fashion_cnn_state_dict.pt'}",
    "dataset=npz",
    f"dataset.path={FASHION_DIR / 'fashion_val.npz'}",
    "dataset.images_key=val_set",
    "dataset.labels_key=targets",
)

ROOT = Path(__file__).resolve().parents[1]
# Small settings of the later stages for end-to-end CLI runs on 40 images of the concept world.
TINY_MINING = (
    "mining.n_refs=3",
    "mining.concepts=2",
    "mining.prototypes=1",
    "mining.clusters=2",
    "mining.ablation_samples=4",
    "mining.ablation_steps=2",
)
TINY_RUN = (
    "analysis.limit=40",
    "store.chunk=20",
    "explain.indices=[0]",
    *TINY_MINING,
    "atlas.inputs=[0]",
    "atlas.concepts=1",
    "evaluate.top=1",
    "evaluate.n_refs=3",
    "evaluate.watermark_top=2",
)
# Fixtures that read FASHION_DIR; tests using them (directly or through other fixtures) or
# marked ``fashion`` need it.
FASHION_FIXTURES = {"fashion_model", "fashion_data"}

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fashion(path=FASHION_DIR): needs the FashionMNIST fixture folder (skipped without it, "
        "failed under CI)",
    )


def _fashion_needed(item: pytest.Item) -> Path | None:
    """The fixture folder ``item`` reads, if it reads one."""
    marker = item.get_closest_marker("fashion")
    if marker is not None:
        return Path(marker.args[0]) if marker.args else FASHION_DIR
    return FASHION_DIR if FASHION_FIXTURES & set(item.fixturenames) else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test needing a missing fixture folder is skipped, naming it; under CI (which always
    has the fixture) it fails instead."""
    path = _fashion_needed(item)
    if path is None or path.is_dir():
        return
    reason = f"FashionMNIST fixture missing: {path}"
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m crp_toolkit <args>`` (a real Hydra run) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "crp_toolkit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="session")
def fashion_model():
    """The trained FashionMNIST CNN (eval mode, not canonized)."""
    return load_fashion_model(FASHION_DIR / "fashion_cnn_state_dict.pt")


@pytest.fixture(scope="session")
def fashion_data():
    """The first 64 validation images (N, 1, 28, 28) in [0, 1] and their labels."""
    return load_fashion_data(FASHION_DIR / "fashion_val.npz", limit=64)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: one thread beats two (no OpenMP hand-offs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Images(torch.utils.data.Dataset):
    """Images and labels in memory; the samples in ``broken`` fail to read, as a corrupt file."""

    def __init__(self, x, y, broken=()):
        self.x, self.y, self.broken = x, y, set(broken)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i in self.broken:
            raise OSError(f"sample {i} is corrupt")
        return self.x[i], int(self.y[i])


# The real store the mining tests share: the 64 fixture images, two of them unreadable.
STORE_DESCRIPTION = "fashion-64"
BROKEN = {3, 40}


@pytest.fixture(scope="session")
def analyzer(fashion_model):
    """LRP of the canonized fashion CNN with zennit's EpsilonPlus semantics."""
    return ct.LRP(ct.canonize(fashion_model), ct.composites.EpsilonPlus())


@pytest.fixture(scope="session")
def dataset(fashion_data):
    """The 64 fixture images; samples 3 and 40 fail to read."""
    x, y = fashion_data
    return Images(x, y, broken=BROKEN)


@pytest.fixture(scope="session")
def _fashion_store(analyzer, dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("fashion_store") / "s.zarr"
    analyze_dataset(
        analyzer,
        dataset,
        ["conv2", "linear1"],
        path,
        dataset_description=STORE_DESCRIPTION,
        progress=False,
        options=StoreOptions(chunk=10),
    )
    return path


@pytest.fixture(scope="module")
def store(_fashion_store, tmp_path_factory):
    """A real store of ``dataset`` (layers conv2 and linear1, chunks of 10 rows), copied for
    each test module so that modules can add derived results without seeing each other's."""
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    shutil.copytree(_fashion_store, path)
    return ct.store.open(path)
