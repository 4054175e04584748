"""Sweep outputs: CSV, Markdown, metric-vs-NFE and error-vs-FLOPs plots, image grids, ADM ``.npz``
samples, TensorBoard.

Every file is written to a temporary name in its folder and renamed into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from bafm.eval.plan import COLUMNS, Grids, Row
from bafm.io import atomic_write_bytes, atomic_write_text
from bafm.sampling import REFERENCE
from bafm.tables import csv_text, markdown_text


def rows_to_csv(rows: Sequence[Row], columns: Sequence[str] = COLUMNS, spec: str = ".8g") -> str:
    """CSV text with exactly ``columns`` (default ``COLUMNS``); None is written as an empty cell."""
    return csv_text(rows, columns, spec)


def read_csv(path: str | Path) -> List[Dict[str, Any]]:
    """Rows of a ``results.csv`` with numbers parsed (ints for nfe/steps/n_samples, None for blank cells).

    Files written before ``sfid``/``precision``/``recall`` existed read without those keys.
    """
    out = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            row: Dict[str, Any] = {"solver": rec["solver"], "grid": rec.get("grid", "uniform")}
            row["tol"] = float(rec["tol"]) if rec.get("tol") else None
            for c in ("nfe", "steps", "n_samples"):
                row[c] = int(rec[c]) if rec[c].isdigit() else float(rec[c])  # adaptive rows: mean NFE
            for c in METRIC_COLUMNS:
                if c in rec:
                    row[c] = float(rec[c]) if rec[c] != "" else None
            out.append(row)
    return out


METRIC_COLUMNS = ("flops", "fid", "fd_ref", "sfid", "is", "precision", "recall", "traj_rmse", "seconds")
SWEEP_SPECS = {"flops": ".4g", "fid": ".3f", "fd_ref": ".4g", "sfid": ".3f", "is": ".3f", "precision": ".3f",
               "recall": ".3f", "traj_rmse": ".4g", "seconds": ".4g"}


def markdown_table(rows: Sequence[Row], columns: Sequence[str] = COLUMNS,
                   specs: Optional[Dict[str, str]] = None) -> str:
    """The rows as a GitHub Markdown table (same columns as the CSV; ``specs``: format per column)."""
    return markdown_text(rows, columns, SWEEP_SPECS if specs is None else specs)


def plot_fid_vs_nfe(rows: Sequence[Row], path: str | Path, title: str = "") -> Path:
    """FID against NFE (log x, log y), one curve per solver, the reference as a dashed line."""
    return plot_metric_vs_nfe(rows, path, "fid", "FID", title)


# The x axes of the plots: row key -> axis label.
X_AXES = {"nfe": "NFE (backbone calls)", "flops": "FLOPs per sample (in backbone calls)"}


def plot_metric_vs_nfe(rows: Sequence[Row], path: str | Path, metric: str, label: str, title: str = "",
                       x: str = "nfe") -> Path:
    """A metric against NFE (or another cost column) on log-log axes, one curve per solver.

    The reference solver is drawn as a dashed line and a star (when its value is positive:
    its trajectory error against itself is 0 and is left out). Rows whose cost or metric is
    missing or not positive are left out.

    Args:
        rows: sweep rows.
        path: ``.png`` destination.
        metric: row key, e.g. ``"fid"`` or ``"traj_rmse"``.
        label: y-axis label.
        title: figure title.
        x: the cost on the x axis, a key of ``X_AXES``: ``"nfe"`` or ``"flops"``.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (used as matplotlib.ticker)

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    by_solver: Dict[str, List[Tuple[float, float]]] = {}
    for row in rows:
        cost, value = row.get(x), row.get(metric)
        cost, value = (math.nan if cost is None else float(cost)), (math.nan if value is None else float(value))
        by_solver.setdefault(row["solver"], []).append((cost, value))
    for solver, pts in by_solver.items():
        pts = sorted(p for p in pts if p[0] > 0 and p[1] > 0)  # NaN compares False: left out
        if not pts:
            continue
        if solver == REFERENCE:
            cost, value = pts[0]
            unit = "NFE" if x == "nfe" else "backbone calls"
            ax.axhline(value, color="black", linestyle="--", linewidth=1.0, label=f"reference ({cost:.4g} {unit})")
            ax.plot([cost], [value], marker="*", color="black", markersize=10, linestyle="none")
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=solver)
    ax.set_xscale("log")
    ax.set_yscale("log")  # values span decades (a diverging low-NFE solver next to converged ones)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 10, 100 rather than 10^1, 10^2
    ax.xaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))  # 6, 20 rather than 6x10^0
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(label)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _safe(name: str) -> str:
    """A solver name as a file-name part (``dpm++2m`` stays readable)."""
    return re.sub(r"[^A-Za-z0-9+._-]", "_", name)


