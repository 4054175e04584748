"""Run every benchmark (``make bench``): sampling latency, SideNet training throughput, data loader,
and the FLOPs of the embedded default's backbone and SideNet.

On a CUDA machine: SiT-XL/2 at paper scale (batch 16/64/256 with CFG), results in
``bench/results/{sampling,training}_gpu.json``. On a CPU-only machine: the same harness at tiny
sizes (``*_cpu_tiny.json``), which proves the scripts but says nothing about GPU speed. The CPU
data-loader benchmark and the FLOP count (``sidenet_flops.json``: counts, not timings) run on
both. Each benchmark runs in its own process,
so one failing does not stop the others; the exit status is non-zero if any failed.

    python bench/run_all.py [--quick] [--only sampling training loader flops] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("sampling", "training", "loader", "flops")


def commands(cuda: bool, quick: bool, out_dir: Path) -> Dict[str, List[str]]:
    """The command line of each benchmark for this machine."""
    tag = "gpu" if cuda else "cpu_tiny"
    sampling = ["--out", str(out_dir / f"sampling_{tag}.json")]
    training = ["--out", str(out_dir / f"training_{tag}.json")]
    loader = ["--out", str(out_dir / "loader_cpu.json")]
    flops = ["--out", str(out_dir / "sidenet_flops.json")]
    if quick:  # a smoke run: fewer sizes, repeats and variants
        sampling += ["--batch-sizes", "64" if cuda else "2", "--repeats", "5", "--warmup", "2",
                     "--solvers", "ba:5", "ba:10", "euler:50", "euler:100"]  # fmt: skip
        if not cuda:
            sampling += ["--variants", "naive", "eager"]
            training += ["--variants", "eager", "--steps", "1"]
        loader += ["--samples", "2000", "--batches", "20", "--repeats", "1", "--batch-size", "64"]
    return {
        "sampling": [sys.executable, str(HERE / "bench_sampling.py"), *sampling],
        "training": [sys.executable, str(HERE / "bench_training.py"), *training],
        "loader": [sys.executable, str(HERE / "bench_loader.py"), *loader],
        "flops": [sys.executable, str(HERE / "bench_sidenet_flops.py"), *flops],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the selected benchmarks one after another; return 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one small size, few repeats")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"benchmarks on {'CUDA: ' + torch.cuda.get_device_name() if cuda else 'CPU (tiny sizes)'} -> {out_dir}")
    failed = []
    for name, command in commands(cuda, args.quick, out_dir).items():
        if name not in args.only:
            continue
        start = time.perf_counter()
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        code = subprocess.call(command)
        print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
