"""Learned concept bases in the dataset store: discovering a basis from a study's dataset, keeping
it as a derived result with its provenance, and the pass that makes it a *concept layer* of the
store (``features.12@nmf16``) beside the layer's channels.

- :func:`discover_basis` streams positions (activation vectors, or activation vectors weighted
  by the position's positive relevance) from the dataset through the analyzer, a batch at a
  time, a seeded sample of ``positions`` per image, into a learner
  (``crp_toolkit.concepts.learning``): memory is one batch and one block of rows, whatever N.
- :func:`save_basis` / :func:`load_basis` / :func:`list_bases`: ``derived/bases/<layer>/<name>``,
  keyed by the store's model, dataset, composite and explained target; a basis made for another
  model or store is refused by name.
- :func:`analyze_basis`: per sample, the relevance of each of the K directions and of the
  residual (conditional relevance, ``BasisConcept``), their spatial max and the coefficients'
  statistics, in the same arrays a layer of the dataset pass has (``layers/<concept layer>/``),
  written a store chunk at a time with its own progress and digests (resumable; see
  ``concept_layers``), then listed in the root attributes (``concept_layers``) so that mining,
  the atlas and evaluate read it as a layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import zarr
from torch import Tensor
from tqdm import tqdm

from crp_toolkit.concepts.basis import (
    SOURCES,
    BasisConcept,
    ConceptBasis,
    split_concept_layer,
)
from crp_toolkit.concepts.concepts import (
    ChannelConcept,
    Concept,
    feature_first,
    summed_over_positions,
)
from crp_toolkit.concepts.learning import LearnerOptions, check_method, learn_directions
from crp_toolkit.data.loading import grouped
from crp_toolkit.engine.layout import feature_axes, layouts
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.store.analysis import layer_statistics
from crp_toolkit.store.concept_layers import (
    DTYPES,
    STATS,
    basis_digest,
    concept_group,
    unit_states,
    write_unit,
)
from crp_toolkit.store.integrity import StoreDamagedError
from crp_toolkit.store.results import list_results, read_result, write_result
from crp_toolkit.store.study import Study
from crp_toolkit.store.zarr_store import Store, StoreMismatchError

KIND = "bases"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingOptions:
    """How positions are sampled for learning: ``positions`` per image (all when an image has
    fewer), images explained ``batch_size`` at a time, the first ``images`` readable samples
    of the store (all by default)."""

    positions: int = 16
    batch_size: int = 64
    images: int | None = None


def basis_result(layer: str, name: str) -> str:
    return f"{KIND}/{layer}/{name}"


IDENTITY = ("model", "dataset", "composite", "target", "output_relevance")


def identity(study_key: dict) -> dict:
    """What a basis must share with a store to be used there: model, dataset, composite,
    explained target, output relevance."""
    return {k: study_key[k] for k in IDENTITY}


# -- sampling ------------------------------------------------------------------------------
def layer_values(
    analyzer: LRP, x: Tensor, target: Tensor | None, layer: str
) -> tuple[Tensor, Tensor | None]:
    """The activation of ``layer``, features first (B, C, ...; a token layer's (B, C, tokens),
    every token), and, given ``target``, the relevance arriving there while explaining it, in
    the same layout (one forward; the backward stops at the layer)."""
    index = analyzer.graph.index(layer)
    axis = feature_axes(analyzer, x.shape[1:])[index]
    fp = analyzer.forward(x, keep=[index], above=index)
    activation = feature_first(fp.value(index), axis, layer)
    if target is None:
        return activation, None
    init = {analyzer.graph.output_layer: analyzer.output_relevance(fp.output, target)[None]}
    pending, _ = analyzer.propagate(fp, init, stop=index)
    return activation, feature_first(pending[index][0], axis, layer)


def position_rows(
    activation: Tensor, relevance: Tensor | None, samples: np.ndarray, positions: int, seed: int
) -> np.ndarray:
    """Up to ``positions`` activation vectors (rows of C) per sample, at positions drawn by a
    generator seeded with (seed, sample id) (so batches do not change them). With
    ``relevance``, each row is scaled by its position's share of the sample's positive
    relevance (times the number of positions: 1 on average)."""
    a = activation.flatten(2) if activation.dim() > 2 else activation[..., None]
    a = a.transpose(1, 2).double().cpu().numpy()  # (B, P, C)
    weight = None
    if relevance is not None:
        r = relevance.flatten(2) if relevance.dim() > 2 else relevance[..., None]
        positive = r.clamp_min(0).sum(1).double().cpu().numpy()  # (B, P)
        total = positive.sum(1, keepdims=True)
        weight = np.divide(
            positive * a.shape[1], total, out=np.zeros_like(positive), where=total > 0
        )
    rows = []
    for b, sample in enumerate(samples):
        rng = np.random.default_rng([seed, int(sample)])
        chosen = np.sort(rng.permutation(a.shape[1])[:positions])
        picked = a[b, chosen]
        rows.append(picked if weight is None else picked * weight[b, chosen, None])
    return np.concatenate(rows) if rows else np.zeros((0, a.shape[2]))


def position_stream(
    study: Study,
    layer: str,
    source: str,
    sampling: SamplingOptions,
    seed: int,
    progress: bool,
) -> Callable[[], Iterator[np.ndarray]]:
    """A stream (called once per epoch) of sampled rows of ``layer`` over the study's readable
    samples, one batch of images at a time, with a bar of the images done."""
    valid = np.flatnonzero(study.store.samples("valid")[:])
    ids = valid if sampling.images is None else valid[: sampling.images]
    device = next(study.analyzer.model.parameters()).device

    def stream() -> Iterator[np.ndarray]:
        groups = [
            ids[s : s + sampling.batch_size].tolist()
            for s in range(0, len(ids), sampling.batch_size)
        ]
        bar = tqdm(total=len(ids), desc=f"discover {layer}", unit="img", disable=not progress)
        with bar:
            for batch in grouped(study.dataset, groups):
                samples = np.asarray(batch.indices)
                target = None
                if source == "relevance":
                    target = torch.as_tensor(study.classes(samples), device=device)
                # no autograd state held across the yield: the learner trains in between
                with torch.no_grad() if target is None else nullcontext():
                    activation, relevance = layer_values(
                        study.analyzer, batch.images.to(device), target, layer
                    )
                    rows = position_rows(activation, relevance, samples, sampling.positions, seed)
                yield rows
                bar.update(len(batch.indices) + len(batch.skipped))

    return stream


# -- discovery -----------------------------------------------------------------------------
def check_discovery(
    study: Study, layer: str, method: str, k: int, source: str, sampling: SamplingOptions
) -> None:
    """Refuse a discovery that cannot work, before any sample is read: a layer the store does
    not hold as channels, an unknown method or source, K over the channels or over the
    positions that will be sampled."""
    store = study.store
    if layer not in store.attrs["layers"]:
        raise KeyError(
            f"layer {layer!r} is not a channel layer of the store at {store.path}; it holds "
            f"{list(store.attrs['layers'])}: learn a basis of one of them (concepts.layers)"
        )
    channels = store.attrs["layers"][layer][0]
    check_method(method, k, channels)
    if source not in SOURCES:
        raise ValueError(f"unknown basis source {source!r}; choose one of {', '.join(SOURCES)}")
    if sampling.positions < 1 or sampling.batch_size < 1:
        raise ValueError(f"positions and batch_size must be at least 1, got {sampling}")
    spatial = int(np.prod(store.attrs["layers"][layer][1:], dtype=np.int64))
    images = int(store.samples("valid")[:].sum())
    images = images if sampling.images is None else min(images, sampling.images)
    rows = images * min(sampling.positions, spatial)
    if rows < k:
        raise ValueError(
            f"K={k} directions from {rows} sampled positions ({images} images x "
            f"{min(sampling.positions, spatial)} positions): K must not exceed the samples; "
            "sample more positions per image (discover.positions) or choose a smaller K"
        )


def discover_basis(
    study: Study,
    layer: str,
    method: str,
    k: int,
    *,
    source: str = "activation",
    seed: int = 0,
    epochs: int = 1,
    sampling: SamplingOptions = SamplingOptions(),
    learner: LearnerOptions | None = None,
    progress: bool = True,
) -> ConceptBasis:
    """Learn K directions of ``layer``'s channel space by ``method`` from the study's dataset
    (``source``: "activation" or "relevance"-weighted activation at sampled positions; see the
    module docstring; NMF learns from their positive part, what a following ReLU passes on);
    seeded, so the same call gives the same basis. Checked before work
    (:func:`check_discovery`)."""
    check_discovery(study, layer, method, k, source, sampling)
    learner = learner or LearnerOptions()
    stream = position_stream(study, layer, source, sampling, seed, progress)
    if method == "nmf":  # the positive part: what a following ReLU passes on
        stream = _positive_part(stream)
    channels = study.store.attrs["layers"][layer][0]
    directions, seen = learn_directions(
        stream, method, k, seed, channels, epochs=epochs, options=learner
    )
    provenance = identity(study.key) | {
        "positions_seen": seen,
        "sampling": asdict(sampling),
        "learner": asdict(learner),
        "epochs": epochs,
    }
    return ConceptBasis(layer, method, source, seed, directions, provenance)


def _positive_part(stream: Callable[[], Iterator[np.ndarray]]) -> Callable[[], Iterator]:
    return lambda: (np.clip(rows, 0, None) for rows in stream())


# -- kept in the store ---------------------------------------------------------------------
def basis_key(basis: ConceptBasis) -> dict:
    """What fixes a stored basis: its provenance and settings."""
    return {
        **dict(basis.provenance),
        "layer": basis.layer,
        "method": basis.method,
        "source": basis.source,
        "seed": basis.seed,
        "k": basis.k,
    }


def check_basis(store: Store, basis: ConceptBasis) -> None:
    """Refuse a basis learned for another model, dataset, composite or explained target than
    the store's, or for a layer (or channel count) it does not hold."""
    provenance = store.attrs["provenance"]
    wanted = {k: provenance.get(k) for k in IDENTITY}
    given = {k: basis.provenance.get(k) for k in wanted}
    differ = [k for k in wanted if wanted[k] != given[k]]
    if differ:
        raise StoreMismatchError(
            f"the basis {basis.concept_layer} was learned for another "
            f"{' and '.join(differ)} than the store at {store.path} was made with "
            f"({', '.join(f'{k}: {given[k]!r} vs {wanted[k]!r}' for k in differ)}); learn it "
            "for this store (crp-toolkit discover store.path=...); nothing was changed"
        )
    layers = store.attrs["layers"]
    if basis.layer not in layers or layers[basis.layer][0] != basis.channels:
        raise StoreMismatchError(
            f"the basis {basis.concept_layer} has {basis.channels} channels of layer "
            f"{basis.layer!r}, which the store at {store.path} does not hold (its layers: "
            f"{ {n: s[0] for n, s in layers.items()} }); nothing was changed"
        )