def grid_to_png_bytes(grid: Tensor) -> bytes:
    """``(3, H, W)`` (or ``(1, H, W)``) in ``[0, 1]`` -> PNG bytes."""
    from PIL import Image

    arr = (grid.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def save_grids(grids: Grids, folder: str | Path) -> List[Path]:
    """One ``<solver>_nfe<nfe>.png`` per sweep point.

    Returns:
        The written paths.
    """
    return [atomic_write_bytes(Path(folder) / f"{_safe(s)}_nfe{n:03d}.png", grid_to_png_bytes(g))
            for (s, n), g in sorted(grids.items())]


class NpzSampleWriter:
    """Sample sink for the engine: ``<folder>/<solver>_nfe<nfe>.npz`` with ``arr_0`` (ADM format)."""

    def __init__(self, folder: str | Path) -> None:
        """Create the writer.

        Args:
            folder: destination folder (created on the first write).
        """
        self.folder = Path(folder)
        self.written: List[Path] = []

    def __call__(self, solver: str, nfe: int, images: Tensor) -> None:
        """Write uint8 ``(N, H, W, C)`` samples (greyscale is kept as one channel)."""
        buf = io.BytesIO()
        np.savez(buf, arr_0=images.cpu().numpy().astype(np.uint8))
        self.written.append(atomic_write_bytes(self.folder / f"{_safe(solver)}_nfe{nfe:03d}.npz", buf.getvalue()))


# What a reader compares first: the solver's error in distribution and per sample, then FID.
DASHBOARD_METRICS = (("fd_ref", "FD to the reference samples"), ("traj_rmse", "trajectory RMSE"),
                     ("fid", "FID"), ("sfid", "sFID"), ("is", "Inception score"), ("precision", "precision"),
                     ("recall", "recall"), ("seconds", "seconds per image"),
                     ("flops", "FLOPs per sample (backbone calls)"))


def sweep_layout(rows: Sequence[Row], prefix: str = "nfe_sweep") -> Dict[str, Any]:
    """TensorBoard custom-scalars layout: one multiline chart per metric, every solver on it.

    The scalars tab draws one card per tag (one per solver and metric); the "Custom Scalars"
    tab draws these charts, so all solvers' curves against NFE share one chart.
    """
    present = {m for row in rows for m in METRIC_COLUMNS
               if row.get(m) is not None and not math.isnan(float(row[m]))}
    charts = {f"{label} vs NFE": ["Multiline", [rf"^{prefix}/{metric}/"]]
              for metric, label in DASHBOARD_METRICS if metric in present}
    return {f"{prefix}: all solvers against NFE": charts}


def log_tensorboard(writer: Any, rows: Sequence[Row], grids: Mapping[Tuple[str, int], Tensor],
                    prefix: str = "nfe_sweep") -> None:
    """Scalars ``<prefix>/<metric>/<solver>`` with step = NFE (one curve per solver) and grids,
    plus a custom-scalars layout that draws each metric for all solvers on one chart.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or Lightning's ``logger.experiment``).
        rows: sweep rows.
        grids: ``(solver, nfe) -> (3, H, W)`` images, logged as ``<prefix>/samples/<solver>``.
        prefix: tag prefix.
    """
    for row in rows:
        for metric in METRIC_COLUMNS:
            if row.get(metric) is None:  # not provided by this extractor/reference
                continue
            value = float(row[metric])
            if not math.isnan(value):
                writer.add_scalar(f"{prefix}/{metric}/{row['solver']}", value, global_step=int(row["nfe"]))
    for (solver, nfe), grid in sorted(grids.items()):
        writer.add_image(f"{prefix}/samples/{solver}", grid.float().clamp(0, 1).cpu(), global_step=int(nfe))
    writer.add_custom_scalars(sweep_layout(rows, prefix))
    writer.flush()


def log_solver_runs(folder: str | Path, rows: Sequence[Row], prefix: str = "nfe_sweep") -> List[Path]:
    """One TensorBoard run per solver, ``<folder>/<solver>/``, all with the tags ``<prefix>/<metric>``.

    TensorBoard draws runs that share a tag on one chart, each in its own colour with its name
    in the legend: in the "Time Series" and "Scalars" tabs every metric is then one chart against
    NFE (step) with a line per solver.

    Returns:
        The run folders written.
    """
    from torch.utils.tensorboard import SummaryWriter

    written = []
    for solver in dict.fromkeys(row["solver"] for row in rows):
        run = Path(folder) / _safe(solver)
        writer = SummaryWriter(log_dir=str(run))
        try:
            for row in (r for r in rows if r["solver"] == solver):
                for metric in METRIC_COLUMNS:
                    value = row.get(metric)
                    if value is not None and not math.isnan(float(value)):
                        writer.add_scalar(f"{prefix}/{metric}", float(value), global_step=int(row["nfe"]))
        finally:
            writer.close()
        written.append(run)
    return written


def write_reports(rows: Sequence[Row], grids: Grids, out_dir: str | Path, title: str = "") -> Dict[str, Path]:
    """``results.csv``, ``results.md``, ``fid_vs_nfe.png``, ``fd_ref_vs_nfe.png``,
    ``traj_rmse_vs_nfe.png``, ``traj_rmse_vs_flops.png``, ``grids/*.png`` in ``out_dir``.

    Args:
        rows: sweep rows.
        grids: sample grids per ``(solver, nfe)``.
        out_dir: destination folder.
        title: what the sweep is (e.g. the experiment name); each plot's title adds its metric.

    Returns:
        Name -> path of what was written.
    """
    out = Path(out_dir)

    def titled(metric: str) -> str:
        return f"{title}: {metric} vs NFE" if title else f"{metric} vs NFE"

    paths = {
        "csv": atomic_write_text(out / "results.csv", rows_to_csv(rows)),
        "md": atomic_write_text(out / "results.md", markdown_table(rows)),
        "plot": plot_fid_vs_nfe(rows, out / "fid_vs_nfe.png", title=titled("FID")),
        "plot_fd_ref": plot_metric_vs_nfe(rows, out / "fd_ref_vs_nfe.png", "fd_ref",
                                          "Fréchet distance to the reference samples",
                                          title=titled("FD to the reference (same noises)")),
        "plot_traj": plot_metric_vs_nfe(rows, out / "traj_rmse_vs_nfe.png", "traj_rmse",
                                        "trajectory RMSE vs. reference", title=titled("trajectory RMSE")),
        "plot_traj_flops": plot_metric_vs_nfe(rows, out / "traj_rmse_vs_flops.png", "traj_rmse",
                                              "trajectory RMSE vs. reference", x="flops",
                                              title=f"{title}: trajectory RMSE vs FLOPs" if title
                                              else "trajectory RMSE vs FLOPs"),
    }
    save_grids(grids, out / "grids")
    paths["grids"] = out / "grids"
    return paths
