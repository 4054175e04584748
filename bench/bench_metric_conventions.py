"""How much the metric convention moves the numbers (README, "Metric conventions").

Synthetic Inception-like features (non-negative, ``max(N(0.3, 0.6), 0)`` per entry; the generated set
a little shifted and narrowed) and class logits (``K`` classes, each sample peaked on its own class
with a random sharpness), scored under ``eval.metrics_convention=torch-fidelity`` and ``=adm``. FID
does not depend on the convention and is left out. CPU only, a few minutes at the defaults.

    python bench/bench_metric_conventions.py [--n 5000] [--dim 2048] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bafm.eval.metrics import inception_score, precision_recall  # noqa: E402


def features(n: int, dim: int, seed: int, shift: float, scale: float) -> torch.Tensor:
    """``(n, dim)`` non-negative features like Inception's pool features."""
    gen = torch.Generator().manual_seed(seed)
    return (0.3 + shift + 0.6 * scale * torch.randn(n, dim, generator=gen)).clamp_min(0.0)


def logits(n: int, classes: int, seed: int) -> torch.Tensor:
    """``(n, classes)`` logits, sample ``i`` peaked on a random class with a random sharpness."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(n, classes, generator=gen, dtype=torch.float64)
    peak = torch.randint(classes, (n,), generator=gen)
    out[torch.arange(n), peak] += 2.0 + 8.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="generated and real feature vectors each")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--is-n", type=int, nargs="+", default=[10000, 50000], help="samples of the IS rows")
    parser.add_argument("--classes", type=int, default=1008, help="logits per sample (Inception's 1008)")
    args = parser.parse_args(argv)
    print("| metric | N | D / K | seed | torch-fidelity | adm | adm - torch-fidelity |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seed in args.seeds:
        real = features(args.n, args.dim, 2 * seed, 0.0, 1.0)
        fake = features(args.n, args.dim, 2 * seed + 1, 0.02, 0.97)
        fidelity = precision_recall(fake, real)
        adm = precision_recall(fake, real, convention="adm")
        for i, name in enumerate(("precision", "recall")):
            print(f"| {name} | {args.n} | {args.dim} | {seed} | {fidelity[i]:.4f} | {adm[i]:.4f} | "
                  f"{adm[i] - fidelity[i]:+.4f} |", flush=True)
    for n in args.is_n:
        for seed in args.seeds:
            lg = logits(n, args.classes, 100 + seed)
            scores = [inception_score(lg, splits=10)[0], inception_score(lg, convention="adm")[0]]
            print(f"| IS (10 splits / chunks of 5000) | {n} | {args.classes} | {seed} | {scores[0]:.2f} | "
                  f"{scores[1]:.2f} | {100 * (scores[1] / scores[0] - 1):+.2f} % |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
