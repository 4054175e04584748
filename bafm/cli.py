"""``bafm <command> --config experiments/<name>.yaml [key=value ...]``: the one entry point."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

from bafm.config import ConfigError, load_config

# command -> (module, function, help, what an interrupt leaves). Each function takes (cfg, out),
# raises on bad input and returns an exit code (0); ``exit_code`` maps errors to exit codes.
COMMANDS: Dict[str, Tuple[str, str, str, str]] = {
    "data": ("bafm.data.prepare", "run", "write latent WebDataset shards",
             "finished shards are kept; run it again to write the rest"),
    "backbone": ("bafm.training.backbone_train", "run", "train the embedded default's backbone and classifier",
                 "weights finished before the interrupt are complete; the others are unchanged"),
    "train": ("bafm.training.train", "run", "train the SideNet beside the frozen backbone",
              "checkpoints written so far are kept; resume with trainer.resume=last"),
    "eval-nfe-sweep": ("bafm.eval.sweep", "run", "FID/IS/trajectory error per solver and NFE budget",
                       "nothing written; an earlier sweep in the output folder is left as it was"),
    "optimize-grid": ("bafm.eval.grid_search", "run", "search time grids per solver and NFE against the reference",
                      "the grids found before the interrupt are kept in the grid file"),
    "edit": ("bafm.editing.edit", "run", "invert images and regenerate them under another class",
             "files written so far are complete; nothing else written"),
}

EXIT_BAD_INPUT = 2  # bad input or a damaged file: one line on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


def _command(name: str) -> Callable:
    module, function, _, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="bafm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands = {}
    for name, (_, _, help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="experiment YAML (default: built-in defaults)")
        p.add_argument("--out", default=None, help="output folder (where the command writes one)")
        p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. trainer.max_steps=10")
        commands[name] = p
    return parser, commands


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``command`` first, then ``--config``, ``--out`` and ``key=value`` overrides in any order."""
    parser, commands = build_parser()
    if argv and argv[0] in commands:
        # Intermixed: overrides may come before, between and after the options.
        args = commands[argv[0]].parse_intermixed_args(list(argv[1:]))
        args.command = argv[0]
        return args
    return parser.parse_args(list(argv))  # help, a missing or unknown command: argparse's message


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; every error that is not a bug becomes one line on stderr and an exit code."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        cfg = load_config(args.config, args.overrides)
        return int(_command(args.command)(cfg, args.out) or 0)
    except BaseException as err:  # KeyboardInterrupt too
        code = exit_code(err)
        if code is None:
            raise  # a bug, not bad input: keep the traceback
        print(f"bafm {args.command}: {describe(err, args.command)}", file=sys.stderr)
        return code


def exit_code(err: BaseException) -> Optional[int]:
    """The one mapping from an error to the command line's exit code; None for a bug (traceback).

    Ctrl-C: 130. Bad input or a damaged file (``user_errors``): 2.
    """
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, (ConfigError, *user_errors())):
        return EXIT_BAD_INPUT
    return None


def describe(err: BaseException, command: str) -> str:
    """The one line printed for ``err`` (its first line; what an interrupt left for Ctrl-C)."""
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted; {getattr(err, 'kept', None) or COMMANDS[command][3]}"
    text = str(err).strip()
    message = text.splitlines()[0] if text else type(err).__name__
    return f"config error: {message}" if isinstance(err, ConfigError) else message


def user_errors() -> Tuple[type, ...]:
    """The error types that mean bad input or a damaged file: one line on stderr, exit code 2.

    Config, checkpoint, shard and data-folder, sweep/edit/grid-search input, latent shape, run
    folder and output folder errors, a non-finite training loss and a missing file. Anything
    else is a bug and keeps its traceback.
    """
    from bafm.data.manifest import DataInputError, DataSettingsError, ShardError
    from bafm.data.vae import LatentShapeError
    from bafm.editing.inputs import EditInputError
    from bafm.eval.grid_search import GridSearchError
    from bafm.eval.plan import SweepInputError
    from bafm.eval.reference_stats import ReferenceStatsError
    from bafm.io import OutputFolderError
    from bafm.models.checkpoint_io import CheckpointError
    from bafm.training.checkpoints import RunFolderError

    return (ConfigError, CheckpointError, ShardError, DataSettingsError, DataInputError, SweepInputError, EditInputError,
            GridSearchError, LatentShapeError, ReferenceStatsError, RunFolderError, OutputFolderError,
            FloatingPointError, FileNotFoundError)


if __name__ == "__main__":
    raise SystemExit(main())
