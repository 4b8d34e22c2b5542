"""Class statistics, PCX prototypes and concept similarity mined out of core from real stores
equal brute-force numpy (and scikit-learn) on the whole matrix."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import BROKEN
from sklearn.mixture import GaussianMixture

from crp_toolkit.mining.prototypes import fit_prototypes, fit_subset
from crp_toolkit.mining.similarity import concept_similarity
from crp_toolkit.mining.statistics import (
    ClassStatistics,
    class_statistics,
    load_result,
    save_result,
    top_classes,
    top_concepts,
)
from crp_toolkit.store.zarr_store import (
    Layout,
    Store,
    StoreOptions,
    create_or_resume,
    write_chunk,
)


def write_store(path, relevance, labels, valid, chunk, classes) -> Store:
    """A store written with the store's own writer from a given relevance matrix (activations
    set equal to it)."""
    n, concepts = relevance.shape
    layout = Layout(
        n, classes, {"feat": (concepts,)}, StoreOptions(chunk, table_size=0, class_table_size=0)
    )
    group = create_or_resume(path, layout, {"model": "synthetic"})
    for i in range(layout.n_chunks):
        rows = slice(layout.rows(i).start, layout.rows(i).stop)
        arrays = layout.empty(rows.stop - rows.start)
        arrays["samples/label"][:] = labels[rows]
        arrays["samples/valid"][:] = valid[rows]
        for stat in ("relevance", "rel_max", "act_max", "act_mean"):
            arrays[f"layers/feat/{stat}"][:] = relevance[rows]
        arrays["layers/feat/normaliser"][:] = np.abs(relevance[rows]).sum(1)
        write_chunk(group, layout, i, arrays)
    return Store(path)


def valid_matrix(store, layer, stat="relevance", normalised=True):
    """The whole (readable samples x concepts) matrix in memory, its sample ids and labels."""
    valid = store.samples("valid")[:]
    scores = store.layer(layer, stat)[:].astype(np.float64)
    if normalised:
        scores = scores / np.maximum(np.abs(scores).sum(1, keepdims=True), 1e-30)
    return scores[valid], np.flatnonzero(valid), store.samples("label")[:][valid]


# -- class statistics --------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["conv2", "linear1"])
def test_class_statistics_equal_brute_force(store, layer):
    stats = class_statistics(store, layer, n_refs=3)
    X, _, labels = valid_matrix(store, layer)
    for cls in range(10):
        rows = X[labels == cls]
        assert stats.counts[cls] == len(rows)
        np.testing.assert_allclose(stats.relevance[cls], rows.mean(0), rtol=1e-10)
        best = -np.sort(-rows, axis=0)[:3]
        np.testing.assert_allclose(stats.usage[:, cls], best.mean(0), rtol=1e-10)
    assert stats.counts.sum() == 64 - len(BROKEN)  # unreadable samples never count


def test_top_classes_and_concepts_rank_by_the_statistics(store):
    stats = class_statistics(store, "conv2", n_refs=3)
    for concept in range(stats.usage.shape[0]):
        best = top_classes(stats, concept, 3)
        assert np.all(np.diff(stats.usage[concept, best]) <= 0)
        assert stats.usage[concept, best[-1]] >= np.delete(stats.usage[concept], best).max()
    best = top_concepts(stats, 4, 5)
    np.testing.assert_array_equal(best, np.argsort(-stats.relevance[4], kind="stable")[:5])
    with pytest.raises(ValueError, match="n must be"):
        top_concepts(stats, 4, 0)


def test_statistics_round_trip_through_the_store(store):
    stats = class_statistics(store, "linear1", n_refs=2)
    name = save_result(store, stats)
    back = load_result(store, ClassStatistics, name)
    for field in ("usage", "relevance", "counts"):
        np.testing.assert_array_equal(getattr(back, field), getattr(stats, field))
    assert (back.layer, back.n_refs, back.mode) == ("linear1", 2, "relevance")
    stored = zarr.open_group(store.path, mode="r")[f"derived/{name}/usage"]
    assert stored.metadata.dimension_names == ("concept", "class")


# -- similarity --------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "stat"), [("relevance", "relevance"), ("activation", "act_max")])
def test_cosine_equals_brute_force(store, mode, stat):
    sim = concept_similarity(store, "conv2", mode=mode, pool="max" if stat == "act_max" else "sum")
    X, _, _ = valid_matrix(store, "conv2", stat)
    unit = X / np.linalg.norm(X, axis=0)
    np.testing.assert_allclose(sim.cosine, unit.T @ unit, atol=1e-12)
    assert sim.cluster.shape == (16,) and sim.embedding.shape == (16, 2)


def test_duplicated_concepts_share_cluster_and_point(tmp_path):
    rng = np.random.default_rng(0)
    relevance = rng.gamma(1.0, size=(90, 12)).astype(np.float32)
    relevance[:, 5] = relevance[:, 2]  # an exact copy
    relevance[:, 7] = 3 * relevance[:, 1]  # the same profile, scaled
    labels = rng.integers(0, 3, 90)
    data = write_store(tmp_path / "d.zarr", relevance, labels, np.ones(90, bool), 16, 3)
    sim = concept_similarity(data, "feat", n_clusters=6)
    for a, b in ((2, 5), (1, 7)):
        assert sim.cosine[a, b] == pytest.approx(1.0)
        assert sim.cluster[a] == sim.cluster[b]
        np.testing.assert_allclose(sim.embedding[a], sim.embedding[b], atol=1e-9)
    others = np.linalg.norm(sim.embedding[[0, 3, 4, 6]] - sim.embedding[2], axis=1)
    assert others.min() > 1e-3  # distinct profiles are not collapsed onto one point
    with pytest.raises(ValueError, match="n_clusters"):
        concept_similarity(data, "feat", n_clusters=13)
    with pytest.raises(ValueError, match="mode must be"):
        concept_similarity(data, "feat", mode="gradient")


# -- prototypes --------------------------------------------------------------------------------
def refit(X, P, seed=0):
    return GaussianMixture(min(P, len(X)), covariance_type="full", random_state=seed).fit(X)


@pytest.mark.parametrize("layer", ["conv2", "linear1"])
def test_prototypes_equal_sklearn_and_brute_force(store, layer):
    protos = fit_prototypes(store, layer, n_prototypes=2, n_nearest=3, n_concepts=4)
    X, ids, labels = valid_matrix(store, layer)
    for cls in range(10):
        rows, sample = X[labels == cls], ids[labels == cls]
        model = refit(rows, 2)
        np.testing.assert_allclose(protos.log_likelihood[sample], model.score_samples(rows))
        np.testing.assert_allclose(protos.means[cls, : model.n_components], model.means_)
        assigned = model.predict(rows)
        np.testing.assert_array_equal(protos.prototype[sample], assigned)
        diff = rows - model.means_[assigned]
        over = np.argsort(-diff, axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(protos.overused[sample], over)
        np.testing.assert_allclose(protos.overuse[sample], np.take_along_axis(diff, over, 1))
        np.testing.assert_array_equal(
            protos.underused[sample], np.argsort(diff, axis=1, kind="stable")[:, :4]
        )
        for p, mean in enumerate(model.means_):  # the nearest samples are really nearest
            distance = np.linalg.norm(rows - mean, axis=1)
            nearest = protos.nearest[cls, p, : min(3, len(rows))]
            chosen = np.linalg.norm(X[np.searchsorted(ids, nearest)] - mean, axis=1)
            np.testing.assert_allclose(chosen, np.sort(distance)[: len(nearest)], atol=1e-12)
            assert set(nearest) <= set(sample)
    broken = sorted(BROKEN)
    assert np.isnan(protos.log_likelihood[broken]).all() and (protos.prototype[broken] == -1).all()


def class_data(seed=0, n=150):
    """Three classes of ``n`` samples, each a mixture of two concept-usage patterns over 16
    concepts; concept 15 is barely used by anyone."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n)
    patterns = rng.gamma(2.0, size=(3, 2, 16))
    patterns[..., 15] = 0.01
    pick = rng.integers(0, 2, 3 * n)
    relevance = patterns[labels, pick] * rng.uniform(0.8, 1.2, (3 * n, 16))
    return relevance.astype(np.float32), labels


