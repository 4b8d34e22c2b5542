"""Dataset analysis into the store: images per second and bytes per sample on disk, without
and with the streaming reference tables (table_size=32, class_table_size=8) and with relevance
maps (the concept world and its CNN; CPU by default).

    python benchmarks/bench_store.py [--n 1200] [--chunk 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import crp_toolkit as ct
from crp_toolkit.data.training import load_world_model
from crp_toolkit.data.world import ConceptWorld
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.zarr_store import StoreOptions


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--chunk", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    analyzer = ct.LRP(ct.canonize(load_world_model()), ct.composites.EpsilonPlusFlat())
    world = ConceptWorld(n=args.n, seed=1)
    images = torch.stack([world[i][0] for i in range(args.n)])  # generation is not timed
    data = torch.utils.data.TensorDataset(
        images, torch.tensor([world[i][1] for i in range(args.n)])
    )
    layers = ["features.12", "features.8"]
    options = {
        "no tables": StoreOptions(chunk=args.chunk, table_size=0, class_table_size=0),
        "tables": StoreOptions(chunk=args.chunk),
        "tables + maps": StoreOptions(chunk=args.chunk, maps=True),
    }
    print("| store | samples | seconds | img/s | bytes/sample |\n|---|---|---|---|---|")
    for name, store_options in options.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s.zarr"
            start = time.perf_counter()
            analyze_dataset(
                analyzer,
                data,
                layers,
                path,
                dataset_description="world",
                loader_options={"num_workers": 0},
                progress=False,
                options=store_options,
            )
            seconds = time.perf_counter() - start
            print(
                f"| {name} | {args.n} | {seconds:.2f} | {args.n / seconds:.0f} | "
                f"{disk_bytes(path) / args.n:.0f} |"
            )


if __name__ == "__main__":
    main()
