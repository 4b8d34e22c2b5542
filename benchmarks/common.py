"""Shared helpers for the benchmarks: machine description, models, timing and memory probes.

Nothing here downloads anything: torchvision models are built with ``weights=None`` and
random (seeded) weights.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parent.parent


# -- machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    run = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
    )
    return run.stdout.strip()


def git_revision() -> str:
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return f"{rev}{'+dirty' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> dict:
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git": git_revision(),
    }
    try:
        import zennit

        info["zennit"] = getattr(zennit, "__version__", None) or _dist_version("zennit")
    except ImportError:
        info["zennit"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# -- models ----------------------------------------------------------------------------------
def build_model(name: str, seed: int = 0) -> nn.Module:
    """A torchvision classifier with random, seeded weights, in eval mode (never downloads)."""
    factory = getattr(torchvision.models, name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"unknown torchvision model {name!r}")
    torch.manual_seed(seed)
    model = factory(weights=None).eval()
    # Give BatchNorm non-trivial statistics so canonization actually changes the weights.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(1.0 + 0.2 * torch.rand(n, generator=gen))
                if module.affine:
                    module.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=gen))
                    module.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model


def zennit_canonizers(name: str) -> list:
    """The zennit canonizer torchvision ships for this architecture family."""
    from zennit import torchvision as zt

    if name.startswith("vgg"):
        return [zt.VGGCanonizer()]
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return [zt.ResNetCanonizer()]
    raise ValueError(f"no zennit canonizer known for {name!r} (vgg*, resnet* are supported)")


def set_batchnorm_eps(model: nn.Module, eps: float) -> int:
    n = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = eps
            n += 1
    return n


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def n_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# -- timing and memory ------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The RSS high-water mark of this process.

    ``VmHWM`` where available: ``getrusage(RUSAGE_SELF).ru_maxrss`` also carries the peak of the
    process that forked and exec'ed us (the kernel keeps it across exec), so in a subprocess of
    a big benchmark process it reports the parent's RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Extra GPU memory one call allocates at its peak, above what was allocated before."""
    import gc

    gc.collect()
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def cpu_allocator_peak_bytes(fn: Callable[[], object]) -> int:
    """Extra CPU memory one call allocates at its peak through PyTorch's allocator, above what
    was allocated before: the running total of the profiler's memory events (every tensor,
    autograd's saved ones included; exact, unlike the RSS, which page reuse blurs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted(
        (e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]"
    )
    if not memory:
        return 0
    before = memory[0][1] - memory[0][2]
    return max(total for _, total, _ in memory) - before


# -- output ----------------------------------------------------------------------------------
def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write atomically, so a run killed mid-write still leaves the previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
    os.replace(tmp, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)
