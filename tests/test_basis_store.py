"""Learned bases on a real concept-world store: completeness of the directions plus residual on
the whole model, the basis kept in the store with its provenance, the concept-layer pass beside
the channels, mining, ablation and attribution graphs on it, damage to its files found by
``verify`` and recomputed exactly, and bad input refused before any work with nothing lost."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr
from omegaconf import OmegaConf

import crp_toolkit as ct
from crp_toolkit.app.context import open_store
from crp_toolkit.concepts.basis import ConceptBasis, split_concept_layer
from crp_toolkit.concepts.conditional import CondAttribution
from crp_toolkit.data.training import load_world_model
from crp_toolkit.data.world import CONCEPTS, ConceptWorld
from crp_toolkit.mining.ablation import ablation_curves, read_ablation
from crp_toolkit.mining.labels import Overlap, concept_labels, probe_labels
from crp_toolkit.mining.localise import localise_references
from crp_toolkit.mining.recovery import (
    match,
    polysemanticity,
    recovery,
    recovery_markdown,
    runner_up,
)
from crp_toolkit.mining.references import reference_samples
from crp_toolkit.mining.statistics import class_statistics
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.bases import (
    SamplingOptions,
    analyze_basis,
    basis_result,
    discover_basis,
    list_bases,
    load_basis,
    save_basis,
)
from crp_toolkit.store.integrity import StoreDamagedError
from crp_toolkit.store.results import list_results
from crp_toolkit.store.study import Study
from crp_toolkit.store.verify import verify
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
    options = StoreOptions(chunk=25, table_size=8, class_table_size=4)
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


def test_every_method_learns_from_the_real_model_and_is_seeded(study):
    """Each method through the real sampler (activations, and relevance-weighted ones)."""
    sampling = SamplingOptions(positions=4, batch_size=32, images=30)
    for method in ("pca", "dictionary", "kmeans", "sae"):
        for source in ("activation", "relevance"):
            found = discover_basis(
                study, LAYER, method, 4, source=source, sampling=sampling, progress=False
            )
            assert found.directions.shape == (4, 64) and np.isfinite(found.directions).all()
            assert found.name == f"{method}4" + ("" if source == "activation" else "-relevance")
    again = discover_basis(study, LAYER, "sae", 4, source="relevance", sampling=sampling)
    np.testing.assert_array_equal(again.directions, found.directions)


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
    stats = class_statistics(store, concept_layer, n_refs=4)
    assert stats.relevance.shape == (6, 7)
    table = reference_samples(store, concept_layer, n_refs=4)
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

    blind = _with_dataset(study, Unreadable())  # fails when the dataset is touched
    with pytest.raises(ValueError, match=message):
        discover_basis(blind, LAYER, method, k, sampling=sampling, progress=False)


def test_labels_name_each_concept_by_its_best_mask_and_are_kept(study, concept_layer):
    store = ct.store.open(study.store.path)
    here = Study(store, *_rest(study))
    labels = concept_labels(here, concept_layer, n_refs=4)
    assert labels.names == list(CONCEPTS)
    assert labels.scores.shape == (7, len(CONCEPTS))
    np.testing.assert_array_equal(labels.label, labels.scores.argmax(1))
    assert ((labels.score >= 0) & (labels.score <= 1)).all() and labels.score.max() > 0.1
    assert f"labels/{concept_layer}" in list_results(store.path)
    name, score = labels.of(2)
    assert (name, score) == (CONCEPTS[labels.label[2]], float(labels.score[2]))
    again = concept_labels(here, concept_layer, n_refs=4)
    np.testing.assert_array_equal(again.scores, labels.scores)


def test_recovery_matches_one_to_one_and_scores_what_it_matched(study, concept_layer):
    store = ct.store.open(study.store.path)
    here = Study(store, *_rest(study))
    channels = recovery(here, LAYER, n_refs=4)
    basis = recovery(here, concept_layer, n_refs=4, threshold=0.01, margin=0.0)
    assert (channels.concepts, basis.concepts) == (64, 6)  # the residual is not a concept
    assert len(set(basis.matched.values())) == len(basis.matched) == 6  # one-to-one
    assert basis.recovered == len(basis.recovered_names) <= 6
    assert len(channels.matched) == len(CONCEPTS)  # more concepts than ground truth: all
    assert 0 <= basis.redundancy <= 1 and 1 <= basis.polysemanticity <= 4
    strict = recovery(here, concept_layer, n_refs=4, threshold=1.0)
    assert strict.recovered == 0 and strict.mass_accuracy == basis.mass_accuracy
    table = recovery_markdown([channels, basis])
    assert f"| {LAYER} | 64 |" in table and f"| {concept_layer} | 6 |" in table


def test_matching_is_the_best_one_to_one_assignment():
    accuracy = np.array([[0.9, 0.8, 0.0], [0.85, 0.1, 0.0]])
    rows, cols = match(accuracy)
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 1: 0}
    np.testing.assert_allclose(runner_up(accuracy, rows, cols), [0.9, 0.1])


def test_polysemanticity_counts_the_names_a_concepts_references_mix():
    best = np.array([[0, 2, -1], [0, 3, -1], [0, 2, 1]])  # (references, concepts)
    found = Overlap(np.arange(3), ("a", "b", "c", "d"), np.zeros((3, 4)), np.zeros((3, 4)), best)
    assert polysemanticity(found) == (1 + 2 + 1) / 3


def test_a_probe_set_without_masks_is_refused_before_any_work(study):
    plain = torch.utils.data.TensorDataset(torch.zeros(60, 3, 64, 64), torch.zeros(60).long())
    blind = _with_dataset(study, plain)
    with pytest.raises(ValueError, match="has no named masks"):
        concept_labels(blind, LAYER)
    with pytest.raises(ValueError, match="has no named masks"):
        recovery(blind, LAYER)


def _with_dataset(study: Study, dataset) -> Study:
    """The study with another dataset, its fingerprint unchecked (to see what is refused)."""
    other = Study.__new__(Study)
    for name in ("store", "analyzer", "description", "provenance"):
        object.__setattr__(other, name, getattr(study, name))
    object.__setattr__(other, "dataset", dataset)
    return other


def test_labels_from_another_probe_set_equal_those_of_its_own_store(study, analyzer):
    """Labels read from a probe set directly (one CRP pass over it) equal the labels of a
    study whose store was made from that probe set: the same RelMax references, heatmaps and
    overlaps; a basis's directions get labels the same way."""
    probe = study.dataset  # as a plain annotated dataset, without its store
    direct = probe_labels(analyzer, LAYER, probe, concepts=range(6), n_refs=4, batch_size=25)
    stored = concept_labels(study, LAYER, concepts=list(range(6)), n_refs=4, reuse=False)
    np.testing.assert_array_equal(direct.label, stored.label)
    np.testing.assert_allclose(direct.scores, stored.scores, rtol=1e-4, atol=1e-6)
    other = ConceptWorld(30, seed=7)  # a probe set the store never saw
    basis = discover_basis(study, LAYER, "nmf", 3, sampling=SamplingOptions(8, 16), progress=False)
    labels = probe_labels(analyzer, LAYER, other, concept=basis.concept(), n_refs=3)
    assert labels.scores.shape == (4, len(CONCEPTS))  # 3 directions and the residual
    with pytest.raises(ValueError, match="has no named masks"):
        probe_labels(analyzer, LAYER, torch.utils.data.TensorDataset(torch.zeros(2, 3, 64, 64)))


