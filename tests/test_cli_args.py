"""``bafm <command>``: options and overrides in any order, for every command."""

from __future__ import annotations

import pytest

from bafm.cli import COMMANDS, main, parse_args


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "rest",
    [
        ["--config", "X.yaml", "a.b=1", "--out", "D", "c.d=2"],
        ["a.b=1", "--config", "X.yaml", "c.d=2", "--out", "D"],
        ["--out=D", "a.b=1", "c.d=2", "--config=X.yaml"],
    ],
)
def test_options_and_overrides_in_any_order(command: str, rest: list) -> None:
    args = parse_args([command, *rest])
    assert (args.command, args.config, args.out, args.overrides) == (command, "X.yaml", "D", ["a.b=1", "c.d=2"])


def test_no_options() -> None:
    args = parse_args(["train"])
    assert (args.command, args.config, args.out, args.overrides) == ("train", None, None, [])


def test_unknown_option_and_command_are_argparse_errors(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["train", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_late_override_reaches_the_config(capsys: pytest.CaptureFixture) -> None:
    # An unknown key after --out is validated like any other override (it used to be rejected by argparse).
    code = main(["eval-nfe-sweep", "--config", "experiments/digits.yaml", "eval.seed=1", "--out", "unused",
                 "eval.not_a_key=2"])
    assert code == 2
    assert "unknown config key 'eval.not_a_key'" in capsys.readouterr().err
