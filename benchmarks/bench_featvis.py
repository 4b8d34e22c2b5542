"""Dataset analysis against zennit-crp's FeatureVisualization.run: VGG16 (random, seeded
weights), 224x224, three conv layers, EpsilonPlusFlat, 10 and 1000 classes. Ours is
``analyze_dataset`` with its streaming reference tables (all 8 score kinds, per concept and per
class); zennit-crp's run keeps RelMax/ActMax tables and per-class statistics of one score kind.
A plain input-gradient pass over the same batches is the floor. Methods alternate within each
round; times are medians. Then our options (plain, maps, top_heatmaps) once each: peak memory
and bytes per sample on disk.

    python benchmarks/bench_featvis.py [--n 32] [--batch 16] [--chunk 0] [--workers 0]
        [--rounds 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from common import (
    REPO,
    cuda_peak_bytes,
    machine_info,
    markdown_table,
    median,
    peak_rss_bytes,
    reset_peak_rss,
    sync,
    write_json,
)
from torch.utils.data import TensorDataset

import crp_toolkit as ct
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.zarr_store import StoreOptions

LAYERS = ["features.20", "features.27", "features.29"]
OPTIONS = {"plain": {}, "maps": {"maps": True}, "top_heatmaps=3": {"top_heatmaps": 3}}


def vgg16(classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.vgg16(weights=None, num_classes=classes).eval()


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gradient_pass(model, data: TensorDataset, batch: int, device) -> Callable[[Path], None]:
    """The floor: one forward and one input-gradient backward per batch."""

    def run(_: Path) -> None:
        x_all, y_all = data.tensors
        for start in range(0, len(x_all), batch):
            x = x_all[start : start + batch].to(device).requires_grad_(True)
            y = y_all[start : start + batch].to(device)
            out = model(x)
            (grad,) = torch.autograd.grad(out.gather(1, y[:, None]).sum(), x)
            del grad
        sync(device)

    return run


def ours(model, data, args, device, **options) -> Callable[[Path], None]:
    """``analyze_dataset`` in chunks of ``args.chunk`` (default: the batch) explained
    ``args.batch`` at a time, read by ``args.workers`` loader processes; ``options``: more
    store options."""
    analyzer = ct.LRP(ct.canonize(model), ct.composites.EpsilonPlusFlat())
    loader = {"num_workers": args.workers, "batch_size": args.batch, "pin_memory": True}

    def run(tmp: Path) -> None:
        analyze_dataset(
            analyzer,
            data,
            LAYERS,
            tmp / "store.zarr",
            dataset_description="bench",
            device=str(device),
            loader_options=loader,
            progress=False,
            options=StoreOptions(chunk=args.chunk or args.batch, **options),
        )
        sync(device)

    return run


def zennit_crp(model, data, batch: int, device) -> Callable[[Path], None]:
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from crp.visualization import FeatureVisualization
    from zennit.composites import EpsilonPlusFlat

    attribution = CondAttribution(copy.deepcopy(model).to(device), device=device)
    layer_map = {name: ChannelConcept() for name in LAYERS}

    def run(tmp: Path) -> None:
        fv = FeatureVisualization(attribution, data, layer_map, path=str(tmp / "fv"))
        with contextlib.redirect_stdout(io.StringIO()):
            fv.run(EpsilonPlusFlat(), 0, len(data), batch_size=batch, checkpoint=len(data))
        sync(device)

    return run


def timed(fn: Callable[[Path], None]) -> tuple[float, int]:
    """Seconds of one call in a fresh folder, and bytes left on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fn(Path(tmp))
        seconds = time.perf_counter() - start
        return seconds, disk_bytes(Path(tmp))


def peak_memory(fn: Callable[[Path], None], device) -> int | None:
    """Peak memory of one call: GPU bytes allocated above the start, or the RSS high-water
    mark of the process on the CPU (None where it cannot be reset)."""
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            return cuda_peak_bytes(lambda: fn(Path(tmp)), device)
        if not reset_peak_rss():
            return None
        fn(Path(tmp))
        return peak_rss_bytes()


def bench(classes: int, args, device) -> dict:
    model = vgg16(classes).to(device)
    gen = torch.Generator().manual_seed(classes)
    x = torch.rand(args.n, 3, 224, 224, generator=gen)
    y = torch.randint(0, classes, (args.n,), generator=gen)
    data = TensorDataset(x, y)
    methods = {
        "gradient": gradient_pass(model, data, args.batch, device),
        "ours": ours(model, data, args, device),
        "zennit-crp": zennit_crp(model, data, args.batch, device),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    disk: dict[str, int] = {}
    for name, fn in methods.items():  # warm-up (not timed)
        disk[name] = timed(fn)[1]
    for _ in range(args.rounds):
        for name, fn in methods.items():
            times[name].append(timed(fn)[0])
    result = {
        "classes": classes,
        "seconds": times,
        "img_per_s": {name: args.n / median(t) for name, t in times.items()},
        "disk_bytes_per_sample": {name: disk[name] / args.n for name in disk},
        "peak_bytes": {name: peak_memory(methods[name], device) for name in methods},
        "options": {},
    }
    for option, extra in OPTIONS.items():
        fn = ours(model, data, args, device, **extra)
        seconds, size = timed(fn)
        result["options"][option] = {
            "img_per_s": args.n / seconds,
            "disk_bytes_per_sample": size / args.n,
            "peak_bytes": peak_memory(fn, device),
        }
    return result


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        speed, peak = r["img_per_s"], r["peak_bytes"]
        rows.append(
            [
                r["classes"],
                f"{speed['gradient']:.2f}",
                f"{speed['zennit-crp']:.2f}",
                f"{speed['ours']:.2f}",
                f"{speed['ours'] / speed['zennit-crp']:.2f}x",
                f"{speed['gradient'] / speed['ours']:.2f}",
                f"{mib(peak['gradient'])} / {mib(peak['zennit-crp'])} / {mib(peak['ours'])}",
                f"{r['disk_bytes_per_sample']['zennit-crp']:,.0f} / "
                f"{r['disk_bytes_per_sample']['ours']:,.0f}",
            ]
        )
    header = [
        "classes",
        "gradient img/s",
        "zennit-crp img/s",
        "ours img/s",
        "ours / zennit-crp",
        "ours time / gradient",
        "peak MiB grad / zennit-crp / ours",
        "bytes/sample zennit-crp / ours",
    ]
    options = [
        [
            r["classes"],
            name,
            f"{o['img_per_s']:.2f}",
            mib(o["peak_bytes"]),
            f"{o['disk_bytes_per_sample']:,.0f}",
        ]
        for r in results
        for name, o in r["options"].items()
    ]
    option_header = ["classes", "ours, option", "img/s (1 run)", "peak MiB", "bytes/sample"]
    return markdown_table(header, rows) + "\n\n" + markdown_table(option_header, options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=0, help="rows per store chunk (0: the batch)")
    p.add_argument("--workers", type=int, default=0, help="loader processes of ours")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    results = [bench(classes, args, device) for classes in args.classes]
    kind = "cpu" if device.type == "cpu" else "gpu"
    out = args.json or REPO / "benchmarks" / "results" / f"featvis_{kind}.json"
    write_json(out, {"machine": machine_info(device), "args": vars(args), "results": results})
    print(report(results))


if __name__ == "__main__":
    main()
