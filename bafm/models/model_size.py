"""Bounds on a model's size, checked before any memory is allocated.

A configuration read from a file or an override (a JSON beside a checkpoint, ``sidenet.depth``)
is counted first: the model is built with one and with two blocks on the meta device (shapes
only, no memory, no initialisation) and the count is extrapolated linearly in ``depth``, since
every extra block has the size of the second one. So even ``depth=100000000`` is refused in
milliseconds instead of building a hundred million modules.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch
from torch import nn

from bafm.models.checkpoint_io import CheckpointError

MAX_PARAMETERS = 10_000_000_000  # 40 GB of float32 weights; SiT-XL/2 has 0.68 billion
MAX_DEPTH = 1000  # blocks; SiT-XL/2 has 28, the released SideNet 4


def count_parameters(build: Callable[..., nn.Module], kwargs: Dict[str, Any]) -> int:
    """Parameters of ``build(**kwargs)``, counted without building more than two blocks.

    Args:
        build: a model class or factory taking ``depth`` among its keyword arguments; every
            block after the first must have the same size (true of ``SiT`` and ``SideNet``,
            whose one odd block, the SideNet's attention block, is there at any depth).
        kwargs: its keyword arguments, ``depth`` included.

    Returns:
        The number of parameters the full model would have.
    """
    depth = int(kwargs["depth"])
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in build(**{**kwargs, "depth": d}).parameters()) for d in (1, 2)]
    return sizes[0] + (depth - 1) * (sizes[1] - sizes[0])


def check_model_size(build: Callable[..., nn.Module], kwargs: Dict[str, Any], what: str,
                     max_parameters: int = MAX_PARAMETERS, max_depth: int = MAX_DEPTH) -> int:
    """Raise unless ``build(**kwargs)`` stays within ``max_depth`` blocks and ``max_parameters``.

    Args:
        build: see ``count_parameters``.
        kwargs: its keyword arguments.
        what: where the configuration comes from, for the message (e.g. ``"sidenet.json"``).
        max_parameters: most parameters allowed.
        max_depth: most blocks allowed.

    Returns:
        The parameter count.

    Raises:
        CheckpointError: one line naming ``what``, the offending value and the limit.
    """
    depth = int(kwargs["depth"])
    if not 1 <= depth <= max_depth:
        raise CheckpointError(f"{what}: depth {depth} is outside the limit of 1 to {max_depth} blocks; "
                              "check the model config")
    try:
        count = count_parameters(build, kwargs)
    except (ValueError, TypeError, RuntimeError) as err:  # e.g. widths that do not divide into heads
        raise CheckpointError(f"{what}: not a valid model config ({err})") from None
    if count > max_parameters:
        raise CheckpointError(f"{what}: this config has {count:,} parameters, more than the limit of "
                              f"{max_parameters:,}; check the model config")
    return count
