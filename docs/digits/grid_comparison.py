"""Uniform vs shift vs optimized grids, and adaptive BA, from sweeps run with two seeds.

Reads sweep ``results.csv`` files given as ``SEED:PATH`` (each row's ``grid`` column says which
grid it used), averages the seeds, and writes

* ``docs/digits/grid_comparison.csv``: one row per (solver, grid, NFE or tolerance), the metric
  per seed and the mean;
* ``docs/digits/grids_vs_nfe.png``: trajectory error (top) and FID (bottom) versus NFE, one
  panel per solver, a line per grid kind (the seed mean; bars span the two seeds);
* ``docs/digits/adaptive_vs_fixed.png``: BA's trajectory error versus (mean) NFE on uniform and
  optimized grids and with step-size control, against Euler-100's;

and prints the Markdown tables quoted in the README: the grids compared, adaptive BA, and (with
``grids:PATH``, the optimized-grid file) how the calibration error of each searched grid transfers
to the held-out seeds, with the search's cost.

Usage:
    .venv/bin/python docs/digits/grid_comparison.py 0:runs/.../results.csv 100000:runs/.../results.csv ... \
        grids:checkpoints/digits/sidenet.grids.json
"""

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SOLVERS = ["ba", "dpm++2m", "unipc", "ipndm", "euler"]
COLORS = ["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:green"]
OUT = Path("docs/digits")


def read_rows(specs):
    """``{(solver, grid, nfe or tol): {seed: row}}``; adaptive rows are keyed by tolerance."""
    table = defaultdict(dict)
    for spec in specs:
        seed, path = spec.split(":", 1)
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["solver"] == "reference":
                    continue
                key = (row["solver"], row["grid"], row["tol"] if row["tol"] else int(row["nfe"]))
                table[key][int(seed)] = row
    return table


def summarise(table):
    """Rows with per-seed and mean ``traj_rmse``, ``fid`` and ``nfe`` (only keys seen for every seed)."""
    seeds = sorted({s for by_seed in table.values() for s in by_seed})
    rows = []
    for (solver, grid, level), by_seed in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1], float(kv[0][2]))):
        if sorted(by_seed) != seeds:
            continue
        row = {"solver": solver, "grid": grid, "tol": level if grid == "adaptive" else ""}
        for metric in ("nfe", "traj_rmse", "fid"):
            values = [float(by_seed[s][metric]) for s in seeds]
            row.update({f"{metric}_seed{s}": v for s, v in zip(seeds, values)})
            row[metric] = mean(values)
        rows.append(row)
    return seeds, rows


def write_csv(rows, seeds, path):
    columns = ["solver", "grid", "tol", "nfe", "traj_rmse", "fid"] + [
        f"{m}_seed{s}" for m in ("nfe", "traj_rmse", "fid") for s in seeds]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def grid_kinds(rows):
    """``uniform``, the ``shift:<s>`` grids by shift, then ``optimized`` (those present)."""
    shifts = sorted({r["grid"] for r in rows if r["grid"].startswith("shift:")}, key=lambda g: float(g[6:]))
    present = {r["grid"] for r in rows}
    return [g for g in ["uniform", *shifts, "optimized"] if g in present]


def pick(rows, solver, grid):
    return sorted((r for r in rows if r["solver"] == solver and r["grid"] == grid), key=lambda r: r["nfe"])