def test_injected_outlier_gets_the_lowest_likelihood(tmp_path):
    relevance, labels = class_data()
    outlier = 153  # a class-1 sample that puts half its relevance on a concept nobody uses
    relevance[outlier, 15] = relevance[outlier].sum()
    valid = np.ones(len(labels), bool)
    valid[7] = False
    data = write_store(tmp_path / "o.zarr", relevance, labels, valid, 64, 3)
    protos = fit_prototypes(data, "feat", n_prototypes=2, seed=1)
    assert np.nanargmin(protos.log_likelihood) == outlier
    assert protos.overused[outlier, 0] == 15
    assert outlier not in protos.nearest  # an outlier is nobody's prototypical example
    again = fit_prototypes(data, "feat", n_prototypes=2, seed=1)
    np.testing.assert_array_equal(again.log_likelihood, protos.log_likelihood)  # seeded


def test_subsampled_fit_scores_every_sample(tmp_path):
    relevance, labels = class_data(1, n=80)
    valid = np.ones(240, bool)
    valid[[5, 100]] = False
    data = write_store(tmp_path / "f.zarr", relevance, labels, valid, 64, 3)
    protos = fit_prototypes(data, "feat", n_prototypes=2, max_fit_samples=30, n_nearest=4)
    chosen = fit_subset(labels, valid, 30, 0)
    assert not chosen[[5, 100]].any()
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [30, 30, 30])
    X = relevance.astype(np.float64)
    X /= np.abs(X).sum(1, keepdims=True)
    for cls in range(3):
        model = refit(X[chosen & (labels == cls)], 2)
        rows = valid & (labels == cls)
        np.testing.assert_allclose(protos.log_likelihood[rows], model.score_samples(X[rows]))
    assert np.isnan(protos.log_likelihood[[5, 100]]).all()
    name = save_result(data, protos)
    back = load_result(data, type(protos), name)
    np.testing.assert_array_equal(back.nearest, protos.nearest)
    with pytest.raises(ValueError, match="max_fit_samples"):
        fit_prototypes(data, "feat", n_prototypes=4, max_fit_samples=2)
    with pytest.raises(ValueError, match="n_concepts must be"):
        fit_prototypes(data, "feat", n_concepts=0)
