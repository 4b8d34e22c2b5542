"""CRP speed and memory: conditional heatmaps per second, crp_toolkit vs zennit-crp 0.6.0.

Two workloads on VGG16 (random weights, 224x224) at ``features.28``, as in GUIDE s.6:
  one-image: K conditional heatmaps (one channel each) of one image;
  many-images: N images x M channels each.
zennit-crp runs its CondAttribution both as ``__call__`` (data broadcast over all conditions
in one batch) and ``generate`` (one forward, backward in batches); ours runs
``CondAttribution``. Methods alternate in rounds; medians are reported. Peak memory: GPU
``max_memory_allocated`` of one call, or on the CPU the RSS high-water mark of one call in a
fresh process.

    python benchmarks/bench_crp.py --quick
    python benchmarks/bench_crp.py --device cuda --json crp.json
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import common
import torch

import crp_toolkit as ct

LAYER = "features.28"
METHODS = ("zennit-crp call", "zennit-crp generate", "ours")


def workloads(args) -> dict[str, tuple[int, int]]:
    """name -> (images, concepts per image)."""
    return {"one-image": (1, args.concepts), "many-images": (args.images, args.per_image)}


def make_methods(model, canonized, images: int, concepts: int, args) -> dict:
    """Callables f(x, target) -> heatmaps for each method, set up outside the timed region."""
    from crp.attribution import CondAttribution
    from zennit.composites import EpsilonPlusFlat

    zennit_model = copy.deepcopy(model)
    zennit = CondAttribution(zennit_model)  # sets requires_grad_(False) on its own copy
    composite = EpsilonPlusFlat(canonizers=common.zennit_canonizers("vgg16"))
    # zennit-crp starts from the logit of the explained class: the same here
    analyzer = ct.LRP(canonized, ct.composites.EpsilonPlusFlat(), normalize_output_relevance=False)
    ours = ct.CondAttribution(analyzer, memory_budget=args.memory_budget)

    def conditions(target):
        return [{"y": int(target[0]), LAYER: [c]} for c in range(concepts)]

    def zennit_call(x, target):
        data = x.clone().requires_grad_()
        return zennit(data, conditions(target), composite, exclude_parallel=False).heatmap

    def zennit_generate(x, target):
        out = []
        for i in range(len(x)):  # generate explains one data point at a time
            data = x[i : i + 1].clone().requires_grad_()
            batches = zennit.generate(
                data,
                conditions(target[i : i + 1]),
                composite,
                batch_size=args.zennit_batch,
                exclude_parallel=False,
                verbose=False,
            )
            out.extend(r.heatmap for r in batches)  # a generator, one result per batch
        return torch.cat(out)

    def ours_call(x, target):
        return ours(x, conditions(target)).heatmaps

    return {
        "zennit-crp call": zennit_call,
        "zennit-crp generate": zennit_generate,
        "ours": ours_call,
    }


def setup(args, device):
    model = common.build_model("vgg16", args.seed).to(device)
    common.freeze(model)
    canonized = ct.canonize(model)
    return model, canonized


def inputs(images: int, args, device):
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(images, 3, args.size, args.size, generator=gen).to(device)
    return x, torch.zeros(images, dtype=torch.long, device=device)


def run_workload(name, images, concepts, model, canonized, args, device) -> dict:
    x, target = inputs(images, args, device)
    methods = make_methods(model, canonized, images, concepts, args)
    heat, errors = {}, {}
    for k, f in methods.items():  # warm-up, and the agreement check
        try:
            heat[k] = f(x, target).float()
        except Exception as err:  # e.g. zennit-crp's broadcast running out of GPU memory
            errors[k] = f"{type(err).__name__}: {err}"[:300]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    methods = {k: f for k, f in methods.items() if k not in errors}
    ref = heat.get("zennit-crp call", heat.get("zennit-crp generate"))
    agreement = {k: float((h - ref).abs().max() / ref.abs().max()) for k, h in heat.items()}
    del heat, ref
    times = {k: [] for k in methods}
    for _ in range(args.rounds):
        for k, f in methods.items():
            common.sync(device)
            t = time.perf_counter()
            f(x, target)
            common.sync(device)
            times[k].append(time.perf_counter() - t)
    n = images * concepts
    result = {"images": images, "concepts": concepts, "heatmaps": n, "agreement": agreement}
    result.update({k: {"error": e} for k, e in errors.items()})
    for k, ts in times.items():
        med = common.median(ts)
        result[k] = {"seconds": med, "heatmaps_per_s": n / med, "runs": ts}
        if device.type == "cuda":
            result[k]["peak_bytes"] = common.cuda_peak_bytes(
                lambda f=methods[k]: f(x, target), device
            )
        elif not args.no_peak:
            result[k]["peak_bytes"] = peak_subprocess(k, name, args)
    return result


def peak_subprocess(method: str, workload: str, args) -> int | None:
    cmd = [sys.executable, __file__, "--peak-of", method, "--peak-workload", workload]
    cmd += [
        "--size",
        str(args.size),
        "--images",
        str(args.images),
        "--per-image",
        str(args.per_image),
    ]
    cmd += ["--concepts", str(args.concepts), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def peak_of(args, device) -> None:
    model, canonized = setup(args, device)
    images, concepts = workloads(args)[args.peak_workload]
    x, target = inputs(images, args, device)
    fn = make_methods(model, canonized, images, concepts, args)[args.peak_of]
    common.reset_peak_rss()
    before = common.current_rss_bytes()
    fn(x, target)
    print(json.dumps({"peak_bytes": common.peak_rss_bytes() - before}))


def report(data: dict) -> str:
    rows = []
    for name, r in data["results"].items():
        if "error" in r:
            rows.append([name, r["error"], "", "", "", "", ""])
            continue
        speeds = [r[k]["heatmaps_per_s"] for k in METHODS if k != "ours" and "error" not in r[k]]
        for k in METHODS:
            if "error" in r[k]:
                rows.append([f"{name} ({r['images']}x{r['concepts']})", k, r[k]["error"][:60]])
                rows[-1] += [""] * 4
                continue
            peak = r[k].get("peak_bytes")
            ratio = (
                r["ours"]["heatmaps_per_s"] / max(speeds)
                if speeds and "seconds" in r["ours"]
                else 0
            )
            rows.append(
                [
                    f"{name} ({r['images']}x{r['concepts']})",
                    k,
                    f"{r[k]['seconds']:.3f}",
                    f"{r[k]['heatmaps_per_s']:.1f}",
                    "" if peak is None else f"{peak / 2**20:.0f}",
                    f"{ratio:.2f}x" if k == "ours" else "",
                    f"{r['agreement'].get(k, float('nan')):.1e}",
                ]
            )
    header = [
        "workload",
        "method",
        "s",
        "heatmaps/s",
        "peak MiB",
        "ours / best zennit-crp",
        "max rel diff to zennit-crp call",
    ]
    return json.dumps(data["machine"]) + "\n\n" + common.markdown_table(header, rows)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--concepts", type=int, default=64, help="heatmaps of the one image")
    p.add_argument("--images", type=int, default=None, help="many-images: images (32 gpu, 6 cpu)")
    p.add_argument("--per-image", type=int, default=8, help="many-images: concepts per image")
    p.add_argument("--zennit-batch", type=int, default=16, help="zennit-crp generate batch size")
    p.add_argument("--memory-budget", type=int, default=2**30, help="ours: bytes per chunk")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="size 64, 8 concepts, 2 images, 1 round")
    p.add_argument("--no-peak", action="store_true")
    p.add_argument("--peak-of", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--peak-workload", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.images is None:
        args.images = 32 if device.type == "cuda" else 6
    if args.images == args.per_image:  # zennit-crp would pair images with conditions
        p.error("--images must differ from --per-image (equal counts make zennit-crp pair them)")
    if args.quick:
        args.size, args.concepts, args.images, args.per_image, args.rounds = 64, 8, 2, 4, 1
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True  # the same for every method
    if args.peak_of:
        return peak_of(args, device)
    data = {"machine": common.machine_info(device), "args": vars(args), "results": {}}
    model, canonized = setup(args, device)
    for name, (images, concepts) in workloads(args).items():
        try:
            data["results"][name] = run_workload(
                name, images, concepts, model, canonized, args, device
            )
        except Exception as err:  # record and go on: the GPU run must leave its JSON
            data["results"][name] = {"error": f"{type(err).__name__}: {err}"}
        if args.json:
            common.write_json(args.json, data)
    print(report(data))


if __name__ == "__main__":
    main()
