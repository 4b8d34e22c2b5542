"""Learned bases on a real concept-world store: completeness of the directions plus residual on
the whole model, the basis kept in the store with its provenance, the concept-layer pass beside
the channels, mining on it, and bad input refused before any work with nothing lost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crp_toolkit as ct
from crp_toolkit.concepts.basis import ConceptBasis
from crp_toolkit.concepts.conditional import CondAttribution
from crp_toolkit.data.training import load_world_model
from crp_toolkit.data.world import ConceptWorld
from crp_toolkit.mining.localise import localise_references
from crp_toolkit.mining.references import reference_samples
from crp_toolkit.mining.statistics import class_statistics
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.bases import (
    SamplingOptions,
    analyze_basis,
    discover_basis,
    list_bases,
    load_basis,
    save_basis,
)
from crp_toolkit.store.results import list_results
from crp_toolkit.store.study import Study
from crp_toolkit.store.zarr_store import StoreMismatchError, StoreOptions

LAYER = "features.12"
DESCRIPTION = "world-60"


@pytest.fixture(scope="module")
def analyzer():
    return ct.LRP(ct.canonize(load_world_model()), ct.composites.EpsilonPlusFlat())


@pytest.fixture(scope="module")
def study(analyzer, tmp_path_factory):
    world = ConceptWorld(60, seed=1)
    path = tmp_path_factory.mktemp("bases") / "s.zarr"
    options = StoreOptions(chunk=25, tables_k=8, class_tables_k=4)
    analyze_dataset(
        analyzer,
        world,
        [LAYER],
        path,
        dataset_description=DESCRIPTION,
        options=options,
        progress=False,
    )
    return Study(ct.store.open(path), analyzer, world, DESCRIPTION)


@pytest.fixture(scope="module")
def basis(study):
    sampling = SamplingOptions(positions=8, batch_size=16)
    return discover_basis(study, LAYER, "nmf", 6, sampling=sampling, progress=False)


@pytest.fixture(scope="module")
def concept_layer(study, basis):
    return analyze_basis(study, basis, batch_size=16, progress=False)


def test_directions_and_residual_add_up_to_the_unconditional_relevance(analyzer, basis):
    """On the whole model: the K + 1 conditional input heatmaps of a basis that does not span
    the layer (6 of 64 channels) sum to the unconditional heatmap, for every sample."""
    x = torch.stack([ConceptWorld(60, seed=1)[i][0] for i in range(3)])
    concept = basis.concept()
    assert concept.count(torch.zeros(1, 64)) == 7
    expl = ct.analyze(x, analyzer)
    attribution = CondAttribution(analyzer, {LAYER: concept})
    for b in range(3):
        conditions = [{"y": int(expl.target[b]), LAYER: [k]} for k in range(7)]
        parts = attribution(x[b : b + 1], conditions).relevance  # (7, *input)
        torch.testing.assert_close(parts.sum(0), expl.relevance[b], rtol=1e-4, atol=1e-6)
        share = parts[6].abs().sum() / expl.relevance[b].abs().sum()
        assert share > 1e-3  # the residual holds a real share


def test_a_seed_fixes_the_learned_basis(study, basis):
    again = discover_basis(
        study,
        LAYER,
        "nmf",
        6,
        sampling=SamplingOptions(positions=8, batch_size=16),
        progress=False,
    )
    np.testing.assert_array_equal(again.directions, basis.directions)
    assert basis.provenance["model"] == study.key["model"]
    assert basis.provenance["positions_seen"] == 60 * 8


def test_the_basis_is_kept_listed_and_read_back(study, basis, concept_layer):
    assert concept_layer == f"{LAYER}@nmf6"
    assert list_bases(study.store) == [concept_layer]
    back = load_basis(study.store, concept_layer)
    np.testing.assert_array_equal(back.directions, basis.directions)
    assert (back.method, back.source, back.seed) == ("nmf", "activation", 0)


def test_the_concept_layer_sits_beside_the_channels_and_adds_up(study, concept_layer):
    store = ct.store.open(study.store.path)
    assert store.layers == [LAYER, concept_layer]
    channels = store.layer(LAYER)[:]
    concepts = store.layer(concept_layer)[:]
    assert concepts.shape == (60, 7)
    np.testing.assert_allclose(concepts.sum(1), channels.sum(1), rtol=1e-4, atol=1e-6)
    assert store.shape(concept_layer) == (7, 8, 8)


def test_mining_and_localised_references_work_on_the_concept_layer(study, concept_layer):
    store = ct.store.open(study.store.path)
    stats = class_statistics(store, concept_layer, k=4)
    assert stats.relevance.shape == (6, 7)
    table = reference_samples(store, concept_layer, k=4)
    refs = localise_references(Study(store, *_rest(study)), table, concepts=[0, 6])
    assert refs.heatmaps.shape == (4, 2, 64, 64)
    # a reference's heatmap is its concept's conditional heatmap, explaining the stored class
    concept = load_basis(store, concept_layer).concept()
    attribution = CondAttribution(study.analyzer, {LAYER: concept})
    for j, c in enumerate([0, 6]):
        sample = int(refs.samples[0, j])
        x = study.dataset[sample][0][None]
        condition = {"y": int(refs.classes[0, j]), LAYER: [c]}
        heatmap = attribution(x, [condition]).heatmaps[0]
        np.testing.assert_allclose(refs.heatmaps[0, j], heatmap.numpy(), rtol=1e-4, atol=1e-7)
    # and the references are the samples where the concept is most relevant (normalised)
    scores = store.layer(concept_layer)[:]
    normalised = scores / np.abs(scores).sum(1, keepdims=True)
    np.testing.assert_array_equal(table.samples[:, 0], np.argsort(-normalised[:, 0])[:4])


def _rest(study):
    return study.analyzer, study.dataset, study.description


def test_a_basis_of_another_model_is_refused_and_nothing_is_lost(study, basis, concept_layer):
    before = list_results(study.store.path)
    foreign = ConceptBasis(
        LAYER, "pca", "activation", 0, basis.directions, {**basis.provenance, "model": "0" * 16}
    )
    with pytest.raises(StoreMismatchError, match="learned for another model"):
        save_basis(study.store, foreign)
    with pytest.raises(StoreMismatchError, match="learned for another model"):
        analyze_basis(study, foreign)
    assert list_results(study.store.path) == before
    assert ct.store.open(study.store.path).layers == [LAYER, concept_layer]


@pytest.mark.parametrize(
    ("method", "k", "sampling", "message"),
    [
        ("ica", 4, SamplingOptions(), "unknown basis method 'ica'"),
        ("nmf", 65, SamplingOptions(), "K=65 directions for a layer of 64 channels"),
        ("pca", 40, SamplingOptions(positions=1, images=20), "from 20 sampled positions"),
    ],
)
def test_bad_discoveries_are_refused_before_any_sample_is_read(study, method, k, sampling, message):
    class Unreadable(torch.utils.data.Dataset):
        def __len__(self):
            raise AssertionError("the dataset was read")

    blind = Study.__new__(Study)  # the real study, with a dataset that fails when touched
    object.__setattr__(blind, "store", study.store)
    object.__setattr__(blind, "analyzer", study.analyzer)
    object.__setattr__(blind, "dataset", Unreadable())
    object.__setattr__(blind, "description", study.description)
    object.__setattr__(blind, "provenance", study.provenance)
    with pytest.raises(ValueError, match=message):
        discover_basis(blind, LAYER, method, k, sampling=sampling, progress=False)
