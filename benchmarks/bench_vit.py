"""ViT speed and memory: plain input gradient vs LXT 2.1's efficient CP-LRP vs crp_toolkit, in
one process, on torchvision ``vit_b_16`` with random weights.

Methods:

* ``gradient``: forward + ``torch.autograd.grad`` of the target logit w.r.t. the input;
* ``lxt``: LXT's efficient patch of torchvision's ``vision_transformer`` classes (CP-LRP inside
  ``nn.MultiheadAttention``, identity GELU, LayerNorm with the std constant), input times
  gradient. LXT patches the classes for the whole process; here the patch is applied just
  before each LXT call and undone right after (a few ``setattr``), so all methods alternate in
  one process and the other methods run the unpatched classes;
* ``ours``: ``ct.LRP(model, ct.composites.CPLRP())`` (the same rules as LXT's with epsilon on
  the dense layers, in the relevance domain), ``ours_keep`` (the same with
  ``recompute=False``: the forward pass keeps every value a rule reads), ``ours_lrp0``
  (``CPLRP(epsilon=0)``: LXT's rules exactly, LRP-0 on dense layers, which runs in the
  gradient domain) and ``ours_attnlrp`` (``AttnLRP()``), analyzers built once, untimed.

Rounds alternate (gradient, lxt, ours, ours_attnlrp, gradient, ...) after a warm-up; medians are
reported. Peak memory: on CUDA the extra ``max_memory_allocated`` of one call; on the CPU the
RSS high-water mark of one call in a fresh subprocess (this script with ``--peak-of``) above
its RSS before the call, and, in the same subprocess, the peak of PyTorch's allocator
(profiler memory events) above what was allocated before the call. Untimed, ours is compared
with LXT on the benchmark's batch: CPLRP with a vanishing epsilon (relevance domain) and
``ours_lrp0`` (gradient domain).

Example: ``python benchmarks/bench_vit.py --rounds 5 --json results/bench_vit_cpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

METHODS = ("gradient", "lxt", "ours", "ours_keep", "ours_lrp0", "ours_attnlrp")
MB = 2**20
Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build(seed: int, size: int, device: torch.device) -> torch.nn.Module:
    """Random-weight vit_b_16 for ``size`` x ``size`` inputs, frozen, with a non-zero head
    (torchvision initialises it to 0)."""
    torch.manual_seed(seed)
    model = torchvision.models.vit_b_16(image_size=size)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return common.freeze(model).eval().to(device)


def input_times_gradient(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, times: bool
):
    x = x.detach().requires_grad_(True)
    out = model(x)
    grad_out = torch.nn.functional.one_hot(target, out.shape[1]).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    return x.detach() * grad if times else grad


@contextlib.contextmanager
def lxt_patched() -> Iterator[None]:
    """LXT's efficient CP-LRP patch of torchvision's ViT classes, undone on exit."""
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.vit_torch import cp_LRP

    saved = {cls: cls.forward for cls in cp_LRP}
    monkey_patch(torchvision.models.vision_transformer, cp_LRP)
    try:
        yield
    finally:
        for cls, forward in saved.items():
            cls.forward = forward
            if "original_forward" in vars(cls):
                delattr(cls, "original_forward")


def make_method(name: str, model: torch.nn.Module, epsilon: float = 1e-6) -> Fn:
    import crp_toolkit as ct

    if name == "gradient":
        return lambda x, t: input_times_gradient(model, x, t, times=False)
    if name == "lxt":

        def lxt(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with lxt_patched():
                return input_times_gradient(model, x, t, times=True)

        return lxt
    composite = ct.composites.AttnLRP if name == "ours_attnlrp" else ct.composites.CPLRP
    analyzer = ct.LRP(
        model,
        composite(epsilon=0.0 if name == "ours_lrp0" else epsilon),
        normalize_output_relevance=False,
        recompute=name != "ours_keep",
    )
    return lambda x, t: analyzer(x, t).relevance


def inputs(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    return x.to(device), torch.randint(0, 1000, (args.batch,), generator=gen).to(device)


def time_rounds(methods: dict[str, Fn], x, target, args, device) -> dict[str, list[float]]:
    for _ in range(args.warmup):
        for fn in methods.values():
            fn(x, target)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            common.sync(device)
            t0 = time.perf_counter()
            result = fn(x, target)
            common.sync(device)
            times[name].append(time.perf_counter() - t0)
            del result
    return times


def peak_of(args) -> None:
    """Hidden mode: build one method, run one call, print its extra peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    fn = make_method(args.peak_of, build(args.seed, args.size, device))
    x, target = inputs(args, device)
    fn(x[:1], target[:1])  # one small call first: imports, lazy initialisation, sizes
    gc.collect()
    reset = common.reset_peak_rss()
    before = common.current_rss_bytes()
    result = fn(x, target)
    peak = common.peak_rss_bytes()
    del result
    allocated = common.cpu_allocator_peak_bytes(lambda: fn(x, target))
    record = {"method": args.peak_of, "peak_bytes": peak - before, "hwm_reset": reset}
    print(json.dumps({**record, "allocator_peak_bytes": allocated}))


