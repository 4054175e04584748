"""The frozen models a command samples with, loaded from an experiment config."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from bafm.config import sidenet_choice, sidenet_path
from bafm.models.fast import apply_speed_switches
from bafm.models.loading import load_backbone, load_sidenet
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


def speed_switches(section: Any) -> Dict[str, Any]:
    """The speed switches of a ``backbone`` / ``sidenet`` config section, as keyword arguments."""
    return dict(compile=bool(section.compile), compile_mode=str(section.compile_mode),
                channels_last=bool(section.channels_last), cuda_graphs=bool(section.cuda_graphs),
                precision=str(section.precision), compile_scope=str(getattr(section, "compile_scope", "model")))


def load_models(cfg: Any, solvers: Sequence[str], device: torch.device | str) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The frozen backbone, and the SideNet when a solver needs one.

    Args:
        cfg: experiment config (``backbone.*``, ``sidenet.path``).
        solvers: solver names of the sweep.
        device: where the weights go.

    Returns:
        ``(backbone, sidenet or None)``, both in eval mode without gradients, wrapped by
        ``bafm.models.fast.apply_speed_switches`` when a speed switch is on.
    """
    bc = cfg.backbone
    backbone = load_backbone(bc.path, arch=bc.arch, source=bc.source, device=device,
                             depth=bc.depth, hidden_size=bc.hidden_size, num_heads=bc.num_heads)
    sidenet = load_sidenet(sidenet_path(cfg), device=device) if needs_sidenet(solvers) else None
    # Speed switches (compile, CUDA graphs, channels-last, precision) from backbone.* / sidenet.*.
    backbone = apply_speed_switches(backbone, **speed_switches(bc))
    sidenet = apply_speed_switches(sidenet, **speed_switches(cfg.sidenet)) if sidenet is not None else None
    return backbone, sidenet
