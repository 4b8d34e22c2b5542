"""Concept discovery speed and memory: learning a basis out of core, and the pass with a basis.

learn: a basis of K directions learned from N images x C channels x their positions (a seeded
sample of ``positions`` per image), streamed batch by batch through the real sampler
(``crp_toolkit.store.bases.position_rows``) into the real learner. The activations are
synthetic (sparse non-negative mixtures of K planted directions, generated per batch), since a
real model pass over 100,000 images does not fit 2 CPU cores in minutes; each N runs in a
fresh process, so its peak RSS is its own.

pass: the dataset pass of a 512-channel layer (the concept world's CNN at width 256, random
weights, 64x64 inputs, channels ``features.12`` at 8x8) into a fresh store, against the pass
that makes a 64-direction basis of the same layer a concept layer of it
(``analyze_basis``), alternating, medians.

    python benchmarks/bench_discover.py learn --n 100000 --method nmf
    python benchmarks/bench_discover.py all --json results/discover_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

import crp_toolkit as ct
from crp_toolkit.concepts.basis import ConceptBasis
from crp_toolkit.concepts.learning import learn_directions
from crp_toolkit.data.world import ConceptWorld, ConceptWorldCNN
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.bases import analyze_basis, identity, position_rows
from crp_toolkit.store.study import Study
from crp_toolkit.store.zarr_store import NO_TABLES

LAYER = "features.12"


def synthetic_stream(n: int, channels: int, k: int, spatial: int, batch: int, positions: int):
    """Batches of (batch, C, spatial, spatial) activations, sampled by the real sampler."""
    planted = np.abs(np.random.default_rng(0).standard_normal((k, channels)))

    def stream():
        for start in range(0, n, batch):
            size = min(batch, n - start)
            rng = np.random.default_rng([1, start])
            codes = rng.exponential(1.0, (size * spatial * spatial, k))
            codes *= rng.random(codes.shape) < 3 / k  # about 3 active directions per position
            maps = (codes @ planted).astype(np.float32)
            maps = maps.reshape(size, spatial, spatial, channels).transpose(0, 3, 1, 2)
            samples = np.arange(start, start + size)
            yield position_rows(torch.from_numpy(maps), None, samples, positions, seed=0)

    return stream


def learn(args) -> dict:
    common.reset_peak_rss()
    stream = synthetic_stream(
        args.n, args.channels, args.k, args.spatial, args.batch, args.positions
    )
    start = time.perf_counter()
    directions, rows = learn_directions(stream, args.method, args.k, 0, args.channels)
    seconds = time.perf_counter() - start
    return {
        "n": args.n,
        "method": args.method,
        "k": args.k,
        "channels": args.channels,
        "positions": f"{args.positions} of {args.spatial}x{args.spatial}",
        "rows": rows,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(common.peak_rss_bytes() / 2**20),
        "shape": list(directions.shape),
    }


def learn_in_fresh_process(n: int, method: str, args) -> dict:
    """``learn`` for N images by ``method`` in a fresh process (its own peak RSS)."""
    settings = [f"--{key}={getattr(args, key)}" for key in ("k", "channels", "spatial")]
    settings += [f"--positions={args.positions}", f"--batch={args.batch}"]
    run = subprocess.run(
        [sys.executable, __file__, "learn", "--n", str(n), "--method", method, *settings],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def timed_passes(images: int, rounds: int) -> dict:
    """Seconds of the channel pass and of the 64-direction basis pass, per round."""
    torch.manual_seed(0)
    model = ct.canonize(ConceptWorldCNN(width=256).eval())
    analyzer = ct.LRP(model, ct.composites.EpsilonPlusFlat())
    world = ConceptWorld(images, seed=1)
    x = torch.stack([world[i][0] for i in range(images)])
    data = torch.utils.data.TensorDataset(x, torch.tensor([world[i][1] for i in range(images)]))
    directions = np.abs(np.random.default_rng(0).standard_normal((64, 512)))
    times = {"channels": [], "basis": []}
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "s.zarr"
            start = time.perf_counter()
            analyze_dataset(
                analyzer,
                data,
                [LAYER],
                path,
                dataset_description="bench",
                options=NO_TABLES,
                loader_options={"batch_size": 64},
                progress=False,
            )
            times["channels"].append(time.perf_counter() - start)
            study = Study(ct.store.open(path), analyzer, data, "bench")
            basis = ConceptBasis(LAYER, "nmf", "activation", r, directions, identity(study.key))
            start = time.perf_counter()
            analyze_basis(study, basis, batch_size=64, progress=False)
            times["basis"].append(time.perf_counter() - start)
    median = {k: common.median(v) for k, v in times.items()}
    return {
        "images": images,
        "rounds": rounds,
        "seconds": times,
        "median": median,
        "basis / channels": round(median["basis"] / median["channels"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["learn", "pass", "all"])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--method", default="nmf")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--spatial", type=int, default=7)
    parser.add_argument("--positions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["nmf", "pca", "kmeans"])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.what == "learn":
        print(json.dumps(learn(args)))
        return
    out = {"machine": common.machine_info(torch.device("cpu")), "commit": common.git_revision()}
    if args.what == "all":
        out["learn"] = [
            learn_in_fresh_process(n, method, args)
            for method in args.methods
            for n in (10_000, args.n)
        ]
        for row in out["learn"]:
            print(json.dumps(row), flush=True)
    out["pass"] = timed_passes(args.images, args.rounds)
    print(json.dumps(out["pass"]), flush=True)
    if args.json:
        common.write_json(args.json, out)


if __name__ == "__main__":
    main()
