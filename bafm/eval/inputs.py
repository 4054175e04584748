"""Check and build a sweep's inputs from an experiment config.

``check_sweep_inputs`` looks at every file a sweep needs (backbone, SideNet, VAE, feature
extractor, reference) and raises ``SweepInputError`` naming the first missing one and how to
make it, before anything is loaded or sampled. ``build_eval_inputs`` then builds the decoder,
feature extractor and reference statistics, ``build_sweep_engine`` the engine with them and the
sweep's settings (the models come from ``bafm.experiment.load_models``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from bafm.config import missing_backbone, sampling_settings, sidenet_path
from bafm.eval.engine import SweepEngine
from bafm.eval.features import FeatureExtractor, build_feature_extractor, check_feature_extractor_files
from bafm.eval.metrics import FeatureStats
from bafm.eval.plan import SweepInputError, SweepPoint, SweepSettings, plan_sweep
from bafm.eval.reference_stats import check_reference_source, resolve_reference_stats
from bafm.experiment import grids_in_use
from bafm.solvers.ground_truth import Reference


def check_eval_files(cfg: Any) -> None:
    """Feature extractor, reference and VAE files (what ``build_eval_inputs`` reads).

    Raises:
        SweepInputError: the first missing file, with what to place where or how to make it.
    """
    ec = cfg.eval
    try:
        check_feature_extractor_files(ec.feature_extractor, classifier_path=ec.classifier_path,
                                      inception_weights=ec.inception_weights)
        check_reference_source(cfg.eval, cfg.data)
    except (FileNotFoundError, ValueError) as err:
        raise SweepInputError(str(err)) from None
    if cfg.data.source != "digits" and not Path(cfg.data.vae_path).exists():
        raise SweepInputError(
            f"data.vae_path: '{cfg.data.vae_path}' not found; the samples are decoded with this diffusers "
            "AutoencoderKL (folder or single .safetensors file), e.g. stabilityai/sd-vae-ft-ema saved locally."
        )


def check_sweep_inputs(
    cfg: Any, solvers: Sequence[str], budgets: Any, *, need_backbone: bool = True, tolerances: Any = None
) -> List[SweepPoint]:
    """Every check that can fail before a sweep starts, in the order a user would fix them.

    Args:
        cfg: experiment config.
        solvers: solver names to sweep.
        budgets: NFE budgets (per solver or one list).
        need_backbone: also require ``backbone.path`` (the CLI loads it; the callback has it).
        tolerances: tolerance levels per adaptive solver (``eval.tolerances``).

    Returns:
        The sweep points.

    Raises:
        SweepInputError: unknown solver, infeasible budget, missing SideNet / backbone /
            classifier / Inception weights / reference / VAE.
    """
    side = sidenet_path(cfg)
    points = plan_sweep(solvers, budgets, sidenet_available=side.is_file(), sidenet_hint=str(side),
                        tolerances=tolerances)
    if need_backbone and missing_backbone(cfg):
        raise SweepInputError(missing_backbone(cfg))
    check_eval_files(cfg)
    return points


def build_eval_inputs(
    cfg: Any, device: torch.device | str = "cpu"
) -> Tuple[Callable[[Tensor], Tensor], FeatureExtractor, Optional[FeatureStats]]:
    """Decoder, feature extractor and reference statistics for ``cfg``.

    Args:
        cfg: experiment config.
        device: where the extractor runs (and reference features are computed).

    Returns:
        ``(decoder, extractor, reference_stats)``.

    Raises:
        SweepInputError: a needed file is missing.
    """
    from bafm.data.vae import build_decoder, decoder_options

    check_eval_files(cfg)
    ec = cfg.eval
    extractor = build_feature_extractor(ec.feature_extractor, classifier_path=ec.classifier_path,
                                        inception_weights=ec.inception_weights, device=device)
    stats = resolve_reference_stats(cfg.eval, cfg.data, extractor, device=device, batch_size=int(ec.batch_size),
                                    seed=int(cfg.seed))
    return build_decoder(**decoder_options(cfg.data)), extractor, stats


def sweep_settings(cfg: Any) -> SweepSettings:
    """The sweep's fixed settings from ``cfg.eval`` and ``cfg.sampling``."""
    ec = cfg.eval
    return SweepSettings(
        sampling=sampling_settings(cfg), seed=int(ec.seed), batch_size=int(ec.batch_size),
        reference=Reference.from_eval(ec), reference_batch_size=int(ec.reference_batch_size),
        include_reference=bool(ec.include_reference),
        grid_images=int(ec.grid_images), is_splits=int(ec.is_splits),
        metrics_convention=str(ec.metrics_convention), sidenet_hint=str(sidenet_path(cfg)),
    )


def build_sweep_engine(cfg: Any, device: torch.device | str = "cpu") -> SweepEngine:
    """A ``SweepEngine`` with decoder, feature extractor, reference statistics and grids from ``cfg``.

    Args:
        cfg: experiment config (``eval``, ``sampling``, ``data``, ``sidenet``).
        device: where the feature extractor (and reference features) run.

    Raises:
        SweepInputError: a file it needs is missing (names it and how to make it).
    """
    table = grids_in_use(cfg, SweepInputError)
    decoder, extractor, stats = build_eval_inputs(cfg, device)
    return SweepEngine(sweep_settings(cfg), decoder=decoder, feature_extractor=extractor, reference_stats=stats,
                       grid_table=table)
