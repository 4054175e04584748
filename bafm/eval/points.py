"""One sweep point (a solver at a budget): sample, decode and featurise on each rank, then
gather to rank 0 and turn the results into a row of metrics.

The reference solver's features per sample are cached with its latents, so each row's ``fd_ref``
(Fréchet distance to the reference samples from the same noises and labels) costs no sampling.

Each solve counts the rows that pass through the backbone and the SideNet (``NetworkRows``); with
each network's FLOPs per row (``bafm.models.flops``, measured once) they give the row's ``flops``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from bafm.eval.distributed import all_sum, gather_to_rank0, sync, world_info
from bafm.eval.features import FeatureExtractor, to_uint8
from bafm.eval.metrics import FeatureStats, ReferenceStats, fd_to_reference, inception_score, reference_metrics
from bafm.eval.plan import Row, SweepPoint, SweepSettings
from bafm.models.flops import NetworkFlops, measure_flops
from bafm.sampling import REFERENCE, grid_label, sample_inputs, solve_batch
from bafm.solvers import is_adaptive
from bafm.solvers.counting import NetworkRows
from bafm.solvers.grid_store import GridTable





@dataclass
class ReferenceCache:
    """The reference solver's results per sample index, reused across sweeps.

    Valid while ``key`` (backbone object, seed, guidance, tolerances, group size, latent shape,
    extractor) holds; the backbone's weights must not change (they are frozen in SideNet
    training).
    """

    key: Optional[Tuple[Any, ...]] = None
    latents: Dict[int, Tensor] = field(default_factory=dict)  # (C, H, W) on the CPU
    features: Dict[int, Tensor] = field(default_factory=dict)  # (D,)
    logits: Dict[int, Tensor] = field(default_factory=dict)  # (K,)
    spatial: Dict[int, Tensor] = field(default_factory=dict)  # (S,)
    nfe: Dict[int, float] = field(default_factory=dict)  # batch NFE each sample was solved with
    steps: Dict[int, float] = field(default_factory=dict)
    seconds: Dict[int, float] = field(default_factory=dict)  # sampling time per image
    flops: Dict[int, float] = field(default_factory=dict)  # work per sample, in backbone calls
    network_flops: Dict[Tuple[Any, ...], NetworkFlops] = field(default_factory=dict)  # see network_flops_for

    def reset(self, key: Tuple[Any, ...]) -> None:
        """Drop everything and adopt ``key``."""
        self.__init__(key=key)  # type: ignore[misc]


@dataclass
class LocalResults:
    """One rank's results for one sweep point."""

    indices: List[Tensor] = field(default_factory=list)
    features: List[Tensor] = field(default_factory=list)
    logits: List[Tensor] = field(default_factory=list)
    spatial: List[Tensor] = field(default_factory=list)
    rmse: List[Tensor] = field(default_factory=list)
    ref_features: List[Tensor] = field(default_factory=list)  # the reference's, same indices (fd_ref)
    grid_idx: List[Tensor] = field(default_factory=list)
    grid: List[Tensor] = field(default_factory=list)
    uint8: List[Tensor] = field(default_factory=list)
    nfe: float = 0.0  # sum over samples
    flops: float = 0.0  # sum over samples, in backbone calls
    steps: float = 0.0
    seconds: float = 0.0
    count: int = 0


@dataclass
class SweepContext:
    """Everything that stays fixed across the points of one sweep."""

    backbone: nn.Module
    sidenet: Optional[nn.Module]
    settings: SweepSettings  # its batch_size is the one in use
    shape: Tuple[int, ...]
    decoder: Callable[[Tensor], Tensor]
    extractor: FeatureExtractor
    reference_stats: Optional[FeatureStats | ReferenceStats]
    device: torch.device
    cache: ReferenceCache
    use_reference: bool
    keep_uint8: bool
    bar: Any = None  # tqdm bar on rank 0
    world: int = 1
    grid_table: Optional[GridTable] = None  # optimized grids, for sampling.grid = optimized
    flops: Optional[NetworkFlops] = None  # FLOPs per row of each network (None: the column stays NaN)

    def grid_name(self, solver: str) -> str:
        """The ``grid`` column: the reference's own (``Reference.grid_label``), else ``bafm.sampling.grid_label``."""
        if solver == REFERENCE:
            return self.settings.reference.grid_label
        return grid_label(solver, self.settings.sampling)

    def grid_for(self, point: "SweepPoint", device: torch.device) -> Optional[Tensor]:
        """The point's optimized grid, or None to let the sampler build ``sampling.grid``."""
        if is_adaptive(point.solver) or self.settings.sampling.grid != "optimized":
            return None
        if self.grid_table is None:
            raise ValueError("sampling.grid is 'optimized' but no grid table was loaded")
        return self.grid_table.grid(point.solver, point.nfe, device=device)


