"""Mining at dataset scale: reference samples, class statistics, concept similarity and PCX
prototypes on a synthetic store of 100,000 samples x 512 concepts (one layer, 10 classes),
written with the store's own writer, per-chunk class tables and merge as the dataset pass
makes them. Reports the median time of 3 runs, the bytes each computation reads per array
against the array's size on disk (1.0: read once), and the peak of traced memory against the
size of one chunk of scores (float64).

    python benchmarks/bench_mining.py [--n 100000] [--concepts 512] [--chunk 4096] [--store DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import zarr
from common import REPO, machine_info, markdown_table, median, write_json

from crp_toolkit.mining.prototypes import fit_prototypes
from crp_toolkit.mining.references import reference_samples
from crp_toolkit.mining.similarity import concept_similarity
from crp_toolkit.mining.statistics import class_statistics
from crp_toolkit.store.tables import chunk_tables, merge_tables
from crp_toolkit.store.zarr_store import (
    Layout,
    Store,
    StoreOptions,
    create_or_resume,
    write_chunk,
)

LAYER = "features"
SPATIAL = (7, 7)
READ: Counter = Counter()  # compressed bytes read per array path, by CountingStore


class CountingStore(zarr.storage.LocalStore):
    """A local store that counts the chunk bytes it hands out, per array."""

    async def get(self, key, prototype=None, byte_range=None):
        found = await super().get(key, prototype, byte_range)
        if found is not None and "/c/" in key:
            READ[key.split("/c/")[0]] += len(found)
        return found


# -- the synthetic store -----------------------------------------------------------------------
def chunk_data(layout: Layout, chunk: int, patterns: np.ndarray, seed: int) -> dict:
    """One chunk of plausible statistics: each class relies on a few concepts (sparse gamma
    pattern), samples vary multiplicatively around it, a little relevance is negative, and
    about one sample in a thousand is unreadable (all zero, as the dataset pass leaves it)."""
    rng = np.random.default_rng([seed, chunk])
    rows = len(layout.rows(chunk))
    arrays = layout.empty(rows)
    classes, concepts = patterns.shape
    labels = rng.integers(0, classes, rows)
    valid = rng.random(rows) > 1e-3
    base = patterns[labels]
    relevance = base * rng.lognormal(0, 0.6, (rows, concepts))
    relevance -= 0.1 * base.mean(1, keepdims=True) * rng.random((rows, concepts))
    act_max = base * rng.lognormal(0, 0.4, (rows, concepts)) + 0.05 * rng.random((rows, concepts))
    logits = rng.normal(size=(rows, classes))
    logits[np.arange(rows), labels] += 3
    values = {
        "relevance": relevance,
        "normaliser": np.abs(relevance).sum(1),
        "rel_max": relevance * rng.uniform(0.05, 0.3, (rows, 1)),
        "act_max": act_max,
        "act_mean": act_max * rng.uniform(0.05, 0.4, (rows, concepts)),
        "act_argmax": rng.integers(0, int(np.prod(SPATIAL)), (rows, concepts)),
    }
    for stat, value in values.items():
        arrays[f"layers/{LAYER}/{stat}"][valid] = value[valid]
    arrays["samples/label"][:] = labels
    arrays["samples/prediction"][:] = logits.argmax(1)
    arrays["samples/logits"][valid] = logits[valid]
    arrays["samples/valid"][:] = valid
    stats = {stat: arrays[f"layers/{LAYER}/{stat}"] for stat in values}
    tables = chunk_tables(
        stats,
        int(np.prod(SPATIAL)),
        labels,
        valid,
        layout.rows(chunk).start,
        k=layout.options.table_size,
        k_class=layout.options.class_table_size,
        entries=layout.class_entries,
        n_classes=classes,
    )
    arrays.update({f"layers/{LAYER}/tables/{name}": value for name, value in tables.items()})
    return arrays


def build_store(path: Path, n: int, concepts: int, classes: int, chunk: int, seed: int = 0):
    layout = Layout(n, classes, {LAYER: (concepts, *SPATIAL)}, StoreOptions(chunk, table_size=0))
    patterns = np.random.default_rng(seed).gamma(0.3, size=(classes, concepts))
    group = create_or_resume(path, layout, {"model": "synthetic", "dataset": f"synthetic-{n}"})
    for i in range(layout.n_chunks):
        write_chunk(group, layout, i, chunk_data(layout, i, patterns, seed))
    merge_tables(path)


# -- measuring ---------------------------------------------------------------------------------
def disk_bytes(path: Path, array: str) -> int:
    return sum(f.stat().st_size for f in (path / array).rglob("*") if f.is_file())


def counted_store(path: Path) -> Store:
    store = Store(path)
    store.group = zarr.open_group(CountingStore(path, read_only=True), mode="r")
    return store


def measure(path: Path, name: str, run, repeats: int) -> dict:
    """Median seconds of ``repeats`` runs, then one traced run for bytes read and peak memory."""
    seconds = []
    for _ in range(repeats):
        store = Store(path)
        start = time.perf_counter()
        run(store)
        seconds.append(time.perf_counter() - start)
    READ.clear()
    store = counted_store(path)
    tracemalloc.start()
    run(store)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    reads = {
        array: round(read / disk_bytes(path, array), 3)
        for array, read in sorted(READ.items())
        if array.startswith("layers/")
    }
    return {"name": name, "seconds": median(seconds), "runs": seconds, "peak": peak, "reads": reads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--concepts", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prototypes-all", action="store_true", help="also fit on every sample")
    p.add_argument("--store", type=Path, help="reuse (or build) the synthetic store here")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/mining_cpu.json")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Best performing initialization did not converge")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or Path(tmp) / "synthetic.zarr"
        if not (path / "zarr.json").exists():
            start = time.perf_counter()
            build_store(path, args.n, args.concepts, args.classes, args.chunk)
            print(f"store written in {time.perf_counter() - start:.1f} s")
        work = {
            "reference_samples relevance-sum-normalised k=40": lambda s: reference_samples(
                s, LAYER, n_refs=40
            ),
            "reference_samples activation-max-raw k=40": lambda s: reference_samples(
                s, LAYER, mode="activation", pool="max", normalised=False, n_refs=40
            ),
            "class_statistics k=8": lambda s: class_statistics(s, LAYER, n_refs=8),
            "concept_similarity relevance": lambda s: concept_similarity(s, LAYER),
            "concept_similarity activation-max": lambda s: concept_similarity(
                s, LAYER, mode="activation", pool="max"
            ),
        }
        # one run each: fitting full-covariance mixtures is the slow part, and it is not I/O
        slow = {
            "fit_prototypes 4, max_fit_samples=1000, max_iter=10": lambda s: fit_prototypes(
                s, LAYER, max_fit_samples=1000, max_iter=10
            ),
        }
        if args.prototypes_all:
            slow["fit_prototypes 4, all samples, max_iter=10"] = lambda s: fit_prototypes(
                s, LAYER, max_iter=10
            )
        results = [measure(path, name, run, args.repeats) for name, run in work.items()]
        results += [measure(path, name, run, 1) for name, run in slow.items()]
        chunk_scores = args.chunk * args.concepts * 8
    rows = [
        (
            r["name"],
            f"{r['seconds']:.2f}",
            ", ".join(f"{a.split('/')[-1]} {x}" for a, x in r["reads"].items()),
            f"{r['peak'] / 2**20:.0f}",
            f"{r['peak'] / chunk_scores:.1f}",
        )
        for r in results
    ]
    header = ("computation", "median s", "read / on disk", "peak MiB", "peak / chunk")
    print(markdown_table(header, rows))
    setting = {k: v for k, v in vars(args).items() if k not in ("store", "out")}
    machine = machine_info(torch.device("cpu"))
    write_json(args.out, {"machine": machine, "setting": setting, "results": results})


if __name__ == "__main__":
    main()
