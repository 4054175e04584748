"""Check and build a sweep's inputs from an experiment config.

``check_sweep_inputs`` looks at every file a sweep needs (backbone, SideNet, VAE, feature
extractor, reference) and raises ``SweepInputError`` naming the first missing one and how to
make it, before anything is loaded or sampled. ``build_eval_inputs`` then builds the decoder,
feature extractor and reference statistics; ``load_models`` the backbone and SideNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from bafm.config import missing_backbone, sidenet_choice, sidenet_path
from bafm.eval.engine import SweepInputError, SweepPoint, plan_sweep
from bafm.eval.features import FeatureExtractor, build_feature_extractor, check_feature_extractor_files
from bafm.eval.metrics import FeatureStats
from bafm.eval.reference_stats import check_reference_source, resolve_reference_stats
from bafm.sampling import uses_side_fn
from bafm.solvers import SOLVERS


def needs_sidenet(solvers: Sequence[str]) -> bool:
    """Whether any (registered) solver in ``solvers`` needs a SideNet."""
    return any(s in SOLVERS and uses_side_fn(s) for s in solvers)


def describe_sidenet(cfg: Any, solvers: Sequence[str]) -> str:
    """One line naming the SideNet the solvers will use and why (or that none is needed)."""
    if not needs_sidenet(solvers):
        return "SideNet: not needed (no solver here uses one)"
    path, reason = sidenet_choice(cfg)
    return f"SideNet: {path} ({reason})"


def check_eval_files(cfg: Any) -> None:
    """Feature extractor, reference and VAE files (what ``build_eval_inputs`` reads).

    Raises:
        SweepInputError: the first missing file, with what to place where or how to make it.
    """
    ec = cfg.eval
    try:
        check_feature_extractor_files(ec.feature_extractor, classifier_path=ec.classifier_path,
                                      inception_weights=ec.inception_weights)
        check_reference_source(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise SweepInputError(str(err)) from None
    if cfg.data.source != "digits" and not Path(cfg.data.vae_path).exists():
        raise SweepInputError(
            f"data.vae_path: '{cfg.data.vae_path}' not found; the samples are decoded with this diffusers "
            "AutoencoderKL (folder or single .safetensors file), e.g. stabilityai/sd-vae-ft-ema saved locally."
        )


def check_sweep_inputs(
    cfg: Any, solvers: Sequence[str], budgets: Any, *, need_backbone: bool = True
) -> List[SweepPoint]:
    """Every check that can fail before a sweep starts, in the order a user would fix them.

    Args:
        cfg: experiment config.
        solvers: solver names to sweep.
        budgets: NFE budgets (per solver or one list).
        need_backbone: also require ``backbone.path`` (the CLI loads it; the callback has it).

    Returns:
        The sweep points.

    Raises:
        SweepInputError: unknown solver, infeasible budget, missing SideNet / backbone /
            classifier / Inception weights / reference / VAE.
    """
    side = sidenet_path(cfg)
    points = plan_sweep(solvers, budgets, sidenet_available=side.is_file(), sidenet_hint=str(side))
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
    from bafm.data.vae import build_decoder

    check_eval_files(cfg)
    ec = cfg.eval
    extractor = build_feature_extractor(ec.feature_extractor, classifier_path=ec.classifier_path,
                                        inception_weights=ec.inception_weights, device=device)
    stats = resolve_reference_stats(cfg, extractor, device=device, batch_size=int(ec.batch_size))
    return build_decoder(cfg), extractor, stats


def load_models(cfg: Any, solvers: Sequence[str], device: torch.device | str) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The frozen backbone, and the SideNet when a solver needs one.

    Args:
        cfg: experiment config (``backbone.*``, ``sidenet.path``).
        solvers: solver names of the sweep.
        device: where the weights go.

    Returns:
        ``(backbone, sidenet or None)``, both in eval mode without gradients, wrapped by
        ``bafm.models.fast.optimize_from_config`` when a speed switch is on.
    """
    from bafm.models.fast import optimize_from_config
    from bafm.models.loading import load_backbone, load_sidenet

    bc = cfg.backbone
    backbone = load_backbone(bc.path, arch=bc.arch, source=bc.source, device=device,
                             depth=bc.depth, hidden_size=bc.hidden_size, num_heads=bc.num_heads)
    sidenet = load_sidenet(sidenet_path(cfg), device=device) if needs_sidenet(solvers) else None
    # Speed switches (compile, CUDA graphs, channels-last, precision) from backbone.* / sidenet.*.
    backbone = optimize_from_config(backbone, bc)
    sidenet = optimize_from_config(sidenet, cfg.sidenet) if sidenet is not None else None
    return backbone, sidenet
