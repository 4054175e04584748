"""The NFE-sweep evaluation engine, shared by ``bafm eval-nfe-sweep`` and the training callback.

For each solver and NFE budget, every sample ``i < num_samples`` is generated from the same
noise and label (see ``bafm.sampling``), decoded to ``[0, 1]`` images and summarised by:

- ``fid``: Fréchet distance of the extractor's features to the reference statistics;
- ``sfid``: the same for its spatial features (Inception only; blank for other extractors);
- ``is``: inception score of the extractor's logits (NaN for extractors without logits);
- ``precision``, ``recall``: k-NN manifold precision and recall (k = 3) against the
  reference's real features (blank when the reference has none);
- ``traj_rmse``: mean over samples of the RMS latent distance to the ``reference`` solver's
  sample from the same noise and label (the reference is solved once and cached);
- ``seconds``: sampling wall time per image on this device (CUDA-synchronised).

Samples are split across ranks by index, in groups of ``reference_batch_size`` consecutive
samples dealt round-robin (``partition``); features are gathered to rank 0, metrics computed
there, and the rows broadcast so every rank returns them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from bafm.eval.distributed import broadcast_object, world_info
from bafm.eval.features import FeatureExtractor
from bafm.eval.metrics import FeatureStats, ReferenceStats
from bafm.eval.points import COLUMNS, ReferenceCache, Row, SweepContext, SweepPoint, reduce_point, run_point
from bafm.sampling import REFERENCE, SamplingSettings, latent_shape, uses_side_fn
from bafm.solvers import SOLVERS
from bafm.solvers.grid_store import GridTable
from bafm.solvers.grids import steps_for_nfe

__all__ = ["COLUMNS", "ReferenceCache", "Row", "SweepEngine", "SweepInputError", "SweepPoint", "SweepResult",
           "evaluate_sweep", "partition", "plan_sweep"]

Grids = Dict[Tuple[str, int], Tensor]
# sample_sink(solver, nfe, images): all samples of one sweep point, uint8 (N, H, W, C), rank 0.
SampleSink = Callable[[str, int, Tensor], None]


class SweepInputError(ValueError):
    """Bad sweep input (solver, budget, missing file), detected before any sampling."""


def partition(num_samples: int, group: int, rank: int, world: int) -> List[Tensor]:
    """This rank's share of the sample indices: groups ``[g G, (g + 1) G)`` with ``g % world == rank``.

    Args:
        num_samples: total samples ``N``.
        group: group size ``G``.
        rank: this process's rank.
        world: number of processes.

    Returns:
        The rank's groups, each an int64 ``(<= G,)`` tensor of consecutive indices (possibly none).
    """
    return [torch.arange(g * group, min((g + 1) * group, num_samples), dtype=torch.int64)
            for g in range(rank, math.ceil(num_samples / group), world)]


def plan_sweep(
    solvers: Sequence[str],
    budgets: Mapping[str, Sequence[int]] | Sequence[int],
    *,
    sidenet_available: bool,
    sidenet_hint: str = "",
) -> List[SweepPoint]:
    """Check solver names, budgets and the SideNet, and list the sweep points.

    Called before anything is sampled, so that bad input fails at once.

    Args:
        solvers: solver names (``reference`` is skipped here: it is always its own row).
        budgets: NFE budgets per solver (``{"euler": [5, 10]}``) or one list for all.
        sidenet_available: whether a SideNet is loaded or its file exists.
        sidenet_hint: the SideNet checkpoint path expected, for the error message.

    Returns:
        The sweep points in the order given.

    Raises:
        SweepInputError: unknown solver (lists the valid ones), missing or infeasible budget (names
            the nearest feasible ones), or a SideNet solver without a SideNet (names the path).
    """
    valid = sorted(SOLVERS)
    points: List[SweepPoint] = []
    for name in solvers:
        if name not in SOLVERS:
            raise SweepInputError(f"unknown solver '{name}' in eval.solvers; valid solvers: {', '.join(valid)}.")
    for name in solvers:
        if name == REFERENCE:
            continue
        if uses_side_fn(name) and not sidenet_available:
            where = f" at '{sidenet_hint}'" if sidenet_hint else ""
            raise SweepInputError(
                f"solver '{name}' needs a trained SideNet, none found{where}. Train one with `make train` "
                "(it exports the EMA SideNet into runs/<experiment>/, used from then on), point sidenet.path "
                "at one, or drop "
                f"'{name}' from eval.solvers."
            )
        if isinstance(budgets, Mapping):
            if name not in budgets:
                raise SweepInputError(f"no NFE budgets for solver '{name}': set eval.budgets.{name}=[...].")
            wanted = list(budgets[name])
        else:
            wanted = list(budgets)
        for nfe in wanted:
            if isinstance(nfe, bool) or int(nfe) != nfe or int(nfe) < 1:
                raise SweepInputError(f"eval.budgets.{name}: budget {nfe!r} is not a positive integer.")
            try:
                steps = steps_for_nfe(name, int(nfe))
            except ValueError as err:
                raise SweepInputError(f"eval.budgets.{name}: {err}") from None
            points.append(SweepPoint(name, int(nfe), int(steps)))
    return points


def check_optimized_grids(points: Sequence[SweepPoint], table: Optional[GridTable]) -> None:
    """Raise ``SweepInputError`` unless ``table`` holds a grid for every fixed-grid point."""
    if table is None:
        raise SweepInputError("sampling.grid is 'optimized' but no optimized grid file was loaded.")
    for point in points:
        if SOLVERS[point.solver].nfe_per_step is not None and not table.has(point.solver, point.nfe):
            try:
                table.grid(point.solver, point.nfe)
            except ValueError as err:
                raise SweepInputError(str(err)) from None


def evaluate_sweep(
    backbone: nn.Module,
    sidenet: Optional[nn.Module],
    *,
    solvers: Sequence[str],
    budgets: Mapping[str, Sequence[int]] | Sequence[int],
    num_samples: int,
    seed: int,
    sampling: SamplingSettings,
    decoder: Callable[[Tensor], Tensor],
    feature_extractor: FeatureExtractor,
    reference_stats: Optional[FeatureStats | ReferenceStats],
    batch_size: int,
    device: torch.device | str,
    reference_cache: Optional[ReferenceCache] = None,
    progress: bool = True,
    include_reference: bool = True,
    reference_rtol: float = 1e-5,
    reference_atol: float = 1e-5,
    reference_batch_size: int = 64,
    grid_images: int = 64,
    sample_sink: Optional[SampleSink] = None,
    shape: Optional[Sequence[int]] = None,
    is_splits: int = 10,
    sidenet_hint: str = "",
    grid_table: Optional[GridTable] = None,
) -> Tuple[List[Row], Grids]:
    """Sample, decode and score every (solver, budget); the reference solver first.

    Args:
        backbone: frozen module with ``velocity(x, t, y)`` and ``num_classes``.
        sidenet: module with ``velocity(x, v, t, h, y)`` (e.g. the EMA SideNet), or None when
            no SideNet solver is swept.
        solvers: solver names; listing ``reference`` forces its row.
        budgets: NFE budgets per solver, or one list for all solvers.
        num_samples: samples per sweep point (global, over all ranks).
        seed: base seed; sample ``i`` starts from noise seeded with ``seed + i``.
        sampling: time grid and guidance.
        decoder: latents ``(B, C, H, W)`` -> images ``(B, C', H', W')`` in ``[0, 1]``.
        feature_extractor: images -> ``(features, logits or None)``.
        reference_stats: real-data statistics for FID, or a ``ReferenceStats`` that adds spatial
            statistics (sFID) and real features (precision/recall); None leaves ``fid`` NaN.
        batch_size: samples per solve on each rank.
        device: where to sample.
        reference_cache: reference results kept between calls (e.g. by the training callback).
        progress: tqdm bar on rank 0 (images/s, ETA).
        include_reference: evaluate the reference solver (needed for ``traj_rmse``).
        reference_rtol: relative tolerance of the reference solver.
        reference_atol: absolute tolerance of the reference solver.
        reference_batch_size: the reference solves fixed groups of this many consecutive samples
            (its adaptive step size is shared by a solve), so its samples, too, are the same for
            any ``batch_size`` and number of processes.
        grid_images: the first this-many samples of each point form its image grid.
        sample_sink: called on rank 0 with each point's samples as uint8 ``(N, H, W, C)``.
        shape: latent shape ``(C, H, W)``; read from the backbone when None.
        is_splits: splits of the inception score.
        sidenet_hint: the SideNet path expected, for the missing-SideNet error.
        grid_table: the optimized grids, required when ``sampling.grid`` is ``"optimized"``.

    Returns:
        ``(rows, grids)``. ``rows`` (every rank): dicts with the keys of ``COLUMNS``, the reference
        row first; ``grids`` (rank 0; empty elsewhere): ``(solver, nfe) -> (3, H', W')`` images
        in ``[0, 1]``.

    Raises:
        SweepInputError: bad solvers, budgets or missing SideNet, raised before any sampling.
    """
    points = plan_sweep(solvers, budgets, sidenet_available=sidenet is not None, sidenet_hint=sidenet_hint)
    if sampling.grid == "optimized":
        check_optimized_grids(points, grid_table)
    include_reference = include_reference or REFERENCE in solvers
    rank, world = world_info()
    if num_samples < 1 or batch_size < 1 or reference_batch_size < 1:
        raise SweepInputError(f"num_samples ({num_samples}), batch_size ({batch_size}) and "
                              f"reference_batch_size ({reference_batch_size}) must be positive.")
    device = torch.device(device)
    shape = tuple(shape) if shape is not None else latent_shape(backbone)
    groups = partition(num_samples, reference_batch_size, rank, world)
    local = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.int64)
    # A rank without samples (fewer groups than ranks) still joins every collective, with no batch.
    batches = [b for b in local.split(batch_size) if b.numel()]

    cache = reference_cache if reference_cache is not None else ReferenceCache()
    key = (id(backbone), int(seed), tuple(shape), float(reference_rtol), float(reference_atol),
           int(reference_batch_size), float(sampling.cfg_scale), sampling.guidance_interval, feature_extractor.name)
    if cache.key != key:
        cache.reset(key)

    todo = ([SweepPoint(REFERENCE, 0, 0)] if include_reference else []) + points
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * num_samples, unit="img", dynamic_ncols=True, desc="nfe sweep")
    ctx = SweepContext(
        backbone=backbone, sidenet=sidenet, seed=int(seed), shape=shape, sampling=sampling,
        decoder=decoder, extractor=feature_extractor, reference_stats=reference_stats, device=device,
        cache=cache, use_reference=include_reference, rtol=float(reference_rtol), atol=float(reference_atol),
        grid_images=int(grid_images), keep_uint8=sample_sink is not None, is_splits=int(is_splits),
        batch_size=int(batch_size), bar=bar, world=world, grid_table=grid_table,
    )

    rows: List[Row] = []
    grids: Grids = {}
    try:
        for point in todo:
            if bar is not None:
                bar.set_description(point.solver + (f" @ {point.nfe} NFE" if point.solver != REFERENCE else ""))
            # The adaptive reference shares one step size per solve: it always solves whole groups.
            local_results = run_point(point, groups if point.solver == REFERENCE else batches, ctx)
            row, grid, uint8 = reduce_point(point, local_results, ctx)
            rows.append(row)
            if rank != 0:
                continue
            # A fixed-step point keeps its requested budget as key; the reference its counted NFE.
            nfe = row["nfe"] if point.solver == REFERENCE else point.nfe
            if point.solver != REFERENCE and row["nfe"] != point.nfe:
                warnings.warn(f"{point.solver}: {point.nfe} NFE requested, {row['nfe']} counted.", stacklevel=2)
            if grid is not None:
                grids[(point.solver, nfe)] = grid
            if sample_sink is not None and uint8 is not None:
                sample_sink(point.solver, nfe, uint8)
    finally:
        if bar is not None:
            bar.close()
    return broadcast_object(rows), grids


@dataclass
class SweepResult:
    """Rows and image grids of one sweep; unpacks as ``rows, grids = result``."""

    rows: List[Row]
    grids: Grids = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.rows, self.grids))

    def write_csv(self, path: str | Path) -> Path:
        """Write ``results.csv``-style rows (exact columns) atomically to ``path``."""
        from bafm.eval.report import rows_to_csv
        from bafm.io import atomic_write_text

        return atomic_write_text(path, rows_to_csv(self.rows))

    def markdown(self) -> str:
        """The rows as a Markdown table."""
        from bafm.eval.report import markdown_table

        return markdown_table(self.rows)


class SweepEngine:
    """``evaluate_sweep`` with its fixed inputs bound and the reference cache kept between runs.

    Build it once (``from_config`` checks every file first), then ``run`` it with any backbone /
    SideNet pair, e.g. the EMA SideNet at each evaluation during training.
    """

    def __init__(
        self,
        *,
        sampling: SamplingSettings,
        decoder: Callable[[Tensor], Tensor],
        feature_extractor: FeatureExtractor,
        reference_stats: Optional[FeatureStats | ReferenceStats],
        seed: int = 0,
        batch_size: int = 250,
        reference_rtol: float = 1e-5,
        reference_atol: float = 1e-5,
        reference_batch_size: int = 64,
        include_reference: bool = True,
        grid_images: int = 64,
        is_splits: int = 10,
        sidenet_hint: str = "",
        grid_table: Optional[GridTable] = None,
    ) -> None:
        """Bind the fixed inputs (see ``evaluate_sweep`` for each)."""
        self.sampling = sampling
        self.decoder = decoder
        self.feature_extractor = feature_extractor
        self.reference_stats = reference_stats
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.reference_rtol = float(reference_rtol)
        self.reference_atol = float(reference_atol)
        self.reference_batch_size = int(reference_batch_size)
        self.include_reference = bool(include_reference)
        self.grid_images = int(grid_images)
        self.is_splits = int(is_splits)
        self.sidenet_hint = sidenet_hint
        self.grid_table = grid_table
        self.reference_cache = ReferenceCache()

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device | str = "cpu") -> "SweepEngine":
        """Build decoder, feature extractor and reference statistics from ``cfg``.

        Args:
            cfg: experiment config (``eval``, ``sampling``, ``data``, ``seed`` via ``eval.seed``).
            device: where the feature extractor (and reference features) run.

        Raises:
            SweepInputError: a file it needs is missing (names it and how to make it).
        """
        from bafm.config import grid_file_path, sampling_settings, sidenet_path
        from bafm.eval.inputs import build_eval_inputs
        from bafm.solvers.grid_store import load_grid_table

        table = None
        if str(cfg.sampling.grid) == "optimized":
            try:
                table = load_grid_table(grid_file_path(cfg))
            except (FileNotFoundError, ValueError) as err:
                raise SweepInputError(str(err)) from None
        decoder, extractor, stats = build_eval_inputs(cfg, device)
        ec = cfg.eval
        return cls(
            sampling=sampling_settings(cfg), decoder=decoder, feature_extractor=extractor, reference_stats=stats,
            seed=ec.seed, batch_size=ec.batch_size, reference_rtol=ec.reference_rtol,
            reference_atol=ec.reference_atol, reference_batch_size=ec.reference_batch_size,
            include_reference=ec.include_reference,
            grid_images=ec.grid_images, is_splits=ec.is_splits, sidenet_hint=str(sidenet_path(cfg)),
            grid_table=table,
        )

    def run(
        self,
        backbone: nn.Module,
        sidenet: Optional[nn.Module],
        *,
        solvers: Sequence[str],
        budgets: Mapping[str, Sequence[int]] | Sequence[int],
        num_samples: int,
        device: torch.device | str,
        progress: bool = True,
        batch_size: Optional[int] = None,
        sample_sink: Optional[SampleSink] = None,
    ) -> SweepResult:
        """One sweep; the reference solutions are reused from earlier runs.

        Args:
            backbone: frozen backbone (``velocity(x, t, y)``, ``num_classes``).
            sidenet: SideNet (``velocity(x, v, t, h, y)``) or None.
            solvers: solver names.
            budgets: NFE budgets per solver, or one list for all.
            num_samples: samples per point.
            device: sampling device.
            progress: tqdm bar on rank 0.
            batch_size: overrides the bound batch size.
            sample_sink: see ``evaluate_sweep``.

        Returns:
            ``SweepResult`` (rows on every rank, grids on rank 0).
        """
        rows, grids = evaluate_sweep(
            backbone, sidenet, solvers=solvers, budgets=budgets, num_samples=num_samples, seed=self.seed,
            sampling=self.sampling, decoder=self.decoder, feature_extractor=self.feature_extractor,
            reference_stats=self.reference_stats, batch_size=batch_size or self.batch_size, device=device,
            reference_cache=self.reference_cache, progress=progress, include_reference=self.include_reference,
            reference_rtol=self.reference_rtol, reference_atol=self.reference_atol,
            reference_batch_size=self.reference_batch_size, grid_images=self.grid_images,
            sample_sink=sample_sink, is_splits=self.is_splits, sidenet_hint=self.sidenet_hint,
            grid_table=self.grid_table,
        )
        return SweepResult(rows, grids)