# -- integrity of concept layers and stored bases ---------------------------------------------
@pytest.fixture
def copied(study, concept_layer, tmp_path):
    """A private copy of the store holding the basis's concept layer, as a study."""
    path = tmp_path / "s.zarr"
    shutil.copytree(study.store.path, path)
    return Study(ct.store.open(path), *_rest(study))


def concept_files(path, name: str) -> dict[str, bytes]:
    """Every file of the concept layer ``name``, by path."""
    folder = path / "layers" / name
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def rediscover(study: Study) -> str:
    """The discovery that made the basis, run again (as ``crp-toolkit discover`` does)."""
    sampling = SamplingOptions(positions=8, batch_size=16)
    again = discover_basis(study, LAYER, "nmf", 6, sampling=sampling, progress=False)
    return analyze_basis(study, again, batch_size=16, progress=False)


def test_a_sound_store_with_a_basis_verifies(copied, concept_layer):
    found = verify(copied.store.path)
    assert found.ok and found.concept_layers == {} and found.bases == {}


def test_a_deleted_concept_layer_chunk_is_named_and_recomputed_exactly(
    copied, concept_layer, caplog
):
    path = copied.store.path
    before = concept_files(path, concept_layer)
    (path / "layers" / concept_layer / "relevance/c/1/0").unlink()
    found = verify(path)
    assert not found.ok and not found.damaged  # the channels are sound
    missing = f"layers/{concept_layer}/relevance/c/1/0: missing"
    assert found.concept_layers == {concept_layer: {1: [missing]}}
    summary = found.summary()
    assert f"concept layer {concept_layer}, unit 1: {missing}" in summary
    assert f"crp-toolkit discover store.path={path} discover.layer={LAYER}" in summary
    assert "discover.methods=[nmf] discover.n_concepts=6" in summary
    assert "discover.positions=8" in summary and "loader.batch_size=16" in summary
    cfg = OmegaConf.create({"stage": "mine", "store": {"path": str(path)}})
    with pytest.raises(RuntimeError, match=f"lost files of learned bases .{concept_layer}: "):
        open_store(cfg, path.parent)  # what mine, atlas and evaluate read it with: no zeros
    assert open_store(cfg, path.parent, bases=False).layers == [LAYER, concept_layer]
    untouched = (path / "layers" / concept_layer / "relevance/c/0/0").stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        rediscover(copied)
    recomputed = [r.message for r in caplog.records if "is recomputed" in r.message]
    assert len(recomputed) == 1 and recomputed[0].startswith(f"unit 1 of {concept_layer}")
    assert (path / "layers" / concept_layer / "relevance/c/0/0").stat().st_mtime_ns == untouched
    assert concept_files(path, concept_layer) == before
    assert verify(path).ok


