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
- ``flops``: the FLOPs of a sample's solve in units of one backbone forward on one sample (see
  ``bafm.eval.plan.COLUMNS``);
- ``seconds``: sampling wall time per image on this device (CUDA-synchronised).

Samples are split across ranks by index, in groups of ``reference_batch_size`` consecutive
samples dealt round-robin (``partition``); features are gathered to rank 0, metrics computed
there, and the rows broadcast so every rank returns them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from bafm.eval.distributed import broadcast_object, world_info
from bafm.eval.features import FeatureExtractor
from bafm.eval.metrics import FeatureStats, ReferenceStats
from bafm.eval.plan import (COLUMNS, Grids, Row, SampleSink, SweepInputError, SweepPoint, SweepSettings,
                            check_optimized_grids, partition, plan_sweep)  # fmt: skip
from bafm.eval.points import ReferenceCache, SweepContext, network_flops_for, reduce_point, run_point
from bafm.sampling import REFERENCE, latent_shape
from bafm.solvers import is_adaptive
from bafm.solvers.grid_store import GridTable

__all__ = ["COLUMNS", "ReferenceCache", "Row", "SweepEngine", "SweepInputError", "SweepPoint", "SweepResult",
           "SweepSettings", "evaluate_sweep", "partition", "plan_sweep"]


def evaluate_sweep(
    backbone: nn.Module,
    sidenet: Optional[nn.Module],
    *,
    solvers: Sequence[str],
    budgets: Mapping[str, Sequence[int]] | Sequence[int],
    num_samples: int,
    settings: SweepSettings,
    decoder: Callable[[Tensor], Tensor],
    feature_extractor: FeatureExtractor,
    reference_stats: Optional[FeatureStats | ReferenceStats],
    device: torch.device | str,
    reference_cache: Optional[ReferenceCache] = None,
    progress: bool = True,
    sample_sink: Optional[SampleSink] = None,
    shape: Optional[Sequence[int]] = None,
    grid_table: Optional[GridTable] = None,
    tolerances: Optional[Mapping[str, Sequence[float]]] = None,
) -> Tuple[List[Row], Grids]:
    """Sample, decode and score every (solver, budget); the reference solver first.

    Args:
        backbone: frozen module with ``velocity(x, t, y)`` and ``num_classes``.
        sidenet: module with ``velocity(x, v, t, h, y)`` (e.g. the EMA SideNet), or None when
            no SideNet solver is swept.
        solvers: solver names; listing ``reference`` forces its row.
        budgets: NFE budgets per solver, or one list for all solvers.
        num_samples: samples per sweep point (global, over all ranks).
        settings: seed, sampling, batch sizes, reference tolerances, grid images, IS splits.
        decoder: latents ``(B, C, H, W)`` -> images ``(B, C', H', W')`` in ``[0, 1]``.
        feature_extractor: images -> ``(features, logits or None)``.
        reference_stats: real-data statistics for FID, or a ``ReferenceStats`` that adds spatial
            statistics (sFID) and real features (precision/recall); None leaves ``fid`` NaN.
        device: where to sample.
        reference_cache: reference results kept between calls (e.g. by the training callback).
        progress: tqdm bar on rank 0 (images/s, ETA).
        sample_sink: called on rank 0 with each point's samples as uint8 ``(N, H, W, C)``.
        shape: latent shape ``(C, H, W)``; read from the backbone when None.
        grid_table: the optimized grids, required when ``settings.sampling.grid`` is ``"optimized"``.
        tolerances: tolerance levels per adaptive solver (see ``plan_sweep``); their rows report
            the measured mean NFE per sample.

    Returns:
        ``(rows, grids)``. ``rows`` (every rank): dicts with the keys of ``COLUMNS``, the reference
        row first; ``grids`` (rank 0; empty elsewhere): ``(solver, nfe) -> (3, H', W')`` images
        in ``[0, 1]``.

    Raises:
        SweepInputError: bad solvers, budgets or missing SideNet, raised before any sampling.
    """
    st = settings
    points = plan_sweep(solvers, budgets, sidenet_available=sidenet is not None, sidenet_hint=st.sidenet_hint,
                        tolerances=tolerances)
    if st.sampling.grid == "optimized":
        check_optimized_grids(points, grid_table)
    include_reference = st.include_reference or REFERENCE in solvers
    rank, world = world_info()
    if num_samples < 1 or st.batch_size < 1 or st.reference_batch_size < 1:
        raise SweepInputError(f"num_samples ({num_samples}), batch_size ({st.batch_size}) and "
                              f"reference_batch_size ({st.reference_batch_size}) must be positive.")
    device = torch.device(device)
    shape = tuple(shape) if shape is not None else latent_shape(backbone)
    groups = partition(num_samples, st.reference_batch_size, rank, world)
    local = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.int64)
    # A rank without samples (fewer groups than ranks) still joins every collective, with no batch.
    batches = [b for b in local.split(st.batch_size) if b.numel()]

    cache = reference_cache if reference_cache is not None else ReferenceCache()
    key = (id(backbone), st.seed, tuple(shape), st.reference, st.reference_batch_size, st.sampling.cfg_scale,
           st.sampling.guidance_interval,
           feature_extractor.name)
    if cache.key != key:
        cache.reset(key)
    flops = network_flops_for(backbone, sidenet, shape, device, cache)

    todo = ([SweepPoint(REFERENCE, 0, 0)] if include_reference else []) + points
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * num_samples, unit="img", dynamic_ncols=True, desc="nfe sweep")
    ctx = SweepContext(
        backbone=backbone, sidenet=sidenet, settings=st, shape=shape, decoder=decoder, extractor=feature_extractor,
        reference_stats=reference_stats, device=device, cache=cache, use_reference=include_reference,
        keep_uint8=sample_sink is not None, bar=bar, world=world, grid_table=grid_table, flops=flops,
    )

    rows: List[Row] = []
    grids: Grids = {}
    try:
        for point in todo:
            if bar is not None:
                bar.set_description(point.label + (f" @ {point.nfe} NFE" if point.nfe else ""))
            # The adaptive reference shares one step size per solve: it always solves whole groups.
            local_results = run_point(point, groups if point.solver == REFERENCE else batches, ctx)
            row, grid, uint8 = reduce_point(point, local_results, ctx)
            rows.append(row)
            if rank != 0:
                continue
            # A fixed-step point keeps its requested budget as key; the reference its counted NFE.
            adaptive = is_adaptive(point.solver)
            nfe = int(round(row["nfe"])) if adaptive else point.nfe
            if not adaptive and row["nfe"] != point.nfe:
                warnings.warn(f"{point.solver}: {point.nfe} NFE requested, {row['nfe']} counted.", stacklevel=2)
            if grid is not None:
                grids[(point.label, nfe)] = grid
            if sample_sink is not None and uint8 is not None:
                sample_sink(point.label, nfe, uint8)
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


