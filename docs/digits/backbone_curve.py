"""FID of the embedded default's backbone versus its training length.

``make backbone`` with ``backbone_train.snapshot_every=N`` leaves the EMA weights every N steps
in ``runs/digits/backbone/snapshots/``. This script runs the NFE sweep on each snapshot (exact
ODE solution, Euler at 10 and 100 NFE, same seeds) and writes ``backbone_curve.csv`` and
``backbone_fid_vs_steps.png`` into the output folder.

Usage:
    .venv/bin/python docs/digits/backbone_curve.py SNAPSHOT_DIR OUT_DIR [key=value ...]

Extra ``key=value`` arguments are passed to every sweep (e.g. ``eval.num_samples=500``).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROWS = (("reference", None), ("euler", 10), ("euler", 100))


def sweep_snapshot(snapshot: Path, out: Path, overrides: Sequence[str]) -> Dict[str, str]:
    """Run the sweep on one snapshot and return ``{row name: fid}``."""
    if not (out / "results.csv").is_file():
        subprocess.run(
            [sys.executable, "-m", "bafm", "eval-nfe-sweep", "--config", "experiments/digits.yaml",
             "--out", str(out), f"backbone.path={snapshot}", "eval.solvers=[euler]",
             "eval.budgets.euler=[10,100]", "eval.grid_images=0", *overrides],
            check=True,
        )
    fids: Dict[str, str] = {}
    with open(out / "results.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = row["solver"] if row["solver"] == "reference" else f"{row['solver']}@{row['nfe']}"
            fids[name] = row["fid"]
            if row["solver"] == "reference":
                fids["reference_nfe"] = row["nfe"]
    return fids


def main(snapshots: Path, out: Path, overrides: List[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for snap in sorted(snapshots.glob("ema_step*.safetensors")):
        step = int(snap.stem.removeprefix("ema_step"))
        fids = sweep_snapshot(snap, out / snap.stem, overrides)
        table.append({"step": step, **fids})
        print(table[-1], flush=True)
    columns = ["step", "reference_nfe", "reference", "euler@10", "euler@100"]
    with open(out / "backbone_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=150)
    steps = [r["step"] for r in table]
    for name in ("reference", "euler@10", "euler@100"):
        ax.plot(steps, [float(r[name]) for r in table], marker="o", label=name)
    ax.set_xlabel("backbone training steps (batch 128)")
    ax.set_ylabel("FID (digits classifier)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "backbone_fid_vs_steps.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
