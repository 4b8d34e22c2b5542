"""One pass over a dataset: per sample, the relevance of every concept of the chosen layers
(explaining the label or the prediction) and activation statistics, written chunk by chunk
into the dataset store (see ``zarr_store``). Resumable: finished chunks are skipped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from crp_toolkit.concepts.concepts import ChannelConcept, concept_on, feature_first, spatial_view
from crp_toolkit.concepts.conditional import propagate_conditioned
from crp_toolkit.data.loading import Batch, first_readable, grouped
from crp_toolkit.engine.layout import feature_axes, layouts
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.store.study import make_provenance
from crp_toolkit.store.tables import SOURCES, chunk_tables, merge_when_complete
from crp_toolkit.store.verify import damaged_units
from crp_toolkit.store.zarr_store import (
    Layout,
    Store,
    StoreOptions,
    create_or_resume,
    done_chunks,
    write_chunk,
)

log = logging.getLogger(__name__)


def layer_statistics(
    relevance: Tensor, activation: Tensor, maps: bool, scores: Tensor | None = None
) -> dict[str, np.ndarray]:
    """Concept relevance (summed over space, and its spatial max), its absolute normaliser,
    and the spatial max, mean and argmax of each channel's activation, for a batch
    (B, C, *positions): all that RelMax/ActMax with "sum" and "max" pooling need. With
    ``maps``, the relevance maps themselves (float16). ``scores``: the concept relevance when
    it counts more positions than those given (a token layer's class token)."""
    if scores is None:
        scores = ChannelConcept().relevance(relevance, activation)
    flat = activation.flatten(2) if activation.dim() > 2 else activation[..., None]
    rel_flat = relevance.flatten(2) if relevance.dim() > 2 else relevance[..., None]
    best = flat.max(2)
    stats = {
        "relevance": scores.float().cpu().numpy(),
        "normaliser": scores.abs().sum(1).float().cpu().numpy(),
        "rel_max": rel_flat.max(2).values.float().cpu().numpy(),
        "act_max": best.values.float().cpu().numpy(),
        "act_mean": flat.mean(2).float().cpu().numpy(),
        "act_argmax": best.indices.int().cpu().numpy(),
    }
    if maps and relevance.dim() > 2:
        stats["maps"] = relevance.half().cpu().numpy()
    return stats


def top_logits(logits: Tensor, k: int) -> dict[str, np.ndarray]:
    """The ``k`` largest logits of each sample and their classes (ties: lower class first)."""
    best = torch.sort(logits.float(), dim=1, descending=True, stable=True)
    return {
        "samples/top_logits": best.values[:, :k].cpu().numpy(),
        "samples/top_classes": best.indices[:, :k].cpu().numpy(),
    }


def top_concept_heatmaps(
    analyzer: LRP, x: Tensor, target: Tensor, concepts: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Input-space conditional heatmaps (B, n, *spatial) of the given concepts (B, n) of
    each layer, explaining ``target``: what ``CondAttribution`` gives for the conditions
    ``{"y": target[b], layer: [concepts[layer][b, j]]}``, with one forward pass for all
    layers and the relevance above each layer computed once for its n concepts."""
    graph = analyzer.graph
    index = {name: graph.index(name) for name in concepts}
    fp = analyzer.forward(x, reuse=True, keep=list(index.values()))
    axes = feature_axes(analyzer, x.shape[1:])
    init = {graph.output_layer: analyzer.output_relevance(fp.output, target)[None]}
    out = {}
    for name, ids in concepts.items():
        grid = ids.T[..., None].tolist()  # [slot j][sample b] -> [concept id]
        channels = concept_on(ChannelConcept(), axes[index[name]], name)
        masks = {index[name]: channels.mask(grid, fp.value(index[name]))}
        relevance, _ = propagate_conditioned(analyzer, fp, init, masks)
        out[name] = relevance.sum(2).transpose(0, 1)  # (n, B, C, ...) -> (B, n, ...)
    return out


def analyze_batch(
    analyzer: LRP, x: Tensor, labels: Tensor, layout: Layout, target: str
) -> dict[str, np.ndarray]:
    """One batch (one forward, one backward down to the lowest layer; with ``top_heatmaps``
    one more forward and the conditional passes): store arrays by path (samples/...,
    layers/...)."""
    layers = list(layout.layers)
    classes = labels.to(x.device) if target == "label" else None  # None: the prediction
    expl = analyzer(x, classes, record=layers, to_input=False)
    if layout.top_logits:
        logits = top_logits(expl.output, layout.options.keep_logits)
    else:
        logits = {"samples/logits": expl.output.float().cpu().numpy()}
    out = {
        "samples/label": labels.numpy(),
        "samples/prediction": expl.output.argmax(1).cpu().numpy(),
        **logits,
        "samples/valid": np.ones(len(x), dtype=bool),
    }
    top: dict[str, Tensor] = {}
    found = layouts(analyzer, x.shape[1:])
    for name in layers:
        i = analyzer.graph.index(name)
        values = [
            feature_first(t[name], found.axes[i], name) for t in (expl.relevances, expl.activations)
        ]
        scores = ChannelConcept().relevance(*values)  # over every position, or every token
        grid = found.grids[i]
        relevance, activation = values if grid is None else [grid.patches(t) for t in values]
        stats = layer_statistics(relevance, activation, layout.options.maps, scores)
        for stat, array in stats.items():
            out[f"layers/{name}/{stat}"] = array
        if layout.options.top_heatmaps:
            ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices
            top[name] = ranked[:, : layout.top_concepts(name)]
    if top:
        heatmaps = top_concept_heatmaps(analyzer, x, expl.target, top)
        for name, ids in top.items():
            out[f"layers/{name}/top_concepts"] = ids.int().cpu().numpy()
            out[f"layers/{name}/top_heatmaps"] = heatmaps[name].half().cpu().numpy()
    return out


def analyze_chunk(
    analyzer: LRP, x: Tensor, labels: Tensor, layout: Layout, target: str, batch_size: int
) -> dict[str, np.ndarray]:
    """``analyze_batch`` over a chunk's images ``batch_size`` at a time (a chunk is the unit
    written to the store; the batch bounds the memory of one pass)."""
    parts = [
        analyze_batch(analyzer, x[s : s + batch_size], labels[s : s + batch_size], layout, target)
        for s in range(0, len(x), batch_size)
    ]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def layer_tables(layout: Layout, chunk: int, arrays: Mapping[str, np.ndarray]):
    """The per-chunk reference tables of every layer from the chunk's rows of ``arrays``."""
    out = {}
    for name, shape in layout.layers.items():
        stats = {stat: arrays[f"layers/{name}/{stat}"] for stat in SOURCES.values()}
        found = chunk_tables(
            stats,
            int(np.prod(shape[1:], dtype=np.int64)),
            arrays["samples/label"],
            arrays["samples/valid"],
            layout.rows(chunk).start,
            k=layout.options.table_size,
            k_class=layout.options.class_table_size,
            entries=layout.class_entries,
            n_classes=layout.classes,
        )
        out.update({f"layers/{name}/tables/{key}": values for key, values in found.items()})
    return out


def finish_chunk(group: zarr.Group, layout: Layout, chunk: int, arrays: dict) -> None:
    """Add the chunk's reference tables to its ``arrays`` and write it (marking it done)."""
    if layout.options.tables:
        arrays.update(layer_tables(layout, chunk, arrays))
    write_chunk(group, layout, chunk, arrays)


@dataclass(frozen=True)
class AnalysisReport:
    """What one ``analyze_dataset`` call did: the store, the units (chunks) it computed, those
    among them recomputed because their files were missing or damaged (with the problems), and
    the samples it could not read (``{"index", "error"}``, stored as ``valid=False``)."""

    path: Path
    computed: list[int] = field(default_factory=list)
    recomputed: dict[int, list[str]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)


def _positive(**counts) -> None:
    bad = {key: value for key, value in counts.items() if value is not None and value <= 0}
    if bad:
        raise ValueError(f"{bad} must be at least 1")


def _damaged(path: Path, units: list[int], progress: bool) -> dict[int, list[str]]:
    """The finished units among ``units`` whose files are missing or damaged, each logged."""
    found = damaged_units(Store(path), units, progress) if units else {}
    for unit, problems in found.items():
        log.warning(
            "unit %d of %s is damaged and is recomputed: %s", unit, path, "; ".join(problems)
        )
    return found


def _check_pass(dataset: Dataset, layers: Sequence[str], target: str, shard, shards) -> None:
    """Refuse a pass that cannot run, before the store exists."""
    _positive(shards=shards)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: check its path (and analysis.limit)")
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    if target not in ("label", "prediction"):
        raise ValueError(f"target must be 'label' or 'prediction', got {target!r}")
    if not layers:
        raise ValueError("give at least one layer to analyse (concepts.layers)")


def probe_layout(
    analyzer: LRP,
    dataset: Dataset,
    layers: Sequence[str],
    options: StoreOptions,
    device: str,
    class_names: Sequence[str] = (),
) -> Layout:
    """The store's layout, from one readable sample through the model."""
    probe_x = first_readable(dataset)
    if options.top_heatmaps and probe_x.dim() < 2:
        raise ValueError(
            f"top_heatmaps needs inputs shaped (channels, *spatial), got samples of shape "
            f"{tuple(probe_x.shape)}; set top_heatmaps=0 for this dataset"
        )
    index = [analyzer.graph.index(n) for n in layers]
    x = torch.as_tensor(probe_x)[None].to(device)
    probe = analyzer.forward(x, keep=index)
    found = layouts(analyzer, x.shape[1:])
    shapes = {
        n: tuple(spatial_view(probe.value(i), found.axes[i], found.grids[i], n).shape[1:])
        for n, i in zip(layers, index, strict=True)
    }
    layout = Layout(
        len(dataset),
        probe.output.shape[1],
        shapes,
        options,
        input_shape=tuple(probe_x.shape[1:]),
        class_names=tuple(str(name) for name in class_names),
    )
    if class_names and len(class_names) != layout.classes:
        raise ValueError(
            f"{len(class_names)} class names for a model with {layout.classes} outputs"
        )
    return layout


def analyze_dataset(
    analyzer: LRP,
    dataset: Dataset,
    layers: Sequence[str],
    path: str | Path,
    *,
    dataset_description: str,
    options: StoreOptions = StoreOptions(),
    target: str = "label",
    device: str = "cpu",
    loader_options: dict | None = None,
    config: dict | None = None,
    progress: bool = True,
    shard: int = 0,
    shards: int = 1,
    class_names: Sequence[str] = (),
) -> AnalysisReport:
    """Run the analysis pass into the store at ``path`` (created, or resumed), holding what
    ``options`` says (:class:`StoreOptions`); ``class_names`` label its class coordinate;
    ``target`` is the class explained per sample, its ``"label"`` or the model's
    ``"prediction"``. With
    ``shards > 1`` this process does the chunks ``c`` with ``c % shards == shard``; shards may
    run at the same time (each writes only its own chunks). A chunk is read whole (one loader
    for all chunks, ``loader_options`` its settings) and explained ``loader_options["batch_size"]``
    samples at a time (the whole chunk at once without it). The reference tables are merged by
    whichever process finds the store complete.

    Finished chunks of a resumed store are checked first (files present, checksums, digests)
    and the damaged ones recomputed. Returns what was done (:class:`AnalysisReport`)."""
    loader = dict(loader_options or {})
    batch_size = loader.pop("batch_size", None)
    batch_size = options.chunk if batch_size is None else batch_size  # None: a chunk at once
    _positive(batch_size=batch_size)
    _check_pass(dataset, layers, target, shard, shards)
    on_error = loader.get("on_error", "skip")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"loader.on_error must be 'skip' or 'fail', got {on_error!r}")
    layout = probe_layout(analyzer, dataset, layers, options, device, class_names)
    provenance = make_provenance(analyzer, dataset, dataset_description, target, config)
    group = create_or_resume(path, layout, provenance)
    path = Path(path).resolve()
    mine = range(shard, layout.n_chunks, shards)
    finished = done_chunks(group)
    damaged = _damaged(path, [c for c in mine if c in finished], progress)
    for c in damaged:
        group["progress/done"][c] = False
    todo = [c for c in mine if c not in finished or c in damaged]
    chunks = grouped(dataset, [layout.rows(c) for c in todo], classes=layout.classes, **loader)
    work = partial(analyze_chunk, analyzer, layout=layout, target=target, batch_size=batch_size)
    skipped = _write_chunks(group, layout, todo, chunks, work, device, progress)
    if options.tables and not merge_when_complete(path):
        report_unmerged(path)
    return AnalysisReport(path, todo, damaged, skipped)


