"""``bafm eval-nfe-sweep`` for SD3 / Flux experiments: per solver and NFE, FID, CLIP score,
``fd_ref`` and ``traj_rmse`` on prompts from a captions file.

Sample ``i`` is prompt ``i mod P`` of ``eval.captions_file`` from noise seeded ``eval.seed + i``
(``bafm.sampling.sample_noise``), so every row sees the same prompts and noises, whatever the
batch size. Batches are the outer loop: a batch's prompts are encoded once by the pipeline's
own ``encode_prompt`` (and the negative prompt for CFG), its reference solution is solved once,
and every (solver, NFE) point then samples it. Columns:

- ``fid``: Fréchet distance of Inception pool features (``eval.feature_extractor: inception``; or of
  CLIP image embeddings, ``clip``) to the real images (``eval.reference_images``, center-cropped to
  the sample size) or to precomputed statistics (``eval.reference_stats``);
- ``clip_score``: torchmetrics' ``CLIPScore`` of the images against their prompts;
- ``fd_ref``: Fréchet distance, same features, to the reference solver's samples from the same
  prompts and noises (0 for the reference): the solver's error in distribution alone;
- ``traj_rmse``: RMS latent distance to the reference solution from the same noise;
- ``seconds``: sampling time per image (CUDA-synchronised).

Points, budgets and the reference solver are the class sweep's (``bafm.eval.plan``,
``bafm.sampling``); closures and the pipeline's schedule are the plug-in's (``bafm.pipelines``).
One process: sharding the prompt list over ranks is left to the caller (``eval.seed`` offsets).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf
from torch import Tensor

from bafm.config import ExperimentConfig, run_dir, sidenet_choice, to_container
from bafm.eval.distributed import sync
from bafm.eval.metrics import FeatureStats, feature_statistics, frechet_distance
from bafm.eval.plan import SweepInputError, SweepPoint, plan_sweep
from bafm.io import OutputFolderError, atomic_write_text, check_output_folder
from bafm.sampling import REFERENCE, SamplingSettings, grid_label, sample_noise, uses_side_fn
from bafm.solvers import SOLVERS, SolveResult
from bafm.solvers.grids import uniform_grid

TEXT_COLUMNS = ("solver", "grid", "nfe", "steps", "fid", "clip_score", "fd_ref", "traj_rmse", "seconds", "n_samples")
TEXT_SPECS = {"fid": ".3f", "clip_score": ".3f", "fd_ref": ".3f", "traj_rmse": ".4g", "seconds": ".4g"}


def text_grid(cfg: ExperimentConfig, pipe: Any, family: str, latent_hw: Tuple[int, int]) -> Tuple[str, float, Optional[float]]:
    """``(grid, shift, mu)`` of ``cfg.sampling``: the pipeline's own schedule for ``sd3`` / ``flux``
    (``sampling.shift`` / ``sampling.mu`` replace its values when given), else the grid kind as is."""
    from bafm.pipelines import pipeline_grid

    sc = cfg.sampling
    if sc.grid == "optimized":
        raise SweepInputError("sampling.grid is 'optimized'; text-to-image sweeps take uniform, shift, sd3 or flux")
    if sc.grid == "sd3":
        return "sd3", float(sc.shift), None
    if sc.grid == "flux":
        _, _, mu = pipeline_grid(pipe, family, latent_hw)
        return "flux", 1.0, float(sc.mu) if sc.mu is not None else mu
    return str(sc.grid), float(sc.shift), None


@torch.no_grad()
def solve_text_batch(backbone: Any, sidenet: Any, solver: str, nfe: Optional[int], noise: Tensor, cond: Any,
                     negative: Any, *, cfg_scale: float, interval: Optional[Tuple[float, float]], grid: Any,
                     shift: float = 1.0, mu: Optional[float] = None, **solver_opts: Any) -> SolveResult:
    """One batch from noise to latents with the plug-in's closures (``bafm.pipelines``).

    Args:
        backbone: ``FlowTransformerBackbone``.
        sidenet: ``TextSideNet`` (used by the SideNet solvers only) or None.
        solver: registered solver name.
        nfe: NFE budget (None for an adaptive solver or an explicit grid).
        noise: ``(B, C, H, W)`` unpacked latents at ``t = 1``.
        cond: ``TextCondition`` of batch ``B``.
        negative: the unconditional ``TextCondition`` (needed when ``cfg_scale != 1``).
        cfg_scale: guidance scale.
        interval: guidance interval ``(lo, hi)`` or None (always).
        grid: grid kind or explicit grid.
        shift, mu: grid parameters (see ``bafm.sampling.integrate``).
        **solver_opts: e.g. ``rtol`` / ``atol`` of the adaptive reference.

    Returns:
        The solver's result; ``x`` ``(B, C, H, W)``.
    """
    from bafm.models.text_sampling import build_text_sampling_fns
    from bafm.pipelines import cast_side_velocity
    from bafm.sampling import integrate

    side = cast_side_velocity(sidenet) if sidenet is not None and uses_side_fn(solver) else None
    velocity_fn, side_fn = build_text_sampling_fns(backbone.velocity, cond, negative=negative, cfg_scale=cfg_scale,
                                                   interval=interval, side_velocity=side)  # fmt: skip
    return integrate(velocity_fn, noise, solver, nfe, side_fn, grid, shift=shift, mu=mu, **solver_opts)


class _Point:
    """One row's running results."""

    def __init__(self, point: SweepPoint, grid: str) -> None:
        self.point, self.grid = point, grid
        self.features: List[Tensor] = []  # (B, D) per batch
        self.rmse: List[Tensor] = []  # (B,) RMS latent distance to the reference, per batch
        self.clip_sum, self.clip_count = 0.0, 0
        self.nfe = self.steps = self.seconds = 0.0  # sums over samples
        self.images: List[Tensor] = []  # the first eval.grid_images samples

    def row(self, n: int, real: Optional[FeatureStats], reference: FeatureStats) -> Dict[str, Any]:
        """The row of ``TEXT_COLUMNS`` over ``n`` samples."""
        is_ref = self.point.solver == REFERENCE
        stats = feature_statistics(torch.cat(self.features))
        return {"solver": self.point.solver, "grid": self.grid,
                "nfe": round(self.nfe / n, 2) if is_ref else int(round(self.nfe / n)),
                "steps": int(round(self.steps / n)),
                "fid": frechet_distance(stats, real) if real is not None else math.nan,
                "clip_score": max(self.clip_sum / self.clip_count, 0.0) if self.clip_count else math.nan,
                "fd_ref": 0.0 if is_ref else frechet_distance(stats, reference),
                "traj_rmse": float(torch.cat(self.rmse).mean()), "seconds": self.seconds / n, "n_samples": n}  # fmt: skip


