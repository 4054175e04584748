"""Fixed-step reference versus adaptive dopri5 on the embedded default (committed digits backbone).

    python bench/bench_reference.py [--samples 128] [--steps 25 50] [--group 64] [--tight 1e-6]

Each candidate reference solves the same per-sample noise and labels as ``bafm eval-nfe-sweep``
(CFG and grid from ``experiments/digits.yaml``) in groups of ``--group`` samples. Reported per
candidate: backbone calls per sample (NFE, counted) and the RMS latent distance to the default
dopri5 reference (rtol = atol = 1e-5, the sweep's) and to a tighter dopri5 solution
(rtol = atol = ``--tight``, default 1e-6; float32, as the sweep runs), each the mean over samples
of the per-sample RMS, as ``traj_rmse``.
Writes ``bench/results/reference_digits_cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, ResultFile  # noqa: E402

from bafm.config import load_config, sampling_settings  # noqa: E402
from bafm.sampling import latent_shape, reference_solve, sample_labels, sample_noise  # noqa: E402
from bafm.models.loading import load_backbone  # noqa: E402
from bafm.solvers.ground_truth import Reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def solve_all(backbone, cfg, samples: int, group: int, solver: str, steps: int, tol: float,
              dtype: torch.dtype) -> tuple[torch.Tensor, float, float]:
    """All samples' latents (float64), mean NFE per sample and seconds, solved group by group."""
    out: List[torch.Tensor] = []
    nfe = 0.0
    start = time.perf_counter()
    for lo in range(0, samples, group):
        idx = torch.arange(lo, min(lo + group, samples))
        noise = sample_noise(idx, latent_shape(backbone), int(cfg.eval.seed), dtype=dtype)
        labels = sample_labels(idx, int(backbone.num_classes))
        res = reference_solve(backbone, noise, labels, sampling_settings(cfg), Reference(solver, steps, tol, tol))
        out.append(res.x.double())
        nfe += float(res.nfe) * len(idx)
    return torch.cat(out), nfe / samples, time.perf_counter() - start


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the per-sample RMS distance."""
    return float((a - b).flatten(1).pow(2).mean(1).sqrt().mean())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--tight", type=float, default=1e-6, help="tolerance of the tighter dopri5 solution")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "reference_digits_cpu.json")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    cfg = load_config(ROOT / "experiments" / "digits.yaml")
    backbone = load_backbone(ROOT / cfg.backbone.path, arch=cfg.backbone.arch, depth=cfg.backbone.depth,
                             hidden_size=cfg.backbone.hidden_size, num_heads=cfg.backbone.num_heads)
    settings = {"samples": args.samples, "group": args.group, "steps": args.steps,
                "backbone": cfg.backbone.path, "cfg_scale": cfg.sampling.cfg_scale, "seed": cfg.eval.seed}
    results = ResultFile(args.out, "reference", torch.device("cpu"), settings,
                         note="embedded default: committed digits backbone; RMS in latent (pixel) units")
    truth, truth_nfe, truth_s = solve_all(backbone, cfg, args.samples, args.group, "dopri5", 0, args.tight,
                                          torch.float32)
    default, nfe, seconds = solve_all(backbone, cfg, args.samples, args.group, "dopri5", 0, 1e-5, torch.float32)
    rows: List[Dict[str, float]] = [
        {"reference": f"dopri5 rtol=atol={args.tight:g}", "nfe": truth_nfe,
         "rms_vs_dopri5": rms(truth, default), "rms_vs_tight": 0.0, "seconds": truth_s},
        {"reference": "dopri5 rtol=atol=1e-5 (default)", "nfe": nfe, "rms_vs_dopri5": 0.0,
         "rms_vs_tight": rms(default, truth), "seconds": seconds},
    ]
    for row in rows:
        results.record(row["reference"], value=row)
    for steps in args.steps:
        x, nfe, seconds = solve_all(backbone, cfg, args.samples, args.group, "rk4", steps, 0.0, torch.float32)
        row = {"reference": f"rk4 {steps} steps", "nfe": nfe, "rms_vs_dopri5": rms(x, default),
               "rms_vs_tight": rms(x, truth), "seconds": seconds}
        results.record(row["reference"], value=row)
        rows.append(row)
    results.finish()
    print("| reference | NFE per sample | RMS vs dopri5 (1e-5) | RMS vs dopri5 (tight) | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reference']} | {r['nfe']:.1f} | {r['rms_vs_dopri5']:.3g} | {r['rms_vs_tight']:.3g} | "
              f"{r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
