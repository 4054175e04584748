"""Shared benchmark helpers: device description, synchronised timing, incremental JSON results.

Every result file holds ``meta`` (device name, torch/CUDA versions, settings) and ``results``;
it is rewritten atomically after each measurement, so a run cut short still leaves valid JSON
with everything measured so far.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from bafm.io import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_device(name: str = "auto") -> torch.device:
    """``pick_device``, and on CUDA the fast-math settings every benchmark uses."""
    device = pick_device(name)
    if device.type == "cuda":
        from bafm.models.compiling import enable_tf32

        enable_tf32()
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    return device


def add_run_arguments(parser: Any) -> Any:
    """``--budget-s`` (skip phases once this much time has passed) and ``--out`` (the JSON file)."""
    parser.add_argument("--budget-s", type=float, default=None, help="skip phases once this much time has passed")
    parser.add_argument("--out", default=None)
    return parser


def device_and_preset(args: Any) -> Tuple[torch.device, bool, str]:
    """``--device`` prepared, whether it is CUDA, and ``--preset`` (default: sit-xl2 on CUDA, tiny on CPU)."""
    device = prepare_device(args.device)
    cuda = device.type == "cuda"
    return device, cuda, args.preset or ("sit-xl2" if cuda else "tiny")


def device_info(device: torch.device) -> Dict[str, Any]:
    """Name and software versions of the machine a benchmark runs on."""
    info: Dict[str, Any] = {
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["device"] = "cpu"
        info["processor"] = platform.processor() or platform.machine()
        if hasattr(os, "getloadavg"):
            info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, repeats: int = 10) -> Dict[str, Any]:
    """Median time of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    CUDA calls are timed with events around each call (device time, launch queue included);
    CPU calls with ``perf_counter``. Compilation and CUDA-graph capture happen in the warm-up.

    Returns:
        ``{"median_ms", "min_ms", "mean_ms", "stdev_ms", "repeats", "warmup"}``.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return {
        "median_ms": round(statistics.median(times), 4),
        "min_ms": round(min(times), 4),
        "mean_ms": round(statistics.fmean(times), 4),
        "stdev_ms": round(statistics.stdev(times), 4) if len(times) > 1 else 0.0,
        "repeats": repeats,
        "warmup": warmup,
    }


def wall_time(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> Dict[str, Any]:
    """Wall-clock seconds of whole calls (synchronised before and after each), median of ``repeats``."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - begin)
    return {"median_s": round(statistics.median(seconds), 5), "runs_s": [round(s, 5) for s in seconds]}


def profile_call(fn: Callable[[], Any], device: torch.device, top: int = 15) -> List[Dict[str, Any]]:
    """The ``top`` operators/kernels of one ``fn()`` call by self device time (CPU time on CPU).

    Call after warm-up. Returns ``[{"name", "self_ms", "calls"}]``, largest first.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    rows = []
    for event in prof.key_averages():
        if device.type == "cuda":
            self_us = getattr(event, "self_device_time_total", None)
            if self_us is None:
                self_us = getattr(event, "self_cuda_time_total", 0.0)
        else:
            self_us = event.self_cpu_time_total
        rows.append({"name": event.key[:120], "self_ms": round(self_us / 1e3, 4), "calls": event.count})
    rows.sort(key=lambda r: r["self_ms"], reverse=True)
    return [r for r in rows if r["self_ms"] > 0][:top]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """Peak allocated device memory since the last reset, GiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def free_memory(device: torch.device) -> None:
    """Release the previous phase's objects and cached device memory between benchmark phases."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()


@torch.no_grad()
def randomize_zero_init_(module: nn.Module, std: float = 0.02, seed: int = 0) -> List[str]:
    """Fill the all-zero parameters of a freshly built model with N(0, std^2) values.

    adaLN-Zero blocks, zero output layers and the SideNet's zero output conv would otherwise give
    zero velocities and identity blocks; timing them on zeros can flatter the kernels.

    Returns:
        The names of the tensors that were filled.
    """
    gen = torch.Generator().manual_seed(seed)
    filled = []
    for name, param in module.named_parameters():
        if param.is_floating_point() and not param.is_meta and bool((param == 0).all()):
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param) * std)
            filled.append(name)
    return filled


def _clean(value: Any) -> Any:
    """JSON-safe copy: tuples to lists, dtypes and devices to strings, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return value


def atomic_write_json(path: Path, payload: Dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    atomic_write_text(path, json.dumps(_clean(payload), indent=2) + "\n")


class ResultFile:
    """A benchmark's JSON file, rewritten after every recorded measurement.

    Layout: ``{"benchmark", "status", "meta": {...device, settings}, "results": {...}, "errors": [...]}``;
    ``status`` is ``"running"`` until :meth:`finish` sets ``"complete"``.
    """

    def __init__(self, path: Path, benchmark: str, device: torch.device, settings: Dict[str, Any],
                 note: str = "") -> None:
        self.path = Path(path)
        self.payload: Dict[str, Any] = {
            "benchmark": benchmark,
            "status": "running",
            "note": note,
            "meta": {**device_info(device), "settings": settings},
            "results": {},
            "errors": [],
        }
        self.save()

    def save(self) -> None:
        """Write the current state."""
        atomic_write_json(self.path, self.payload)

    def record(self, *keys: str, value: Any) -> None:
        """Set ``results[k1][k2]...`` to ``value`` and save."""
        node = self.payload["results"]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        self.save()

    def error(self, where: str, err: BaseException) -> None:
        """Note a failed measurement (the run goes on) and save."""
        reason = (str(err).strip().splitlines() or [""])[0][:500]
        self.payload["errors"].append({"where": where, "error": f"{type(err).__name__}: {reason}"})
        self.save()

    def finish(self, status: str = "complete") -> None:
        """Mark the file finished and save."""
        self.payload["status"] = status
        self.save()


class Deadline:
    """Wall-clock budget for a benchmark script: phases check it before they start."""

    def __init__(self, budget_s: Optional[float]) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        """Seconds left (infinite without a budget)."""
        if self.budget_s is None:
            return math.inf
        return self.budget_s - (time.monotonic() - self.start)

    def allows(self, needed_s: float) -> bool:
        """True when at least ``needed_s`` seconds are left."""
        return self.left() >= needed_s