@dataclass
class TextSweepModels:
    """What a text-to-image sweep samples and measures with, loaded once."""

    pipe: Any  # the diffusers pipeline (encode_prompt, VAE, image processor)
    family: str
    backbone: Any  # FlowTransformerBackbone
    sidenet: Any  # TextSideNet, or None when no swept solver uses one
    extractor: Any  # FeatureExtractor for fid / fd_ref
    clip: Any  # torchmetrics CLIPScore, or None
    shape: Tuple[int, int, int]  # unpacked latent (C, H, W)
    grid: Tuple[str, float, Optional[float]]  # (kind, shift, mu) of the sampling grid


def load_text_sweep_models(cfg: ExperimentConfig, sidenet_path: Optional[Path],
                           device: torch.device) -> TextSweepModels:
    """Pipeline, backbone, SideNet (from ``sidenet_path``, None: none), feature extractor and CLIP scorer.

    Raises:
        SweepInputError: the CLIP model cannot be loaded.
        CheckpointError: the pipeline or the SideNet cannot be loaded (one line).
    """
    from bafm.eval.clip_score import ClipImageFeatures, ClipScoreError, load_clip, load_clip_score
    from bafm.eval.features import build_feature_extractor
    from bafm.models.diffusers_flow import FlowTransformerBackbone
    from bafm.models.text_sidenet import load_text_sidenet
    from bafm.text_sample import PRECISIONS, load_pipeline

    ec, family = cfg.eval, str(cfg.backbone.source)
    try:
        loaded = load_clip(str(ec.clip_model)) if ec.clip_model else None
    except ClipScoreError as err:
        raise SweepInputError(str(err)) from None
    clip = load_clip_score(str(ec.clip_model), device, loaded) if loaded is not None else None
    if ec.feature_extractor == "clip":
        extractor = ClipImageFeatures(*loaded, name=str(ec.clip_model)).to(device).eval()
    else:
        extractor = build_feature_extractor("inception", inception_weights=ec.inception_weights or None, device=device)
    pipe = load_pipeline(str(cfg.backbone.path), family, PRECISIONS[str(cfg.backbone.precision)], device)
    backbone = FlowTransformerBackbone(pipe.transformer, family, distilled_guidance=float(cfg.backbone.guidance))
    sidenet = load_text_sidenet(sidenet_path, device=device) if sidenet_path is not None else None
    # The pipelines' latent sizes: the VAE's factor, and the transformer's patches (Flux: 2x2 packing).
    multiple = pipe.vae_scale_factor * backbone.spatial_multiple
    shape = (backbone.in_channels, int(cfg.sample.height) // multiple * multiple // pipe.vae_scale_factor,
             int(cfg.sample.width) // multiple * multiple // pipe.vae_scale_factor)  # fmt: skip
    return TextSweepModels(pipe, family, backbone, sidenet, extractor, clip, shape,
                           text_grid(cfg, pipe, family, shape[1:]))  # fmt: skip


def _solve_point(models: TextSweepModels, cfg: ExperimentConfig, point: SweepPoint, noise: Tensor, cond: Any,
                 negative: Any) -> SolveResult:
    """One batch of one row: the reference (rk4 on a uniform grid, or dopri5) or a solver at its budget."""
    ec = cfg.eval
    guidance = dict(cfg_scale=float(cfg.sampling.cfg_scale),
                    interval=tuple(float(v) for v in cfg.sampling.guidance_interval))  # fmt: skip
    if point.solver == REFERENCE and ec.reference_solver == "rk4":
        grid = uniform_grid(int(ec.reference_steps), dtype=torch.float64)
        return solve_text_batch(models.backbone, None, "rk4", None, noise, cond, negative, grid=grid, **guidance)
    if point.solver == REFERENCE:
        return solve_text_batch(models.backbone, None, REFERENCE, None, noise, cond, negative, grid="uniform",
                                rtol=float(ec.reference_rtol), atol=float(ec.reference_atol), **guidance)  # fmt: skip
    kind, shift, mu = models.grid
    return solve_text_batch(models.backbone, models.sidenet, point.solver, point.nfe, noise, cond, negative,
                            grid=kind, shift=shift, mu=mu, **guidance)  # fmt: skip


def _reference_stats(cfg: ExperimentConfig, extractor: Any, size: Tuple[int, int], device: torch.device) -> Optional[FeatureStats]:
    """Real-image statistics: ``eval.reference_stats`` (.npz), else ``eval.reference_images`` (center-cropped)."""
    from bafm.data.images import IMAGE_EXTENSIONS, load_image
    from bafm.eval.reference_stats import load_stats

    ec = cfg.eval
    if ec.reference_stats:
        return load_stats(ec.reference_stats)[0]
    if not ec.reference_images:
        return None
    files = sorted(p for p in Path(ec.reference_images).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SweepInputError(f"eval.reference_images '{ec.reference_images}' holds no images.")
    feats = []
    for i in range(0, len(files), int(ec.batch_size)):
        # ADM center crop to the sample's square side (sample.height), in [0, 1].
        images = torch.stack([load_image(f, size[0]) for f in files[i : i + int(ec.batch_size)]]).add(1).div(2)
        feats.append(extractor.extract(images.to(device)).features.float().cpu())
    return feature_statistics(torch.cat(feats))


def _check_inputs(cfg: ExperimentConfig) -> Tuple[List[str], Dict[str, List[int]]]:
    """Everything checkable before a model is loaded; returns the solvers and budgets."""
    from bafm.eval.features import check_feature_extractor_files

    ec = cfg.eval
    if ec.feature_extractor not in ("inception", "clip"):
        raise SweepInputError(f"eval.feature_extractor is '{ec.feature_extractor}'; text-to-image sweeps use "
                              "inception or clip (the CLIP image embeddings of eval.clip_model)")
    if ec.feature_extractor == "clip" and not ec.clip_model:
        raise SweepInputError("eval.feature_extractor is 'clip' but eval.clip_model is empty")
    for key in ("reference_stats", "reference_images"):
        value = getattr(ec, key)
        if value and not Path(value).exists():
            raise SweepInputError(f"eval.{key} '{value}' not found.")
    if ec.feature_extractor == "inception":
        check_feature_extractor_files("inception", inception_weights=ec.inception_weights or None)
    solvers = list(ec.solvers)
    budgets = {k: [int(n) for n in v] for k, v in ec.budgets.items()}
    return solvers, budgets


@torch.no_grad()
def text_sweep(cfg: ExperimentConfig, out: Optional[str] = None, *, progress: bool = True) -> List[Dict[str, Any]]:
    """Run the configured text-to-image sweep and write ``results.csv`` / ``results.md`` / grids.

    Returns:
        The rows (dicts with ``TEXT_COLUMNS``), the reference row first.

    Raises:
        SweepInputError: a bad solver, budget, file or CLIP model, before any sampling.
    """
    from bafm.data.captions import read_prompts
    from bafm.eval.clip_score import clip_score_sum
    from bafm.pipelines import decode_latents, encode_prompts

    ec = cfg.eval
    solvers, budgets = _check_inputs(cfg)
    try:
        prompts = read_prompts(ec.captions_file)
        dest = check_output_folder(output_folder(cfg, out))
    except (FileNotFoundError, ValueError, OutputFolderError) as err:
        raise SweepInputError(str(err)) from None
    side_path, reason = sidenet_choice(cfg)
    needs_side = any(s in SOLVERS and uses_side_fn(s) for s in solvers)
    points = plan_sweep(solvers, budgets, sidenet_available=side_path.is_file() or not needs_side,
                        sidenet_hint=f"{side_path} ({reason})")  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() and ec.device != "cpu" else "cpu")
    models = load_text_sweep_models(cfg, side_path if needs_side else None, device)
    real = _reference_stats(cfg, models.extractor, (int(cfg.sample.height), int(cfg.sample.width)), device)
    kind, shift, mu = models.grid
    label = SamplingSettings(grid=kind, shift=shift, mu=mu)
    results = [_Point(SweepPoint(REFERENCE, 0, 0), "uniform" if ec.reference_solver == "rk4" else "adaptive")]
    results += [_Point(p, grid_label(p.solver, label)) for p in points]
    n, batch_size = int(ec.num_samples), int(ec.batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * len(results), unit="img", desc="t2i nfe sweep", dynamic_ncols=True)
    for start in range(0, n, batch_size):
        ids = torch.arange(start, min(n, start + batch_size))
        batch_prompts = [prompts[i % len(prompts)] for i in ids.tolist()]
        # Encoded once per batch for every row; the negative prompt only when CFG is on.
        cond, negative = encode_prompts(models.pipe, models.family, batch_prompts, str(cfg.sample.negative_prompt),
                                        float(cfg.sampling.cfg_scale) != 1.0, int(cfg.sample.max_sequence_length))
        noise = sample_noise(ids, models.shape, int(ec.seed), device=device)
        reference: Optional[Tensor] = None
        for res in results:  # the reference first: the others' traj_rmse is measured against it
            sync(device)
            began = time.perf_counter()
            solved = _solve_point(models, cfg, res.point, noise, cond, negative)
            sync(device)
            res.seconds += time.perf_counter() - began
            res.nfe += float(solved.nfe) * len(ids)
            res.steps += float(solved.steps) * len(ids)
            latents = solved.x.float()
            reference = latents if reference is None else reference
            res.rmse.append((latents.double() - reference.double()).flatten(1).pow(2).mean(1).sqrt().cpu())
            images = decode_latents(models.pipe, latents, output_type="pt").float()  # (B, 3, H, W) in [0, 1]
            res.features.append(models.extractor.extract(images.to(device)).features.float().cpu())
            if models.clip is not None:
                total, count = clip_score_sum(models.clip, images, batch_prompts)
                res.clip_sum, res.clip_count = res.clip_sum + total, res.clip_count + count
            if start < int(ec.grid_images):
                res.images.append(images[: int(ec.grid_images) - start].cpu())
            if bar is not None:
                bar.update(len(ids))
    if bar is not None:
        bar.close()
    ref_stats = feature_statistics(torch.cat(results[0].features))
    rows = [res.row(n, real, ref_stats) for res in results]
    _write(cfg, dest, rows, results)
    return rows


def output_folder(cfg: ExperimentConfig, out: Optional[str] = None) -> Path:
    """``out``, else ``eval.out_dir``, else ``runs/<experiment>/nfe_sweep``."""
    if out:
        return Path(out)
    return Path(cfg.eval.out_dir) if cfg.eval.out_dir else run_dir(cfg) / "nfe_sweep"


def _write(cfg: ExperimentConfig, dest: Path, rows: List[Dict[str, Any]], results: List[_Point]) -> None:
    """``results.csv``, ``results.md``, ``config.yaml`` and one image grid per row, atomically."""
    from bafm.eval.points import image_grid
    from bafm.eval.report import markdown_table, rows_to_csv, save_grids

    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest / "results.csv", rows_to_csv(rows, TEXT_COLUMNS))
    atomic_write_text(dest / "results.md", markdown_table(rows, TEXT_COLUMNS, TEXT_SPECS))
    atomic_write_text(dest / "config.yaml", OmegaConf.to_yaml(to_container(cfg)))
    grids = {(res.point.solver, int(row["nfe"])): image_grid(torch.cat(res.images))
             for res, row in zip(results, rows) if res.images}  # fmt: skip
    save_grids(grids, dest / "grids")


def run(cfg: ExperimentConfig, out: Optional[str] = None) -> int:
    """``bafm eval-nfe-sweep`` for a text-to-image experiment: the table, then where it went."""
    from bafm.eval.report import markdown_table

    rows = text_sweep(cfg, out)
    print(markdown_table(rows, TEXT_COLUMNS, TEXT_SPECS), end="")
    print(f"results: {output_folder(cfg, out)}")
    return 0
