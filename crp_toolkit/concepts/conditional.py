"""Conditional relevance: relevance restricted to concepts of chosen layers (CRP).

A condition maps layer names to concept ids, plus the output target under ``"y"``. Ids within
a layer are OR-ed, layers are AND-ed. All conditions of a call share one forward pass; the
relevance above the highest conditioned layer is computed once, and the rest is batched over
conditions in chunks that fit a memory budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from crp_toolkit.concepts.concepts import ChannelConcept, Concept, concept_on, one_hot
from crp_toolkit.engine.explanation import Explanation
from crp_toolkit.engine.layout import feature_axes
from crp_toolkit.engine.lrp import LRP, ForwardPass

OUTPUT = "y"
Condition = Mapping[str, object]


@dataclass(kw_only=True)
class CondResult(Explanation):
    """An ``Explanation`` with one row per (sample, condition) pair, in the order given.

    ``relevance``: input relevance (N, *input shape); ``heatmaps``: summed over channels;
    ``relevances`` / ``activations``: per recorded layer (N, ...), relevance before any mask;
    ``sample``: the sample of each row; ``output``: its logits; ``target``: the class its
    condition explains (-1 where the condition names no single class: several, or a pass
    started at an inner layer).
    """

    relevance: Tensor
    sample: Tensor


def propagate_conditioned(
    analyzer: LRP,
    fp: ForwardPass,
    init: Mapping[int, Tensor],
    masks: Mapping[int, Tensor],
    *,
    record: Iterable[int] = (),
    exclude_parallel: bool = True,
    chunk_size: int | None = None,
    memory_budget: int = 2**30,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Relevance at the input and at ``record`` layers for S slots of masks.

    ``init`` maps a layer index to relevance (1 or S, B, ...) at its output; ``masks`` map
    layer indices to (S, B, ...) multipliers. Returns (S, B, *input) and {index: (S, B, ...)}.
    """
    record = set(record)
    slots = max([m.shape[0] for m in masks.values()] + [r.shape[0] for r in init.values()])
    pending, above = dict(init), {}
    if masks and all(r.shape[0] == 1 for r in init.values()):
        pending, above = analyzer.propagate(fp, init, record=record, stop=max(masks))
        if exclude_parallel:  # what was recorded in parallel to the top condition is dropped
            downstream = analyzer.graph.descendants(max(masks))
            above = {i: r for i, r in above.items() if i in downstream}
    exclusive = tuple(masks) if exclude_parallel else ()
    if exclude_parallel:
        _check_on_one_path(analyzer, masks)
    size = chunk_size or _chunk_size(fp, masks, memory_budget)
    heat, below = [], []
    for start in range(0, slots, size):
        part = slice(start, start + size)
        n = min(size, slots - start)
        chunk_init = {i: r if r.shape[0] == 1 else r[part] for i, r in pending.items()}
        chunk_masks = {i: m if m.shape[0] == 1 else m[part] for i, m in masks.items()}
        out, rec = analyzer.propagate(
            fp, chunk_init, masks=chunk_masks, record=record, exclusive=exclusive
        )
        heat.append(_or_zeros(out.get(-1), fp.value(-1), n))
        below.append({i: _or_zeros(rec.get(i), fp.value(i), n) for i in record - above.keys()})
    recorded = {i: r.expand(slots, *r.shape[1:]) for i, r in above.items()}
    for i in below[0]:
        recorded[i] = torch.cat([b[i] for b in below])
    return torch.cat(heat), recorded


def _or_zeros(relevance: Tensor | None, like: Tensor, slots: int) -> Tensor:
    """Relevance expanded to ``slots``; zeros where none arrived (a layer it bypassed)."""
    if relevance is None:
        return torch.zeros_like(like).expand(slots, *like.shape)
    return relevance.expand(slots, *relevance.shape[1:])


