"""``bafm optimize-grid``: time grids that minimise the trajectory error, per solver and NFE budget.

For every requested solver and budget, the interior times of the grid are searched so that the
mean over a calibration set of the RMS distance between the solver's sample and the
reference's sample from the same noise and label (the sweep's ``traj_rmse``, against the same
``eval.reference_solver``: dopri5 at ``eval.reference_rtol``/``atol``, or RK4 at
``eval.reference_steps``) is smallest. The calibration set is ``optimize_grid.num_samples`` samples
with per-sample seeds
``optimize_grid.seed + i``, which must not overlap the evaluation seeds
``eval.seed + [0, eval.num_samples)``.

Search: derivative-free (``scipy.optimize.minimize``, Nelder-Mead by default, or Powell) over
``theta`` in ``R^(N-1)`` with ``t_k = 1 - sum_{j<=k} softmax([theta, 0])_j``, so every candidate is
a valid grid (strictly decreasing, exactly 1 and 0 at the ends); it starts from the uniform grid
(``theta = 0``) and keeps the best grid seen, which is never worse than uniform on the
calibration set. The solvers take grids as plain floats (``check_grid``), so no gradient flows
through them; a derivative-free search tunes exactly the registered solvers.

Grids are written, with the seeds, the objective, the search settings and the sha256 of the SideNet
they were searched for, to ``<runs_dir>/<name>/<sidenet stem>.grids.json``
(``bafm.config.grid_file_path``) or ``--out``, merged into the grids already there
as soon as each one is found (under a lock, so concurrent searches into one file keep each other's
grids, and an interrupted search keeps the ones it finished).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from bafm.config import ExperimentConfig, grid_file_path, sampling_settings, sidenet_path
from bafm.eval.grid_plan import GridSearchError, plan_search
from bafm.io import OutputFolderError, check_not_tracked, check_output_folder, file_lock
from bafm.sampling import SamplingSettings, latent_shape, reference_solve, sample_inputs, solve_batch
from bafm.solvers import uses_side_fn
from bafm.solvers.grid_store import GridTable, load_grid_table, save_grid_table
from bafm.solvers.ground_truth import Reference
from bafm.solvers.grids import steps_for_nfe, uniform_grid

KEEP_HINT = "its grids are kept: move it away or pass another file (--out)"
OBJECTIVE = "mean over calibration samples of the RMS latent distance to the reference solver's sample (traj_rmse)"


def grid_from_params(theta: np.ndarray) -> List[float]:
    """``[1, t_1, ..., t_{N-1}, 0]`` from ``N - 1`` free parameters (softmax of the step sizes)."""
    logits = np.concatenate([np.asarray(theta, dtype=np.float64), [0.0]])
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    interior = 1.0 - np.cumsum(weights)[:-1]
    return [1.0] + [float(t) for t in interior] + [0.0]


def params_from_grid(grid: Sequence[float]) -> np.ndarray:
    """Inverse of ``grid_from_params``."""
    steps = -np.diff(np.asarray(grid, dtype=np.float64))
    return np.log(steps[:-1]) - np.log(steps[-1])


class Calibration:
    """Fixed calibration noise, labels and reference samples; scores a (solver, grid).

    Args:
        backbone: frozen backbone (``velocity``, ``num_classes``).
        sidenet: SideNet or None.
        sampling: guidance settings (the grid is the one being scored).
        indices: calibration sample indices (seeds are ``seed + index``).
        seed: base seed.
        device: sampling device.
        batch_size: samples per solve.
        reference: the ground truth's solver and options (``eval.reference_solver`` and its keys, as in
            the sweep).
        reference_group: samples per reference solve (as in the sweep).
    """

    def __init__(self, backbone: nn.Module, sidenet: Optional[nn.Module], sampling: SamplingSettings, indices: Tensor,
                 seed: int, device: torch.device, batch_size: int, reference: Reference,
                 reference_group: int) -> None:
        self.backbone, self.sidenet, self.sampling, self.device = backbone, sidenet, sampling, device
        shape, classes = latent_shape(backbone), int(backbone.num_classes)
        self.batches: List[Tuple[Tensor, Tensor]] = [sample_inputs(idx, shape, seed, classes, device=device)
                                                     for idx in indices.split(batch_size)]
        refs = [reference_solve(backbone, *sample_inputs(idx, shape, seed, classes, device=device), sampling,
                                reference).x for idx in indices.split(reference_group)]
        self.reference = torch.cat(refs).double()
        self.backbone_calls = 0  # batched backbone calls spent by ``error``

    @torch.no_grad()
    def error(self, solver: str, grid: Sequence[float]) -> float:
        """Mean over samples of the RMS distance to the reference sample."""
        t_grid = torch.tensor(grid, dtype=torch.float64, device=self.device)
        total, start = 0.0, 0
        for noise, labels in self.batches:
            res = solve_batch(self.backbone, self.sidenet, solver, noise, labels, self.sampling, grid=t_grid)
            self.backbone_calls += res.nfe
            ref = self.reference[start : start + noise.shape[0]]
            total += float((res.x.double() - ref).flatten(1).pow(2).mean(dim=1).sqrt().sum())
            start += noise.shape[0]
        value = total / start
        return value if math.isfinite(value) else math.inf


def search_grid(calibration: Calibration, solver: str, nfe: int, method: str, max_evals: int) -> Dict[str, Any]:
    """Search one solver's grid at one budget.

    Returns:
        ``{"grid", "uniform", "optimized", "evals", "seconds", "backbone_calls"}``: the best grid,
        the objective on the uniform grid and on the best one, and the search's cost.
    """
    from scipy.optimize import minimize

    steps = steps_for_nfe(solver, nfe)
    uniform = uniform_grid(steps, dtype=torch.float64).tolist()
    calls_before, started = calibration.backbone_calls, time.perf_counter()
    best = {"grid": uniform, "value": calibration.error(solver, uniform)}
    uniform_value, evals = best["value"], 1

    def objective(theta: np.ndarray) -> float:
        nonlocal evals
        grid = grid_from_params(theta)
        if any(b >= a for a, b in zip(grid[:-1], grid[1:])):  # collapsed steps: not a grid
            return math.inf
        evals += 1
        value = calibration.error(solver, grid)
        if value < best["value"]:
            best.update(grid=grid, value=value)
        return value

    if steps > 1 and max_evals > 1:
        x0 = np.zeros(steps - 1)
        if method == "nelder-mead":
            simplex = np.vstack([x0] + [x0 + 0.5 * np.eye(steps - 1)[i] for i in range(steps - 1)])
            minimize(objective, x0, method="Nelder-Mead",
                     options={"maxfev": max_evals - 1, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-7})
        else:
            minimize(objective, x0, method="Powell", options={"maxfev": max_evals - 1, "xtol": 1e-3, "ftol": 1e-6})
    return {"grid": best["grid"], "uniform": uniform_value, "optimized": best["value"], "evals": evals,
            "seconds": time.perf_counter() - started, "backbone_calls": calibration.backbone_calls - calls_before}


def output_path(cfg: ExperimentConfig, out: Optional[str]) -> Path:
    """``--out`` (a ``.json`` file, or a folder for ``<sidenet stem>.grids.json``), else ``grid_file_path(cfg)``."""
    default = grid_file_path(cfg)
    if not out:
        return default
    return Path(out) if str(out).endswith(".json") else Path(out) / default.name


def optimize_grids(cfg: ExperimentConfig, out: Optional[str] = None, *, progress: bool = True) -> Path:
    """Search every requested (solver, NFE) grid and write them (see the module docstring).

    Returns:
        The JSON file written.

    Raises:
        GridSearchError: bad input (before any model is loaded).
    """
    from bafm.experiment import check_grids_match_sidenet, load_models, sidenet_fingerprint

    pairs = plan_search(cfg.optimize_grid, cfg.eval)
    oc, ec = cfg.optimize_grid, cfg.eval
    solvers = sorted({s for s, _ in pairs})
    side = sidenet_path(cfg)
    if any(uses_side_fn(s) for s in solvers) and not side.is_file():
        raise GridSearchError(f"a SideNet solver is requested but no SideNet is at '{side}'; train one with `make train`.")
    if not Path(cfg.backbone.path).is_file():
        raise GridSearchError(f"backbone checkpoint '{cfg.backbone.path}' not found.")
    dest = output_path(cfg, out)
    try:
        check_output_folder(dest.parent)
        if not (cfg.sampling.grid_file or str(out or "").endswith(".json")):  # a file the user did not name
            check_not_tracked(dest, "bafm optimize-grid's grid file", "pass the file itself with --out to replace it")
    except OutputFolderError as err:
        raise GridSearchError(str(err)) from None
    if dest.is_file():  # an unreadable file, or one of another SideNet, stops the run before any sampling
        table = _read_table(dest)
        try:
            check_grids_match_sidenet(table, side)
        except ValueError as err:
            raise GridSearchError(f"{err}; {KEEP_HINT}") from None
    name = str(ec.device)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    backbone, sidenet = load_models(cfg.backbone, cfg.sidenet, side, solvers, device)
    indices = torch.arange(int(oc.num_samples), dtype=torch.int64)
    reference = Reference.from_eval(ec)
    started = time.perf_counter()
    calibration = Calibration(backbone, sidenet, sampling_settings(cfg), indices, int(oc.seed), device, int(oc.batch_size),
                              reference, int(ec.reference_batch_size))
    reference_seconds = time.perf_counter() - started
    settings = {
        "calibration": {"seed": int(oc.seed), "num_samples": int(oc.num_samples),
                        "seeds": [int(oc.seed), int(oc.seed) + int(oc.num_samples) - 1],
                        "labels": "index % num_classes", "cfg_scale": float(cfg.sampling.cfg_scale),
                        "guidance_interval": [float(v) for v in cfg.sampling.guidance_interval],
                        "reference_seconds": reference_seconds},
        "search": {"method": str(oc.method), "max_evals": int(oc.max_evals), "start": "uniform",
                   "parameters": "t_k = 1 - cumsum(softmax([theta, 0]))_k, theta in R^(steps - 1)"},
    }
    meta = {
        "objective": {"metric": OBJECTIVE, "reference": reference.as_dict()},
        **settings,  # of the latest run; each result also records the settings that found it
        "models": {"backbone": str(cfg.backbone.path), "sidenet": str(side),
                   "sidenet_sha256": sidenet_fingerprint(side)},  # sampling.grid=optimized checks it
    }
    for solver, nfe in pairs:
        found = search_grid(calibration, solver, nfe, str(oc.method), int(oc.max_evals))
        grid = found.pop("grid")
        found.update({"calibration": {k: settings["calibration"][k] for k in ("seed", "num_samples")},
                      "search": {k: settings["search"][k] for k in ("method", "max_evals")}})
        merge_grid(dest, solver, nfe, grid, found, meta)  # at once: an interrupted run keeps what it found
        if progress:
            print(f"{solver} @ {nfe} NFE: traj_rmse {found['uniform']:.5g} (uniform) -> {found['optimized']:.5g} "
                  f"({found['evals']} evaluations, {found['seconds']:.1f} s)", file=sys.stderr)
    return dest


def _read_table(path: Path) -> GridTable:
    try:
        return load_grid_table(path)
    except ValueError as err:
        raise GridSearchError(f"{err}; {KEEP_HINT}") from None


def merge_grid(dest: Path, solver: str, nfe: int, grid: Sequence[float], result: Dict[str, Any],
               meta: Dict[str, Any]) -> Path:
    """Add one searched grid and its result to ``dest``, keeping every other grid already there.

    The read-modify-write holds a lock on ``dest``'s folder, so concurrent searches (say, one per
    solver) into the same file all keep their grids.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.parent):
        previous = _read_table(dest) if dest.is_file() else GridTable()
        grids = dict(previous.grids)
        results: Dict[str, Dict[str, Any]] = {s: dict(v) for s, v in previous.meta.get("results", {}).items()}
        grids[(solver, int(nfe))] = list(grid)
        results.setdefault(solver, {})[str(int(nfe))] = result
        return save_grid_table(dest, grids, {**meta, "results": results})


def run(cfg: ExperimentConfig, out: Optional[str] = None) -> int:
    """CLI entry (``bafm optimize-grid --config X [--out FILE_OR_DIR] [overrides]``).

    Returns:
        0 on success.

    Raises:
        GridSearchError: bad input, before anything is sampled (``bafm.cli`` reports it).
    """
    path = optimize_grids(cfg, out)
    print(f"grids: {path}")
    return 0
