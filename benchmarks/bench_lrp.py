"""LRP speed and memory: plain input gradient vs zennit 0.4.6 vs crp_toolkit, in one process.

For every model (torchvision, random weights, eval mode) and composite it times

* ``gradient``: forward + ``torch.autograd.grad`` of the target logit w.r.t. the input;
* ``zennit``: the same gradient call inside zennit's composite (hooks and canonizer registered
  once, outside the timed region, on the model's own copy);
* ``ours``: ``ct.LRP(ct.canonize(model), composite)(x, target)`` with canonization and the
  analyzer built once, outside the timed region.

The methods alternate in rounds (gradient, zennit, ours, gradient, ...) after a warm-up and the
median per method is reported. Peak memory is one call per method: on CUDA the extra
``max_memory_allocated``, on CPU the RSS high-water mark of a fresh subprocess (this script with
the hidden ``--peak-of`` flag) above its RSS before the call. Once per configuration (untimed)
ours and zennit are compared: as benchmarked (float32), and on a float64 copy whose BatchNorm
``eps`` is 0, where zennit's canonized model is exact (it leaves BatchNorm computing
``x / sqrt(1 + eps)``) and rounding is not amplified by near-zero Gamma denominators.

Examples::

    python benchmarks/bench_lrp.py --quick                       # smoke test, ~1 min on CPU
    python benchmarks/bench_lrp.py --models vgg16 --rounds 3     # CPU, 2 threads, batch 4
    python benchmarks/bench_lrp.py --device cuda --json results/bench_lrp_h100.json

Nothing is downloaded. Results are written to ``--json`` after every configuration, and a
configuration that fails is recorded with its error while the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

METHODS = ("gradient", "zennit", "ours")
COMPOSITES = ("EpsilonPlusFlat", "EpsilonGammaBox")
BOX = (-3.0, 3.0)
N_CLASSES = 1000
MB = 2**20


# -- the three methods -------------------------------------------------------------------------
def one_hot(target: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, n).to(dtype)


def input_gradient(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out, x, one_hot(target, out.shape[1], out.dtype))
    return grad


def ours_composite(name: str):
    import crp_toolkit as ct

    if name == "EpsilonPlusFlat":
        return ct.composites.EpsilonPlusFlat()
    if name == "EpsilonGammaBox":
        return ct.composites.EpsilonGammaBox(*BOX)
    raise ValueError(f"unknown composite {name!r}; choose from {COMPOSITES}")


def zennit_composite(name: str, model_name: str):
    from zennit import composites as zc

    canonizers = common.zennit_canonizers(model_name)
    if name == "EpsilonPlusFlat":
        return zc.EpsilonPlusFlat(canonizers=canonizers)
    if name == "EpsilonGammaBox":
        return zc.EpsilonGammaBox(low=BOX[0], high=BOX[1], canonizers=canonizers)
    raise ValueError(f"unknown composite {name!r}; choose from {COMPOSITES}")


class Method:
    """A prepared method: ``fn(x, target) -> relevance``, plus ``close()`` to undo hooks."""

    def __init__(self, fn: Callable, close: Callable[[], None] = lambda: None):
        self.fn, self.close = fn, close


def make_gradient(model: torch.nn.Module) -> Method:
    return Method(lambda x, t: input_gradient(model, x, t))


def make_zennit(model: torch.nn.Module, model_name: str, composite: str) -> Method:
    """zennit on its own frozen copy of the model: canonizer and hooks registered once."""
    zmodel = common.freeze(copy.deepcopy(model))
    comp = zennit_composite(composite, model_name)
    comp.register(zmodel)
    return Method(lambda x, t: input_gradient(zmodel, x, t), comp.remove)


def make_ours(canonized: torch.nn.Module, composite: str) -> Method:
    import crp_toolkit as ct

    analyzer = ct.LRP(canonized, ours_composite(composite))
    return Method(lambda x, t: analyzer(x, t).relevance)


def make_method(method: str, model, canonized, model_name: str, composite: str) -> Method:
    if method == "gradient":
        return make_gradient(model)
    if method == "zennit":
        return make_zennit(model, model_name, composite)
    if method == "ours":
        return make_ours(canonized, composite)
    raise ValueError(f"unknown method {method!r}")


def inputs(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    target = torch.randint(0, N_CLASSES, (args.batch,), generator=gen)
    return x.to(device), target.to(device)


# -- measurements -----------------------------------------------------------------------------
def time_rounds(methods: dict[str, Method], x, target, args, device) -> dict[str, list[float]]:
    for _ in range(args.warmup):
        for m in methods.values():
            m.fn(x, target)
            common.sync(device)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, m in methods.items():
            common.sync(device)
            t0 = time.perf_counter()
            result = m.fn(x, target)
            common.sync(device)
            times[name].append(time.perf_counter() - t0)
            del result
    return times


@contextlib.contextmanager
def no_tf32():
    """Exact float32 on CUDA for the agreement check (cuDNN convolutions default to TF32)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| over the whole batch."""
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = ref.abs().max().item()
    return (ours - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def agreement(methods, model, model_name, composite, x, target) -> dict:
    """Compare ours with zennit (untimed).

    ``max_rel_diff``: the benchmarked methods on the whole batch in float32 (TF32 off). It mixes
    two effects: zennit's canonized BatchNorm still computes ``x / sqrt(1 + eps)``, and the
    Gamma rule on random weights divides by near-zero denominators, which amplifies rounding.
    ``max_rel_diff_exact``: a float64 copy with BatchNorm eps ~ 0 (the smallest double; newer
    torch refuses 0) on the first two samples,
    where both implementations compute the same function; this one should be ~1e-10 or less.
    """
    import crp_toolkit as ct

    out: dict[str, object] = {}
    with no_tf32():
        ref = methods["zennit"].fn(x, target)
        mine = methods["ours"].fn(x, target)
        out["max_rel_diff"] = max_rel_diff(mine, ref)
        out["zennit_max_abs"] = ref.abs().max().item()  # huge values flag ill-conditioning
        out["finite"] = bool(torch.isfinite(mine).all() and torch.isfinite(ref).all())
        del ref, mine
    exact = copy.deepcopy(model).double()
    common.set_batchnorm_eps(exact, torch.finfo(torch.float64).tiny)  # newer torch refuses 0
    x64, t64 = x[:2].double(), target[:2]
    zen = make_zennit(exact, model_name, composite)
    try:
        ref = zen.fn(x64, t64)
    finally:
        zen.close()
    mine = make_ours(ct.canonize(exact), composite).fn(x64, t64)
    out["max_rel_diff_exact"] = max_rel_diff(mine, ref)
    del ref, mine, exact, zen
    gc.collect()
    return out


def peak_subprocess(method: str, model_name: str, composite: str, args) -> dict:
    """Run ``--peak-of`` in a fresh interpreter and parse its one JSON line."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--peak-of",
        method,
        "--models",
        model_name,
        "--composites",
        composite,
        "--device",
        "cpu",
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    # Make freed tensors leave the RSS at once, so the probe sees live memory only.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.peak_timeout, env=env, check=False
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"--peak-of {method} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


