"""Exceptions that a command raises for the command line to report (see ``bafm.cli.exit_code``)."""

from __future__ import annotations


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the interrupted command kept (one line, e.g. where to resume from).

    Args:
        kept: what is on disk now, e.g. ``"nothing written"`` or
            ``"checkpoints in runs/digits/checkpoints; resume with trainer.resume=last"``.
    """

    def __init__(self, kept: str) -> None:
        super().__init__(kept)
        self.kept = kept
