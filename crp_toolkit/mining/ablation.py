"""Concept ablation curves: the faithfulness test of the CRP paper.

For each sample, the concepts (channels) of a layer are ordered by their CRP relevance while
explaining the class the store explains (label or prediction), by their activation, and at
random (seeded); then switched off cumulatively in that order (their channel zeroed in the
layer's output) while the explained logit is recorded. A faithful relevance ranking makes the
logit fall fastest: its mean curve has the smallest area.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor
from tqdm import tqdm

from crp_toolkit.concepts.concepts import ChannelConcept, concept_on, require_feature_axis
from crp_toolkit.engine.layout import feature_axes
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.store.results import read_result, write_result
from crp_toolkit.store.study import Study
from crp_toolkit.store.zarr_store import Store

ORDERINGS = ("relevance", "activation", "random")


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
    analyzer: LRP, x: Tensor, classes: Tensor, layer: str, seed: int = 0, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Per ordering, (n, C) concept ids of ``layer`` from first to last switched off:
    descending CRP relevance (explaining ``classes``) and activation (summed over space; ties
    keep the lower id first), and a random permutation per sample (``seed``). Scores are
    computed ``batch_size`` samples at a time."""
    parts = []
    axis = feature_axes(analyzer, x.shape[1:])[analyzer.graph.index(layer)]
    channels = concept_on(ChannelConcept(), axis, layer)
    for xs, ys in zip(x.split(batch_size), classes.split(batch_size), strict=True):
        expl = analyzer(xs, ys, record=[layer])
        relevance, activation = expl.relevances[layer], expl.activations[layer]
        parts.append([channels.relevance(r, activation) for r in (relevance, activation)])
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
) -> np.ndarray:
    """(steps, n): the logit of ``classes`` with the first ``removed[t]`` concepts of each
    sample's ``order`` switched off; every (step, sample) is a row of one masked forward pass,
    ``batch_size`` rows at a time, each pass advancing ``bar``."""
    n, concepts = order.shape
    rank = np.argsort(order, axis=1)  # rank[b, c]: when concept c of sample b goes off
    keep = rank[None] >= np.asarray(removed)[:, None, None]  # (steps, n, C)
    rows = torch.from_numpy(keep.reshape(-1, concepts))
    sample = torch.arange(n).repeat(len(removed))
    out = []
    for start in range(0, len(rows), batch_size):
        part = slice(start, start + batch_size)
        logits = masked_forward(analyzer, x[sample[part]], layer, rows[part])
        out.append(logits.gather(1, classes[sample[part]][:, None].to(logits.device))[:, 0])
        if bar is not None:
            bar.update(len(logits))
    return torch.cat(out).reshape(len(removed), n).float().cpu().numpy()


def masked_forward(analyzer: LRP, x: Tensor, layer: str, keep: Tensor) -> Tensor:
    """The model's output with the channels of ``layer``'s output (along its feature axis)
    multiplied by ``keep`` (rows, C) (1 keeps a channel, 0 switches it off), per row of
    ``x``."""
    index = analyzer.graph.index(layer)
    axis = require_feature_axis(feature_axes(analyzer, x.shape[1:])[index], layer)
    with torch.no_grad():
        return _Masked(analyzer.graph.module, analyzer.graph.layers[index].node, keep, axis).run(x)


class _Masked(fx.Interpreter):
    """Runs a traced model, multiplying one node's output by a per-row channel mask."""

    def __init__(self, module: fx.GraphModule, node: fx.Node, keep: Tensor, axis: int) -> None:
        super().__init__(module)
        self.node, self.keep, self.axis = node, keep, axis

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n is not self.node:
            return out
        keep = self.keep.to(out).reshape(*self.keep.shape, *([1] * (out.dim() - 2)))
        return out * keep.movedim(1, self.axis)


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
    """Ablation curves of ``layer`` for ``samples`` (a number: the first that many valid
    samples of the store; or sample ids), explaining the store's explained classes. ``steps``
    limits how many ablation steps are taken (evenly spaced; all C + 1 by default);
    ``batch_size`` rows go through each forward (and samples through each relevance pass). With
    ``write``, the result is kept in the store as ``derived/ablation/<layer>``. With
    ``progress``, a bar of the masked forward rows done on stderr."""
    analyzer = study.analyzer
    ids = _samples(study.store, samples)
    images = study.images(ids)
    like = next(analyzer.model.parameters(), images)
    x = images.to(device=like.device, dtype=like.dtype)
    classes = torch.from_numpy(study.classes(ids)).to(x.device)
    orders = concept_orders(analyzer, x, classes, layer, seed, batch_size)
    concepts = orders["relevance"].shape[1]
    removed = _steps(concepts, steps)
    rows = len(orders) * len(removed) * len(ids)
    bar = tqdm(total=rows, desc=f"ablation {layer}", unit="row", leave=False, disable=not progress)
    with bar:
        logits = np.stack(
            [
                ablated_logits(analyzer, x, classes, layer, o, removed, batch_size, bar)
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
    """What fixes the ablation curves of ``layer``."""
    return {**study.key, "layer": layer, "seed": seed}


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
