"""The streaming reference tables of the dataset pass: building one chunk's tables
(``layer_tables``: every layer, all 8 score specs, top-k and per-class) and merging a complete
store's per-chunk tables (``merge_tables``). Random statistics shaped like VGG16's deep conv
layers (relevance signed, activations rectified: many tied zeros); medians of several runs.

With ``--analysis N``, also ``analyze_dataset`` end to end on N random 64x64 images
(VGG16, 10 classes, three layers of 512 channels, chunks of ``--rows``), with the tables
(table_size=32, class_table_size=8) and without (0): the share the tables take of a CPU pass.

With ``--pipeline N``, ``analyze_dataset`` on N inputs through a network of almost no compute
whose layers are shaped like VGG16's deepest (``--layers`` depthwise convolutions of
``--concepts`` channels at 14x14), inputs generated on the fly, for each of ``--classes``: the
images per second the pass itself sustains around a network (loading, statistics, tables,
writing, merge), i.e. the ceiling a fast accelerator would meet, with the tables and without,
and the peak RSS (run with two N to see that it does not grow with the samples).

    python benchmarks/bench_tables.py [--rows 256] [--concepts 512] [--layers 3]
        [--classes 10 1000] [--chunks 40] [--repeats 5] [--analysis 0] [--pipeline 0]
        [--label before]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_featvis import LAYERS, vgg16
from common import (
    REPO,
    machine_info,
    markdown_table,
    median,
    peak_rss_bytes,
    reset_peak_rss,
    write_json,
)
from torch.utils.data import TensorDataset

import crp_toolkit as ct
from crp_toolkit.store.analysis import analyze_dataset, layer_tables
from crp_toolkit.store.tables import merge_tables
from crp_toolkit.store.zarr_store import Layout, StoreOptions, create_or_resume, write_chunk

NO_TABLE_SIZES = {"table_size": 0, "class_table_size": 0}  # StoreOptions of a store without tables


def chunk_arrays(layout: Layout, chunk: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One chunk's labels, validity and per-layer statistics (float32, as the pass gives)."""
    rows = len(layout.rows(chunk))
    arrays = {
        "samples/label": rng.integers(0, layout.classes, rows),
        "samples/valid": np.ones(rows, dtype=bool),
    }
    for name, shape in layout.layers.items():
        signed = rng.standard_normal((2, rows, shape[0]), dtype=np.float32)
        active = np.maximum(rng.standard_normal((2, rows, shape[0]), dtype=np.float32), 0)
        stats = {"relevance": signed[0], "rel_max": signed[1]}
        stats |= {"act_max": active[0], "act_mean": active[1] / 4}
        arrays |= {f"layers/{name}/{stat}": values for stat, values in stats.items()}
    return arrays


def layout_for(args, classes: int) -> Layout:
    layers = {f"layer{i}": (args.concepts, 14, 14) for i in range(args.layers)}
    options = StoreOptions(chunk=args.rows, table_size=args.k, class_table_size=args.k_class)
    return Layout(max(args.chunks, 1) * args.rows, classes, layers, options)


def time_chunk(layout: Layout, repeats: int, rng: np.random.Generator) -> list[float]:
    """Seconds of ``layer_tables`` for one chunk, each run on fresh statistics."""
    runs = []
    for _ in range(repeats):
        arrays = chunk_arrays(layout, 0, rng)
        start = time.perf_counter()
        layer_tables(layout, 0, arrays)
        runs.append(time.perf_counter() - start)
    return runs


def time_merge(layout: Layout, repeats: int, rng: np.random.Generator) -> list[float]:
    """Seconds of ``merge_tables`` on a complete store of ``layout`` (tables only)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.zarr"
        group = create_or_resume(path, layout, {})
        for c in range(layout.n_chunks):
            arrays = chunk_arrays(layout, c, rng)
            tables = layer_tables(layout, c, arrays)
            keep = {key: arrays[key] for key in ("samples/label", "samples/valid")}
            write_chunk(group, layout, c, keep | tables)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            merge_tables(path)
            runs.append(time.perf_counter() - start)
        return runs


def time_analysis(n: int, chunk: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of ``analyze_dataset`` over ``n`` images with and without the tables."""
    analyzer = ct.LRP(ct.canonize(vgg16(10)), ct.composites.EpsilonPlusFlat())
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(n, 3, 64, 64, generator=gen), torch.randint(0, 10, (n,)))
    runs: dict[str, list[float]] = {"tables": [], "no tables": []}
    for _ in range(repeats):
        for name, k in (("tables", {}), ("no tables", NO_TABLE_SIZES)):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                analyze_dataset(
                    analyzer,
                    data,
                    LAYERS,
                    Path(tmp) / "s.zarr",
                    dataset_description="bench",
                    loader_options={"num_workers": 0},
                    progress=False,
                    options=StoreOptions(chunk=chunk, **k),
                )
                runs[name].append(time.perf_counter() - start)
    return runs


