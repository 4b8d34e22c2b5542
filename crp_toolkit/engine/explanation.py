"""Explanations: what ``analyze`` returns, and how targets and output relevance are set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Explanation:
    """The result of explaining a batch.

    ``relevance`` is shaped like the input (None when the backward pass stopped at the
    lowest recorded layer); ``output`` holds the model's logits and ``target`` the explained
    class per sample; ``layer_relevances`` maps layer names to the relevance arriving at their
    outputs (when asked for), ``layer_activations`` to those layers' outputs.
    """

    relevance: Tensor | None
    output: Tensor
    target: Tensor
    layer_relevances: dict[str, Tensor] = field(default_factory=dict)
    layer_activations: dict[str, Tensor] = field(default_factory=dict)


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


def explain(
    analyzer,
    x: Tensor,
    target=None,
    *,
    layer_relevances: bool | Sequence[str] = False,
    to_input: bool = True,
) -> Explanation:
    """Explain ``target`` (argmax by default) for every sample of ``x`` with ``analyzer``.
    With ``to_input=False`` and layer relevances asked for, the backward pass stops at the
    lowest of those layers (no input relevance): the relevances above it are the same, and
    the layers below, often the costliest, are skipped."""
    graph = analyzer.graph
    if layer_relevances is True:
        record = list(range(len(graph.layers)))
    else:
        record = [graph.index(name) for name in (layer_relevances or ())]
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
    """``analyze(x, analyzer, target)``: the same as ``analyzer(x, target)``."""
    return analyzer(x, target, **kwargs)
