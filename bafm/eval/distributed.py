"""Collectives for the evaluation engine: rank info, ordered gathers to rank 0, sums.

All functions work without ``torch.distributed`` being initialised (one process), so the
engine has a single code path.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def world_info() -> Tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device(device: torch.device) -> torch.device:
    """NCCL moves CUDA tensors only; other backends use the CPU."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_to_rank0(
    local: Optional[Tensor], idx: Tensor, device: torch.device, chunk: Optional[int] = None
) -> Optional[Tensor]:
    """Concatenate every rank's rows, ordered by sample index, on rank 0 (None elsewhere).

    Every rank must call this the same number of times; a rank without rows passes None.

    Args:
        local: this rank's rows ``(n, ...)`` on the CPU, or None when it has none.
        idx: their global indices ``(n,)``.
        device: this rank's device (used for NCCL transfers).
        chunk: rows per collective call (bounds memory for large images); None: all at once.

    Returns:
        ``(N, ...)`` rows sorted by index on rank 0; None on other ranks or when no rank had rows.
    """
    rank, world = world_info()
    if world == 1:
        return None if local is None else local[torch.argsort(idx)]
    metas: List[Any] = [None] * world
    dist.all_gather_object(metas, None if local is None else (tuple(local.shape[1:]), local.dtype))
    known = [m for m in metas if m is not None]
    if not known:
        return None
    if local is None:
        local, idx = torch.zeros((0, *known[0][0]), dtype=known[0][1]), idx[:0]
    comm = comm_device(device)
    counts: List[Any] = [None] * world
    dist.all_gather_object(counts, int(local.shape[0]))
    most = max(counts)
    step = max(1, chunk or most)
    rows, rows_idx = [], []
    for lo in range(0, most, step):
        part, part_idx = local[lo : lo + step], idx[lo : lo + step]
        pad = step - part.shape[0]
        send = torch.cat([part, part.new_zeros((pad, *part.shape[1:]))]).to(comm)
        send_idx = torch.cat([part_idx, part_idx.new_full((pad,), -1)]).to(comm)
        recv = [torch.empty_like(send) for _ in range(world)]
        recv_idx = [torch.empty_like(send_idx) for _ in range(world)]
        dist.all_gather(recv, send)
        dist.all_gather(recv_idx, send_idx)
        if rank == 0:
            for got, got_idx in zip(recv, recv_idx, strict=True):
                keep = got_idx >= 0
                rows.append(got[keep].cpu())
                rows_idx.append(got_idx[keep].cpu())
    if rank != 0:
        return None
    allrows, allidx = torch.cat(rows), torch.cat(rows_idx)
    return allrows[torch.argsort(allidx)]


def all_sum(values: Sequence[float], device: torch.device) -> List[float]:
    """Sum each of a few floats over ranks (float64).

    Args:
        values: this rank's values.
        device: this rank's device (used for NCCL transfers).

    Returns:
        The sums, on every rank.
    """
    if world_info()[1] == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=comm_device(device))
    dist.all_reduce(t)
    return t.tolist()


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (so wall-clock timings cover it); no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if world_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_from_env(device: str = "auto") -> Tuple[torch.device, bool]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Args:
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:<i>``; under
            ``torchrun`` with CUDA each process takes ``cuda:<LOCAL_RANK>``.

    Returns:
        ``(device, initialised_here)``: this process's device, and whether this call created the
        process group (then the caller should destroy it when done).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"eval.device is '{device}' but CUDA is not available.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device(f"cuda:{local_rank}") if world > 1 or device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    created = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return dev, created