def _chunk_size(fp: ForwardPass, masks: Mapping[int, Tensor], budget: int) -> int:
    """Slots per chunk so that the relevance pass stays within ``budget`` bytes (estimate:
    a few tensors the size of every activation below the highest conditioned layer)."""
    top = max(masks) if masks else len(fp.graph.layers) - 1
    below = {layer.node for layer in fp.graph.layers[: top + 1]} | {fp.graph.input_node}
    per_slot = sum(
        t.numel() * t.element_size()
        for node, t in fp.values.items()
        if isinstance(t, Tensor) and node in below
    )
    return max(1, int(budget // max(1, 3 * per_slot)))


def _check_on_one_path(analyzer: LRP, masks: Mapping[int, Tensor]) -> None:
    layers = sorted(masks)
    for lower, upper in zip(layers, layers[1:], strict=False):
        if lower not in analyzer.graph.ancestors(upper):
            names = analyzer.graph.layers[lower].name, analyzer.graph.layers[upper].name
            raise ValueError(
                f"with exclude_parallel=True, conditioned layers must lie on one path, but "
                f"{names[0]!r} and {names[1]!r} are parallel; use exclude_parallel=False or "
                "condition them in separate conditions"
            )


class CondAttribution:
    """Conditional attributions (the general form of CRP), after zennit-crp's class.

    ``CondAttribution(analyzer)(x, conditions, record=[...])``: one row per (sample,
    condition): with as many conditions as samples they pair up, otherwise every sample is
    explained under every condition (sample-major order, as zennit-crp does).
    """

    def __init__(
        self,
        analyzer: LRP,
        concepts: Mapping[str, Concept] | None = None,
        *,
        memory_budget: int = 2**30,
    ) -> None:
        self.analyzer = analyzer
        self.concepts = dict(concepts or {})
        self.memory_budget = memory_budget

    def concept(self, layer: str, input_shape: Sequence[int]) -> Concept:
        """The concepts of ``layer`` (channels unless given) for inputs of ``input_shape``,
        along the layer's feature axis (see ``engine.layout``)."""
        axes = feature_axes(self.analyzer, input_shape)
        found = self.concepts.get(layer, ChannelConcept())
        return concept_on(found, axes[self.analyzer.graph.index(layer)], layer)

    def __call__(
        self,
        x: Tensor,
        conditions: Sequence[Condition],
        record: Sequence[str] = (),
        *,
        exclude_parallel: bool = True,
        start_layer: str | None = None,
        init_rel: Tensor | None = None,
        chunk_size: int | None = None,
    ) -> CondResult:
        """Conditional relevance of ``x`` under each condition.

        ``start_layer`` starts the pass at an inner layer instead of the output, from
        ``init_rel`` ((B, ...) shaped like that layer's output) or else its activation.
        Conditions naming different sets of layers are propagated separately (with
        ``exclude_parallel`` a condition drops only what bypasses its own layers).
        """
        graph = self.analyzer.graph
        conditions = [dict(c) for c in conditions]
        if not conditions:
            raise ValueError("give at least one condition, e.g. [{'y': 3}]")
        named = {k for c in conditions for k in c if k != OUTPUT}
        record_index = [graph.index(name) for name in record]
        start = graph.index(start_layer) if start_layer else None
        self.analyzer.refuse_unreached(
            [graph.index(n) for n in named], None if start is None else [start]
        )
        keep = [graph.index(n) for n in named] + record_index + ([start] if start else [])
        fp = self.analyzer.forward(x, reuse=True, keep=keep)
        batch = x.shape[0]
        pairwise = len(conditions) == batch and batch > 1
        rows = len(conditions) if pairwise else len(conditions) * batch
        heat: list[Tensor | None] = [None] * rows
        relevances: dict[str, list] = {name: [None] * rows for name in record}
        for members in _groups(conditions):
            grid, where = _layout(conditions, members, batch, pairwise)
            h, recorded = self._run(
                fp, grid, start, init_rel, record_index, exclude_parallel, chunk_size
            )
            for (s, b), row in where.items():
                heat[row] = h[s, b]
                for i, r in recorded.items():
                    relevances[graph.layers[i].name][row] = r[s, b]
        sample = [row if pairwise else row // len(conditions) for row in range(rows)]
        condition = [row if pairwise else row % len(conditions) for row in range(rows)]
        explained = [-1 if start is not None else _single_class(c) for c in conditions]
        return CondResult(
            relevance=torch.stack(heat),
            output=fp.output[sample],
            target=torch.tensor([explained[c] for c in condition], device=x.device),
            relevances={name: torch.stack(r) for name, r in relevances.items()},
            activations={name: fp.value(graph.index(name))[sample] for name in record},
            sample=torch.tensor(sample, device=x.device),
        )

    def _run(self, fp, grid, start, init_rel, record_index, exclude_parallel, chunk_size):
        graph = self.analyzer.graph
        layers = sorted(
            {k for row in grid for c in row if c for k in c if k != OUTPUT}, key=graph.index
        )
        masks = {}
        for name in layers:
            index, concept = graph.index(name), self.concept(name, fp.value(-1).shape[1:])
            activation = fp.value(index)
            ids = [[_ids(c.get(name, []), name) if c else [] for c in row] for row in grid]
            for chosen in (i for row in ids for i in row):
                concept.check(chosen, activation, name)
            masks[index] = concept.mask(ids, activation)
        init = self._initial(fp, grid, start, init_rel)
        return propagate_conditioned(
            self.analyzer,
            fp,
            init,
            masks,
            record=record_index,
            exclude_parallel=exclude_parallel,
            chunk_size=chunk_size,
            memory_budget=self.memory_budget,
        )

    def _initial(self, fp, grid, start, init_rel) -> dict[int, Tensor]:
        batch = fp.value(-1).shape[0]
        if start is not None:
            base = fp.value(start) if init_rel is None else init_rel.to(fp.value(start))
            if base.shape[0] != batch:
                raise ValueError(f"init_rel has {base.shape[0]} rows for a batch of {batch}")
            live = torch.tensor([[c is not None for c in row] for row in grid], dtype=base.dtype)
            live = live.to(base.device).reshape(*live.shape, *([1] * (base.dim() - 1)))
            return {start: base[None] * live}
        if any(c is not None and OUTPUT not in c for row in grid for c in row):
            raise ValueError(
                f"every condition needs the output target {OUTPUT!r} (e.g. {{'y': 3}}), "
                "unless start_layer is given"
            )
        output = fp.output
        classes = output.shape[1]
        ys = [[_ids(c[OUTPUT], OUTPUT) if c is not None else [] for c in row] for row in grid]
        bad = sorted({y for row in ys for chosen in row for y in chosen if not 0 <= y < classes})
        if bad:
            raise ValueError(f"target(s) {bad} out of range: the model has {classes} classes")
        if all(row == ys[0] for row in ys):
            ys = ys[:1]  # one output relevance shared by every slot
        selected = one_hot(ys, classes, output)
        value = 1.0 if self.analyzer.normalize_output_relevance else output[None]
        return {self.analyzer.graph.output_layer: selected * value}


def _single_class(condition: Condition) -> int:
    """The class a condition explains, or -1 when it names none or several."""
    ys = _ids(condition.get(OUTPUT, []), OUTPUT)
    return ys[0] if len(ys) == 1 else -1


def _groups(conditions: Sequence[dict]) -> list[list[int]]:
    """Indices of conditions grouped by the set of layers they name, in first-seen order."""
    groups: dict[frozenset, list[int]] = {}
    for i, c in enumerate(conditions):
        groups.setdefault(frozenset(k for k in c if k != OUTPUT), []).append(i)
    return list(groups.values())


def _layout(conditions, members, batch, pairwise):
    """A [slot][sample] grid of conditions (None where unused) and where each cell's result
    goes: paired conditions use one slot, otherwise every member is a slot over all samples
    (rows in sample-major order, as zennit-crp's broadcast)."""
    if pairwise:
        grid = [[conditions[b] if b in members else None for b in range(batch)]]
        return grid, {(0, b): b for b in members}
    grid = [[conditions[k]] * batch for k in members]
    n = len(conditions)
    return grid, {(s, b): b * n + k for s, k in enumerate(members) for b in range(batch)}


def _ids(value, name: str) -> list[int]:
    if isinstance(value, Tensor):
        value = value.flatten().tolist()
    if isinstance(value, int):
        return [value]
    try:
        return [int(v) for v in value]
    except TypeError as err:
        raise TypeError(
            f"concept ids for {name!r} must be an int or a list of ints, got {value!r}"
        ) from err
