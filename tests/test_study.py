"""The study seam on the real FashionMNIST store: fingerprints checked once, when a study is
made; derived results read back only under their key; the one chunk reader of mining."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import STORE_DESCRIPTION

import crp_toolkit as ct
import crp_toolkit.store.study as study_module
from crp_toolkit.mining import ablation_curves, localise_references, read_ablation
from crp_toolkit.mining.references import (
    concept_scores,
    read_chunks,
    reference_samples,
    score_chunks,
)
from crp_toolkit.store import Study, read_result, write_result
from crp_toolkit.store.tables import Spec


def test_fingerprints_are_checked_once_when_the_study_is_made(
    analyzer, dataset, store, monkeypatch
):
    calls = []
    real = study_module.model_fingerprint

    def counted(model):
        calls.append(model)
        return real(model)

    monkeypatch.setattr(study_module, "model_fingerprint", counted)
    made = Study(store, analyzer, dataset, STORE_DESCRIPTION)
    assert len(calls) == 1 and made.provenance == dict(store.attrs["provenance"])
    table = reference_samples(store, "conv2", n_refs=2)
    localise_references(made, table, concepts=[0, 1], cache=False)
    localise_references(made, table, concepts=[2], cache=False)
    ablation_curves(made, "conv2", samples=4, steps=2, write=False)
    assert len(calls) == 1  # nothing re-hashes the model's parameters
    with pytest.raises(ct.store.StoreMismatchError, match="dataset"):
        Study(store, analyzer, dataset, "another description")


def test_a_read_with_another_key_is_a_miss(analyzer, dataset, store):
    arrays = {"x": np.arange(3)}
    write_result(store.path, "tests/keyed", arrays, dims={"x": ("i",)}, key={"a": 1, "b": [1]})
    found = read_result(store.path, "tests/keyed", {"a": 1, "b": (1,)})  # as JSON reads it
    np.testing.assert_array_equal(found["x"], arrays["x"])
    assert read_result(store.path, "tests/keyed", {"a": 2, "b": [1]}) is None
    made = Study(store, analyzer, dataset, STORE_DESCRIPTION)
    curves = ablation_curves(made, "conv2", samples=4, steps=2, seed=1)
    assert read_ablation(made, "conv2", seed=1).key == curves.key
    assert read_ablation(made, "conv2", seed=2) is None  # kept for seed 1 only: stale here


def test_the_chunk_reader_covers_the_store_once_in_order(store):
    spec = Spec("activation", "max", False)
    parts = list(read_chunks(store, "conv2", spec))
    chunk, n = store.attrs["chunk"], store.attrs["n_samples"]
    assert [len(p.samples) for p, _ in parts] == [min(chunk, n - s) for s in range(0, n, chunk)]
    samples = np.concatenate([p.samples for p, _ in parts])
    np.testing.assert_array_equal(samples, np.arange(n))
    valid = store.samples("valid")[:]
    np.testing.assert_array_equal(np.concatenate([keep for _, keep in parts]), valid)
    every = concept_scores(store, "conv2", slice(0, n), spec)
    np.testing.assert_array_equal(np.concatenate([p.scores for p, _ in parts]), every)
    readable = list(score_chunks(store, "conv2", spec))
    np.testing.assert_array_equal(
        np.concatenate([p.samples for p in readable]), np.flatnonzero(valid)
    )
    np.testing.assert_array_equal(np.concatenate([p.scores for p in readable]), every[valid])
    labels = np.concatenate([p.labels for p in readable])
    np.testing.assert_array_equal(labels, store.samples("label")[:][valid])
