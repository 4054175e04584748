"""``bafm <command> --config experiments/<name>.yaml [key=value ...]``: the one entry point."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

from bafm.config import ConfigError, load_config

# command -> (module, function, help). Each function takes (cfg, out) and returns an exit code.
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "data": ("bafm.data.prepare", "run", "write latent WebDataset shards"),
    "backbone": ("bafm.training.backbone_train", "run", "train the embedded default's backbone and classifier"),
    "train": ("bafm.training.train", "run", "train the SideNet beside the frozen backbone"),
    "eval-nfe-sweep": ("bafm.eval.sweep", "run", "FID/IS/trajectory error per solver and NFE budget"),
    "optimize-grid": ("bafm.eval.grid_search", "run", "search time grids per solver and NFE against the reference"),
    "edit": ("bafm.editing.edit", "run", "invert images and regenerate them under another class"),
    "sample": ("bafm.text_sample", "run", "text-to-image PNGs from an SD3/Flux pipeline (prompt=\"...\")"),
}


def _command(name: str) -> Callable:
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="bafm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands = {}
    for name, (_, _, help_text) in COMMANDS.items():
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
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    overrides = list(args.overrides)
    if args.command == "sample":  # the bare prompt="..." / negative_prompt="..." of `bafm sample`
        overrides = [f"sample.{o}" if o.startswith(("prompt=", "negative_prompt=")) else o for o in overrides]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"bafm {args.command}: config error: {err}", file=sys.stderr)
        return 2
    try:
        return int(_command(args.command)(cfg, args.out) or 0)
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise  # a bug, not bad input: keep the traceback
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"bafm {args.command}: {message}", file=sys.stderr)
        return 2


def user_errors() -> Tuple[type, ...]:
    """The error types that mean bad input or a damaged file: one line on stderr, exit code 2.

    Config, checkpoint, shard, sweep/edit input, run folder and output folder errors, a
    non-finite training loss and a missing file. Anything else is a bug and keeps its traceback.
    """
    from bafm.data.manifest import ShardError
    from bafm.editing.inputs import EditInputError
    from bafm.eval.plan import SweepInputError
    from bafm.io import OutputFolderError
    from bafm.models.checkpoint_io import CheckpointError
    from bafm.training.checkpoints import RunFolderError

    return (ConfigError, CheckpointError, ShardError, SweepInputError, EditInputError, RunFolderError,
            OutputFolderError, FloatingPointError, FileNotFoundError)


if __name__ == "__main__":
    raise SystemExit(main())
