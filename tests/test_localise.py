"""Localised reference samples on a real FashionMNIST store: conditional heatmaps equal direct
CondAttribution calls, receptive-field boxes equal hand-derived ones, views and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import STORE_DESCRIPTION

import crp_toolkit as ct
from crp_toolkit.atlas.views import ViewOptions, crop_window, reference_views
from crp_toolkit.data.training import load_world_model
from crp_toolkit.engine.receptive_field import receptive_field
from crp_toolkit.mining import reference_samples
from crp_toolkit.mining.localise import localise_references
from crp_toolkit.store import Study

CONCEPTS = [0, 5, 11]


def localise(analyzer, dataset, store, mode="relevance", **options):
    table = reference_samples(store, "conv2", mode=mode, n_refs=3)
    study = Study(store, analyzer, dataset, STORE_DESCRIPTION)
    return localise_references(study, table, concepts=CONCEPTS, **options)


@pytest.mark.parametrize("mode", ["relevance", "activation"])
def test_heatmaps_equal_direct_cond_attribution(analyzer, dataset, store, mode):
    found = localise(analyzer, dataset, store, mode, cache=False)
    labels = store.samples("label")[:]
    attribution = ct.CondAttribution(analyzer)
    for r in range(3):
        for j, c in enumerate(CONCEPTS):
            s = int(found.samples[r, j])
            assert found.classes[r, j] == labels[s]  # the store explains labels
            direct = attribution(
                dataset[s][0][None], [{"y": int(labels[s]), "conv2": [c]}], record=["conv2"]
            )
            torch.testing.assert_close(
                torch.from_numpy(found.heatmaps[r, j]), direct.heatmaps[0], rtol=1e-5, atol=1e-7
            )
            if mode == "relevance":  # the argmax of the concept's conditional relevance
                best = direct.relevances["conv2"][0, c].argmax()
                expected = np.unravel_index(int(best), (12, 12))
            else:  # the stored position of its maximal activation
                expected = np.unravel_index(store.layer("conv2", "act_argmax")[s, c], (12, 12))
            assert tuple(found.positions[r, j]) == tuple(int(v) for v in expected)


def closed_form_world(i: int, pools: int) -> tuple[int, int]:
    """Half-open rows seen by neuron i of the conv after ``pools`` blocks (3x3 conv, pad 1;
    2x2 max pool): a conv widens an interval [a, b] to [a - 1, b + 1] and a pool maps it to
    [2a, 2b + 1], so with s = 2**pools the neuron sees [s i - (2s - 1), s i + 3s - 2],
    clipped to the 64-pixel image."""
    s = 2**pools
    return max(s * i - (2 * s - 1), 0), min(s * i + 3 * s - 2, 63) + 1


@pytest.mark.parametrize(
    "layer, pools", [("features.0", 0), ("features.4", 1), ("features.8", 2), ("features.12", 3)]
)
def test_receptive_fields_of_the_world_cnn(layer, pools):
    analyzer = ct.LRP(ct.canonize(load_world_model()), ct.composites.EpsilonPlus())
    field = receptive_field(analyzer, layer, (3, 64, 64))
    size = 64 // 2**pools
    assert field.boxes.shape == (size, size, 4)
    for i in range(size):
        for j in range(size):
            assert tuple(field.box((i, j))) == (
                *closed_form_world(i, pools),
                *closed_form_world(j, pools),
            )
    assert tuple(receptive_field(analyzer, "classifier", (3, 64, 64)).box(())) == (0, 64, 0, 64)


def test_receptive_fields_of_the_fashion_cnn(analyzer):
    conv1 = receptive_field(analyzer, "conv1", (1, 28, 28))  # 3x3, stride 1, on the input
    conv2 = receptive_field(analyzer, "conv2", (1, 28, 28))  # 3x3 stride 2 on conv1
    parallel = receptive_field(analyzer, "parallel.0", (1, 28, 28))  # 5x5 stride 2 on the input
    for i in range(12):
        for j in range(12):
            expected = (2 * i, 2 * i + 5, 2 * j, 2 * j + 5)
            assert tuple(conv2.box((i, j))) == expected
            assert tuple(parallel.box((i, j))) == expected
    assert all(tuple(conv1.box((i, i))) == (i, i + 3, i, i + 3) for i in range(26))
    assert tuple(receptive_field(analyzer, "linear1", (1, 28, 28)).box(())) == (0, 28, 0, 28)


def test_boxes_crops_and_dimmed_views(analyzer, dataset, store):
    view = ViewOptions(crop_size=5, blur=0.0)  # the conv2 box is 5x5: crops are the box itself
    found = localise(analyzer, dataset, store, cache=False)
    views = reference_views(Study(store, analyzer, dataset, STORE_DESCRIPTION), found, view)
    field = receptive_field(analyzer, "conv2", (1, 28, 28))
    for r in range(3):
        for j in range(len(CONCEPTS)):
            box, window = found.boxes[r, j], views.windows[r, j]
            assert tuple(box) == tuple(field.box(found.positions[r, j]))
            y0, y1, x0, x1 = window
            assert 0 <= y0 < y1 <= 28 and 0 <= x0 < x1 <= 28  # inside the image
            assert y0 <= box[0] and box[1] <= y1 and x0 <= box[2] and box[3] <= x1  # holds the box
            image = dataset[int(found.samples[r, j])][0].numpy()
            np.testing.assert_allclose(views.crops[r, j], image[:, y0:y1, x0:x1], rtol=1e-6)
            heat = found.heatmaps[r, j]
            bright = heat >= view.threshold * heat.max()
            expected = image * np.where(bright, 1.0, view.dim)
            np.testing.assert_allclose(views.dimmed[r, j], expected, rtol=1e-6)
    assert views.crops.shape == (3, 3, 1, 5, 5) and views.dimmed.shape == (3, 3, 1, 28, 28)


@pytest.mark.parametrize("box", [(0, 5, 0, 5), (23, 28, 20, 28), (3, 20, 10, 12), (0, 28, 4, 9)])
def test_crop_windows_are_squares_inside_the_image_around_the_box(box):
    y0, y1, x0, x1 = crop_window(box, 28, 28)
    assert y1 - y0 == x1 - x0 == max(box[1] - box[0], box[3] - box[2])
    assert min(y0, x0) >= 0 and max(y1, x1) <= 28
    assert y0 <= box[0] and box[1] <= y1 and x0 <= box[2] and box[3] <= x1


def test_cache_is_keyed_by_the_composite(fashion_model, analyzer, dataset, store):
    first = localise(analyzer, dataset, store)
    again = localise(analyzer, dataset, store)
    assert not first.from_cache and again.from_cache
    np.testing.assert_array_equal(again.heatmaps, first.heatmaps)
    np.testing.assert_array_equal(again.boxes, first.boxes)
    flat = ct.LRP(ct.canonize(fashion_model), ct.composites.EpsilonPlusFlat())
    other = localise(flat, dataset, store)
    assert not other.from_cache and other.key["composite"] == repr(flat.composite)
    assert other.key["composite"] != first.key["composite"]
    assert not np.allclose(other.heatmaps, first.heatmaps)  # Flat on the first layers
    assert localise(analyzer, dataset, store).from_cache  # the first entry is still there


def test_a_model_or_dataset_other_than_the_stores_is_refused(fashion_model, dataset, store):
    uncanonized = ct.LRP(fashion_model, ct.composites.EpsilonPlus())
    with pytest.raises(ct.store.StoreMismatchError, match="model"):
        localise(uncanonized, dataset, store)
    analyzer = ct.LRP(ct.canonize(fashion_model), ct.composites.EpsilonPlus())
    with pytest.raises(ct.store.StoreMismatchError, match="dataset"):
        Study(store, analyzer, dataset, "other")


def test_bad_selection_is_refused(analyzer, dataset, store):
    table = reference_samples(store, "conv2", n_refs=3)
    study = Study(store, analyzer, dataset, STORE_DESCRIPTION)
    with pytest.raises(ValueError, match="0..15"):
        localise_references(study, table, concepts=[16])
    with pytest.raises(ValueError, match="n_refs must be between 1 and"):
        localise_references(study, table, n_refs=4)
