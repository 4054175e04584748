"""Resumable training checkpoints: written atomically, never non-finite, resumed only when asked.

Policy (``bafm train``):

- A run resumes only with ``trainer.resume`` set. A fresh run into a run folder that already
  holds any training output (``RUN_OUTPUTS``: checkpoints, the exported SideNet, event files,
  the summary, training sweeps) stops before any work with a one-line message
  (``RunFolderError``): resume with ``trainer.resume=last`` or start over in an empty folder.
- A resume whose checkpoint does not fit the configured SideNet (other ``sidenet.*`` sizes)
  stops before Lightning restores anything, naming the settings that differ.
- ``trainer.resume=last`` picks the readable checkpoint with the highest ``global_step``
  (ties: the newest file), not simply the newest file; unreadable files are skipped with a warning.
- A checkpoint is written only if every SideNet and EMA tensor is finite, so a run that diverges
  keeps its last good checkpoint. On an exception (Ctrl-C, a crash) ``interrupted.ckpt`` is
  written only if training advanced since it started and the state is finite; a failed start
  never writes one.
- Every ``.ckpt`` is written to a temporary file next to its target and renamed into place, on
  the run folder's own filesystem whatever ``$TMPDIR`` is.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from bafm.io import atomic_path
from bafm.models.checkpoint_io import CheckpointError, read_checkpoint
from bafm.training.run_lock import RunFolderError

INTERRUPTED = "interrupted"
CKPT_SUFFIX = ".ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, then an atomic rename."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` (a local path) atomically."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def state_is_finite(module: torch.nn.Module) -> bool:
    """True when every floating-point parameter and buffer of ``module`` is finite."""
    tensors = [*module.parameters(), *module.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _trainable_state(pl_module: L.LightningModule) -> torch.nn.Module:
    # The SideNet and its EMA; the frozen backbone is never checkpointed.
    return torch.nn.ModuleList([m for m in (getattr(pl_module, "sidenet", None), getattr(pl_module, "ema", None))
                                if m is not None]) or pl_module


class FiniteModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that refuses to save a non-finite state (the last good one stays)."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not state_is_finite(_trainable_state(trainer.lightning_module)):
            rank_zero_warn(f"step {trainer.global_step}: SideNet weights are not finite; "
                           f"not writing {Path(filepath).name} (the last good checkpoint is kept)")
            return
        super()._save_checkpoint(trainer, filepath)


class InterruptCheckpoint(Callback):
    """On an exception, save ``interrupted.ckpt`` if training advanced and the state is finite.

    Unlike Lightning's ``OnExceptionCheckpoint`` it does not turn ``fit(ckpt_path=None)`` into
    an implicit resume from "last", and it writes nothing when the run failed before its first
    step (a bad resume path, a missing file) or diverged.
    """

    def __init__(self, dirpath: Path) -> None:
        super().__init__()
        self.path = Path(dirpath) / f"{INTERRUPTED}{CKPT_SUFFIX}"
        self._start_step: Optional[int] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._start_step is None or trainer.global_step <= self._start_step:
            return
        if isinstance(exception, FloatingPointError) or not state_is_finite(_trainable_state(pl_module)):
            return
        trainer.save_checkpoint(str(self.path))


def read_global_step(path: Path) -> int:
    """The ``global_step`` stored in a Lightning checkpoint, reading no code from it.

    Raises:
        CheckpointError: the file is not a readable Lightning checkpoint.
    """
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("global_step"), int):
        raise CheckpointError(f"{path}: not a readable checkpoint (no global_step; not written by bafm train)")
    return int(checkpoint["global_step"])


def list_checkpoints(folder: Path) -> List[Tuple[int, float, Path]]:
    """``(global_step, mtime, path)`` of every readable ``.ckpt`` in ``folder`` (warns on the rest)."""
    found = []
    for path in sorted(Path(folder).glob(f"*{CKPT_SUFFIX}")):
        try:
            found.append((read_global_step(path), path.stat().st_mtime, path))
        except CheckpointError as err:
            warnings.warn(f"skipping {err}", stacklevel=2)
    return found


def resolve_resume(resume: str, folder: Path) -> Optional[str]:
    """The checkpoint ``trainer.resume`` asks for.

    Args:
        resume: "" (fresh run), "last" (highest ``global_step`` in ``folder``) or a path.
        folder: the run's checkpoint folder.

    Returns:
        The checkpoint path, or None for a fresh run.

    Raises:
        FileNotFoundError: "last" without a readable checkpoint, or a path that does not exist.
        CheckpointError: the given file is not a readable checkpoint.
    """
    if not resume:
        return None
    if resume == "last":
        found = list_checkpoints(folder)
        if not found:
            raise FileNotFoundError(f"trainer.resume=last but no readable checkpoint in {folder}; "
                                    "start without trainer.resume")
        return str(max(found, key=lambda item: (item[0], item[1]))[2])
    if not Path(resume).is_file():
        raise FileNotFoundError(f"trainer.resume: checkpoint '{resume}' not found")
    read_global_step(Path(resume))
    return resume


# What ``bafm train`` writes in its run folder, as globs relative to it.
RUN_OUTPUTS = ("checkpoints/*.ckpt", "sidenet.safetensors", "sidenet.json", "train/events.out.tfevents.*",
               "train/hparams.yaml", "train_summary.json", "train_sweeps/*")


def run_outputs(run: Path) -> List[Path]:
    """The outputs of an earlier training run found in the run folder ``run``."""
    return sorted(p for pattern in RUN_OUTPUTS for p in Path(run).glob(pattern))


def check_fresh_run_folder(folder: Path, run: Path) -> None:
    """Stop a fresh run whose run folder already holds any training output (see ``RUN_OUTPUTS``).

    Args:
        folder: the run's checkpoint folder (``<run>/checkpoints``).
        run: the run folder.

    Raises:
        RunFolderError: names the folder, what is there (the step reached, if checkpoints are),
            and how to resume or start over.
    """
    found = run_outputs(run)
    if not found:
        return
    steps = [step for step, _, _ in list_checkpoints(folder)] if any(p.suffix == CKPT_SUFFIX for p in found) else []
    if steps:
        what = f"training checkpoints (up to step {max(steps)}) in {folder}; resume with trainer.resume=last, or"
    else:
        more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
        names = ", ".join(str(p.relative_to(run)) for p in found[:3]) + more
        what = f"the outputs of an earlier run ({names}) and no checkpoint to resume from;"
    raise RunFolderError(
        f"run folder '{run}' already holds {what} start over with another runs_dir=/name= or after removing '{run}'")


def check_resume_fits(path: str | Path, module: torch.nn.Module, settings: Dict[str, Any]) -> None:
    """Stop before Lightning restores a checkpoint whose tensors do not fit ``module``.

    Args:
        path: the checkpoint to resume from.
        module: the freshly built LightningModule (its ``state_dict`` holds what is trainable).
        settings: this run's ``sidenet`` settings (``channels``, ``emb_dim``, ``depth``, ``num_heads``),
            compared with those stored in the checkpoint's hyper-parameters to say what changed.

    Raises:
        RunFolderError: one line naming the checkpoint and the settings that differ (or, for a
            checkpoint without them, the first tensor that does not fit).
    """
    checkpoint = read_checkpoint(path)
    stored = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    # The frozen backbone is never in a checkpoint (SideNetModule drops it on save).
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith("backbone.")}
    wrong = [k for k in expected if k in stored and tuple(stored[k].shape) != expected[k]]
    wrong += [k for k in stored if k not in expected] + [k for k in expected if k not in stored]
    if not wrong:
        return
    saved = (checkpoint.get("hyper_parameters") or {}).get("sidenet") or {}
    changed = [f"sidenet.{k}={saved[k]} (now {settings[k]})" for k in settings if k in saved and saved[k] != settings[k]]
    if changed:
        why = f"was trained with {', '.join(changed)}"
    else:
        first = wrong[0]
        shapes = (f"{tuple(stored[first].shape)} there, {expected[first]} here" if first in stored and first in expected
                  else "present on one side only")
        why = f"does not fit this SideNet ({len(wrong)} tensors differ; first '{first}': {shapes})"
    raise RunFolderError(f"checkpoint '{path}' {why}; resume with the checkpoint's sidenet.* settings, or start a "
                         f"fresh run with another name=")
