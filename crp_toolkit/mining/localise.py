"""Localised reference samples: where a concept sits in each of its reference samples.

For every reference sample s of concept c (a :class:`ReferenceTable` column) this computes

- the concept's conditional heatmap on s, from its relevance while explaining the class the
  store explains for s (label or prediction), never from its activation (CRP's reference
  heatmaps; zennit-crp issue #11), batched over many (sample, concept) pairs per call;
- the exact input-space box of the receptive field of the concept's maximal neuron (for
  relevance references the argmax of its conditional relevance at the layer, for activation
  references the store's ``act_argmax``), traced through the model's conv and pool geometry.

Results are cached in the store under ``derived/localised/...``, keyed by everything that
changes them (composite, model and dataset fingerprints, references). Views for display
(crops around the box, the image dimmed where the heatmap is low) are the atlas's:
``crp_toolkit.atlas.views.reference_views``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from crp_toolkit.concepts.basis import concept_values
from crp_toolkit.concepts.concepts import ChannelConcept, Concept, spatial_view
from crp_toolkit.concepts.conditional import OUTPUT, CondAttribution
from crp_toolkit.engine.layout import layouts
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.engine.receptive_field import receptive_field
from crp_toolkit.mining.references import ReferenceTable
from crp_toolkit.store.bases import layer_concept
from crp_toolkit.store.results import keyed_name, read_result, write_result
from crp_toolkit.store.study import Study


@dataclass(frozen=True)
class LocalisedReferences:
    """Reference samples of ``concepts`` of ``layer``, localised; entry ``[r, j]`` belongs to
    the r-th reference of concept ``concepts[j]``.

    ``samples``/``classes`` (n_refs, n): sample ids and the class explained for them;
    ``positions`` (n_refs, n, spatial axes of the layer): the concept's maximal neuron;
    ``heatmaps`` (n_refs, n, H, W): conditional heatmaps; ``boxes`` (n_refs, n, 4): the
    receptive field as (y0, y1, x0, x1), half-open. ``from_cache``: read back from the store.
    """

    layer: str
    mode: str
    pool: str
    normalised: bool
    concepts: np.ndarray
    samples: np.ndarray
    classes: np.ndarray
    positions: np.ndarray
    heatmaps: np.ndarray
    boxes: np.ndarray
    key: dict
    from_cache: bool = False


_ARRAYS = {
    "concepts": ("concept",),
    "samples": ("rank", "concept"),
    "classes": ("rank", "concept"),
    "positions": ("rank", "concept", "axis"),
    "heatmaps": ("rank", "concept", "y", "x"),
    "boxes": ("rank", "concept", "edge"),
}


def localise_references(
    study: Study,
    references: ReferenceTable,
    *,
    concepts: Sequence[int] | None = None,
    n_refs: int | None = None,
    batch_size: int = 32,
    cache: bool = True,
    progress: bool = False,
) -> LocalisedReferences:
    """Localise the ``n_refs`` best references (all rows of the table by default) of ``concepts``
    (all by default) of the table's layer, as described in the module docstring. With
    ``cache``, a result computed before for the same key is read back from the store, and a
    new one is written there. With ``progress``, a bar of the references done on stderr."""
    ids, samples = _selection(references, concepts, n_refs)
    meta = {
        "layer": references.layer,
        "mode": references.mode,
        "pool": references.pool,
        "normalised": references.normalised,
    }
    key = {
        **study.key,
        **meta,
        "n_refs": int(samples.shape[0]),
        "concepts": ids.tolist(),
        "samples": hashlib.sha256(samples.astype(np.int64).tobytes()).hexdigest()[:20],
    }
    name = keyed_name(f"localised/{references.layer}", key)
    found = read_result(study.store.path, name, key) if cache else None
    if found is not None:
        arrays = {a: found.arrays[a] for a in _ARRAYS}
        return LocalisedReferences(**meta, **arrays, key=key, from_cache=True)
    arrays = _localise(study, references, ids, samples, batch_size, progress)
    if cache:
        write_result(study.store.path, name, arrays, dims=_ARRAYS, attrs=meta, key=key)
    return LocalisedReferences(**meta, **arrays, key=key)


def _localise(
    study: Study,
    references: ReferenceTable,
    ids: np.ndarray,
    samples: np.ndarray,
    batch_size: int,
    progress: bool,
) -> dict[str, np.ndarray]:
    """The arrays of :class:`LocalisedReferences` for concepts ``ids`` and their (n_refs, n)
    reference ``samples``, computed."""
    images = study.images(samples.ravel())
    if images.dim() != 4:
        raise ValueError(f"localised references need images (C, H, W), got {images.shape[1:]}")
    classes = study.classes(samples)
    concept_of = np.broadcast_to(ids, samples.shape).ravel()
    layer = references.layer
    model_layer, concept = layer_concept(study.store, layer)  # channels, or a learned basis
    desc = f"localise {layer} ({references.mode})"
    with tqdm(total=len(images), desc=desc, unit="ref", leave=False, disable=not progress) as bar:
        heatmaps, layer_maps = conditional_maps(
            study.analyzer,
            images,
            classes.ravel(),
            model_layer,
            concept_of,
            batch_size,
            bar=bar,
            concept=concept,
        )
    if references.mode == "activation":
        rows, columns = np.broadcast_arrays(samples, ids[None, :])
        argmax = study.store.layer(layer, "act_argmax").vindex[rows, columns]
        positions = _unravel(argmax.ravel(), study.store.shape(layer)[1:])
    else:
        flat = layer_maps.flatten(1).argmax(1).numpy()
        positions = _unravel(flat, tuple(layer_maps.shape[1:]))
    field = receptive_field(study.analyzer, model_layer, tuple(images.shape[1:]))
    boxes = np.stack([field.box(p) for p in positions])
    height, width = images.shape[2:]
    shape = samples.shape
    return {
        "concepts": ids,
        "samples": samples,
        "classes": classes,
        "positions": positions.reshape(*shape, -1).astype(np.int64),
        "heatmaps": heatmaps.reshape(*shape, height, width).numpy(),
        "boxes": boxes.reshape(*shape, 4),
    }


def conditional_maps(
    analyzer: LRP,
    images: Tensor,
    classes: Sequence[int],
    layer: str,
    concepts: Sequence[int],
    batch_size: int = 32,
    bar: tqdm | None = None,
    concept: Concept | None = None,
) -> tuple[Tensor, Tensor]:
    """For pairs (image i, concept ``concepts[i]``), explaining ``classes[i]``: the input
    heatmap of the concept (P, H, W) and the concept's relevance map at ``layer`` (P, ...),
    as ``CondAttribution`` gives them for ``{"y": classes[i], layer: [concepts[i]]}``, with
    ``batch_size`` pairs per call (every pair its own row), each call advancing ``bar``.
    ``concept``: what the ids of ``layer`` are (channels by default, or a learned basis)."""
    concept = concept or ChannelConcept()
    attribution = CondAttribution(analyzer, {layer: concept})
    like = next(analyzer.model.parameters(), images)
    found, index = layouts(analyzer, images.shape[1:]), analyzer.graph.index(layer)
    heat, maps = [], []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        conditions = [
            {OUTPUT: int(y), layer: [int(c)]}
            for y, c in zip(classes[part], concepts[part], strict=True)
        ]
        x = images[part].to(device=like.device, dtype=like.dtype)
        result = attribution(x, conditions, record=[layer])
        chosen = torch.as_tensor(np.asarray(concepts[part]), device=x.device)
        axis, grid = found.axes[index], found.grids[index]
        values = (result.relevances[layer], result.activations[layer])
        relevance, _ = concept_values(
            concept, *(spatial_view(t, axis, grid, layer) for t in values)
        )
        heat.append(result.heatmaps.float().cpu())
        maps.append(relevance[torch.arange(len(x), device=x.device), chosen].float().cpu())
        if bar is not None:
            bar.update(len(x))
    return torch.cat(heat), torch.cat(maps)


def _selection(
    references: ReferenceTable, concepts: Sequence[int] | None, n_refs: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Concept ids and their (n_refs, n) reference samples, checked against the table."""
    available = references.samples.shape[1]
    ids = np.arange(available) if concepts is None else np.asarray(list(concepts), np.int64)
    bad = [int(i) for i in ids if not 0 <= i < available]
    if bad or ids.size == 0:
        raise ValueError(
            f"concept ids {bad or 'none'} not valid for layer {references.layer!r}: give ids "
            f"in 0..{available - 1}"
        )
    rows = references.samples.shape[0]
    n = rows if n_refs is None else n_refs
    if not 1 <= n <= rows:
        raise ValueError(f"n_refs must be between 1 and the table's {rows} references, got {n}")
    return ids, references.samples[:n, ids].astype(np.int64)


def _unravel(flat: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    """Flat positions (P,) as (P, spatial axes) indices; (P, 0) for a layer without space."""
    if not spatial:
        return np.zeros((len(flat), 0), np.int64)
    return np.stack(np.unravel_index(flat, spatial), -1)
