"""Concept ablation curves: the faithfulness test of the CRP paper.

For each sample, the concepts of a layer are ordered by their CRP relevance while explaining
the class the store explains (label or prediction), by their activation, and at random
(seeded); then switched off cumulatively in that order while the explained logit is recorded.
A concept is a channel (switched off: zeroed in the layer's output), or, in the concept layer
of a learned basis (``features.12@nmf16``), a direction (switched off: its component
``c_k basis_k`` removed from the activation) or the residual (the rest of the activation). A
faithful relevance ranking makes the logit fall fastest: its mean curve has the smallest area.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor
from tqdm import tqdm

from crp_toolkit.concepts.basis import ablated, concept_values, split_concept_layer
from crp_toolkit.concepts.concepts import (
    ChannelConcept,
    Concept,
    feature_first,
    require_feature_axis,
    summed_over_positions,
)
from crp_toolkit.engine.layout import feature_axes
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.store.bases import layer_concept, load_basis
from crp_toolkit.store.concept_layers import basis_digest
from crp_toolkit.store.results import read_result, write_result
from crp_toolkit.store.study import Study
from crp_toolkit.store.zarr_store import Store

ORDERINGS = ("relevance", "activation", "random")
CHANNELS = ChannelConcept()  # the default concepts: a layer's channels


@dataclass(frozen=True)
class AblationCurves:
    """Ablation of ``layer``'s concepts in every ordering.

    ``samples``/``classes`` (n,): sample ids and explained classes; ``orders``
    (orderings, n, C): concepts in the order they are switched off; ``removed`` (steps,): how
    many are off at each step (0 first, all last); ``logits`` (orderings, steps, n): the
    explained logit at each step.
    """

    layer: str
    orderings: tuple[str, ...]
    samples: np.ndarray
    classes: np.ndarray
    orders: np.ndarray
    removed: np.ndarray
    logits: np.ndarray
    key: dict

    @property
    def used(self) -> np.ndarray:
        """Samples whose unablated explained logit is positive: the ones a relative curve
        means something for."""
        return self.logits[0, 0] > 0

    @property
    def relative(self) -> np.ndarray:
        """Logits relative to the unablated one, (orderings, steps, n)."""
        return self.logits / self.logits[:, :1]

    @property
    def mean(self) -> np.ndarray:
        """Mean relative curve over the ``used`` samples, (orderings, steps)."""
        return self.relative[:, :, self.used].mean(-1)

    @property
    def area(self) -> np.ndarray:
        """Area under each mean curve over the fraction of concepts removed, (orderings,):
        smaller is a faster fall."""
        fraction = self.removed / self.removed[-1]
        return np.trapezoid(self.mean, fraction, axis=1)


def concept_orders(
    analyzer: LRP,
    x: Tensor,
    classes: Tensor,
    layer: str,
    seed: int = 0,
    batch_size: int = 64,
    concept: Concept = CHANNELS,
) -> dict[str, np.ndarray]:
    """Per ordering, (n, concepts) concept ids of ``layer`` from first to last switched off:
    descending CRP relevance (explaining ``classes``) and activation (summed over space: of a
    channel, or a basis's coefficient; ties keep the lower id first), and a random permutation
    per sample (``seed``). ``concept``: channels, or a learned basis of the layer. Scores are
    computed ``batch_size`` samples at a time."""
    parts = []
    axis = feature_axes(analyzer, x.shape[1:])[analyzer.graph.index(layer)]
    for xs, ys in zip(x.split(batch_size), classes.split(batch_size), strict=True):
        expl = analyzer(xs, ys, record=[layer])
        values = (feature_first(expl.relevances[layer], axis, layer),)
        values += (feature_first(expl.activations[layer], axis, layer),)
        maps = concept_values(concept, *values)
        parts.append([summed_over_positions(m) for m in maps])
    orders = {
        name: np.argsort(-torch.cat(s).double().cpu().numpy(), axis=1, kind="stable")
        for name, s in zip(("relevance", "activation"), zip(*parts, strict=True), strict=True)
    }
    rng = np.random.default_rng(seed)
    concepts = orders["relevance"].shape[1]
    orders["random"] = np.stack([rng.permutation(concepts) for _ in range(len(x))])
    return orders


def ablated_logits(
    analyzer: LRP,
    x: Tensor,
    classes: Tensor,
    layer: str,
    order: np.ndarray,
    removed: np.ndarray,
    batch_size: int = 256,
    bar: tqdm | None = None,
    concept: Concept = CHANNELS,
) -> np.ndarray:
    """(steps, n): the logit of ``classes`` with the first ``removed[t]`` concepts (channels,
    or of ``concept``, a learned basis) of each sample's ``order`` switched off; every (step,
    sample) is a row of one masked forward pass, ``batch_size`` rows at a time, each pass
    advancing ``bar``."""
    n, concepts = order.shape
    rank = np.argsort(order, axis=1)  # rank[b, c]: when concept c of sample b goes off
    keep = rank[None] >= np.asarray(removed)[:, None, None]  # (steps, n, C)
    rows = torch.from_numpy(keep.reshape(-1, concepts))
    sample = torch.arange(n).repeat(len(removed))
    out = []
    for start in range(0, len(rows), batch_size):
        part = slice(start, start + batch_size)
        logits = masked_forward(analyzer, x[sample[part]], layer, rows[part], concept)
        out.append(logits.gather(1, classes[sample[part]][:, None].to(logits.device))[:, 0])
        if bar is not None:
            bar.update(len(logits))
    return torch.cat(out).reshape(len(removed), n).float().cpu().numpy()


def masked_forward(
    analyzer: LRP, x: Tensor, layer: str, keep: Tensor, concept: Concept = CHANNELS
) -> Tensor:
    """The model's output with the concepts of ``layer``'s output (along its feature axis)
    where ``keep`` (rows, concepts) is 0 switched off, per row of ``x``: channels zeroed, or
    the components of a learned basis's directions (and residual) removed (``concept``; see
    ``concepts.basis.ablated``)."""
    index = analyzer.graph.index(layer)
    axis = require_feature_axis(feature_axes(analyzer, x.shape[1:])[index], layer)

    def edit(out: Tensor) -> Tensor:
        return ablated(concept, out.movedim(axis, 1), keep.to(out.device)).movedim(1, axis)

    with torch.no_grad():
        return _Edited(analyzer.graph.module, analyzer.graph.layers[index].node, edit).run(x)


class _Edited(fx.Interpreter):
    """Runs a traced model, replacing one node's output by ``edit`` of it."""

    def __init__(self, module: fx.GraphModule, node: fx.Node, edit) -> None:
        super().__init__(module)
        self.node, self.edit = node, edit

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        return self.edit(out) if n is self.node else out


