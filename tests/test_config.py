"""Config system: defaults -> experiment YAML -> overrides, with errors that name the key."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from bafm.config import ConfigError, ExperimentConfig, load_config

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_there_are_experiments():
    names = {p.name for p in EXPERIMENTS}
    assert {"digits.yaml", "imagenet256_sit_xl2.yaml", "imagenet512_sit_xl2.yaml"} <= names


def test_imagenet_512_is_256_at_twice_the_resolution_in_its_own_shards():
    root = Path(__file__).resolve().parents[1] / "experiments"
    in256, in512 = load_config(root / "imagenet256_sit_xl2.yaml"), load_config(root / "imagenet512_sit_xl2.yaml")
    assert (in256.data.resolution, in512.data.resolution) == (256, 512)
    assert in256.data.dataset != in512.data.dataset  # 256 and 512 shards never share a folder
    assert in256.backbone.path != in512.backbone.path and in256.eval.reference_stats != in512.eval.reference_stats
    for section in ("sidenet", "loss", "optim", "sampling"):  # no separate 512 settings are assumed
        assert OmegaConf.to_container(in256[section]) == OmegaConf.to_container(in512[section]), section
    assert (in512.eval.reference_solver, in512.eval.reference_steps) == ("rk4", 50)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_instantiates(path):
    cfg = load_config(path)
    assert OmegaConf.get_type(cfg) is ExperimentConfig
    assert cfg.name == path.stem
    for solver in cfg.eval.solvers:  # a fixed-grid solver needs budgets, an adaptive one tolerances
        assert solver in cfg.eval.budgets or solver in cfg.eval.tolerances, f"{path.name}: no budgets for {solver}"


def test_merge_order_defaults_yaml_overrides(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("name: e\ntrainer:\n  max_steps: 7\n  log_every_n_steps: 3\n")
    cfg = load_config(exp, ["trainer.max_steps=11"])
    assert cfg.trainer.max_steps == 11  # override wins
    assert cfg.trainer.log_every_n_steps == 3  # yaml wins over default
    assert cfg.trainer.checkpoint_every_n_steps == ExperimentConfig().trainer.checkpoint_every_n_steps


def test_budgets_in_an_experiment_replace_the_defaults(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("eval:\n  solvers: [ba]\n  budgets:\n    ba: [5]\noptimize_grid:\n  solvers: [ba]\n")
    cfg = load_config(exp)
    assert dict(cfg.eval.budgets) == {"ba": [5]}


def test_a_sweep_plan_without_budgets_for_a_listed_solver_fails_at_load(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("eval:\n  budgets:\n    ba: [5]\n")  # eval.solvers still lists euler, heun, ...
    with pytest.raises(ConfigError, match=r"^no NFE budgets for solver 'euler': set eval.budgets.euler=\[...\]\.$"):
        load_config(exp)


@pytest.mark.parametrize("overrides, message", [
    (["eval.callback_solvers=[ba,heun]", "eval.callback_budgets=[5,10]"],
     r"^eval.callback_budgets: solver 'heun' cannot spend exactly 5 NFE \(2 per step\); nearest: 4 or 6\.$"),
    (["eval.callback_solvers=[ba,eulr]"], r"^unknown solver 'eulr' in eval.callback_solvers; valid solvers: ab2, "),
    (["eval.callback_budgets=[0]"], r"^eval.callback_budgets: budget 0 is not a positive integer\.$"),
    (["eval.callback_solvers=[ba-adaptive]", "eval.tolerances={ba-adaptive: []}"],
     r"^no tolerances for adaptive solver 'ba-adaptive': set eval.tolerances.ba-adaptive=\[...\]\.$"),
    (["edit.solvers=[heun]", "edit.budgets={heun: [7]}"], r"^edit.budgets.heun: solver 'heun' cannot spend exactly 7"),
    (["edit.solvers=[ba-adaptive]", "eval.tolerances={ba-adaptive: [-1.0]}"],
     r"^eval.tolerances.ba-adaptive: tolerance -1.0 is not a positive number\.$"),
    (["optimize_grid.solvers=[ba-adaptive]"], r"^optimize_grid.solvers: 'ba-adaptive' is not a fixed-grid solver; "),
])
def test_every_plan_is_checked_when_the_config_is_loaded(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_step'.*trainer.max_steps"):
        load_config(None, ["trainer.max_step=3"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    exp = tmp_path / "bad.yaml"
    exp.write_text("optim:\n  lr: 1e-3\n  emma_decay: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.emma_decay'.*optim.ema_decay"):
        load_config(exp)


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"trainer.max_steps.*'abc'.*Integer"):
        load_config(None, ["trainer.max_steps=abc"])


def test_bad_choice_lists_allowed():
    with pytest.raises(ConfigError, match=r"data.on_error.*raise, skip"):
        load_config(None, ["data.on_error=ignore"])


def test_bad_guidance_interval():
    with pytest.raises(ConfigError, match="guidance_interval"):
        load_config(None, ["sampling.guidance_interval=[0.8,0.2]"])


def test_missing_experiment_file_lists_available():
    with pytest.raises(ConfigError, match=r"not found. Available: .*digits.yaml"):
        load_config("experiments/nope.yaml")


def test_config_is_read_only():
    cfg = load_config(None)
    with pytest.raises(ReadonlyConfigError, match=r"read-only config(.|\n)*full_key: trainer\.max_steps"):
        cfg.trainer.max_steps = 3


def test_negative_classifier_shift_is_rejected():
    expected = r"'backbone_train.classifier_max_shift' is -1, expected a number of pixels >= 0"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["backbone_train.classifier_max_shift=-1"])
