"""A store's files damaged on disk (deleted, bytes flipped, truncated, rewritten) are found,
named, and recomputed exactly by ``analyze``; reads name the array and chunk file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import BROKEN, STORE_DESCRIPTION, cli
from omegaconf import OmegaConf

import crp_toolkit as ct
from crp_toolkit.app.context import open_store
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.integrity import StoreDamagedError
from crp_toolkit.store.verify import verify
from crp_toolkit.store.zarr_store import StoreOptions

LAYERS = ["conv2", "linear1"]


@pytest.fixture
def copy(_fashion_store, tmp_path):
    """A private copy of the shared fashion store (64 samples, chunks of 10: 7 units)."""
    path = tmp_path / "s.zarr"
    shutil.copytree(_fashion_store, path)
    return path


def reanalyze(analyzer, dataset, path):
    """The pass that made the store, run again on it."""
    return analyze_dataset(
        analyzer,
        dataset,
        LAYERS,
        path,
        dataset_description=STORE_DESCRIPTION,
        progress=False,
        options=StoreOptions(chunk=10),
    )


def all_arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {
        name: array[...]
        for name, array in group.members(max_depth=None)
        if isinstance(array, zarr.Array) and not name.startswith("derived")
    }


def flip_byte(file) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def assert_same(path, reference) -> None:
    found = all_arrays(path)
    assert found.keys() == reference.keys()
    for name, values in reference.items():
        np.testing.assert_array_equal(found[name], values, err_msg=name)


def test_a_sound_store_verifies(copy):
    found = verify(copy)
    assert found.ok and found.units == 7 and not found.damaged
    assert "matches its digest" in found.summary()


def test_a_deleted_chunk_file_is_found_and_recomputed_exactly(copy, analyzer, dataset):
    reference = all_arrays(copy)
    (copy / "layers/conv2/relevance/c/3/0").unlink()
    store = ct.store.open(copy)
    assert not store.complete  # it read as zeros and said complete before
    assert store.incomplete_units() == {3: ["layers/conv2/relevance/c/3/0: missing"]}
    cfg = OmegaConf.create({"stage": "mine", "store": {"path": str(copy)}})
    with pytest.raises(RuntimeError, match=r"unit 3: layers/conv2/relevance/c/3/0: missing"):
        open_store(cfg, copy.parent)  # what mine, atlas and evaluate read the store with
    found = verify(copy)
    assert list(found.damaged) == [3]
    assert "layers/conv2/relevance/c/3/0: missing" in found.damaged[3][0]
    report = reanalyze(analyzer, dataset, copy)
    assert report.computed == [3] and list(report.recomputed) == [3]
    assert_same(copy, reference)
    assert verify(copy).ok


def test_a_flipped_byte_fails_to_read_naming_array_and_file(copy, analyzer, dataset):
    reference = all_arrays(copy)
    flip_byte(copy / "layers/linear1/act_max/c/5/0")
    store = ct.store.open(copy)
    with pytest.raises(StoreDamagedError, match=r"layers/linear1/act_max/c/5/0.*checksum"):
        store.layer("linear1", "act_max")[:]
    found = verify(copy)
    assert list(found.damaged) == [5] and "checksum" in found.damaged[5][0]
    assert reanalyze(analyzer, dataset, copy).computed == [5]
    assert_same(copy, reference)


def test_a_truncated_chunk_is_named_not_a_bare_codec_error(copy):
    file = copy / "samples/label/c/2"
    file.write_bytes(file.read_bytes()[:5])
    with pytest.raises(StoreDamagedError, match=r"samples/label/c/2: RuntimeError: Zstd") as err:
        ct.store.open(copy).samples("label")[:]
    assert "crp-toolkit verify" in str(err.value)
    with pytest.raises(StoreDamagedError, match="samples/label/c/2"):
        ct.store.open(copy).samples("label").vindex[[25]]
    assert list(verify(copy).damaged) == [2]


def test_rewritten_contents_are_found_by_the_digest(copy, analyzer, dataset):
    """Chunks that decode but hold other numbers than the pass wrote (e.g. a stray write)."""
    reference = all_arrays(copy)
    zarr.open_group(copy, mode="r+")["layers/conv2/rel_max"][10:20] = 7.0
    found = verify(copy)
    assert found.damaged == {1: ["its contents differ from what was written (digest mismatch)"]}
    assert reanalyze(analyzer, dataset, copy).computed == [1]
    assert_same(copy, reference)


def test_a_damaged_per_chunk_table_is_recomputed(copy, analyzer, dataset):
    reference = all_arrays(copy)
    (copy / "layers/conv2/tables/top_scores/c/6/0/0/0").unlink()
    assert list(verify(copy).damaged) == [6]
    assert reanalyze(analyzer, dataset, copy).computed == [6]
    assert_same(copy, reference)


def test_a_damaged_derived_result_is_named(copy):
    shutil.rmtree(copy / "derived/tables/conv2/relevance-sum-normalised/scores/c")
    found = verify(copy)
    assert not found.ok and not found.damaged
    assert (
        found.derived
        and "derived/tables/conv2/relevance-sum-normalised/scores" in (found.derived[0])
    )
    assert "crp-toolkit mine" in found.summary()


def test_verify_on_the_command_line(copy, tmp_path):
    sound = cli("verify", f"store.path={copy}", f"hydra.run.dir={tmp_path / 'ok'}")
    assert sound.returncode == 0, sound.stderr
    assert "7 units" in sound.stdout and json.loads((tmp_path / "ok/verify.json").read_text())["ok"]
    (copy / "samples/valid/c/4").unlink()
    damaged = cli("verify", f"store.path={copy}", f"hydra.run.dir={tmp_path / 'bad'}")
    assert damaged.returncode != 0
    assert "unit 4" in damaged.stdout and "samples/valid/c/4: missing" in damaged.stdout
    report = json.loads((tmp_path / "bad/verify.json").read_text())
    assert not report["ok"] and list(report["damaged"]) == ["4"]


def test_the_store_opens_in_xarray_with_coordinates(copy):
    samples = xr.open_zarr(copy, group="samples", consolidated=False)
    assert list(samples.sample.values) == list(range(64))
    assert list(samples["class"].values) == [str(k) for k in range(10)]
    assert samples.logits.dims == ("sample", "class")
    assert not samples.valid.sel(sample=sorted(BROKEN)).any()
    layer = xr.open_zarr(copy, group="layers/conv2", consolidated=False)
    assert layer.relevance.dims == ("sample", "concept")
    assert list(layer.concept.values) == list(range(layer.sizes["concept"]))
    store = ct.store.open(copy)
    np.testing.assert_array_equal(layer.relevance.sel(sample=7).values, store.layer("conv2")[7])
    tables = xr.open_zarr(copy, group="layers/conv2/tables", consolidated=False)
    assert "relevance-sum-normalised" in list(tables.spec.values)
