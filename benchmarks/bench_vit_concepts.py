"""Concepts on a vision transformer (issue 14): the dataset pass on torchvision ``vit_b_16``
(random weights, CP-LRP) against its LRP and a plain gradient pass, and 64 conditional heatmaps
of one image batched against one by one, in one process.

- ``gradient``: forward + ``torch.autograd.grad`` of the target logit w.r.t. the input, per
  batch; ``lrp``: the analyzer on the batch (input relevance); ``pass``: ``analyze_dataset``
  into a fresh store, three token layers (the outputs of blocks 3, 7 and 11), per-image time
  from the whole run (loader, tables and writes included, one chunk per batch).
- ``crp batched``: ``ct.CRP`` with 64 indexed channels of block 7's output, one call;
  ``crp one by one``: 64 ``CondAttribution`` calls of one condition each.

Methods alternate in rounds after a warm-up; medians are reported.

    python benchmarks/bench_vit_concepts.py --images 8 --batch 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, median  # noqa: E402

import crp_toolkit as ct  # noqa: E402
from crp_toolkit.store.analysis import analyze_dataset  # noqa: E402
from crp_toolkit.store.zarr_store import StoreOptions  # noqa: E402

BLOCKS = [f"encoder.layers.encoder_layer_{i}.add#2" for i in (3, 7, 11)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gradient(model, x: torch.Tensor, y: torch.Tensor) -> None:
    x = x.clone().requires_grad_()
    out = model(x)
    torch.autograd.grad(out.gather(1, y[:, None]).sum(), x)


def dataset_pass(analyzer, data: TensorDataset, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        analyze_dataset(
            analyzer,
            data,
            BLOCKS,
            Path(tmp) / "vit.zarr",
            dataset_description="bench",
            options=StoreOptions(chunk=batch),
            loader_options={"num_workers": 0},
            progress=False,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concepts", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero
    analyzer = ct.LRP(model, ct.composites.CPLRP())
    x = torch.randn(args.images, 3, 224, 224)
    y = torch.randint(0, 1000, (args.images,))
    data = TensorDataset(x, y)
    batches = list(zip(x.split(args.batch), y.split(args.batch), strict=True))
    one, layer = x[:1], BLOCKS[1]
    conditions = [{"y": int(y[0]), layer: [c]} for c in range(args.concepts)]
    crp = ct.CRP(analyzer, layer, ct.IndexedFeatures(*range(args.concepts)))
    attr = ct.CondAttribution(analyzer)
    methods = {
        "gradient": lambda: [gradient(model, xs, ys) for xs, ys in batches],
        "lrp": lambda: [analyzer(xs, ys) for xs, ys in batches],
        "pass": lambda: dataset_pass(analyzer, data, args.batch),
        "crp batched": lambda: crp(one, y[:1]),
        "crp one by one": lambda: [attr(one, [c]) for c in conditions],
    }
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            times[name].append(timed(fn))
    med = {name: median(t) for name, t in times.items()}
    per_image = {name: med[name] / args.images for name in ("gradient", "lrp", "pass")}
    rows = [
        [name, f"{per_image[name]:.3f}", f"{per_image[name] / per_image['lrp']:.2f}"]
        for name in per_image
    ]
    print(
        f"vit_b_16 224x224, CPU, {args.threads} threads, {args.images} images in batches of "
        f"{args.batch}, median of {args.rounds} alternating rounds"
    )
    print(markdown_table(["method", "s / image", "/ LRP"], rows))
    speedup = med["crp one by one"] / med["crp batched"]
    print(
        f"\n{args.concepts} conditional heatmaps of one image: batched {med['crp batched']:.2f} s, "
        f"one by one {med['crp one by one']:.2f} s ({speedup:.1f}x)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine_info(torch.device("cpu")), "seconds": times}, indent=2)
        )


if __name__ == "__main__":
    main()
