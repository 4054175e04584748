"""Bad input gives one line on stderr and exit code 2 before any work, for every command; a
bug keeps its traceback. Also: which SideNet a sweep or edit uses, and damaged cached files."""

import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bafm.cli import main
from bafm.config import load_config
from bafm.eval.engine import SweepEngine
from bafm.eval.features import build_feature_extractor
from bafm.eval.reference_stats import cache_path, load_stats, resolve_reference_stats
from bafm.models.checkpoint_io import CheckpointError
from bafm.models.loading import load_backbone, load_sidenet
from factories import tiny_model_overrides

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits.yaml")


def _tiny_overrides(tiny, tmp_path):
    return tiny_model_overrides(tiny, tmp_path, with_sidenet=False)


def _sweep(tiny, tmp_path, *extra):
    return ["eval-nfe-sweep", "--config", DIGITS, "--out", str(tmp_path / "out"), *_tiny_overrides(tiny, tmp_path),
            "eval.num_samples=8", "eval.batch_size=8", "eval.include_reference=false", "eval.grid_images=0",
            "eval.device=cpu", "eval.solvers=[ba]", "eval.budgets.ba=[3]", *extra]


def _edit(tiny, tmp_path, *extra):
    return ["edit", "--config", DIGITS, "--out", str(tmp_path / "edit"), *_tiny_overrides(tiny, tmp_path),
            f"sidenet.path={tiny / 'sidenet.safetensors'}", "edit.device=cpu", "edit.indices=[0,1]",
            "edit.target_class=3", "edit.solvers=[euler]", "edit.budgets.euler=[2]", *extra]


@pytest.mark.parametrize("override, message", [
    ("loss.links=0", "'loss.links' is 0, expected an integer >= 1."),
    ("data.batch_size=0", "'data.batch_size' is 0, expected an integer >= 1."),
    ("loss.offset_rate=0", "'loss.offset_rate' is 0.0, expected a finite number > 0."),
    ("loss.p_backward=1.5", "'loss.p_backward' is 1.5, expected a probability in [0, 1]."),
    ("loss.label_dropout=-0.1", "'loss.label_dropout' is -0.1, expected a probability in [0, 1]."),
    ("optim.ema_decay=1.01", "'optim.ema_decay' is 1.01, expected a number in [0, 1]."),
    ("sampling.cfg_scale=-1", "'sampling.cfg_scale' is -1.0, expected a finite number >= 0 (1: no guidance)."),
    ("sampling.cfg_scale=inf", "'sampling.cfg_scale' is inf, expected a finite number >= 0 (1: no guidance)."),
    ("trainer.checkpoint_every_n_steps=0", "'trainer.checkpoint_every_n_steps' is 0, expected an integer >= 1."),
    ("data.shuffle_buffer=-1", "'data.shuffle_buffer' is -1, expected an integer >= 0 (0: no shuffling)."),
    ("eval.num_samples=1", "'eval.num_samples' is 1, expected an integer >= 2 (FID needs at least two samples)."),
])
def test_out_of_range_values_fail_at_load_for_every_command(override, message, capsys):
    for command in ("train", "eval-nfe-sweep", "edit", "data"):
        assert main([command, "--config", DIGITS, override]) == 2
        assert capsys.readouterr().err == f"bafm {command}: config error: {message}\n"