def peak_memory(name: str, fn: Fn, x, target, args, device) -> dict:
    if device.type == "cuda":
        return {"peak_bytes": common.cuda_peak_bytes(lambda: fn(x, target), device)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-of", name]
    cmd += ["--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the RSS
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"rc {proc.returncode}: {proc.stderr[-500:]}"}


def agreement(model: torch.nn.Module, x, target) -> dict[str, float]:
    """max |ours - LXT| / max |LXT|, ours = CPLRP with a vanishing epsilon (LRP-0 as LXT, in
    the relevance domain) and ``ours_lrp0`` (epsilon 0, in the gradient domain)."""
    theirs = make_method("lxt", model)(x, target)
    ours = {
        "relevance": make_method("ours", model, epsilon=1e-30)(x, target),
        "gradient": make_method("ours_lrp0", model)(x, target),
    }
    return {k: float((v - theirs).abs().max() / theirs.abs().max()) for k, v in ours.items()}


def report(data: dict) -> str:
    m, a = data["machine"], data["args"]
    where = m.get("gpu") or f"{m['cpu']} ({a['threads']} threads of {m['cpu_count']})"
    lines = [
        f"## ViT benchmark: vit_b_16 on {where}",
        "",
        f"batch {a['batch']}, {a['size']}x{a['size']}, median of {a['rounds']} alternating "
        f"rounds after {a['warmup']} warm-up; torch {m['torch']}, crp_toolkit git {m['git']}, "
        f"{m['date']}; ours vs LXT (float32, LRP-0), max rel diff: relevance domain "
        f"{data['agreement']['relevance']:.1e}, gradient domain "
        f"{data['agreement']['gradient']:.1e}",
        "",
    ]
    base = data["methods"]["gradient"]["median_s"]
    rows = []
    for name, res in data["methods"].items():
        peak = res.get("peak", {})
        mib = f"{peak['peak_bytes'] / MB:.0f}" if "peak_bytes" in peak else "-"
        alloc = peak.get("allocator_peak_bytes")
        alloc_mib = "-" if alloc is None else f"{alloc / MB:.0f}"
        ratio = f"{res['median_s'] / base:.2f}x"
        row = [name, f"{res['median_s']:.3f}", f"{res['images_per_s']:.2f}", ratio, mib]
        rows.append([*row, alloc_mib])
    header = ["method", "median s", "img/s", "x gradient", "peak MiB", "allocator peak MiB"]
    lines.append(common.markdown_table(header, rows))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--json", metavar="OUT", default=None)
    p.add_argument("--peak-of", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_of:
        peak_of(args)
        return 0
    device = torch.device(args.device)
    model = build(args.seed, args.size, device)
    x, target = inputs(args, device)
    methods = {name: make_method(name, model) for name in METHODS}
    times = time_rounds(methods, x, target, args, device)
    results = {}
    for name, ts in times.items():
        med = common.median(ts)
        results[name] = {"times_s": ts, "median_s": med, "images_per_s": args.batch / med}
        if not args.no_peak:
            results[name]["peak"] = peak_memory(name, methods[name], x, target, args, device)
    data = {
        "machine": common.machine_info(device),
        "args": vars(args),
        "methods": results,
        "agreement": agreement(model, x, target),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