def peak_of(args) -> None:
    """Hidden mode: build one method, run one call, print its extra peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    import crp_toolkit as ct

    model_name, composite = args.models[0], args.composites[0]
    model = common.freeze(common.build_model(model_name, args.seed))
    canonized = None
    if args.peak_of == "ours":
        canonized = ct.canonize(model)
        del model
        model = None
    method = make_method(args.peak_of, model, canonized, model_name, composite)
    if args.peak_of == "zennit":
        del model  # zennit runs on its own copy
    x, target = inputs(args, device)
    gc.collect()
    reset = common.reset_peak_rss()
    before = common.current_rss_bytes()
    result = method.fn(x, target)
    peak = common.peak_rss_bytes()
    del result
    method.close()
    print(json.dumps({"method": args.peak_of, "peak_bytes": peak - before, "hwm_reset": reset}))


def peak_memory(methods, model_name, composite, x, target, args, device, cache) -> dict:
    peaks: dict[str, dict] = {}
    for name, m in methods.items():
        key = (model_name, name if name == "gradient" else f"{name}/{composite}")
        if key in cache:
            peaks[name] = cache[key]
            continue
        try:
            if device.type == "cuda":
                peaks[name] = {
                    "peak_bytes": common.cuda_peak_bytes(lambda m=m: m.fn(x, target), device)
                }
            else:
                peaks[name] = peak_subprocess(name, model_name, composite, args)
        except Exception as err:  # noqa: BLE001 - recorded, the timings still stand
            peaks[name] = {"error": f"{type(err).__name__}: {err}"}
        cache[key] = peaks[name]
    return peaks


# -- one configuration --------------------------------------------------------------------------
def run_config(model_name, composite, model, canonized, args, device, peak_cache) -> dict:
    record: dict[str, object] = {"model": model_name, "composite": composite}
    methods: dict[str, Method] = {}
    try:
        for name in METHODS:
            methods[name] = make_method(name, model, canonized, model_name, composite)
        x, target = inputs(args, device)
        times = time_rounds(methods, x, target, args, device)
        results = {}
        for name, ts in times.items():
            med = common.median(ts)
            results[name] = {"times_s": ts, "median_s": med, "images_per_s": args.batch / med}
        record["methods"] = results
        med = {name: r["median_s"] for name, r in results.items()}
        record["ratios"] = {
            "ours/gradient": med["ours"] / med["gradient"],
            "zennit/gradient": med["zennit"] / med["gradient"],
            "zennit/ours": med["zennit"] / med["ours"],
        }
        if not args.no_peak:
            peaks = peak_memory(methods, model_name, composite, x, target, args, device, peak_cache)
            for name, p in peaks.items():
                results[name]["peak"] = p
        if not args.no_check:
            try:
                record["agreement"] = agreement(methods, model, model_name, composite, x, target)
            except Exception as err:  # noqa: BLE001 - keep the timings
                record["agreement"] = {"error": f"{type(err).__name__}: {err}"}
        record["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - record and go on with the next configuration
        record["status"] = "error"
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
        print(f"!! {model_name}/{composite} failed: {record['error']}", file=sys.stderr)
    finally:
        for m in methods.values():
            with contextlib.suppress(Exception):
                m.close()
        methods.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


# -- report -------------------------------------------------------------------------------------
def fmt_bytes(peak: dict | None) -> str:
    if not peak:
        return "-"
    if "error" in peak:
        return "error"
    return f"{peak['peak_bytes'] / MB:.0f}"


def report(data: dict) -> str:
    m, a = data["machine"], data["args"]
    where = m.get("gpu") or f"{m['cpu']} ({a['threads']} threads of {m['cpu_count']})"
    lines = [
        f"## LRP benchmark: {where}",
        "",
        f"device {m['device']}, batch {a['batch']}, {a['size']}x{a['size']}, "
        f"median of {a['rounds']} alternating rounds after {a['warmup']} warm-up; "
        f"torch {m['torch']}, zennit {m['zennit']}, crp_toolkit git {m['git']}, {m['date']}",
        "",
    ]
    mem = "peak MiB (GPU alloc)" if m["device"].startswith("cuda") else "peak MiB (RSS)"
    rows, ratio_rows = [], []
    for r in data["results"]:
        if r.get("status") != "ok":
            rows.append([r["model"], r["composite"], "ERROR", r.get("error", "?")[:60], "", "", ""])
            continue
        base = r["methods"]["gradient"]["median_s"]
        for name in METHODS:
            res = r["methods"][name]
            rows.append(
                [
                    r["model"],
                    r["composite"],
                    name,
                    f"{res['median_s']:.4f}",
                    f"{res['images_per_s']:.1f}",
                    f"{res['median_s'] / base:.2f}x",
                    fmt_bytes(res.get("peak")),
                ]
            )
        ag = r.get("agreement", {})
        ratio_rows.append(
            [
                r["model"],
                r["composite"],
                f"{r['ratios']['ours/gradient']:.2f}",
                f"{r['ratios']['zennit/gradient']:.2f}",
                f"{r['ratios']['zennit/ours']:.2f}",
                f"{ag['max_rel_diff']:.1e}" if "max_rel_diff" in ag else "-",
                f"{ag['max_rel_diff_exact']:.1e}" if "max_rel_diff_exact" in ag else "-",
            ]
        )
    header = ["model", "composite", "method", "median s", "img/s", "x gradient", mem]
    lines.append(common.markdown_table(header, rows))
    if ratio_rows:
        lines += [
            "",
            common.markdown_table(
                [
                    "model",
                    "composite",
                    "ours/gradient",
                    "zennit/gradient",
                    "zennit/ours",
                    "ours vs zennit: max rel diff",
                    "same, float64 + BN eps 0",
                ],
                ratio_rows,
            ),
        ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available"
    )
    p.add_argument("--batch", type=int, default=None, help="default: 4 on cpu, 32 on cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on cpu)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up calls per method (1 cpu, 3 cuda)"
    )
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    p.add_argument("--composites", nargs="+", default=list(COMPOSITES), choices=COMPOSITES)
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", default=None, help="write all results as JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: size 64, 1 round, batch 2")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-check", action="store_true", help="skip the ours-vs-zennit check")
    p.add_argument("--peak-timeout", type=float, default=600, help="seconds per CPU peak probe")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; configurations not started by then are recorded as skipped",
    )
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark")
    p.add_argument("--peak-of", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.size, args.rounds = 64, 1
        args.batch = args.batch or 2
        args.warmup = 1 if args.warmup is None else args.warmup
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    cuda = args.device == "cuda"
    args.batch = args.batch or (32 if cuda else 4)
    args.threads = args.threads or (None if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peak_of:
        peak_of(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    import crp_toolkit as ct

    start = time.perf_counter()
    data = {"machine": common.machine_info(device), "args": vars(args), "results": []}
    peak_cache: dict = {}

    def save() -> None:
        data["elapsed_s"] = time.perf_counter() - start
        if args.json:
            common.write_json(args.json, data)

    for model_name in args.models:
        over = args.time_budget is not None and time.perf_counter() - start > args.time_budget
        model = canonized = None
        try:
            if over:
                raise TimeoutError(f"time budget of {args.time_budget}s spent")
            t0 = time.perf_counter()
            model = common.freeze(common.build_model(model_name, args.seed)).to(device)
            canonized = ct.canonize(model)
            setup = {
                "model_setup_s": time.perf_counter() - t0,
                "model_mib": common.n_bytes(model) / MB,
            }
        except Exception as err:  # noqa: BLE001
            for composite in args.composites:
                data["results"].append(
                    {
                        "model": model_name,
                        "composite": composite,
                        "status": "skipped" if over else "error",
                        "error": f"{type(err).__name__}: {err}",
                        "traceback": traceback.format_exc(),
                    }
                )
            print(f"!! {model_name}: {type(err).__name__}: {err}", file=sys.stderr)
            save()
            continue
        for composite in args.composites:
            if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                data["results"].append(
                    {
                        "model": model_name,
                        "composite": composite,
                        "status": "skipped",
                        "error": f"time budget of {args.time_budget}s spent",
                    }
                )
                save()
                continue
            t0 = time.perf_counter()
            record = run_config(model_name, composite, model, canonized, args, device, peak_cache)
            record.update(setup, config_s=time.perf_counter() - t0)
            data["results"].append(record)
            save()
            print(
                f"# {model_name}/{composite}: {record['status']} in {record['config_s']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
        del model, canonized
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    print(report(data))
    if args.json:
        print(f"\nJSON written to {args.json}")
    return 0 if all(r.get("status") == "ok" for r in data["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