def network_flops_for(backbone: nn.Module, sidenet: Optional[nn.Module], shape: Tuple[int, ...],
                      device: torch.device, cache: ReferenceCache) -> NetworkFlops:
    """Each network's FLOPs per row, measured once and kept in ``cache`` for later sweeps.

    Keyed by the models' identities and the SideNet's configuration (its weights may change
    between sweeps during training; its FLOPs do not).
    """
    side_key = None
    if sidenet is not None:
        side_key = (id(sidenet), type(sidenet).__name__, repr(getattr(sidenet, "config", None)))
    key = (id(backbone), side_key, tuple(shape))
    if key not in cache.network_flops:
        cache.network_flops[key] = measure_flops(backbone, sidenet, shape, device)
    return cache.network_flops[key]


def image_grid(images: Tensor) -> Tensor:
    """``(N, C, H, W)`` in ``[0, 1]`` -> one ``(3, H', W')`` grid, about square."""
    from torchvision.utils import make_grid

    nrow = max(1, math.ceil(math.sqrt(images.shape[0])))
    return make_grid(images.float().clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)


@torch.no_grad()
def run_point(point: SweepPoint, batches: List[Tensor], ctx: SweepContext) -> LocalResults:
    """Sample, decode and featurise this rank's batches for one sweep point.

    Args:
        point: the solver and budget (``reference``: the cached ground truth).
        batches: this rank's global sample indices, one ``(B,)`` tensor per batch.
        ctx: the sweep's fixed settings.

    Returns:
        This rank's per-sample features, logits, trajectory errors, grid images and timings.
    """
    out = LocalResults()
    cache, device = ctx.cache, ctx.device
    is_ref = point.solver == REFERENCE
    t_grid = None if is_ref else ctx.grid_for(point, device)
    for idx in batches:
        ids = idx.tolist()
        if is_ref and all(i in cache.latents for i in ids):
            # Solved in an earlier sweep: reuse latents, features and timing.
            x = torch.stack([cache.latents[i] for i in ids]).to(device)
            needs_images = ctx.keep_uint8 or any(i < ctx.settings.grid_images for i in ids)
            images = ctx.decoder(x) if needs_images else None
            feats = torch.stack([cache.features[i] for i in ids])
            logits = torch.stack([cache.logits[i] for i in ids]) if ids[0] in cache.logits else None
            spatial = torch.stack([cache.spatial[i] for i in ids]) if ids[0] in cache.spatial else None
            nfe, steps = sum(cache.nfe[i] for i in ids), sum(cache.steps[i] for i in ids)
            flops = sum(cache.flops[i] for i in ids)
            elapsed = sum(cache.seconds[i] for i in ids)
        else:
            st = ctx.settings
            noise, labels = sample_inputs(idx, ctx.shape, st.seed, int(ctx.backbone.num_classes), device=device)
            opts = {"rtol": point.tol, "atol": point.tol} if point.tol is not None else {}
            work = NetworkRows()
            sync(device)
            start = time.perf_counter()
            res = solve_batch(ctx.backbone, None if is_ref else ctx.sidenet, point.solver, noise, labels, st.sampling,
                              nfe=None if is_adaptive(point.solver) else point.nfe, grid=t_grid, reference=st.reference,
                              work=work, **opts)
            sync(device)
            elapsed = time.perf_counter() - start
            x = res.x
            images = ctx.decoder(x)
            extracted = ctx.extractor.extract(images)
            feats, logits, spatial = extracted.features, extracted.logits, extracted.spatial
            # Adaptive BA counts each sample's calls; the others spend res.nfe on every sample.
            nfe, steps = res.mean_nfe() * len(ids), float(res.steps) * len(ids)
            flops = ctx.flops.backbone_calls(work) if ctx.flops is not None else math.nan
            if is_ref:
                for r, i in enumerate(ids):
                    cache.latents[i] = x[r].detach().cpu()
                    cache.features[i] = feats[r].float().cpu()
                    if logits is not None:
                        cache.logits[i] = logits[r].float().cpu()
                    if spatial is not None:
                        cache.spatial[i] = spatial[r].float().cpu()
                    cache.nfe[i], cache.steps[i] = float(res.nfe), float(res.steps)
                    cache.seconds[i] = elapsed / len(ids)
                    cache.flops[i] = flops / len(ids)
        out.indices.append(idx)
        out.features.append(feats.float().cpu())
        if logits is not None:
            out.logits.append(logits.float().cpu())
        if spatial is not None:
            out.spatial.append(spatial.float().cpu())
        if is_ref:
            out.rmse.append(torch.zeros(len(ids), dtype=torch.float64))
        elif ctx.use_reference:
            ref = torch.stack([cache.latents[i] for i in ids]).to(device=device, dtype=torch.float64)
            diff = (x.double() - ref).flatten(1)  # (B, C * H * W)
            out.rmse.append(diff.pow(2).mean(dim=1).sqrt().cpu())
            out.ref_features.append(torch.stack([cache.features[i] for i in ids]))
        in_grid = idx < ctx.settings.grid_images
        out.grid_idx.append(idx[in_grid])
        if images is not None:
            out.grid.append(images[in_grid.to(images.device)].float().clamp(0, 1).cpu())
            if ctx.keep_uint8:
                out.uint8.append(to_uint8(images).permute(0, 2, 3, 1).cpu())  # (B, H, W, C)
        out.nfe += nfe
        out.flops += flops
        out.steps += steps
        out.seconds += elapsed
        out.count += len(ids)
        if ctx.bar is not None:
            ctx.bar.update(len(ids) * ctx.world)
    return out


