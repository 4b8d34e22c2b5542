"""Concepts on a vision transformer (issue 14): the dataset pass on torchvision ``vit_b_16``
(random weights, CP-LRP) against its LRP and a plain gradient pass, and 64 conditional heatmaps
of one image batched against one by one, in one process.

- ``gradient``: forward + ``torch.autograd.grad`` of the target logit w.r.t. the input, per
  batch; ``lrp``: the analyzer on the batch (input relevance), over ``--images`` images;
- ``pass N``: ``analyze_dataset`` into a fresh store, three token layers (the outputs of
  blocks 3, 7 and 11), for each of the ``--pass-sizes`` (loader, tables, writes and the merge
  included). Two sizes separate the store's fixed cost (creation, and the merge of the class
  tables: 1,000 classes x 768 features x 8 score kinds per layer, whatever N) from the cost
  per image, which is what a dataset-scale pass pays;
- ``crp batched @b``: ``ct.CRP`` with 64 indexed channels of block b's output (``--crp-blocks``),
  one call; ``crp one by one @b``: 64 ``CondAttribution`` calls of one condition each. The
  backward pass below the conditioned block runs once per concept either way, so the speed-up
  grows the lower the block.

Every method is warmed up once on small inputs; then methods alternate in rounds and medians
are reported.

    python benchmarks/bench_vit_concepts.py --images 16 --pass-sizes 16 48 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
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


def dataset_pass(analyzer, data: TensorDataset, batch: int, chunk: int) -> None:
    """One dataset pass into a fresh store in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        analyze_dataset(
            analyzer,
            data,
            BLOCKS,
            Path(tmp) / "vit.zarr",
            dataset_description="bench",
            options=StoreOptions(chunk=chunk),
            loader_options={"num_workers": 0, "batch_size": batch},
            progress=False,
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16, help="images of the gradient and LRP runs")
    p.add_argument("--pass-sizes", type=int, nargs=2, default=[16, 48], metavar=("N1", "N2"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--chunk", type=int, default=16, help="rows per store unit")
    p.add_argument("--crp-blocks", type=int, nargs="+", default=[3, 7])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concepts", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def methods(args: argparse.Namespace, model, analyzer) -> tuple[dict, dict]:
    """The timed methods, and the same on small inputs for the warm-up."""
    g = torch.Generator().manual_seed(0)
    n = max(args.images, *args.pass_sizes)
    x, y = torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 1000, (n,), generator=g)
    batches = list(zip(x[: args.images].split(args.batch), y[: args.images].split(args.batch)))
    timed_ = {
        "gradient": lambda: [gradient(model, xs, ys) for xs, ys in batches],
        "lrp": lambda: [analyzer(xs, ys) for xs, ys in batches],
    }
    warm = {
        "gradient": lambda: gradient(model, x[:1], y[:1]),
        "lrp": lambda: analyzer(x[:1], y[:1]),
    }
    for size in args.pass_sizes:
        data = TensorDataset(x[:size], y[:size])
        timed_[f"pass {size}"] = partial(dataset_pass, analyzer, data, args.batch, args.chunk)
    warm["pass"] = partial(dataset_pass, analyzer, TensorDataset(x[:2], y[:2]), 2, 2)
    attr = ct.CondAttribution(analyzer)
    for block in args.crp_blocks:
        layer = f"encoder.layers.encoder_layer_{block}.add#2"
        crp = ct.CRP(analyzer, layer, ct.IndexedFeatures(*range(args.concepts)))
        conditions = [{"y": int(y[0]), layer: [c]} for c in range(args.concepts)]
        timed_[f"crp batched @{block}"] = partial(crp, x[:1], y[:1])
        timed_[f"crp one by one @{block}"] = partial(
            lambda cs: [attr(x[:1], [c]) for c in cs], conditions
        )
        warm[f"crp @{block}"] = partial(attr, x[:1], conditions[:1])
    return timed_, warm


def report(args: argparse.Namespace, med: dict[str, float]) -> None:
    lrp = med["lrp"] / args.images
    n1, n2 = args.pass_sizes
    per_image = (med[f"pass {n2}"] - med[f"pass {n1}"]) / (n2 - n1)
    fixed = med[f"pass {n1}"] - n1 * per_image
    rows = [
        ["gradient (forward + input gradient)", f"{med['gradient'] / args.images:.3f}"],
        ["LRP (input relevance)", f"{lrp:.3f}"],
        *[
            [f"dataset pass, {n} images (all costs)", f"{med[f'pass {n}'] / n:.3f}"]
            for n in (n1, n2)
        ],
        [f"dataset pass, per image ({n1} to {n2} images)", f"{per_image:.3f}"],
    ]
    rows = [[name, t, f"{float(t) / lrp:.2f}"] for name, t in rows]
    print(
        f"vit_b_16 224x224, CPU, {args.threads} threads, batches of {args.batch}, store chunks "
        f"of {args.chunk}, median of {args.rounds} alternating rounds"
    )
    print(markdown_table(["method", "s / image", "/ LRP"], rows))
    print(f"\nthe pass's fixed cost (store creation, the merge): {fixed:.1f} s")
    for block in args.crp_blocks:
        batched, single = med[f"crp batched @{block}"], med[f"crp one by one @{block}"]
        print(
            f"{args.concepts} conditional heatmaps of one image, block {block}: batched "
            f"{batched:.2f} s, one by one {single:.2f} s ({single / batched:.1f}x)"
        )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero
    analyzer = ct.LRP(model, ct.composites.CPLRP())
    timed_methods, warm = methods(args, model, analyzer)
    for fn in warm.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in timed_methods}
    for _ in range(args.rounds):
        for name, fn in timed_methods.items():
            times[name].append(timed(fn))
    report(args, {name: median(t) for name, t in times.items()})
    if args.json:
        record = {
            "machine": machine_info(torch.device("cpu")),
            "args": vars(args),
            "seconds": times,
        }
        args.json.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
