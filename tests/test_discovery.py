"""Scored discovery's measures on real concept-world samples and their ground-truth masks."""

from __future__ import annotations

import numpy as np

from crp_toolkit.data.world import CONCEPTS, ConceptWorld
from crp_toolkit.mining.discovery import mass_accuracy, match_references

WORLD = ConceptWorld(n=40, seed=1)


def samples(indices):
    return [WORLD.sample(i) for i in indices]


def test_mass_accuracy_is_the_positive_share_inside_each_mask():
    found = samples(range(6))
    masks = np.stack([s.masks for s in found])
    rng = np.random.default_rng(0)
    heatmaps = rng.standard_normal((6, 64, 64))
    shares = mass_accuracy(heatmaps, masks)
    for n in range(6):
        positive = np.clip(heatmaps[n], 0, None)
        for k in range(len(CONCEPTS)):
            assert np.isclose(shares[n, k], positive[masks[n, k]].sum() / positive.sum())


def test_a_heatmap_on_one_concept_matches_that_concept():
    with_mark = [s for s in samples(range(40)) if s.concepts[CONCEPTS.index("watermark")]]
    assert len(with_mark) >= 3
    mark = CONCEPTS.index("watermark")
    heatmaps = np.stack([s.masks[mark] * 2.0 - 0.5 for s in with_mark])  # negative elsewhere
    masks = np.stack([s.masks for s in with_mark])
    presence = np.stack([s.concepts for s in with_mark])
    m = match_references(heatmaps, masks, presence)
    assert CONCEPTS[m.best] == "watermark" and m.accuracy[m.best] == 1.0 and m.purity == 1.0


def test_purity_counts_references_without_the_matched_concept():
    found = samples(range(40))
    red = CONCEPTS.index("red")
    has_red = [s for s in found if s.concepts[red]][:4]
    no_red = [s for s in found if not s.concepts[red]][:1]
    refs = has_red + no_red
    heatmaps = np.stack([s.masks[red].astype(float) for s in has_red] + [np.zeros((64, 64))])
    m = match_references(
        heatmaps, np.stack([s.masks for s in refs]), np.stack([s.concepts for s in refs])
    )
    matched, accuracy, purity = m.best, m.accuracy[m.best], m.purity
    assert all(s.concepts[matched] for s in has_red)  # a mask holding all of each red object
    assert np.isclose(purity, np.stack([s.concepts for s in refs])[:, matched].mean())
    assert np.isclose(accuracy, 4 / 5)  # the empty heatmap scores 0