def _write_chunks(
    group: zarr.Group,
    layout: Layout,
    todo: list[int],
    batches: Iterable[Batch],
    work: Callable[[Tensor, Tensor], dict[str, np.ndarray]],
    device: str,
    progress: bool,
) -> list[dict]:
    """Explain the chunks ``todo`` (their ``batches``, read ahead by one loader) with
    ``work(images, labels)`` and write them; returns the samples that could not be read. The
    tables and the write of a chunk run in a thread while the next chunk is explained (numpy,
    zarr's codecs and torch release the GIL); one written chunk waits at most."""
    skipped: list[dict] = []
    samples = sum(len(layout.rows(c)) for c in todo)
    bar = tqdm(total=samples, desc="analyze", unit="img", disable=not progress)
    with bar, ThreadPoolExecutor(1) as writer:
        pending = None
        for c, batch in zip(todo, batches, strict=True):
            rows = layout.rows(c)
            arrays = layout.empty(len(rows))
            for bad in batch.skipped:
                log.warning("sample %d could not be read: %s", bad["index"], bad["error"])
            skipped += batch.skipped
            if batch.indices:
                at = np.array(batch.indices) - rows.start
                images = batch.images.to(device, non_blocking=True)  # pinned by the loader
                for key, values in work(images, batch.labels).items():
                    arrays[key][at] = values
            if pending is not None:
                pending.result()  # raises what the write of the previous chunk raised
            pending = writer.submit(finish_chunk, group, layout, c, arrays)
            bar.update(len(rows))
        if pending is not None:
            pending.result()
    return skipped


def report_unmerged(path: Path) -> None:
    """Warn when a complete store's tables are not merged because another process holds the
    merge lock (references are then mined from the score matrices, exactly but slower)."""
    group = zarr.open_group(path, mode="r")
    if group["progress/done"][:].all() and not group.attrs.get("tables_merged"):
        lock = path.with_name(f"{path.name}.merging")
        holder = lock.read_text().strip() if lock.exists() else "?"
        log.warning(
            "the reference tables of %s are not merged: another process (host and pid: %s) "
            "holds %s; if none does, delete that file and run "
            "crp_toolkit.store.tables.merge_tables (or any stage that reads the store)",
            path,
            holder,
            lock,
        )
