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
    "edit": ("bafm.editing.edit", "run", "invert images and regenerate them under another class"),
}


def _command(name: str) -> Callable:
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bafm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="experiment YAML (default: built-in defaults)")
        p.add_argument("--out", default=None, help="output folder (where the command writes one)")
        p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. trainer.max_steps=10")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"bafm {args.command}: config error: {err}", file=sys.stderr)
        return 2
    return int(_command(args.command)(cfg, args.out) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