class SweepEngine:
    """``evaluate_sweep`` with its fixed inputs bound and the reference cache kept between runs.

    Build it once (``bafm.eval.inputs.build_sweep_engine`` checks every file first), then ``run``
    it with any backbone / SideNet pair, e.g. the EMA SideNet at each evaluation during training.
    """

    def __init__(
        self,
        settings: SweepSettings,
        *,
        decoder: Callable[[Tensor], Tensor],
        feature_extractor: FeatureExtractor,
        reference_stats: Optional[FeatureStats | ReferenceStats],
        grid_table: Optional[GridTable] = None,
    ) -> None:
        """Bind the fixed inputs (see ``evaluate_sweep`` for each)."""
        self.settings = settings
        self.decoder = decoder
        self.feature_extractor = feature_extractor
        self.reference_stats = reference_stats
        self.grid_table = grid_table
        self.reference_cache = ReferenceCache()

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
        sample_sink: Optional[SampleSink] = None,
        tolerances: Optional[Mapping[str, Sequence[float]]] = None,
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
            sample_sink: see ``evaluate_sweep``.
            tolerances: tolerance levels per adaptive solver (see ``plan_sweep``).

        Returns:
            ``SweepResult`` (rows on every rank, grids on rank 0).
        """
        rows, grids = evaluate_sweep(
            backbone, sidenet, solvers=solvers, budgets=budgets, num_samples=num_samples, settings=self.settings,
            decoder=self.decoder, feature_extractor=self.feature_extractor, reference_stats=self.reference_stats,
            device=device, reference_cache=self.reference_cache, progress=progress, sample_sink=sample_sink,
            grid_table=self.grid_table, tolerances=tolerances,
        )
        return SweepResult(rows, grids)