def plot_grids(rows, seeds, path):
    fig, axes = plt.subplots(2, len(SOLVERS), figsize=(3.2 * len(SOLVERS), 6.0), dpi=120, sharex=True)
    kinds = grid_kinds(rows)
    for col, solver in enumerate(SOLVERS):
        for i, grid in enumerate(kinds):
            points = [r for r in pick(rows, solver, grid) if r["nfe"] <= 10]
            if not points:
                continue
            color, marker = COLORS[i % len(COLORS)], "os^vD"[i % 5]
            for row_i, metric in enumerate(("traj_rmse", "fid")):
                ax = axes[row_i, col]
                x = [r["nfe"] for r in points]
                y = [r[metric] for r in points]
                lo = [y_ - min(r[f"{metric}_seed{s}"] for s in seeds) for y_, r in zip(y, points)]
                hi = [max(r[f"{metric}_seed{s}"] for s in seeds) - y_ for y_, r in zip(y, points)]
                ax.errorbar(x, y, yerr=[lo, hi], color=color, marker=marker, ms=4, capsize=2, label=grid)
        axes[0, col].set_title(solver)
        axes[0, col].set_yscale("log")
        axes[1, col].set_xlabel("NFE")
    axes[0, 0].set_ylabel("trajectory error (RMS to reference)")
    axes[1, 0].set_ylabel("FID (digits classifier)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Grids on the embedded default (1000 held-out samples, mean of seeds {seeds})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_adaptive(rows, path):
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for grid, label in (("uniform", "BA, uniform grid"), ("optimized", "BA, optimized grid"),
                        ("adaptive", "BA adaptive (mean NFE)")):
        points = pick(rows, "ba-adaptive" if grid == "adaptive" else "ba", grid)
        ax.plot([r["nfe"] for r in points], [r["traj_rmse"] for r in points], marker="o", ms=4, label=label)
        if grid == "adaptive":
            for r in points:
                ax.annotate(f"tol {float(r['tol']):g}", (r["nfe"], r["traj_rmse"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
    euler = [r for r in pick(rows, "euler", "uniform") if r["nfe"] == 100]
    if euler:
        ax.axhline(euler[0]["traj_rmse"], color="gray", ls="--", label="Euler-100")
    ax.axvline(8, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("NFE per sample")
    ax.set_ylabel("trajectory error (RMS to reference)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(rows, seeds):
    """Per solver and NFE: trajectory error and FID on each grid kind (seed means)."""
    kinds = grid_kinds(rows)
    lines = ["| solver | NFE | " + " | ".join([f"traj {g}" for g in kinds] + [f"FID {g}" for g in kinds]) + " |",
             "|---|---:|" + "---:|" * (2 * len(kinds))]
    by_key = {(r["solver"], r["grid"], r["nfe"]): r for r in rows if r["grid"] in kinds}
    for solver in SOLVERS:
        for nfe in sorted({n for s, g, n in by_key if s == solver and n <= 10}):
            cells = [by_key.get((solver, g, nfe)) for g in kinds]
            traj = [f"{c['traj_rmse']:.4f}" if c else "" for c in cells]
            fid = [f"{c['fid']:.3f}" if c else "" for c in cells]
            lines.append(f"| {solver} | {nfe:g} | " + " | ".join(traj + fid) + " |")
    adaptive = ["", "| ba-adaptive tol | mean NFE | traj_rmse | FID |", "|---:|---:|---:|---:|"]
    for r in pick(rows, "ba-adaptive", "adaptive"):
        adaptive.append(f"| {float(r['tol']):g} | {r['nfe']:.2f} | {r['traj_rmse']:.4f} | {r['fid']:.3f} |")
    return "\n".join(lines + adaptive)


def targets(rows):
    """The grid targets, from the seed means: BA-5 optimized vs uniform BA-7, and BA vs the rivals per budget."""
    at = {(r["solver"], r["grid"], r["nfe"]): r for r in rows}
    lines = []
    ba5, ba7 = at.get(("ba", "optimized", 5)), at.get(("ba", "uniform", 7))
    if ba5 and ba7:
        lines.append(f"optimized BA-5 vs uniform BA-7: traj {ba5['traj_rmse']:.4f} vs {ba7['traj_rmse']:.4f}, "
                     f"FID {ba5['fid']:.3f} vs {ba7['fid']:.3f}")
    for nfe in sorted({n for s, g, n in at if s == "ba" and g == "optimized" and n <= 10}):
        rivals = {s: at[(s, "optimized", nfe)] for s in SOLVERS[1:] if (s, "optimized", nfe) in at}
        if rivals:
            best = min(rivals, key=lambda s: rivals[s]["fid"])
            lines.append(f"{nfe} NFE, optimized grids: BA FID {at[('ba', 'optimized', nfe)]['fid']:.3f}, "
                         f"best rival {best} {rivals[best]['fid']:.3f}")
    return "\n".join(lines)


def transfer(rows, seeds, grid_file):
    """Calibration error of each searched grid against its held-out error per seed, and the cost.

    Two readings: the error itself (held-out vs calibration, which also moves with the sample set:
    the uniform grid's error differs between the sets too), and the gain (optimized / uniform on
    the same samples), which isolates how well the grid itself transfers.
    """
    results = json.loads(Path(grid_file).read_text())["results"]
    held = {(r["solver"], r["grid"], r["nfe"]): r for r in rows}
    lines = ["| solver | NFE | calibration: uniform → optimized (gain) | held-out optimized, seed "
             + " / ".join(str(s) for s in seeds) + " | error vs calibration | held-out gain | gain vs calibration "
             "| evaluations | search min | backbone calls |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    minutes = calls = 0.0
    within = {"error": 0, "gain": 0, "pairs": 0, "held-out lower": 0}
    for solver in SOLVERS:
        for nfe in sorted(int(n) for n in results.get(solver, {})):
            r = results[solver][str(nfe)]
            h, u = held.get((solver, "optimized", nfe)), held.get((solver, "uniform", nfe))
            minutes, calls = minutes + r["seconds"] / 60, calls + r["backbone_calls"]
            if h is None or u is None:
                continue
            gain = r["optimized"] / r["uniform"]
            held_gain = [h[f"traj_rmse_seed{s}"] / u[f"traj_rmse_seed{s}"] for s in seeds]
            per_seed = " / ".join(f"{h[f'traj_rmse_seed{s}']:.4f}" for s in seeds)
            err_gap = max(abs(h[f"traj_rmse_seed{s}"] / r["optimized"] - 1) for s in seeds)
            gain_gap = max(abs(g / gain - 1) for g in held_gain)
            within["pairs"] += 1
            within["error"] += err_gap <= 0.05
            within["gain"] += gain_gap <= 0.05
            within["held-out lower"] += sum(h[f"traj_rmse_seed{s}"] < r["optimized"] for s in seeds)
            lines.append(f"| {solver} | {nfe} | {r['uniform']:.4f} → {r['optimized']:.4f} ({gain:.3f}) | {per_seed} | "
                         f"≤ {err_gap:.1%} | {' / '.join(f'{g:.3f}' for g in held_gain)} | ≤ {gain_gap:.1%} | "
                         f"{r['evals']} | {r['seconds'] / 60:.1f} | {r['backbone_calls']} |")
    lines.append(f"\nSearch total: {minutes:.1f} min, {calls:.0f} batched backbone calls. Within 5 % on both seeds: "
                 f"error {within['error']}/{within['pairs']}, gain {within['gain']}/{within['pairs']}; held-out error "
                 f"below calibration in {within['held-out lower']} of {len(seeds) * within['pairs']} cases.")
    return "\n".join(lines)


def main(specs):
    grid_files = [s.split(":", 1)[1] for s in specs if s.startswith("grids:")]
    seeds, rows = summarise(read_rows([s for s in specs if not s.startswith("grids:")]))
    write_csv(rows, seeds, OUT / "grid_comparison.csv")
    plot_grids(rows, seeds, OUT / "grids_vs_nfe.png")
    plot_adaptive(rows, OUT / "adaptive_vs_fixed.png")
    print(markdown(rows, seeds))
    print()
    print(targets(rows))
    for grid_file in grid_files:
        print()
        print(transfer(rows, seeds, grid_file))


if __name__ == "__main__":
    main(sys.argv[1:])
