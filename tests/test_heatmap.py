"""Heatmaps: signed colours (red positive, blue negative, white none), shapes, figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crp_toolkit as ct


def test_signed_colours_and_symmetric_scaling():
    relevance = torch.zeros(1, 3, 4, 4)
    relevance[0, :, 0, 0] = 1.0  # positive
    relevance[0, :, 3, 3] = -1.0  # negative
    image = ct.heatmap(relevance, percentile=100)[0]
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8
    red, green, blue = (int(v) for v in image[0, 0])
    assert red > 150 and red > blue + 100 and red > green + 100
    red, green, blue = (int(v) for v in image[3, 3])
    assert blue > 150 and blue > red + 100
    assert (image[1, 1] > 240).all()  # zero relevance is white


def test_heatmaps_of_an_explanation_and_a_figure(fashion_model, fashion_data, tmp_path):
    x = fashion_data[0][:3]
    expl = ct.analyze(x, ct.LRP(ct.canonize(fashion_model), ct.composites.EpsilonPlusFlat()))
    images = ct.heatmap(expl)
    assert images.shape == (3, 28, 28, 3)
    overlay = ct.heatmap(expl, overlay=x)
    assert overlay.shape == images.shape and not np.array_equal(overlay, images)
    paths = ct.save_heatmaps(expl, tmp_path)
    assert [p.name for p in paths] == ["heatmap_000.png", "heatmap_001.png", "heatmap_002.png"]
    figure = ct.heatmap_figure(expl, inputs=x, titles=["a", "b", "c"])
    figure.savefig(tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 1000


def test_heatmaps_of_every_explanation_are_one_image_per_row(fashion_model, fashion_data):
    """CRP's explanation gives one heatmap per (sample, feature), sample-major, each the same
    image as that row's conditional heatmap from CondAttribution."""
    x = fashion_data[0][:2]
    analyzer = ct.LRP(ct.canonize(fashion_model), ct.composites.EpsilonPlusFlat())
    crp = ct.analyze(x, ct.CRP(analyzer, "conv2", ct.IndexedFeatures(3, 5, 8)), 1)
    images = ct.heatmap(crp)
    assert images.shape == (6, 28, 28, 3)
    conditions = [{"y": 1, "conv2": [c]} for c in (3, 5, 8)]
    cond = ct.analyze(x, ct.CondAttribution(analyzer), conditions=conditions)
    np.testing.assert_array_equal(images, ct.heatmap(cond))
    with pytest.raises(ValueError, match="heatmaps need"):
        ct.heatmap(torch.zeros(2, 5))