def reduce_point(
    point: SweepPoint, local: LocalResults, ctx: SweepContext
) -> Tuple[Row, Optional[Tensor], Optional[Tensor]]:
    """Gather one point's results to rank 0 and compute its row there.

    Every rank must call it (collectives inside).

    Args:
        point: the sweep point.
        local: this rank's results from ``run_point``.
        ctx: the sweep's fixed settings.

    Returns:
        ``(row, grid, uint8)``: the row (metrics NaN off rank 0), the ``(3, H, W)`` image grid
        and the uint8 ``(N, H, W, C)`` samples when kept (both None off rank 0).
    """
    rank, _ = world_info()
    device = ctx.device

    def cat(parts: List[Tensor]) -> Optional[Tensor]:
        return torch.cat(parts) if parts else None

    idx = torch.cat(local.indices) if local.indices else torch.zeros(0, dtype=torch.int64)
    feats = gather_to_rank0(cat(local.features), idx, device)
    logits = gather_to_rank0(cat(local.logits), idx if local.logits else idx[:0], device)
    spatial = gather_to_rank0(cat(local.spatial), idx if local.spatial else idx[:0], device)
    rmse = gather_to_rank0(cat(local.rmse), idx if local.rmse else idx[:0], device)
    ref_feats = gather_to_rank0(cat(local.ref_features), idx if local.ref_features else idx[:0], device)
    gidx = torch.cat(local.grid_idx) if local.grid_idx else torch.zeros(0, dtype=torch.int64)
    grid_all = gather_to_rank0(cat(local.grid), gidx if local.grid else gidx[:0], device)
    u8 = gather_to_rank0(cat(local.uint8), idx, device, chunk=ctx.settings.batch_size) if ctx.keep_uint8 else None
    nfe_sum, flops_sum, steps_sum, seconds_sum, count = all_sum(
        [local.nfe, local.flops, local.steps, local.seconds, local.count], device)

    n = max(int(count), 1)
    # Tolerance rows report their measured mean NFE per sample; the others an integer.
    nfe = round(nfe_sum / n, 2) if point.tol is not None else int(round(nfe_sum / n))
    row: Row = {"solver": point.solver, "grid": ctx.grid_name(point.solver), "tol": point.tol, "nfe": nfe,
                "flops": flops_sum / n, "steps": int(round(steps_sum / n)), "fid": math.nan, "fd_ref": math.nan,
                "sfid": math.nan, "is": math.nan, "precision": math.nan, "recall": math.nan, "traj_rmse": math.nan,
                "seconds": seconds_sum / n, "n_samples": int(count)}
    if rank != 0 or feats is None:
        return row, None, None
    convention = ctx.settings.metrics_convention
    row.update(reference_metrics(feats, ctx.reference_stats, spatial=spatial, device=device, convention=convention))
    if logits is not None:  # gathered in sample order, which ADM's consecutive IS chunks rely on
        row["is"] = inception_score(logits, splits=ctx.settings.is_splits, convention=convention)[0]
    if ctx.use_reference and rmse is not None and rmse.numel():
        row["traj_rmse"] = float(rmse.double().mean())
    if point.solver == REFERENCE:
        row["fd_ref"] = 0.0
    elif ref_feats is not None:
        row["fd_ref"] = fd_to_reference(feats, ref_feats)
    grid = image_grid(grid_all) if grid_all is not None and grid_all.shape[0] else None
    return row, grid, u8
