"""What the store's integrity checks cost beside the dataset pass (the concept world and its
CNN, CPU): the pass itself (which digests every unit it writes), the digests alone, ``verify``
of the finished store, a rerun of ``analyze`` on the complete store (it checks every finished
unit first), and the same rerun after one unit's file was deleted (it recomputes that unit).
Median of ``--repeat`` runs, alternating.

    python benchmarks/bench_integrity.py [--n 1200] [--chunk 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import crp_toolkit as ct
from crp_toolkit.data.training import load_world_model
from crp_toolkit.data.world import ConceptWorld
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.integrity import unit_digest
from crp_toolkit.store.verify import verify
from crp_toolkit.store.zarr_store import Layout, StoreOptions

LAYERS = ["features.12", "features.8"]


def timed(work, *args) -> float:
    start = time.perf_counter()
    work(*args)
    return time.perf_counter() - start


def digests(path: Path) -> None:
    """Every unit's digest from its arrays read back (what the writer computes, plus reads)."""
    store = ct.store.open(path)
    layout = Layout.from_attrs(store.attrs)
    for chunk in range(layout.n_chunks):
        rows = slice(layout.rows(chunk).start, layout.rows(chunk).stop)
        arrays = {
            p: store.group[p][chunk if per_chunk else rows]
            for p, (_, per_chunk) in layout.unit().items()
        }
        unit_digest(arrays)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--chunk", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    analyzer = ct.LRP(ct.canonize(load_world_model()), ct.composites.EpsilonPlusFlat())
    world = ConceptWorld(n=args.n, seed=1)
    images = torch.stack([world[i][0] for i in range(args.n)])  # generation is not timed
    labels = torch.tensor([world[i][1] for i in range(args.n)])
    data = torch.utils.data.TensorDataset(images, labels)

    def run_pass(path: Path) -> None:
        analyze_dataset(
            analyzer,
            data,
            LAYERS,
            path,
            dataset_description="world",
            options=StoreOptions(chunk=args.chunk),
            loader_options={"num_workers": 0},
            progress=False,
        )

    steps = {
        "pass (fresh store)": run_pass,
        "digests of every unit (read back)": digests,
        "verify": verify,
        "analyze rerun on the complete store": run_pass,
    }
    times: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s.zarr"
            for name, work in steps.items():
                times.setdefault(name, []).append(timed(work, path))
            shutil.rmtree(next((path / "layers/features.8/relevance/c").iterdir()))  # one unit lost
            times.setdefault("analyze rerun, one unit lost", []).append(timed(run_pass, path))
    base = statistics.median(times["pass (fresh store)"])
    print(f"{args.n} images, chunks of {args.chunk}, layers {LAYERS}, median of {args.repeat}")
    print("| step | seconds | / pass |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
