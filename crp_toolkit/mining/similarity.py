"""Concept similarity: two concepts are alike when their relevance (or activation) profiles over
the dataset's samples point the same way. The cosine similarity comes from a Gram matrix
accumulated chunk by chunk; concepts are then clustered (average linkage on 1 - cos) and laid
out in 2-D (classical MDS of the unit-length profiles) for the atlas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from sklearn.cluster import AgglomerativeClustering
from sklearn.decomposition import KernelPCA

from crp_toolkit.mining.references import score_chunks
from crp_toolkit.store.tables import Spec
from crp_toolkit.store.zarr_store import Store


@dataclass(frozen=True)
class ConceptSimilarity:
    """``cosine[i, j]``: cosine similarity of concepts i and j over the samples (0 where a
    concept is never scored); ``cluster[c]``: concept c's cluster; ``embedding[c]``: its 2-D
    position; ``merges``/``merge_distance``: the full average-linkage tree (scikit-learn's
    ``children_`` and ``distances_``), for dendrograms."""

    layer: str
    mode: str
    pool: str
    normalised: bool
    cosine: np.ndarray
    cluster: np.ndarray
    embedding: np.ndarray
    merges: np.ndarray
    merge_distance: np.ndarray

    DIMS: ClassVar[dict[str, tuple[str, ...]]] = {
        "cosine": ("concept", "concept_other"),
        "cluster": ("concept",),
        "embedding": ("concept", "axis"),
        "merges": ("merge", "child"),
        "merge_distance": ("merge",),
    }

    @property
    def name(self) -> str:
        return f"similarity/{self.layer}/{self.mode}"


def gram(store: Store, layer: str, *, mode: str, pool: str, normalised: bool) -> np.ndarray:
    """S^T S for the (samples x concepts) score matrix S, one chunk at a time."""
    concepts = store.layer(layer).shape[1]
    total = np.zeros((concepts, concepts))
    for part in score_chunks(store, layer, Spec(mode, pool, normalised)):
        total += part.scores.T @ part.scores
    return total


def cosine_from_gram(g: np.ndarray) -> np.ndarray:
    """Cosine similarity from a Gram matrix; a concept with a zero profile is similar to
    nothing but itself."""
    norm = np.sqrt(np.diag(g))
    scale = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    cosine = np.clip(g * scale[:, None] * scale[None, :], -1.0, 1.0)
    np.fill_diagonal(cosine, 1.0)
    return cosine


def concept_similarity(
    store: Store,
    layer: str,
    *,
    mode: str = "relevance",
    pool: str = "sum",
    normalised: bool = True,
    n_clusters: int = 8,
) -> ConceptSimilarity:
    """Cosine similarity of the concepts of ``layer`` over all readable samples, their
    clusters and a 2-D map. ``mode``/``pool``/``normalised`` choose the profile as in
    ``reference_samples``."""
    concepts = store.layer(layer).shape[1]
    if not 1 <= n_clusters <= concepts:
        raise ValueError(f"n_clusters must be between 1 and the {concepts} concepts of {layer!r}")
    cosine = cosine_from_gram(gram(store, layer, mode=mode, pool=pool, normalised=normalised))
    tree = AgglomerativeClustering(
        n_clusters=n_clusters,
        metric="precomputed",
        linkage="average",
        compute_full_tree=True,
        compute_distances=True,
    ).fit(1.0 - cosine)
    # the centred cosine matrix is the double-centred -d^2/2 of the chord distances between
    # unit profiles: its kernel PCA is their classical MDS (exact, no random start)
    embedding = KernelPCA(2, kernel="precomputed", eigen_solver="dense").fit_transform(cosine)
    return ConceptSimilarity(
        layer,
        mode,
        pool,
        normalised,
        cosine,
        tree.labels_,
        embedding,
        tree.children_,
        tree.distances_,
    )
