"""Runs stay in their folder and one run owns it: run names, committed files, the run-folder lock,
the fresh-run guard over every output and resuming with another SideNet size."""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bafm.cli import main
from bafm.training.run_lock import LOCK_NAME, RunFolderError, RunFolderLock
from factories import tiny_digits_models, tiny_digits_overrides

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits.yaml")


def _train(tmp_path, *extra):
    return ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "eval.every_n_steps=0",
            "trainer.checkpoint_every_n_steps=1", "trainer.accelerator=cpu", "trainer.max_steps=1", *extra]


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.org", "-c", "user.name=t", *args],
                          capture_output=True, text=True, check=True)
    return done.stdout


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A small git checkout with committed weights, grids and a committed dataset manifest."""
    repo = tmp_path / "checkout"
    models = tiny_digits_models(repo / "checkpoints" / "digits")
    weights = repo / "weights" / "digits"
    weights.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(models["sidenet"].with_suffix(suffix), weights / f"sidenet{suffix}")
    (weights / "sidenet.grids.json").write_text("{}\n")
    (repo / "data" / "shipped").mkdir(parents=True)
    (repo / "data" / "shipped" / "manifest.json").write_text("{}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "committed files")
    return repo


def _digests(repo: Path) -> dict:
    return {name: hashlib.sha256((repo / name).read_bytes()).hexdigest()
            for name in _git(repo, "ls-files").split()}


def test_escaping_run_names_and_committed_files_are_refused(checkout, tmp_path, monkeypatch, capsys):
    before = _digests(checkout)
    monkeypatch.chdir(checkout)  # relative command-line paths resolve here, as in a shell
    models = checkout / "checkpoints" / "digits"
    common = ["--config", DIGITS, f"backbone.path={models / 'backbone.safetensors'}", "backbone.depth=null",
              "backbone.hidden_size=null", "backbone.num_heads=null", f"eval.classifier_path={models / 'classifier.safetensors'}",
              "checkpoints_dir=checkpoints", f"data.root={tmp_path / 'data'}", "trainer.max_steps=1"]
    name_error = "expected a run name: one folder name under runs_dir (not empty, no '/', not '.' or '..')."
    cases = [
        (["train", "runs_dir=runs", "name=../checkpoints/digits"], f"config error: 'name' is '../checkpoints/digits', {name_error}"),
        (["train", "name=/some/where"], f"config error: 'name' is '/some/where', {name_error}"),
        (["train", "name=''"], f"config error: 'name' is '', {name_error}"),
        (["train", "runs_dir=checkpoints", "name=digits"],
         f"config error: the run folder '{models}' (runs_dir/name) lies inside checkpoints_dir '{checkout / 'checkpoints'}', "
         "which holds the committed weights; choose another runs_dir."),
        (["backbone", "runs_dir=checkpoints", "name=digits"],
         f"config error: the run folder '{models}' (runs_dir/name) lies inside checkpoints_dir '{checkout / 'checkpoints'}', "
         "which holds the committed weights; choose another runs_dir."),
        (["backbone", "--out", "checkpoints/digits", "backbone_train.steps=1", "backbone_train.classifier_steps=1",
          f"backbone_train.out={tmp_path / 'backbone.safetensors'}"],
         f"bafm backbone's classifier file '{models / 'classifier.safetensors'}' would overwrite files committed to git "
         f"('{models / 'classifier.safetensors'}'); pass the file itself with --out to replace it"),
        (["train", "runs_dir=weights", "name=digits"],
         f"bafm train's run folder '{checkout / 'weights' / 'digits'}' would overwrite files committed to git "
         f"('{checkout / 'weights/digits/sidenet.grids.json'}', '{checkout / 'weights/digits/sidenet.json'}', "
         f"'{checkout / 'weights/digits/sidenet.safetensors'}'); choose another runs_dir= or name="),
        (["optimize-grid", "runs_dir=weights", "name=digits", f"sidenet.path={models / 'sidenet.safetensors'}",
          "optimize_grid.solvers=[euler]", "optimize_grid.budgets={euler: [2]}"],
         f"bafm optimize-grid's grid file '{checkout / 'weights/digits/sidenet.grids.json'}' would overwrite files "
         f"committed to git ('{checkout / 'weights/digits/sidenet.grids.json'}'); pass the file itself with --out to "
         "replace it"),
        (["data", "--out", "data/shipped"],
         f"bafm data's dataset folder '{checkout / 'data' / 'shipped'}' would overwrite files committed to git "
         f"('{checkout / 'data/shipped/manifest.json'}'); pass another --out or data.dataset="),
    ]
    for args, message in cases:
        assert main([args[0], *common, *args[1:]]) == 2, args
        assert capsys.readouterr().err == f"bafm {args[0]}: {message}\n"
    assert _git(checkout, "status", "--porcelain", "--untracked-files=all") == ""
    assert _digests(checkout) == before


_HOLDER = """
import sys
from bafm.training.run_lock import RunFolderLock
lock = RunFolderLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.read()  # hold it until the test closes stdin (or kills this process)
"""


def _hold(run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env)
    assert proc.stdout.readline() == b"locked\n"  # barrier: the other process holds the lock now
    return proc


def test_second_process_on_a_run_folder_stops_at_once_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    run = tmp_path / "runs" / "digits"
    holder = _hold(run)
    try:
        assert main(_train(tmp_path)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert re.fullmatch(rf"bafm train: run folder '{re.escape(str(run))}' is in use by another run \(pid "
                            rf"{holder.pid} on \S+ since [0-9: -]+: -c {re.escape(str(run))}\); wait for it to finish, "
                            r"or pick another name=\n", err)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing else written
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without removing its lock file
        holder.wait()
    assert f"pid {holder.pid} on" in (run / LOCK_NAME).read_text()
    with pytest.warns(UserWarning, match=rf"taking over the stale lock of a run that is no longer running \(pid {holder.pid} "):
        assert main(_train(tmp_path)) == 0
    assert (run / "sidenet.safetensors").is_file() and not (run / LOCK_NAME).exists()


def test_lock_is_released_and_reacquired_in_one_process(tmp_path):
    with RunFolderLock(tmp_path / "run"):
        with pytest.raises(RunFolderError, match=rf"run folder '{tmp_path / 'run'}' is in use by another run \(pid {os.getpid()} "):
            RunFolderLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with RunFolderLock(tmp_path / "run"):  # free again, no stale-lock warning
        pass


def test_fresh_run_guard_covers_the_export_and_event_files(tmp_path, capsys):
    assert main(_train(tmp_path)) == 0
    run = tmp_path / "runs" / "digits"
    shutil.rmtree(run / "checkpoints")  # the user deleted the checkpoints, not the run's other outputs
    export = run / "sidenet.safetensors"
    stamp = export.stat().st_mtime_ns
    events = sorted((run / "train").glob("events.out.tfevents.*"))
    capsys.readouterr()
    assert main(_train(tmp_path)) == 2
    assert capsys.readouterr().err == (
        f"bafm train: run folder '{run}' already holds the outputs of an earlier run (sidenet.json, "
        f"sidenet.safetensors, train/events.out.tfevents.{events[0].name.split('tfevents.')[1]} (+2 more)) and no "
        f"checkpoint to resume from; start over with another runs_dir=/name= or after removing '{run}'\n")
    assert export.stat().st_mtime_ns == stamp and sorted((run / "train").glob("events.out.tfevents.*")) == events


def test_resume_with_another_sidenet_size_is_one_line(tmp_path, capsys):
    assert main(_train(tmp_path)) == 0
    capsys.readouterr()
    assert main(_train(tmp_path, "trainer.max_steps=2", "trainer.resume=last", "sidenet.channels=16")) == 2
    last = tmp_path / "runs" / "digits" / "checkpoints" / "last.ckpt"
    assert capsys.readouterr().err == (
        f"bafm train: checkpoint '{last}' was trained with sidenet.channels=8 (now 16); resume with the checkpoint's "
        "sidenet.* settings, or start a fresh run with another name=\n")


def test_ctrl_c_during_training_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from bafm.training.module import SideNetModule

    original, calls = SideNetModule.training_step, []

    def pressed_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during the third step
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SideNetModule, "training_step", pressed_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    try:
        assert main(_train(tmp_path, "trainer.max_steps=5")) == 130
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    ckpts = tmp_path / "runs" / "digits" / "checkpoints"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"bafm train: interrupted; training stopped at step 2; checkpoints in {ckpts}; resume with trainer.resume=last")
    assert (ckpts / "interrupted.ckpt").is_file() and not (tmp_path / "runs" / "digits" / LOCK_NAME).exists()