def save_basis(store: Store, basis: ConceptBasis) -> str:
    """Keep ``basis`` in the store (checked against it first). A basis of the same name made
    with other settings is refused rather than replaced (nothing in the store is lost); the
    same one kept already is left as it is, unless its files are damaged: then it is written
    again (the same settings learn the same directions). Returns its concept layer name."""
    check_basis(store, basis)
    name = basis_result(basis.layer, basis.name)
    if name in list_results(store.path):
        try:
            if read_result(store.path, name, basis_key(basis)) is not None:
                return basis.concept_layer  # the same basis: kept already
        except StoreDamagedError as err:
            log.warning("the stored basis %s is damaged and is written again: %s", name, err)
        else:
            raise FileExistsError(
                f"the store at {store.path} already holds a basis {basis.concept_layer} made "
                "with other settings (sampling or learner options); give this one another "
                "seed, or use another store; nothing was changed"
            )
    attrs = {"layer": basis.layer, "method": basis.method, "source": basis.source}
    attrs |= {"seed": basis.seed, "provenance": dict(basis.provenance)}
    write_result(
        store.path,
        name,
        {"directions": np.asarray(basis.directions, np.float64)},
        dims={"directions": ("direction", "channel")},
        attrs=attrs,
        key=basis_key(basis),
    )
    return basis.concept_layer