def test_missing_backbone_same_line_in_train_and_sweep(tiny, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    lines = {}
    for command in ("train", "eval-nfe-sweep", "edit"):
        sweep = [*_sweep(tiny, tmp_path)[3:], f"sidenet.path={tiny / 'sidenet.safetensors'}"]
        args = {"train": [], "eval-nfe-sweep": sweep, "edit": _edit(tiny, tmp_path)[3:]}[command]
        assert main([command, "--config", DIGITS, *args, f"backbone.path={missing}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"bafm {command}: ")
        lines[command] = err.split(": ", 1)[1]
    assert set(lines.values()) == {f"backbone checkpoint '{missing}' not found; check backbone.path, or make it with "
                                   "`make backbone` (about 70 min on 2 CPU cores).\n"}


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def broken(cfg, out):
        raise KeyError("a bug")

    monkeypatch.setattr("bafm.eval.sweep.run", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["eval-nfe-sweep", "--config", DIGITS])


def test_damaged_checkpoint_is_not_a_readable_checkpoint(tiny, tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "random.pt").write_bytes(rng.bytes(4096))
    torch.save(load_sidenet(tiny / "sidenet.safetensors").state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    for name in ("random.pt", "truncated.pt"):
        with pytest.raises(CheckpointError, match=rf"{name}: not a readable checkpoint"):
            load_backbone(tmp_path / name, "SiT-S/2")
        with pytest.raises(CheckpointError, match=rf"{name}: not a readable checkpoint"):
            load_sidenet(tmp_path / name)
    # Through the CLI: one line, exit code 2.
    assert main(_sweep(tiny, tmp_path, f"sidenet.path={tmp_path / 'truncated.pt'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"bafm eval-nfe-sweep: {tmp_path / 'truncated.pt'}: not a readable checkpoint")


def test_corrupt_reference_cache_is_recomputed_with_a_warning(tiny, tmp_path):
    cfg = load_config(DIGITS, [f"data.root={tmp_path / 'data'}"])
    extractor = build_feature_extractor("classifier", classifier_path=tiny / "classifier.safetensors")
    fresh = resolve_reference_stats(cfg.eval, cfg.data, extractor, seed=cfg.seed)
    cached = cache_path(cfg.data)
    cached.write_bytes(cached.read_bytes()[:100])  # truncated zip
    with pytest.warns(UserWarning, match=rf"{cached}: unreadable cached reference statistics"):
        again = resolve_reference_stats(cfg.eval, cfg.data, extractor, seed=cfg.seed)
    torch.testing.assert_close(torch.as_tensor(again.pool.mu), torch.as_tensor(fresh.pool.mu))
    torch.testing.assert_close(torch.as_tensor(load_stats(cached)[0].sigma), torch.as_tensor(fresh.pool.sigma))


def test_sweep_and_edit_say_which_sidenet_they_use(tiny, tmp_path, capsys):
    default = tmp_path / "checkpoints" / "digits" / "sidenet.safetensors"
    default.parent.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny / f"sidenet{suffix}", default.with_suffix(suffix))
    assert main(_sweep(tiny, tmp_path)) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"SideNet: {default} (default checkpoint; no training export in {tmp_path / 'runs' / 'digits'})"
    export = tmp_path / "runs" / "digits" / "sidenet.safetensors"
    export.parent.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny / f"sidenet{suffix}", export.with_suffix(suffix))
    assert main(_sweep(tiny, tmp_path)) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"SideNet: {export} (this experiment's training export)"
    assert main(_edit(tiny, tmp_path)) == 0
    assert capsys.readouterr().out.splitlines()[0] == "SideNet: not needed (no solver here uses one)"


@pytest.mark.parametrize("command", ["eval-nfe-sweep", "edit"])
def test_unwritable_output_fails_before_sampling(command, tiny, tmp_path, capsys, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the output folder")

    monkeypatch.setattr(SweepEngine, "run", no_sampling)
    monkeypatch.setattr("bafm.editing.edit._edit_all", no_sampling)
    build = _sweep if command == "eval-nfe-sweep" else _edit
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out, why in [(blocker, "is an existing file"), (blocker / "sub", f"lies under the file '{blocker}'")]:
        args = [*build(tiny, tmp_path), f"sidenet.path={tiny / 'sidenet.safetensors'}"]
        args[args.index("--out") + 1] = str(out)
        assert main(args) == 2
        assert capsys.readouterr().err == f"bafm {command}: output folder '{out}' {why}; pass a folder (--out)\n"


def test_cli_budget_override_changes_one_solver_only():
    from omegaconf import OmegaConf

    experiment = OmegaConf.load(DIGITS).eval.budgets
    cfg = load_config(DIGITS, ["eval.budgets.euler=[5]"])
    assert dict(cfg.eval.budgets) == {**OmegaConf.to_container(experiment), "euler": [5]}
    # The experiment file's own mapping still replaces the defaults' mapping.
    assert set(load_config(DIGITS).eval.budgets) == set(experiment)
    assert "rk4" in load_config(None).eval.budgets and "rk4" not in experiment


def test_make_passes_out_with_spaces_as_one_argument():
    done = subprocess.run(["make", "-n", "-C", str(ROOT), "eval-nfe-sweep", "OUT=dir with spaces",
                           "ARGS=eval.num_samples=8"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stdout.splitlines() if "-m bafm eval-nfe-sweep" in l)
    argv = shlex.split(line)
    assert argv[argv.index("--out") + 1] == "dir with spaces"
    assert argv[argv.index("--config") + 1] == "experiments/digits.yaml" and argv[-1] == "eval.num_samples=8"
