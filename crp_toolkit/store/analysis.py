"""One pass over a dataset: per sample, the relevance of every concept of the chosen layers
(explaining the label or the prediction) and activation statistics, written chunk by chunk
into the dataset store (see ``zarr_store``). Resumable: finished chunks are skipped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

import crp_toolkit
from crp_toolkit.concepts.concepts import ChannelConcept
from crp_toolkit.data.loading import first_readable, gather
from crp_toolkit.engine.explanation import explain as explain_batch
from crp_toolkit.engine.lrp import LRP
from crp_toolkit.store.zarr_store import (
    Layout,
    create_or_resume,
    dataset_fingerprint,
    done_chunks,
    model_fingerprint,
    write_chunk,
)


def layer_statistics(relevance: Tensor, activation: Tensor, maps: bool) -> dict[str, np.ndarray]:
    """Concept relevance (summed over space, and its spatial max), its absolute normaliser,
    and the spatial max, mean and argmax of each channel's activation, for a batch: all that
    RelMax/ActMax with "sum" and "max" targets need. With ``maps``, the relevance maps
    themselves (float16)."""
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


def analyze_batch(
    analyzer: LRP, x: Tensor, labels: Tensor, layers: Sequence[str], explain: str, maps: bool
) -> dict[str, np.ndarray]:
    """One batch (one forward, one backward): store arrays by path (samples/..., layers/...)."""
    target = labels.to(x.device) if explain == "label" else None  # None: the prediction
    expl = explain_batch(analyzer, x, target, layer_relevances=list(layers))
    out = {
        "samples/label": labels.numpy(),
        "samples/prediction": expl.output.argmax(1).cpu().numpy(),
        "samples/logits": expl.output.float().cpu().numpy(),
        "samples/valid": np.ones(len(x), dtype=bool),
    }
    for name in layers:
        relevance, activation = expl.layer_relevances[name], expl.layer_activations[name]
        for stat, values in layer_statistics(relevance, activation, maps).items():
            out[f"layers/{name}/{stat}"] = values
    return out


def analyze_dataset(
    analyzer: LRP,
    dataset: Dataset,
    layers: Sequence[str],
    path: str | Path,
    *,
    dataset_description: str,
    chunk: int = 256,
    explain: str = "label",
    device: str = "cpu",
    loader_options: dict | None = None,
    config: dict | None = None,
    progress: bool = True,
    shard: int = 0,
    shards: int = 1,
    maps: bool = False,
) -> Path:
    """Run the analysis pass into the store at ``path`` (created, or resumed). With
    ``shards > 1`` this process does the chunks ``c`` with ``c % shards == shard``; shards may
    run at the same time (each writes only its own chunks)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    if explain not in ("label", "prediction"):
        raise ValueError(f"explain must be 'label' or 'prediction', got {explain!r}")
    if not layers:
        raise ValueError("give at least one layer to analyse (concepts.layers)")
    probe_x = first_readable(dataset)
    probe = analyzer.forward(
        torch.as_tensor(probe_x)[None].to(device), keep=[analyzer.graph.index(n) for n in layers]
    )
    shapes = {n: tuple(probe.value(analyzer.graph.index(n)).shape[1:]) for n in layers}
    layout = Layout(len(dataset), chunk, probe.output.shape[1], shapes, maps)
    provenance = {
        "model": model_fingerprint(analyzer.model),
        "dataset": dataset_fingerprint(dataset, dataset_description),
        "composite": repr(analyzer.composite),
        "explain": explain,
        "output_relevance": "one" if analyzer.normalize_output_relevance else "logit",
        "package_version": crp_toolkit.__version__,
        "config": config or {},
    }
    group = create_or_resume(path, layout, provenance)
    finished = done_chunks(group)
    todo = [c for c in range(shard, layout.n_chunks, shards) if c not in finished]
    for c in tqdm(todo, desc="analyze", unit="chunk", disable=not progress):
        rows = layout.rows(c)
        options = {**(loader_options or {}), "batch_size": chunk}
        batch = gather(dataset, list(rows), **options)
        arrays = layout.empty(len(rows))
        if batch.indices:
            at = np.array(batch.indices) - rows.start
            images = batch.images.to(device)
            found = analyze_batch(analyzer, images, batch.labels, layers, explain, maps)
            for key, values in found.items():
                arrays[key][at] = values
        write_chunk(group, layout, c, arrays)
    return Path(path)