def test_rewritten_concept_layer_contents_are_found_by_the_digest(copied, concept_layer):
    path = copied.store.path
    zarr.open_group(path, mode="r+")[f"layers/{concept_layer}/act_mean"][25:50] = 3.0
    found = verify(path)
    assert found.concept_layers == {
        concept_layer: {1: ["its contents differ from what was written (digest mismatch)"]}
    }


def test_a_damaged_stored_basis_is_named_and_learned_again(copied, basis, concept_layer):
    path = copied.store.path
    layer_files = concept_files(path, concept_layer)
    file = path / "derived/bases" / LAYER / "nmf6/directions/c/0/0"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(StoreDamagedError, match="derived/bases/features.12/nmf6/directions"):
        load_basis(ct.store.open(path), concept_layer)
    found = verify(path)
    assert not found.ok and found.derived == [] and list(found.bases) == [concept_layer]
    assert "derived/bases/features.12/nmf6/directions/c/0/0" in found.bases[concept_layer][0]
    summary = found.summary()
    assert f"basis of {concept_layer} damaged" in summary and "crp-toolkit mine" not in summary
    assert "discover.methods=[nmf]" in summary
    rediscover(copied)
    back = load_basis(ct.store.open(path), concept_layer)
    np.testing.assert_array_equal(back.directions, basis.directions)
    assert concept_files(path, concept_layer) == layer_files  # the same basis: rows kept
    assert verify(path).ok


# -- ablation and attribution graphs on a basis -----------------------------------------------
def removed_components(model, basis: torch.Tensor, keep: torch.Tensor, x, classes):
    """The explained logits with the components of the basis concepts where ``keep`` (n, K + 1)
    is 0 removed from ``LAYER``'s output by a forward hook: coefficients by least squares
    (``torch.linalg.lstsq``, not the concept's pseudo-inverse), the residual last."""
    k = basis.shape[0]

    def hook(module, inputs, out):
        a = out.movedim(1, -1)  # (n, h, w, C)
        lhs = basis.T.expand(*a.shape[:-1], *basis.T.shape)
        c = torch.linalg.lstsq(lhs, a[..., None]).solution[..., 0]  # (n, h, w, K)
        parts = c[..., None] * basis  # (n, h, w, K, C)
        residual = a - parts.sum(-2)
        kept = (keep[:, None, None, :k, None] * parts).sum(-2) + keep[:, None, None, k:] * residual
        return kept.movedim(-1, 1)

    handle = model.get_submodule(LAYER).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x).gather(1, classes[:, None])[:, 0].numpy()
    finally:
        handle.remove()


