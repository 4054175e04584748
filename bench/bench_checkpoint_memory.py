"""Peak RSS of loading a full-size SiT-XL/2 REPA training checkpoint (``model``, ``ema``, Adam state, ``args``).

    python bench/bench_checkpoint_memory.py [--dir /tmp] [--before-root DIR] [--keep]

Writes a random checkpoint in REPA's layout (683 M parameters: SiT-XL/2 at 256 with one 768-d
projector; ``model`` and ``ema`` float32, Adam's ``exp_avg``/``exp_avg_sq`` per parameter, an
``argparse.Namespace``; about 11 GB) to ``--dir``, then measures ``load_backbone(path)`` in a
fresh process per variant: peak RSS (``VmHWM``), the RSS after the imports (baseline) and after
loading. (Not ``ru_maxrss``: on Linux a child's ``ru_maxrss`` also counts what its parent had
resident when it forked, here the pages of the checkpoint just written.) ``--before-root`` points at another bafm checkout (e.g. an older commit from
``git archive``) to measure its loader in the same way. The checkpoint is deleted afterwards
unless ``--keep``. Needs about 11 GB of disk; memory is what is measured (the checkpoint is
written from file-backed pages, so making it needs little RAM).
Writes ``bench/results/checkpoint_memory_cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, ResultFile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import sys, time
from pathlib import Path

def kib(field):
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(l for l in lines if l.startswith(field + ":")).split()[1])

from bafm.models import load_backbone
baseline = kib("VmRSS")
start = time.perf_counter()
model = load_backbone(sys.argv[1], "SiT-XL/2", source="repa")
seconds = time.perf_counter() - start
params = sum(p.numel() for p in model.parameters())
print(baseline, kib("VmRSS"), kib("VmHWM"), params, round(seconds, 2))
"""


def make_repa_checkpoint(path: Path, seed: int = 0) -> Dict[str, int]:
    """A random full-size SiT-XL/2 REPA training checkpoint at ``path``; returns its byte counts.

    Every tensor is its own private map of a slice of one random float32 pool file, so
    ``torch.save`` writes one storage per tensor and entry (as a real checkpoint has) while the
    process holds only clean, reclaimable file pages.
    """
    from bafm.models.sit import build_sit

    shapes = {k: v.shape for k, v in build_sit("SiT-XL/2", projector_dims=[768], device="meta").state_dict().items()}
    numel = sum(int(np.prod(s)) for s in shapes.values())
    pool = path.with_suffix(".pool")
    rng = np.random.default_rng(seed)
    with open(pool, "wb") as f:
        for start in range(0, numel, 2**24):
            (rng.standard_normal(min(2**24, numel - start), dtype=np.float32) * 0.02).tofile(f)

    def entry() -> Dict[str, torch.Tensor]:
        # One storage per tensor, as in a real checkpoint: a private (copy-on-write) map of its slice.
        out, offset = {}, 0
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            array = np.memmap(pool, dtype=np.float32, mode="c", offset=offset * 4, shape=tuple(shape))
            out[name] = torch.from_numpy(array)
            offset += n
        return out

    ema, model, avg, avg_sq = entry(), entry(), entry(), entry()
    opt = {"state": {i: {"step": torch.tensor(4e5), "exp_avg": avg[k], "exp_avg_sq": avg_sq[k]}
                     for i, k in enumerate(shapes)},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                             "params": list(range(len(shapes)))}]}
    args = argparse.Namespace(model="SiT-XL/2", resolution=256, enc_type="dinov2-vit-b", proj_coeff=0.5)
    torch.save({"model": model, "ema": ema, "opt": opt, "args": args, "steps": 400000}, path)
    del ema, model, avg, avg_sq, opt
    pool.unlink()
    per_entry = numel * 4
    return {"parameters": numel, "bytes_per_entry": per_entry, "file_bytes": path.stat().st_size}


def measure(path: Path, bafm_root: Path) -> Dict[str, float]:
    """``load_backbone(path)`` in a fresh process importing bafm from ``bafm_root``.

    Two peaks: the child's own ``VmHWM`` and the largest ``VmRSS`` this process sees when it
    polls the child every 2 ms. (The kernel updates the high-water mark lazily, so memory that
    is given back through ``madvise`` can leave a transient peak out of ``VmHWM``; the polled
    figure catches it.)
    """
    env = {**os.environ, "PYTHONPATH": str(bafm_root), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    polled = 0
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            line = next(l for l in status.read_text().splitlines() if l.startswith("VmRSS:"))
            polled = max(polled, int(line.split()[1]))
        except (OSError, StopIteration):
            pass
        time.sleep(0.002)
    out, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the loading process failed: {err[-2000:]}")
    baseline, after, peak, params, seconds = out.split()
    gib = 2**20  # KiB per GiB
    return {"baseline_rss_gib": int(baseline) / gib, "rss_after_load_gib": int(after) / gib,
            "peak_rss_gib": int(peak) / gib, "peak_above_baseline_gib": (int(peak) - int(baseline)) / gib,
            "polled_peak_rss_gib": polled / gib, "parameters": int(params), "load_seconds": float(seconds)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--before-root", type=Path, default=None, help="another bafm checkout to measure too")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint file")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "checkpoint_memory_cpu.json")
    args = parser.parse_args(argv)
    path = args.dir / "bafm_repa_sit_xl2_random.pt"
    variants: List[tuple] = ([("before", args.before_root)] if args.before_root else []) + [("this checkout", ROOT)]
    results = ResultFile(args.out, "checkpoint_memory", torch.device("cpu"),
                         {"checkpoint": "random SiT-XL/2 REPA layout: model, ema, opt (Adam), args",
                          "variants": {name: str(root) for name, root in variants}})
    try:
        start = time.perf_counter()
        sizes = make_repa_checkpoint(path)
        results.record("checkpoint", value={**sizes, "write_seconds": round(time.perf_counter() - start, 1)})
        print(f"checkpoint: {sizes['parameters'] / 1e6:.0f} M parameters, {sizes['file_bytes'] / 2**30:.2f} GiB")
        for name, root in variants:
            row = measure(path, root)
            results.record(name, value=row)
            print(f"{name}: peak RSS {row['peak_rss_gib']:.2f} GiB (VmHWM; polled {row['polled_peak_rss_gib']:.2f}), "
                  f"{row['peak_above_baseline_gib']:.2f} above the {row['baseline_rss_gib']:.2f} GiB after imports, "
                  f"{row['rss_after_load_gib']:.2f} GiB after loading, {row['load_seconds']:.1f} s")
        results.finish()
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            path.with_suffix(".pool").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
