"""Bounds before work, one-line errors and exit codes from one mapping, sweep outputs as a set,
paths that resolve the same from any folder, and the Makefile's help and tensorboard lines."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bafm.cli import COMMANDS, exit_code, main
from bafm.config import ConfigError, load_config
from bafm.data.datamodule import LatentDataModule
from bafm.data.manifest import ShardError
from bafm.eval.engine import SweepEngine
from bafm.eval.grid_search import GridSearchError
from bafm.models.checkpoint_io import CheckpointError
from bafm.models.loading import load_sidenet
from factories import synthetic_shards, tiny_digits_overrides, tiny_model_overrides

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits.yaml")


def _tiny(tiny, tmp_path):
    return tiny_model_overrides(tiny, tmp_path)


def _sweep(tiny, tmp_path, out, *extra):
    return ["eval-nfe-sweep", "--config", DIGITS, "--out", str(out), *_tiny(tiny, tmp_path), "eval.num_samples=8",
            "eval.batch_size=8", "eval.include_reference=false", "eval.grid_images=4", "eval.device=cpu", *extra]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- bounds before work


def test_batch_size_larger_than_the_split_stops_before_work(tmp_path, capsys, monkeypatch):
    def no_backbone(*args, **kwargs):
        raise AssertionError("loaded the backbone before checking the batch size")

    monkeypatch.setattr("bafm.training.train.load_backbone", no_backbone)
    args = ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "data.batch_size=100000"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"bafm train: config error: 'data.batch_size' is 100000, more than the 1438 samples of the 'train' split in "
        f"'{tmp_path / 'data' / 'digits8'}'; use at most 1438.\n")


def test_model_configs_are_counted_before_allocating(tiny, tmp_path, capsys):
    side = tmp_path / "side"
    side.mkdir()
    shutil.copy(tiny / "sidenet.safetensors", side / "sidenet.safetensors")
    config = json.loads((tiny / "sidenet.json").read_text())
    for change, message in [
        ({"depth": 100_000_000}, "depth 100000000 is outside the limit of 1 to 1000 blocks; check the model config"),
        ({"channels": 4_000_000, "num_heads": 2},
         r"this config has [0-9,]+ parameters, more than the limit of 10,000,000,000; check the model config"),
    ]:
        (side / "sidenet.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=rf"^{side / 'sidenet.json'}: {message}$"):
            load_sidenet(side / "sidenet.safetensors")
    # The same from the command line, and for a SideNet to be trained.
    assert main(_sweep(tiny, tmp_path, tmp_path / "out", "eval.solvers=[ba]", "eval.budgets.ba=[3]",
                       f"sidenet.path={side / 'sidenet.safetensors'}")) == 2
    assert capsys.readouterr().err.endswith("more than the limit of 10,000,000,000; check the model config\n")
    assert main(["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "sidenet.depth=100000000"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bafm train: sidenet.* settings: depth 100000000 is outside the limit of 1 to 1000 blocks; check the model config")


# ----------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd"])
def test_manifest_shard_names_stay_inside_the_data_folder(name, tmp_path, capsys):
    folder = synthetic_shards(tmp_path / "data" / "syn", shape=(1, 8, 8))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    message = (f"{folder / 'manifest.json'}: split 'train' lists shard '{name}', expected a file name inside "
               f"'{folder}'; re-run `make data` to rewrite the manifest")
    with pytest.raises(ShardError) as caught:
        LatentDataModule(load_config(DIGITS, [f"data.root={tmp_path / 'data'}", "data.dataset=syn"]).data).setup("fit")
    assert str(caught.value) == message
    args = ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "data.source=folder", "data.dataset=syn"]
    assert main(args) == 2
    assert capsys.readouterr().err == f"bafm train: {message}\n"


def test_train_with_another_seed_over_existing_digits_shards(tmp_path, capsys):
    assert main(["data", "--config", DIGITS, f"data.root={tmp_path / 'data'}"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "seed=5"]) == 2
    assert capsys.readouterr().err == (
        f"bafm train: '{tmp_path / 'data' / 'digits8'}' holds digits shards written with other settings: seed=0 "
        "(now 5); the seed fixes the train/val split. Pass data.dataset=<new name> to write shards for these settings "
        "beside them, or go back to the settings of the shards.\n")


def test_pickled_reference_statistics_are_one_line(tiny, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.array([{"not": "numbers"}], dtype=object), sigma=np.eye(2))
    assert main(_sweep(tiny, tmp_path, tmp_path / "out", "eval.solvers=[euler]", "eval.budgets.euler=[2]",
                       f"eval.reference_stats={ref}")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"bafm eval-nfe-sweep: {ref}: holds pickled Python objects, which bafm never loads (unpickling can run code); "
        "save plain arrays instead, e.g. np.savez(path, mu=mu, sigma=sigma)")
    assert not (tmp_path / "out").exists()


def test_every_command_reports_through_one_mapping(monkeypatch, capsys):
    assert exit_code(GridSearchError("x")) == 2 and exit_code(ConfigError("x")) == 2
    assert exit_code(KeyboardInterrupt()) == 130 and exit_code(KeyError("a bug")) is None
    # A command raises; it does not print and return 2 itself.
    cfg = load_config(DIGITS, ["backbone.path=/nonexistent/backbone.safetensors"])  # a plan error stops at load
    from bafm.eval.grid_search import run as optimize_grid

    with pytest.raises(GridSearchError, match="backbone checkpoint '/nonexistent/backbone.safetensors' not found"):
        optimize_grid(cfg)
    for command, (module, function, _, kept) in COMMANDS.items():
        def interrupted(cfg, out):
            raise KeyboardInterrupt

        monkeypatch.setattr(f"{module}.{function}", interrupted)
        assert main([command, "--config", DIGITS]) == 130
        assert capsys.readouterr().err == f"bafm {command}: interrupted; {kept}\n"


# ----------------------------------------------------------------------------- sweep outputs as a set


def test_sweep_outputs_are_replaced_as_a_set(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    assert main(_sweep(tiny, tmp_path, out, "eval.solvers=[ba,euler]", "eval.budgets.ba=[3]",
                       "eval.budgets.euler=[2]")) == 0
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["ba_nfe003.png", "euler_nfe002.png"]
    # A smaller sweep into the same folder: nothing of the first one stays.
    assert main(_sweep(tiny, tmp_path, out, "eval.solvers=[euler]", "eval.budgets.euler=[2]")) == 0
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["euler_nfe002.png"]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [line.split(",")[0] for line in (out / "results.csv").read_text().splitlines()[1:]] == ["euler"]
    kept = _tree(out)
    capsys.readouterr()

    # Ctrl-C during a re-run: one line, exit 130, the previous complete results untouched.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SweepEngine, "run", interrupted)
    assert main(_sweep(tiny, tmp_path, out, "eval.solvers=[ba]", "eval.budgets.ba=[3]")) == 130
    assert capsys.readouterr().err == (f"bafm eval-nfe-sweep: interrupted; nothing written to '{out}'; the previous "
                                       "sweep there is left as it was\n")
    assert _tree(out) == kept and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_sweep_refuses_to_replace_a_folder_of_other_files(tiny, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(_sweep(tiny, tmp_path, tmp_path / "mine", "eval.solvers=[euler]", "eval.budgets.euler=[2]")) == 2
    assert capsys.readouterr().err == (
        f"bafm eval-nfe-sweep: output folder '{tmp_path / 'mine'}' holds files that are not a sweep's (notes.txt); a "
        "sweep replaces its folder as a whole: pass an empty or new folder (--out)\n")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- paths, max_steps, Makefile


def test_paths_resolve_the_same_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DIGITS, ["sidenet.path=mine/side.safetensors"])
    assert cfg.backbone.path == str(ROOT / "checkpoints" / "digits" / "backbone.safetensors")  # experiment file
    assert cfg.runs_dir == str(ROOT / "runs") and cfg.data.root == str(ROOT / "data")  # defaults
    assert cfg.sidenet.path == str(tmp_path / "mine" / "side.safetensors")  # command line: the current folder
    assert cfg.trainer.resume == "" and load_config(DIGITS, ["trainer.resume=last"]).trainer.resume == "last"
    own = tmp_path / "elsewhere" / "e.yaml"  # not in an experiments/ folder: its own folder is the root
    own.parent.mkdir()
    own.write_text("backbone:\n  path: models/b.safetensors\n")
    assert load_config(own).backbone.path == str(own.parent / "models" / "b.safetensors")
    # "Not found" names the absolute path tried.
    assert main(["train", "--config", DIGITS, "backbone.path=nope.safetensors"]) == 2
    assert capsys.readouterr().err.startswith(f"bafm train: backbone checkpoint '{tmp_path / 'nope.safetensors'}' not found;")


def test_max_steps_is_a_count_or_minus_one():
    assert load_config(DIGITS, ["trainer.max_steps=-1"]).trainer.max_steps == -1  # until Ctrl-C
    for value in (0, -2):
        with pytest.raises(ConfigError, match=rf"^'trainer.max_steps' is {value}, expected an integer >= 1, or -1 to "
                                              r"train until stopped with Ctrl-C\.$"):
            load_config(DIGITS, [f"trainer.max_steps={value}"])


def test_make_help_and_tensorboard_without_logs(tmp_path):
    shown = subprocess.run(["make", "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in shown.splitlines() if "optimize-grid" in line)
    assert "JSON in the run folder runs/<name>/" in line and "beside the SideNet" not in line
    (tmp_path / "runs" / "digits").mkdir(parents=True)
    # -o setup: do not build the virtual environment; the check comes before TensorBoard starts.
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "-o", "setup", "tensorboard", f"RUNS={tmp_path / 'runs'}",
                           "VENV=/nonexistent"], capture_output=True, text=True)
    assert done.returncode != 0
    assert f"{tmp_path / 'runs'}/ holds no TensorBoard logs yet: run `make train`" in done.stderr
    assert "nonexistent" not in done.stderr  # TensorBoard was not started