def ablation_curves(
    study: Study,
    layer: str,
    *,
    samples: int | Sequence[int] = 64,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 256,
    write: bool = True,
    progress: bool = False,
) -> AblationCurves:
    """Ablation curves of ``layer`` (a layer's channels, or the concept layer of a learned
    basis, ``features.12@nmf16``) for ``samples`` (a number: the first that many valid
    samples of the store; or sample ids), explaining the store's explained classes. ``steps``
    limits how many ablation steps are taken (evenly spaced; all C + 1 by default);
    ``batch_size`` rows go through each forward (and samples through each relevance pass). With
    ``write``, the result is kept in the store as ``derived/ablation/<layer>``. With
    ``progress``, a bar of the masked forward rows done on stderr."""
    analyzer = study.analyzer
    model_layer, concept = layer_concept(study.store, layer)
    ids = _samples(study.store, samples)
    images = study.images(ids)
    like = next(analyzer.model.parameters(), images)
    x = images.to(device=like.device, dtype=like.dtype)
    classes = torch.from_numpy(study.classes(ids)).to(x.device)
    orders = concept_orders(analyzer, x, classes, model_layer, seed, batch_size, concept)
    concepts = orders["relevance"].shape[1]
    removed = _steps(concepts, steps)
    rows = len(orders) * len(removed) * len(ids)
    bar = tqdm(total=rows, desc=f"ablation {layer}", unit="row", leave=False, disable=not progress)
    with bar:
        logits = np.stack(
            [
                ablated_logits(
                    analyzer, x, classes, model_layer, o, removed, batch_size, bar, concept
                )
                for o in orders.values()
            ]
        )
    key = ablation_key(study, layer, seed)
    curves = AblationCurves(
        layer,
        tuple(orders),
        ids,
        classes.cpu().numpy(),
        np.stack(list(orders.values())),
        removed,
        logits,
        key,
    )
    if write:
        write_result(
            study.store.path,
            f"ablation/{layer}",
            {name: getattr(curves, name) for name in _ARRAYS},
            dims=_ARRAYS,
            attrs={"layer": layer, "orderings": list(curves.orderings)},
            key=key,
        )
    return curves


def ablation_key(study: Study, layer: str, seed: int = 0) -> dict:
    """What fixes the ablation curves of ``layer``: for a basis layer also its directions'
    digest (a basis learned again under the same name after the old one was removed)."""
    key = {**study.key, "layer": layer, "seed": seed}
    if split_concept_layer(layer)[1] is not None:
        key["basis"] = basis_digest(load_basis(study.store, layer).directions)
    return key


def read_ablation(study: Study, layer: str, seed: int = 0) -> AblationCurves | None:
    """The ablation curves of ``layer`` kept in the store, or None (also when they were made
    with another analyzer, dataset or seed)."""
    key = ablation_key(study, layer, seed)
    found = read_result(study.store.path, f"ablation/{layer}", key)
    if found is None:
        return None
    arrays = {name: found.arrays[name] for name in _ARRAYS}
    return AblationCurves(layer, tuple(found.attrs["orderings"]), **arrays, key=key)


_ARRAYS = {
    "samples": ("sample",),
    "classes": ("sample",),
    "orders": ("ordering", "sample", "rank"),
    "removed": ("step",),
    "logits": ("ordering", "step", "sample"),
}


def _samples(store: Store, samples: int | Sequence[int]) -> np.ndarray:
    """Sample ids: the first ``samples`` valid ones, or the given ids (checked valid)."""
    valid = store.samples("valid")[:]
    if isinstance(samples, int):
        if samples < 1:
            raise ValueError(f"samples must be a positive number or a list of ids, got {samples}")
        return np.flatnonzero(valid)[:samples]
    ids = np.asarray(list(samples), np.int64)
    bad = [int(i) for i in ids if not (0 <= i < len(valid) and valid[i])]
    if bad or ids.size == 0:
        raise ValueError(
            f"samples {bad or 'none'} are not valid samples of the store (out of range or "
            "unreadable when it was made); give ids of readable samples"
        )
    return ids


def _steps(concepts: int, steps: int | None) -> np.ndarray:
    """How many concepts are off at each step: 0..C, or ``steps`` + 1 evenly spaced counts."""
    if steps is None:
        return np.arange(concepts + 1)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return np.unique(np.round(np.linspace(0, concepts, steps + 1)).astype(np.int64))
