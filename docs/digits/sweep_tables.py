"""The README's embedded-default sweep table and target checks, from two sweeps' results.csv.

    .venv/bin/python docs/digits/sweep_tables.py SEED0.csv SEED100000.csv

Prints one Markdown row per (solver, NFE) with both seeds' trajectory error, ``fd_ref`` and FID,
then, per budget 3-10, which solver has the lowest trajectory error and ``fd_ref`` on each seed,
and the issue's targets (BA-10 vs Euler-100 in trajectory error, BA-8 vs Euler-100 in ``fd_ref``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bafm.eval.report import read_csv  # noqa: E402

Key = Tuple[str, float]


def by_key(rows: List[dict]) -> Dict[Key, dict]:
    out = {}
    for r in rows:
        label = r["solver"] if r.get("tol") in (None, "") else f"{r['solver']} (tol {r['tol']:g})"
        out[(label, r["nfe"])] = r
    return out


def fmt(value: float, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main(first: str, second: str) -> None:
    a, b = by_key(read_csv(first)), by_key(read_csv(second))
    print("| solver | NFE | FLOPs (backbone calls) | traj_rmse | traj (seed 100000) | fd_ref | fd_ref (seed 100000) "
          "| FID | FID (seed 100000) | precision | recall | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in a.items():
        s = next((v for k, v in b.items() if k[0] == key[0] and (k[1] == key[1] or "tol" in k[0])), {})
        nfe = f"{r['nfe']:g}" + ("" if "tol" not in key[0] else f" / {s.get('nfe', float('nan')):g}")
        print(f"| {key[0]} | {nfe} | {fmt(r.get('flops'), '.4g')} | {fmt(r['traj_rmse'], '.4g')} | "
              f"{fmt(s.get('traj_rmse'), '.4g')} | {fmt(r['fd_ref'], '.4g')} | {fmt(s.get('fd_ref'), '.4g')} | "
              f"{fmt(r['fid'], '.3f')} | {fmt(s.get('fid'), '.3f')} | {fmt(r['precision'], '.3f')} | "
              f"{fmt(r['recall'], '.3f')} | {fmt(r['seconds'], '.3g')} |")
    print()
    for name, rows in (("seed 0", a), ("seed 100000", b)):
        fixed = {k: v for k, v in rows.items() if "tol" not in k[0] and k[0] != "reference"}
        for metric in ("traj_rmse", "fd_ref"):
            wins = []
            for nfe in (3, 4, 5, 6, 8, 10):
                at = {k[0]: v[metric] for k, v in fixed.items() if k[1] == nfe}
                best = min(at, key=at.get)
                wins.append(f"{nfe}: {best}" + ("" if best == "ba" else f" ({at[best]:.4g} vs ba {at['ba']:.4g})"))
            print(f"{name}, lowest {metric} per NFE: " + "; ".join(wins))
        e100 = fixed[("euler", 100)]
        print(f"{name}: BA-10 traj {fixed[('ba', 10)]['traj_rmse']:.4g} vs Euler-100 {e100['traj_rmse']:.4g}; "
              f"BA-8 fd_ref {fixed[('ba', 8)]['fd_ref']:.4g} vs Euler-100 {e100['fd_ref']:.4g}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
