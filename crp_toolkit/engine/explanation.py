"""Explanations: what ``analyze`` returns, and how targets and output relevance are set.

One vocabulary for every analyzer (LRP, CRP, CondAttribution): ``relevance`` is the input
relevance, one row per explained case (``heatmaps``: summed over the input's channels);
``relevances`` / ``activations`` map recorded layer names to the relevance arriving at their
outputs and to those outputs; ``output`` holds the logits and ``target`` the explained class
of each row. ``record=[...]`` names the layers to record, for every analyzer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class Explanation:
    """The LRP explanation of a batch: one row per sample.

    ``relevance`` is shaped like the input (None when the backward pass stopped at the
    lowest recorded layer, ``to_input=False``); ``output`` holds the model's logits and
    ``target`` the explained class per sample; ``relevances`` maps the recorded layers to
    the relevance arriving at their outputs, ``activations`` to those outputs.
    """

    relevance: Tensor | None
    output: Tensor
    target: Tensor
    relevances: dict[str, Tensor] = field(default_factory=dict)
    activations: dict[str, Tensor] = field(default_factory=dict)

    #: axes of ``relevance`` before the input's own (batch; batch and feature for CRP)
    cases: ClassVar[int] = 1

    @property
    def heatmaps(self) -> Tensor:
        """``relevance`` summed over the input's channel axis (the first axis of an input
        sample), e.g. (batch, H, W) for images; unchanged for flat inputs."""
        if self.relevance is None:
            raise ValueError(
                "this explanation has no input relevance (it stopped at the lowest recorded "
                "layer); explain with to_input=True for heatmaps"
            )
        if self.relevance.dim() <= self.cases + 1:
            return self.relevance
        return self.relevance.sum(self.cases)


def resolve_target(output: Tensor, target: int | Sequence[int] | Tensor | None) -> Tensor:
    """Per-sample class ids: the argmax for ``None``, checked against the output's classes."""
    if output.dim() != 2:
        raise ValueError(
            f"the model output has shape {tuple(output.shape)}; "
            "LRP explains scores shaped (batch, classes)"
        )
    batch, classes = output.shape
    if target is None:
        return output.argmax(1)
    ids = torch.as_tensor(target, device=output.device).long().flatten()
    if ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        raise ValueError(f"got {ids.numel()} targets for a batch of {batch}; give one per sample")
    if ((ids < 0) | (ids >= classes)).any():
        raise ValueError(
            f"target {ids.tolist()} out of range: "
            f"the model has {classes} classes (0..{classes - 1})"
        )
    return ids


def explain_lrp(
    analyzer,
    x: Tensor,
    target=None,
    *,
    record: bool | Sequence[str] = (),
    to_input: bool = True,
) -> Explanation:
    """Explain ``target`` (argmax by default) for every sample of ``x`` with the LRP
    ``analyzer`` (what ``analyze`` and ``LRP.__call__`` run). ``record``: layer names whose
    relevance and activation to keep (True: every layer). With ``to_input=False`` and layers
    recorded, the backward pass stops at the lowest of them (no input relevance): the
    relevances above it are the same, and the layers below, often the costliest, are
    skipped."""
    graph = analyzer.graph
    if record is True:
        record = list(range(len(graph.layers)))
    else:
        record = [graph.index(name) for name in (record or ())]
    stop = -1 if to_input or not record else min(record)
    fp = analyzer.forward(x, keep=record, above=stop)
    ids = resolve_target(fp.output, target)
    activations = {graph.layers[i].name: fp.value(i) for i in record}
    init = analyzer.output_relevance(fp.output, ids)[None]
    pending, recorded = analyzer.propagate(fp, {graph.output_layer: init}, record=record, stop=stop)
    if stop >= 0 and stop in pending:  # every layer above has passed its share down to it
        recorded[stop] = pending[stop]
    relevance = pending.get(-1, torch.zeros_like(x)[None])[0] if stop < 0 else None
    layers = {graph.layers[i].name: r[0] for i, r in sorted(recorded.items())}
    return Explanation(relevance, fp.output, ids, layers, activations)


def analyze(x: Tensor, analyzer, target: int | Sequence[int] | Tensor | None = None, **kwargs):
    """The one entry point: explain ``x`` with any analyzer (``ct.LRP``, ``ct.CRP``,
    ``ct.CondAttribution``), ``target`` the class explained per sample (argmax when None;
    CondAttribution takes its classes from ``conditions=`` instead). Keyword arguments go to
    the analyzer, e.g. ``record=["features.28"]``. Same as ``analyzer(x, target, ...)``."""
    if target is None:
        return analyzer(x, **kwargs)
    return analyzer(x, target, **kwargs)
