"""Reference samples mined out of core from a real store equal brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from crp_toolkit.mining import reference_samples


def brute_force(store, layer, mode, pool, normalised, k, classes=None):
    if mode == "relevance":
        scores = store.layer(layer, "relevance" if pool == "sum" else "rel_max")[:]
    elif pool == "max":
        scores = store.layer(layer, "act_max")[:]
    else:
        scores = store.layer(layer, "act_mean")[:] * (144 if layer == "conv2" else 1)
    scores = scores.astype(np.float64)
    if normalised:
        scores = scores / np.maximum(np.abs(scores).sum(1, keepdims=True), 1e-30)
    keep = store.samples("valid")[:].copy()
    if classes is not None:
        keep &= np.isin(store.samples("label")[:], classes)
    scores[~keep] = -np.inf
    order = np.argsort(-scores, axis=0, kind="stable")[:k]
    return order, np.take_along_axis(scores, order, 0)


@pytest.mark.parametrize("layer", ["conv2", "linear1"])
@pytest.mark.parametrize("mode", ["relevance", "activation"])
@pytest.mark.parametrize("pool", ["sum", "max"])
@pytest.mark.parametrize("normalised", [True, False])
def test_reference_samples_equal_brute_force(store, layer, mode, pool, normalised):
    table = reference_samples(store, layer, mode=mode, pool=pool, normalised=normalised, n_refs=7)
    samples, scores = brute_force(store, layer, mode, pool, normalised, 7)
    np.testing.assert_array_equal(table.samples, samples)
    np.testing.assert_allclose(table.scores, scores, rtol=1e-12)
    assert 3 not in table.samples and 40 not in table.samples  # unreadable samples never count


def test_reference_samples_per_class(store):
    table = reference_samples(store, "conv2", classes=[2, 7], n_refs=3)
    samples, _ = brute_force(store, "conv2", "relevance", "sum", True, 3, classes=[2, 7])
    np.testing.assert_array_equal(table.samples, samples)
    labels = store.samples("label")[:]
    assert set(labels[table.samples.ravel()]) <= {2, 7}


def test_bad_arguments(store):
    with pytest.raises(ValueError, match="mode must be"):
        reference_samples(store, "conv2", mode="gradient")
    with pytest.raises(ValueError, match="n_refs must be"):
        reference_samples(store, "conv2", n_refs=0)
    with pytest.raises(KeyError, match="holds"):
        reference_samples(store, "conv9")