class Cheap(torch.nn.Module):
    """Layers shaped like VGG16's deepest (channels x 14 x 14), with almost no compute."""

    def __init__(self, channels: int, layers: int, classes: int) -> None:
        super().__init__()
        convs = [torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)]
        self.features = torch.nn.Sequential(
            *[m for _ in range(layers) for m in (*convs, torch.nn.ReLU())]
        )
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.classifier = torch.nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class Generated(torch.utils.data.Dataset):
    """Inputs made on the fly from their index: memory independent of the sample count."""

    def __init__(self, n: int, shape: tuple[int, ...], classes: int) -> None:
        self.n, self.shape, self.classes = n, shape, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        gen = torch.Generator().manual_seed(i)
        return torch.rand(self.shape, generator=gen), i % self.classes


def time_pipeline(args, classes: int) -> dict[str, list[float]]:
    """Seconds and peak RSS bytes of ``analyze_dataset`` over ``args.pipeline`` generated
    inputs through ``Cheap``, with the tables and without, alternating."""
    torch.manual_seed(0)
    model = Cheap(args.concepts, args.layers, classes).eval()
    analyzer = ct.LRP(model, ct.composites.EpsilonPlusFlat())
    layers = [f"features.{2 * i + 1}" for i in range(args.layers)]
    data = Generated(args.pipeline, (args.concepts, 14, 14), classes)
    runs: dict[str, list[float]] = {"tables": [], "no tables": []}
    peaks: dict[str, list[int]] = {"tables": [], "no tables": []}
    for _ in range(args.merge_repeats):
        for name, k in (("tables", {}), ("no tables", NO_TABLE_SIZES)):
            with tempfile.TemporaryDirectory() as tmp:
                reset_peak_rss()
                start = time.perf_counter()
                analyze_dataset(
                    analyzer,
                    data,
                    layers,
                    Path(tmp) / "s.zarr",
                    dataset_description="bench",
                    loader_options={"num_workers": 0, "batch_size": 64},
                    progress=False,
                    options=StoreOptions(chunk=args.rows, **k),
                )
                runs[name].append(time.perf_counter() - start)
                peaks[name].append(peak_rss_bytes())
    return {"seconds": runs, "peak_rss_bytes": peaks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--concepts", type=int, default=512)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-class", type=int, default=8)
    p.add_argument("--chunks", type=int, default=40, help="chunks of the merged store (0: none)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--merge-repeats", type=int, default=3, help="runs of merge and analysis")
    p.add_argument("--analysis", type=int, default=0, help="images of the end-to-end run")
    p.add_argument("--pipeline", type=int, default=0, help="inputs of the pipeline ceiling run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="current", help="names the JSON file: tables_<label>")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results, rows = [], []
    for classes in args.classes:
        layout = layout_for(args, classes)
        chunk = time_chunk(layout, args.repeats, rng)
        merge = time_merge(layout, args.merge_repeats, rng) if args.chunks else []
        results.append({"classes": classes, "chunk_seconds": chunk, "merge_seconds": merge})
        merged = f"{median(merge):.2f}" if merge else "-"
        rows.append([classes, f"{median(chunk):.3f}", f"{median(chunk) / args.layers:.3f}", merged])
    header = ["classes", "chunk_tables s/chunk", "per layer", f"merge s ({args.chunks} chunks)"]
    report = markdown_table(header, rows)
    out = {"machine": machine_info(torch.device("cpu")), "setting": vars(args)}
    if args.analysis:
        out["analysis_seconds"] = time_analysis(args.analysis, args.rows, args.merge_repeats)
        speed = {name: args.analysis / median(t) for name, t in out["analysis_seconds"].items()}
        report += "\n\nanalyze_dataset img/s: " + ", ".join(
            f"{k} {v:.1f}" for k, v in speed.items()
        )
    if args.pipeline:
        pipeline = {classes: time_pipeline(args, classes) for classes in args.classes}
        out["pipeline"] = pipeline
        report += f"\n\npipeline ceiling, {args.pipeline} inputs (no network): " + "; ".join(
            f"{classes} classes: "
            + ", ".join(
                f"{k} {args.pipeline / median(t):.0f} img/s "
                f"(peak RSS {max(found['peak_rss_bytes'][k]) / 2**20:.0f} MiB)"
                for k, t in found["seconds"].items()
            )
            for classes, found in pipeline.items()
        )
    write_json(
        REPO / "benchmarks" / "results" / f"tables_{args.label}.json", out | {"results": results}
    )
    print(report)


if __name__ == "__main__":
    main()
