"""A training loader that Lightning can checkpoint, so a resumed run sees the same batches.

Lightning saves ``state_dict()`` of every loader that has one and restores it before the next
``iter()``. Each epoch's batch stream is built from its epoch number alone (its seed), so
restoring ``(epoch, batches served)`` and skipping the served batches of that epoch replays the
uninterrupted stream exactly. Skipping costs at most one epoch of reading: keep epochs short
(``with_epoch``) on large datasets.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, Optional


class ResumableLoader:
    """Iterable over batches whose position survives checkpoint/resume.

    Args:
        make_epoch: ``epoch -> iterable of batches`` for that epoch, deterministic in ``epoch``.
        length: batches per epoch, if known (lets Lightning show epoch progress).
    """

    def __init__(self, make_epoch: Callable[[int], Iterable[Any]], length: Optional[int] = None) -> None:
        self.make_epoch = make_epoch
        self.length = length
        self.epoch = -1  # the epoch being served; -1 before the first ``iter``
        self.served = 0  # batches of ``epoch`` already handed out
        self._resume: Optional[Dict[str, int]] = None

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this loader's epoch length is not known")
        return self.length

    def __iter__(self) -> Iterator[Any]:
        if self._resume is not None:
            self.epoch, skip = self._resume["epoch"], self._resume["served"]
            self._resume = None
        else:
            self.epoch, skip = self.epoch + 1, 0
        self.served = 0
        for batch in self.make_epoch(self.epoch):
            self.served += 1
            if self.served <= skip:
                continue  # already trained on before the checkpoint
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        missing = {"epoch", "served"} - set(state)
        if missing:
            raise KeyError(f"loader state in the checkpoint lacks {sorted(missing)}")
        self._resume = {"epoch": int(state["epoch"]), "served": int(state["served"])}
