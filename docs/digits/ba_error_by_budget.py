"""BA's trajectory error per NFE budget for several SideNets, on held-out noises (README lever table).

    .venv/bin/python docs/digits/ba_error_by_budget.py [--samples 256] [--baselines] SIDENET ...

Each SideNet (an export ``.safetensors`` or a ``bafm train`` checkpoint ``.ckpt``, read for its EMA
weights) samples BA at 3, 4, 5, 6, 8 and 10 NFE on uniform grids from noises ``500000 + i`` (labels
``i % 10``: neither the evaluation seeds 0 / 100000 nor the grid-search seeds); the error is the mean
per-sample RMS distance to dopri5 (rtol = atol = 1e-5) from the same noise. ``--baselines`` adds
iPNDM and Euler-100 on the same noises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from side_error_table import ema_sidenet  # noqa: E402

from bafm.models.loading import load_backbone, load_sidenet  # noqa: E402
from bafm.sampling import SamplingSettings, reference_solve, sample_inputs, solve_batch  # noqa: E402
from bafm.solvers.ground_truth import Reference  # noqa: E402

BUDGETS = (3, 4, 5, 6, 8, 10)
SEED = 500_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sidenets", nargs="*")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--baselines", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    backbone = load_backbone(ROOT / "checkpoints/digits/backbone.safetensors", arch="SiT-S/2", depth=6,
                             hidden_size=128, num_heads=4)
    noise, labels = sample_inputs(torch.arange(args.samples), (1, 8, 8), SEED, 10)
    sampling = SamplingSettings()
    exact = reference_solve(backbone, noise, labels, sampling, Reference("dopri5", 0, 1e-5, 1e-5)).x

    def error(sidenet, solver: str, nfe: int) -> float:
        x = solve_batch(backbone, sidenet, solver, noise, labels, sampling, nfe=nfe).x
        return float((x - exact).flatten(1).pow(2).mean(dim=1).sqrt().mean())

    print("| SideNet | " + " | ".join(f"BA-{n}" for n in BUDGETS) + " |")
    print("|---|" + "---:|" * len(BUDGETS))
    if args.baselines:
        print("| iPNDM (no SideNet) | " + " | ".join(f"{error(None, 'ipndm', n):.5f}" for n in BUDGETS) + " |")
        print(f"<!-- Euler-100: {error(None, 'euler', 100):.5f} -->")
    for path in args.sidenets:
        sidenet = ema_sidenet(Path(path)) if path.endswith(".ckpt") else load_sidenet(path)
        print(f"| {path} | " + " | ".join(f"{error(sidenet, 'ba', n):.5f}" for n in BUDGETS) + " |", flush=True)


if __name__ == "__main__":
    main()