def load_basis(store: Store, concept_layer: str) -> ConceptBasis:
    """The basis of a concept layer (``features.12@nmf16``) kept in the store."""
    layer, name = split_concept_layer(concept_layer)
    found = read_result(store.path, basis_result(layer, name or ""))
    if name is None or found is None:
        raise KeyError(
            f"no basis {concept_layer!r} in the store at {store.path}; it holds "
            f"{list_bases(store) or 'none'} (learn one with crp-toolkit discover)"
        )
    a = found.attrs
    return ConceptBasis(
        a["layer"], a["method"], a["source"], a["seed"], found["directions"], a["provenance"]
    )


def list_bases(store: Store) -> list[str]:
    """The concept layers of every basis kept in the store."""
    return [
        name.split("/", 1)[1].replace("/", "@")
        for name in list_results(store.path)
        if name.startswith(f"{KIND}/")
    ]


def layer_concept(store: Store, name: str) -> tuple[str, Concept]:
    """The model layer of a store layer and its concepts: channels, or a basis's directions
    and residual."""
    layer, basis = split_concept_layer(name)
    if basis is None:
        return layer, ChannelConcept()
    return layer, load_basis(store, name).concept()


# -- the pass ------------------------------------------------------------------------------
def analyze_basis(
    study: Study, basis: ConceptBasis, *, batch_size: int = 64, progress: bool = True
) -> str:
    """Make ``basis`` a concept layer of the study's store (see the module docstring): kept
    in the store, then analysed chunk by chunk with the basis the store keeps (resumable;
    units damaged since, or computed with a basis since replaced, are recomputed). Returns the
    concept layer's name. An unfinished store (its dataset pass not done) is refused before
    anything is written."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    store = study.store
    if not store.complete:
        raise RuntimeError(
            f"the store at {store.path} is unfinished: run its dataset pass to the end "
            "(crp-toolkit analyze with the same store.path) before adding a basis"
        )
    name = save_basis(store, basis)
    kept = load_basis(store, name)  # what every unit is computed with
    root, layout = zarr.open_group(store.path, mode="r+"), store.layout
    digest = basis_digest(kept.directions)
    group = concept_group(root, name, kept.k + 1, layout, digest)
    todo = unit_states(root, store.path, name, layout)
    for unit, problems in todo.items():
        if problems != ["not done"]:
            log.warning("unit %d of %s is damaged and is recomputed: %s", unit, name, problems)
    concept, device = kept.concept(), next(study.analyzer.model.parameters()).device
    rows = sum(len(layout.rows(c)) for c in todo)
    with tqdm(total=rows, desc=f"analyze {name}", unit="img", disable=not progress) as bar:
        for unit in todo:
            arrays = unit_statistics(study, concept, kept.layer, unit, batch_size, device)
            write_unit(group, layout, unit, arrays)
            bar.update(len(layout.rows(unit)))
    attrs = dict(root.attrs.get("concept_layers", {}))
    attrs[name] = [kept.k + 1, *layout.layers[kept.layer][1:]]
    root.attrs["concept_layers"] = attrs
    return name


def unit_statistics(
    study: Study, concept: BasisConcept, layer: str, unit: int, batch_size: int, device
) -> dict[str, np.ndarray]:
    """The statistics rows of one unit (store chunk) of a basis's concept layer: its readable
    samples' rows by :func:`basis_statistics`, ``batch_size`` at a time; zeros elsewhere."""
    rows, k = study.store.layout.rows(unit), concept.basis.shape[0] + 1
    arrays = {s: np.zeros((len(rows), k), DTYPES[s]) for s in STATS}
    arrays["normaliser"] = np.zeros(len(rows), np.float32)
    valid = study.store.samples("valid")[rows.start : rows.stop]
    ids = np.arange(rows.start, rows.stop)[valid]
    for s in range(0, len(ids), batch_size):
        part = ids[s : s + batch_size]
        for key, values in basis_statistics(study, concept, layer, part, device).items():
            arrays[key][part - rows.start] = values
    return arrays


def basis_statistics(
    study: Study, concept: BasisConcept, layer: str, samples: np.ndarray, device
) -> dict[str, np.ndarray]:
    """The store's per-sample statistics of a basis's concepts for ``samples``: what
    ``layer_statistics`` gives for channels, here of the K directions and the residual."""
    x = study.images(samples).to(device)
    target = torch.as_tensor(study.classes(samples), device=device)
    activation, relevance = layer_values(study.analyzer, x, target, layer)
    rel_maps, act_maps = concept.maps(relevance, activation)
    scores = summed_over_positions(rel_maps)  # over every token
    grid = layouts(study.analyzer, x.shape[1:]).grids[study.analyzer.graph.index(layer)]
    if grid is not None:  # maxima and argmax over the patch grid, as for the layer's channels
        rel_maps, act_maps = grid.patches(rel_maps), grid.patches(act_maps)
    return layer_statistics(rel_maps, act_maps, maps=False, scores=scores)
