"""Streaming reference tables, top logits and top-concept heatmaps in a real store: merged
tables equal brute force over the whole score matrix, mining from tables equals mining from
the matrices, heatmaps equal direct CondAttribution calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Images

import crp_toolkit as ct
from crp_toolkit.mining.references import class_references, reference_samples
from crp_toolkit.store import tables
from crp_toolkit.store.analysis import analyze_dataset, layer_tables
from crp_toolkit.store.results import read_result
from crp_toolkit.store.tables import (
    SOURCES,
    SPECS,
    class_table_name,
    merge_tables,
    scores,
    table_name,
)
from crp_toolkit.store.zarr_store import (
    Layout,
    StoreMismatchError,
    StoreOptions,
    create_or_resume,
    write_chunk,
)

K, K_CLASS, BROKEN, LAYERS = 12, 3, {3, 40}, ["conv2", "linear1"]
KINDS = ("samples", "scores")


@pytest.fixture(scope="module")
def analyzer(fashion_model):
    return ct.LRP(ct.canonize(fashion_model), ct.composites.EpsilonPlus())


def _analyze(analyzer, data, path, **options) -> Path:
    return analyze_dataset(
        analyzer, data, LAYERS, path, dataset_description="tables", progress=False, **options
    ).path


@pytest.fixture(scope="module")
def stores(analyzer, fashion_data, tmp_path_factory):
    """The same 64 images (two unreadable) with tables (chunks of 10 rows: 64 is no multiple,
    and a chunk holds fewer rows than k) and without."""
    x, y = fashion_data
    data = Images(x, y, broken=BROKEN)
    tmp = tmp_path_factory.mktemp("tables")
    with_tables = _analyze(
        analyzer,
        data,
        tmp / "t.zarr",
        options=StoreOptions(chunk=10, table_size=K, class_table_size=K_CLASS),
    )
    without = _analyze(
        analyzer,
        data,
        tmp / "m.zarr",
        options=StoreOptions(chunk=10, table_size=0, class_table_size=0),
    )
    return ct.store.open(with_tables), ct.store.open(without)


def brute_scores(store, layer, spec):
    """The whole score matrix in memory, unreadable samples at -inf."""
    positions = int(np.prod(store.attrs["layers"][layer][1:]))
    values = scores(store.layer(layer, spec.stat)[:], spec, positions)
    values[~store.samples("valid")[:]] = -np.inf
    return values


def brute_top(values, k):
    """Stable sort of every column (ties: lower sample first)."""
    order = np.argsort(-values, axis=0, kind="stable")[:k]
    best = np.take_along_axis(values, order, 0)
    return np.where(np.isfinite(best), order, -1), best


@pytest.mark.parametrize("layer", LAYERS)
def test_merged_tables_equal_brute_force(stores, layer):
    store, _ = stores
    labels = store.samples("label")[:]
    assert store.attrs["tables_merged"]
    for spec in SPECS:
        values = brute_scores(store, layer, spec)
        table = read_result(store.path, table_name(layer, spec))
        samples, best = brute_top(values, K)
        np.testing.assert_array_equal(table["samples"], samples, err_msg=spec.name)
        np.testing.assert_array_equal(table["scores"], best, err_msg=spec.name)
        assert not np.isin(table["samples"], list(BROKEN)).any()
        per_class = read_result(store.path, class_table_name(layer, spec))
        assert per_class["samples"].shape == (10, K_CLASS, values.shape[1])
        for y in range(10):
            in_class = np.where((labels == y)[:, None], values, -np.inf)
            samples, best = brute_top(in_class, K_CLASS)
            np.testing.assert_array_equal(per_class["samples"][y], samples, err_msg=spec.name)
            np.testing.assert_array_equal(per_class["scores"][y], best, err_msg=spec.name)


def test_ties_go_to_the_lower_sample(stores):
    """Units of linear1 that a ReLU silences get relevance 0: real ties, merged across chunks."""
    store, _ = stores
    for name in (table_name("linear1", SPECS[1]), class_table_name("linear1", SPECS[1])):
        table = read_result(store.path, name)
        scores_, samples = table["scores"], table["samples"]
        tied = (scores_[..., 1:, :] == scores_[..., :-1, :]) & np.isfinite(scores_[..., 1:, :])
        assert tied.sum() > 0, "the fixture has tied scores"
        assert (samples[..., 1:, :][tied] > samples[..., :-1, :][tied]).all()


@pytest.mark.parametrize("layer", LAYERS)
def test_reference_samples_from_tables_equal_from_matrices(stores, layer):
    with_tables, without = stores
    for spec in SPECS:
        options = {"mode": spec.mode, "pool": spec.pool, "normalised": spec.normalised}
        for k, classes in ((K, None), (5, None), (K_CLASS, [1, 7, 8]), (2, [0])):
            a = reference_samples(with_tables, layer, n_refs=k, classes=classes, **options)
            b = reference_samples(without, layer, n_refs=k, classes=classes, **options)
            np.testing.assert_array_equal(a.samples, b.samples)
            np.testing.assert_array_equal(a.scores, b.scores)
        a = class_references(with_tables, layer, n_refs=K_CLASS, **options)
        b = class_references(without, layer, n_refs=K_CLASS, **options)
        np.testing.assert_array_equal(a.samples, b.samples)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_class_references_equal_brute_force_beyond_the_stored_tables(stores):
    store, _ = stores
    labels = store.samples("label")[:]
    table = class_references(store, "conv2", n_refs=K_CLASS + 2)  # more than stored: from matrices
    values = brute_scores(store, "conv2", SPECS[0])
    assert table.samples.shape == (10, K_CLASS + 2, values.shape[1])
    for y in range(10):
        samples, best = brute_top(np.where((labels == y)[:, None], values, -np.inf), K_CLASS + 2)
        np.testing.assert_array_equal(table.samples[y], samples)
        np.testing.assert_array_equal(table.scores[y], best)


def tied_statistics(rng, rows: int, concepts: int) -> dict[str, np.ndarray]:
    """Statistics full of ties: a few small integers, signed zeros, NaN and -inf."""
    stats = {}
    for stat in SOURCES.values():
        values = rng.integers(-1, 3, (rows, concepts)).astype(np.float32)
        values[rng.random(values.shape) < 0.2] = -0.0
        values[rng.random(values.shape) < 0.03] = np.nan
        values[rng.random(values.shape) < 0.03] = -np.inf
        stats[stat] = values
    return stats


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # -inf / inf normalising
@pytest.mark.parametrize("n_classes", [3, 40])
def test_merge_of_tied_chunks_equals_a_stable_sort(n_classes, tmp_path, monkeypatch):
    """Chunks of 8 rows (some with fewer valid rows than k or none, most missing some
    classes), merged one chunk per block (each pruned against the tables so far), equal a
    stable sort of the whole matrix bit for bit, signed zeros included."""
    monkeypatch.setattr(tables, "MERGE_BUDGET", 1)
    rng = np.random.default_rng(n_classes)
    layout = Layout(
        61, n_classes, {"l": (5,)}, StoreOptions(chunk=8, table_size=6, class_table_size=3)
    )
    stats = tied_statistics(rng, 61, 5)
    labels = rng.integers(0, n_classes, 61)
    valid = rng.random(61) < 0.8
    valid[16:24] = False  # a chunk without a single sample
    group = create_or_resume(tmp_path / "s.zarr", layout, {})
    for c in range(layout.n_chunks):
        rows = slice(layout.rows(c).start, layout.rows(c).stop)
        arrays = {"samples/label": labels[rows], "samples/valid": valid[rows]}
        arrays |= {f"layers/l/{stat}": values[rows] for stat, values in stats.items()}
        write_chunk(group, layout, c, arrays | layer_tables(layout, c, arrays))
    for workers in (1, 3):  # the specs merged one after another or side by side
        merge_tables(tmp_path / "s.zarr", workers=workers)
        _assert_stable_sort(tmp_path / "s.zarr", stats, labels, valid, n_classes)


def _assert_stable_sort(path, stats, labels, valid, n_classes):
    for spec in SPECS:
        values = scores(stats[spec.stat], spec, 1)
        values[~valid[:, None] | np.isnan(values)] = -np.inf
        table = read_result(path, table_name("l", spec))
        for kind, want in zip(KINDS, brute_top(values, 6)):
            assert table[kind].tobytes() == want.tobytes(), spec.name
        per_class = read_result(path, class_table_name("l", spec))
        for y in range(n_classes):
            in_class = np.where((labels == y)[:, None], values, -np.inf)
            for kind, want in zip(KINDS, brute_top(in_class, 3)):
                assert per_class[kind][y].tobytes() == want.tobytes(), (spec.name, y)


def test_tables_off_and_merge_rules(stores, analyzer, fashion_data, tmp_path):
    with_tables, without = stores
    assert "layers/conv2/tables" not in without.group and "derived" not in without.group
    before = read_result(with_tables.path, table_name("conv2", SPECS[3]))
    merge_tables(with_tables.path)  # idempotent
    again = read_result(with_tables.path, table_name("conv2", SPECS[3]))
    np.testing.assert_array_equal(before["samples"], again["samples"])
    x, y = fashion_data
    data = Images(x[:20], y[:20])
    with pytest.raises(StoreMismatchError):  # table sizes are part of the store's shape
        _analyze(
            analyzer,
            Images(x, y, broken=BROKEN),
            with_tables.path,
            options=StoreOptions(chunk=10, table_size=K + 1),
        )
    partial = _analyze(
        analyzer,
        data,
        tmp_path / "p.zarr",
        shards=2,
        options=StoreOptions(chunk=10, table_size=4, class_table_size=2),
    )
    assert not ct.store.open(partial).complete
    with pytest.raises(ValueError, match="not complete"):
        merge_tables(partial)
    with pytest.raises(ValueError, match="at least 0"):
        _analyze(analyzer, data, tmp_path / "bad.zarr", options=StoreOptions(table_size=-1))


def test_top_logits_replace_the_logits(analyzer, fashion_data, tmp_path):
    x, y = fashion_data
    data = Images(x[:24], y[:24], broken={5})
    store = ct.store.open(
        _analyze(analyzer, data, tmp_path / "l.zarr", options=StoreOptions(chunk=16, keep_logits=3))
    )
    assert "samples/logits" not in store.group and store.classes == 10
    keep = np.flatnonzero(store.samples("valid")[:])
    logits = analyzer.forward(x[keep]).output
    best = torch.sort(logits, dim=1, descending=True, stable=True)
    np.testing.assert_array_equal(store.samples("top_classes")[:][keep], best.indices[:, :3])
    np.testing.assert_allclose(store.samples("top_logits")[:][keep], best.values[:, :3], rtol=1e-6)
    assert store.samples("top_logits").metadata.dimension_names == ("sample", "rank")
    full = ct.store.open(
        _analyze(
            analyzer, data, tmp_path / "f.zarr", options=StoreOptions(chunk=16, keep_logits=10)
        )
    )
    assert full.samples("logits").shape == (24, 10)  # not more classes than keep_logits: all kept


@pytest.mark.parametrize("target", ["label", "prediction"])
def test_top_heatmaps_equal_cond_attribution(analyzer, fashion_data, tmp_path, target):
    x, y = fashion_data
    data = Images(x[:12], y[:12], broken={4})
    path = _analyze(
        analyzer,
        data,
        tmp_path / "h.zarr",
        target=target,
        options=StoreOptions(chunk=8, top_heatmaps=3, table_size=0),
    )
    store = ct.store.open(path)
    attr = ct.CondAttribution(analyzer)
    keep = np.flatnonzero(store.samples("valid")[:])
    for layer in LAYERS:
        concepts = store.layer(layer, "top_concepts")[:]
        heatmaps = store.layer(layer, "top_heatmaps")[:]
        assert heatmaps.shape == (12, 3, 28, 28) and heatmaps.dtype == np.float16
        relevance = store.layer(layer)[:]
        expected = np.argsort(-relevance, axis=1, kind="stable")[:, :3]
        np.testing.assert_array_equal(concepts[keep], expected[keep])
        explained = store.samples(target)[:]
        for i in keep[::3]:
            conditions = [{"y": int(explained[i]), layer: [int(c)]} for c in concepts[i]]
            direct = attr(x[i : i + 1], conditions).heatmaps
            np.testing.assert_allclose(heatmaps[i], direct.numpy(), rtol=1e-2, atol=1e-4)