def test_ablating_basis_concepts_removes_their_components(study, concept_layer):
    store = ct.store.open(study.store.path)
    here = Study(store, *_rest(study))
    found = ablation_curves(here, concept_layer, samples=6, write=False)
    assert found.orders.shape == (3, 6, 7) and list(found.removed) == list(range(8))
    x = torch.stack([study.dataset[int(s)][0] for s in found.samples])
    classes = torch.from_numpy(found.classes)
    basis = load_basis(store, concept_layer).concept().basis
    model, n = study.analyzer.model, len(x)
    unablated = removed_components(model, basis, torch.ones(n, 7), x, classes)
    with torch.no_grad():
        np.testing.assert_allclose(unablated, model(x).gather(1, classes[:, None])[:, 0], 1e-5)
        layer = model.get_submodule(LAYER)
        handle = layer.register_forward_hook(lambda m, i, out: torch.zeros_like(out))
        zeroed = model(x).gather(1, classes[:, None])[:, 0].numpy()  # all K + 1 removed: 0
        handle.remove()
    for o in range(3):
        np.testing.assert_allclose(found.logits[o, 0], unablated, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(found.logits[o, -1], zeroed, rtol=1e-4, atol=1e-4)
        keep = torch.ones(n, 7)
        keep[torch.arange(n)[:, None], torch.from_numpy(found.orders[o, :, :3])] = 0
        middle = removed_components(model, basis, keep, x, classes)
        np.testing.assert_allclose(found.logits[o, 3], middle, rtol=1e-4, atol=1e-4)
    for o, stat in ((0, "relevance"), (1, "act_mean")):  # orders follow the store's scores
        scores = store.layer(concept_layer, stat)[:][found.samples]
        ranked = np.take_along_axis(scores, found.orders[o], 1)
        assert (np.diff(ranked, axis=1) <= 1e-4 * np.abs(scores).max()).all()


def test_ablation_kept_for_a_basis_is_not_served_for_another_of_its_name(copied, concept_layer):
    """Removing a basis and learning another under its name (another seed) leaves the kept
    ablation curves of the old one unread: the key holds the directions' digest."""
    ablation_curves(copied, concept_layer, samples=4, steps=2, progress=False)
    assert read_ablation(copied, concept_layer) is not None
    shutil.rmtree(copied.store.path / "derived" / basis_result(*split_concept_layer(concept_layer)))
    sampling = SamplingOptions(positions=8, batch_size=16)
    other = discover_basis(copied, LAYER, "nmf", 6, seed=1, sampling=sampling, progress=False)
    assert save_basis(copied.store, other) == concept_layer
    assert read_ablation(copied, concept_layer) is None


def test_the_attribution_graph_decomposes_a_basis_concept(study, concept_layer):
    store = ct.store.open(study.store.path)
    concept = load_basis(store, concept_layer).concept()
    sample, direction = 0, 2
    x, y = study.dataset[sample][0][None], int(store.samples("label")[sample])
    graph = ct.attribution_graph(
        study.analyzer, x, concept_layer, direction, target=y, concepts={concept_layer: concept}
    )
    assert graph.root == ct.ConceptNode(concept_layer, direction)
    stored = float(store.layer(concept_layer)[sample, direction])  # the pass's own score
    assert graph.relevance[graph.root] == pytest.approx(stored, rel=1e-4, abs=1e-7)
    children = graph.children(graph.root)
    assert {child.layer for child, _ in children} == {"features.8"}  # channels feed it
    recorded = CondAttribution(study.analyzer, {LAYER: concept})(
        x, [{"y": y, LAYER: [direction]}], record=["features.8"]
    ).relevances["features.8"][0]
    for child, fraction in children:
        expected = float(recorded[child.concept].sum()) / graph.relevance[graph.root]
        assert fraction == pytest.approx(expected, rel=1e-5)


def test_a_basis_layer_below_the_root_holds_every_concept_and_all_its_relevance(
    study, concept_layer
):
    """The classifier's class unit decomposed into the basis's K + 1 concepts (full width):
    together they carry the relevance arriving at the layer, the residual included."""
    store = ct.store.open(study.store.path)
    concept = load_basis(store, concept_layer).concept()
    x, y = study.dataset[1][0][None], int(store.samples("label")[1])
    graph = ct.attribution_graph(
        study.analyzer,
        x,
        "classifier",
        y,
        target=y,
        widths=(7,),
        layers=["classifier"],
        concepts={concept_layer: concept},
    )
    children = graph.children(graph.root)
    assert sorted(c.concept for c, _ in children) == list(range(7))
    assert {c.layer for c, _ in children} == {concept_layer}
    arriving = study.analyzer(x, torch.tensor([y]), record=[LAYER]).relevances[LAYER].sum()
    carried = sum(f for _, f in children) * graph.relevance[graph.root]
    assert carried == pytest.approx(float(arriving), rel=1e-4)
    with pytest.raises(ValueError, match="give its concepts as concepts="):
        ct.attribution_graph(study.analyzer, x, concept_layer, 0)
    with pytest.raises(ValueError, match="several concept sets for one layer"):
        ct.attribution_graph(
            study.analyzer, x, LAYER, 0, concepts={LAYER: concept, concept_layer: concept}
        )
