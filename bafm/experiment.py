"""The frozen models a command samples with, loaded from an experiment config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from bafm.config import grid_file_candidates, sidenet_choice, sidenet_path
from bafm.io import sha256_file
from bafm.models.fast import apply_speed_switches
from bafm.models.loading import load_backbone, load_sidenet
from bafm.solvers import SOLVERS, uses_side_fn
from bafm.solvers.grid_store import GridTable, load_grid_table


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


def load_models(
    backbone_section: Any, sidenet_section: Any, sidenet_file: Path | str, solvers: Sequence[str],
    device: torch.device | str,
) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The frozen backbone, and the SideNet when a solver needs one.

    Args:
        backbone_section: the ``backbone`` config section (path, architecture, speed switches).
        sidenet_section: the ``sidenet`` config section (speed switches).
        sidenet_file: the SideNet checkpoint (``bafm.config.sidenet_path``); read only when a solver
            needs it.
        solvers: solver names of the sweep.
        device: where the weights go.

    Returns:
        ``(backbone, sidenet or None)``, both in eval mode without gradients, wrapped by
        ``bafm.models.fast.apply_speed_switches`` when a speed switch is on.
    """
    bc = backbone_section
    backbone = load_backbone(bc.path, arch=bc.arch, source=bc.source, device=device,
                             depth=bc.depth, hidden_size=bc.hidden_size, num_heads=bc.num_heads)
    sidenet = load_sidenet(Path(sidenet_file), device=device) if needs_sidenet(solvers) else None
    # Speed switches (compile, CUDA graphs, channels-last, precision) from backbone.* / sidenet.*.
    backbone = apply_speed_switches(backbone, **speed_switches(bc))
    sidenet = apply_speed_switches(sidenet, **speed_switches(sidenet_section)) if sidenet is not None else None
    return backbone, sidenet


def sidenet_fingerprint(path: Path) -> Optional[str]:
    """sha256 of the SideNet file at ``path`` (None when there is none): what optimized grids are tied to."""
    return sha256_file(path) if Path(path).is_file() else None


def check_grids_match_sidenet(table: GridTable, side: Path) -> None:
    """Raise unless ``table`` was searched for the SideNet file ``side`` (when the table records one).

    Raises:
        ValueError: names the grid file, both SideNets and what to do.
    """
    recorded = table.meta.get("models", {}).get("sidenet_sha256")
    actual = sidenet_fingerprint(side)
    if recorded and actual and recorded != actual:
        raise ValueError(
            f"optimized grid file '{table.path}' was searched for another SideNet (sha256 {recorded[:12]}), not "
            f"'{side}' (sha256 {actual[:12]}); run `make optimize-grid` for this SideNet, or point "
            "sampling.grid_file at grids searched for it"
        )


def grids_in_use(cfg: Any, error: Type[Exception]) -> Optional[GridTable]:
    """The optimized grids when ``sampling.grid`` is ``optimized`` (see ``load_optimized_grids``), else None.

    Raises:
        error: the grid file is missing, malformed or of another SideNet (the command's input error).
    """
    if str(cfg.sampling.grid) != "optimized":
        return None
    try:
        return load_optimized_grids(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise error(str(err)) from None


def load_optimized_grids(cfg: Any) -> GridTable:
    """The optimized grids of the SideNet in use, from the first of ``grid_file_candidates(cfg)`` that exists.

    Raises:
        FileNotFoundError: none exists (names every place looked and how to make one).
        ValueError: the file is malformed, or was searched for another SideNet.
    """
    candidates = grid_file_candidates(cfg)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        looked = " or ".join(f"'{p}'" for p in candidates)
        raise FileNotFoundError(f"no optimized grid file at {looked}; make one with `make optimize-grid` "
                                "(or point sampling.grid_file at one)")
    table = load_grid_table(path)
    check_grids_match_sidenet(table, sidenet_path(cfg))
    return table
