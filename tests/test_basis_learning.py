"""Learning concept bases from streams of rows: each method recovers planted directions, a seed
fixes the result, memory is one block, and bad requests are refused before any work."""

from __future__ import annotations

import numpy as np
import pytest

from crp_toolkit.concepts.learning import (
    METHODS,
    LearnerOptions,
    StreamingPCA,
    blocks,
    learn_directions,
    oriented,
)

C, K = 24, 6


def planted_directions() -> np.ndarray:
    """K non-negative unit directions on disjoint channel groups."""
    rng = np.random.default_rng(0)
    planted = np.zeros((K, C))
    for j in range(K):
        planted[j, 4 * j : 4 * j + 4] = rng.uniform(0.5, 1, 4)
    return planted / np.linalg.norm(planted, axis=1, keepdims=True)


def one_active_stream(planted: np.ndarray, parts: int = 10, rows: int = 500):
    """Rows that are each one planted direction, scaled, plus a little non-negative noise."""

    def stream():
        rng = np.random.default_rng(1)
        for _ in range(parts):
            which = rng.integers(K, size=rows)
            scale = rng.uniform(0.5, 2, (rows, 1))
            yield planted[which] * scale + 0.02 * np.abs(rng.standard_normal((rows, C)))

    return stream


def gaussian_stream(planted: np.ndarray):
    """Rows mixing orthogonal directions with independent Gaussian coefficients of distinct
    variance: the principal components are the directions."""
    sigma = np.linspace(3.0, 1.0, K)

    def stream():
        rng = np.random.default_rng(2)
        for _ in range(10):
            yield (rng.standard_normal((500, K)) * sigma) @ planted

    return stream


@pytest.mark.parametrize("method", [m for m in METHODS if m != "pca"])
def test_sparse_methods_recover_planted_directions(method):
    planted = planted_directions()
    options = LearnerOptions(batch=256, topk=1)  # small data: small steps; rows 1-sparse
    found, seen = learn_directions(
        one_active_stream(planted), method, K, 0, C, epochs=2, options=options
    )
    assert seen == 5000
    assert found.shape == (K, C)
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, rtol=1e-6)
    best = np.abs(planted @ found.T).max(1)  # each planted direction's closest learned one
    assert best.min() > 0.9, best


def test_pca_recovers_planted_principal_directions():
    planted = planted_directions()
    found, _ = learn_directions(gaussian_stream(planted), "pca", K, 0, C)
    np.testing.assert_allclose(np.abs(planted @ found.T).max(1), 1.0, atol=0.02)


def correlated_rows(n: int) -> np.ndarray:
    """Rows with distinct variances along mixed (non-axis) directions, and a mean 50 times
    their typical spread (what would cancel away the variance in a naive sum of squares)."""
    rng = np.random.default_rng(5)
    mixing = np.linalg.qr(rng.standard_normal((C, C)))[0]
    return (rng.standard_normal((n, C)) * np.linspace(4.0, 0.5, C)) @ mixing + 50.0


def test_streaming_pca_equals_sklearn_pca_of_the_rows_in_memory():
    from sklearn.decomposition import PCA

    rows = correlated_rows(3000)
    calls = []

    def stream():
        calls.append(1)
        yield from np.array_split(rows, 7)  # uneven parts, regrouped into blocks of 500

    found, seen = learn_directions(stream, "pca", K, 0, C, options=LearnerOptions(block=500))
    assert seen == 3000 and len(calls) == 1  # one pass
    expected = oriented(PCA(K, svd_solver="full").fit(rows).components_)  # same signs
    np.testing.assert_allclose(found, expected, atol=1e-9)


def test_streaming_pca_is_deterministic_and_independent_of_the_blocks():
    rows = correlated_rows(2000)
    runs = [
        learn_directions(lambda: [rows], "pca", K, seed, C, options=LearnerOptions(block=block))[0]
        for seed, block in [(0, 256), (1, 256), (0, 2000)]
    ]
    np.testing.assert_array_equal(runs[0], runs[1])  # same rows, same blocks: same bits
    np.testing.assert_allclose(runs[0], runs[2], atol=1e-10)  # other blocks: same directions


def test_streaming_pca_holds_a_channels_square_whatever_the_rows():
    pca = StreamingPCA(K, C)
    for part in np.array_split(correlated_rows(4000), 8):
        pca.partial_fit(part)
    assert pca.count == 4000
    assert pca.gram.shape == (C, C) and pca.total.shape == (C,) and pca.shift.shape == (C,)
    expected = np.cov(correlated_rows(4000).T, bias=True)
    np.testing.assert_allclose(pca.covariance(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_a_seed_fixes_the_basis_and_another_changes_it(method):
    planted = planted_directions()
    stream = one_active_stream(planted, parts=3)
    first, _ = learn_directions(stream, method, K, 3, C)
    again, _ = learn_directions(stream, method, K, 3, C)
    np.testing.assert_array_equal(first, again)
    if method != "pca":  # PCA has no randomness
        other, _ = learn_directions(stream, method, K, 4, C)
        assert not np.array_equal(first, other)


def test_blocks_bound_memory_and_keep_every_row():
    parts = [np.full((n, 2), float(i)) for i, n in enumerate([3, 700, 5, 900, 2])]
    found = list(blocks(parts, 512, least=8))
    assert max(len(b) for b in found) <= 512 + 8  # a block, or a block and a short tail
    assert sum(len(b) for b in found) == sum(len(p) for p in parts)
    np.testing.assert_array_equal(np.concatenate(found), np.concatenate(parts))


def test_oriented_rows_are_unit_with_a_positive_peak():
    rows = oriented(np.array([[0.0, -3.0, 1.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    np.testing.assert_allclose(rows[0], [0, 3, -1] / np.sqrt(10))
    np.testing.assert_array_equal(rows[1], 0)
    np.testing.assert_array_equal(rows[2], [1, 0, 0])


@pytest.mark.parametrize(
    ("method", "k", "message"),
    [
        ("ica", K, "unknown basis method 'ica'"),
        ("nmf", C + 1, f"K={C + 1} directions for a layer of {C} channels"),
        ("pca", 0, "K must be between 1"),
    ],
)
def test_bad_requests_are_refused_before_any_row_is_read(method, k, message):
    def stream():
        raise AssertionError("the stream was read")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match=message):
        learn_directions(stream, method, k, 0, C)


def test_too_few_rows_and_negative_rows_for_nmf_are_refused():
    planted = planted_directions()
    with pytest.raises(ValueError, match="only 4 sampled positions for K=6"):
        learn_directions(lambda: [planted[:4]], "kmeans", K, 0, C)
    with pytest.raises(ValueError, match="NMF needs non-negative rows"):
        learn_directions(lambda: [-np.ones((50, C))], "nmf", K, 0, C)
