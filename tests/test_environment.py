"""environment.yml and pyproject.toml pin the same packages; the layout is the project card's."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(requirements):
    pins = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", req.strip())
        assert match, f"unpinned requirement: {req!r}"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = _pins([r for r in pip_section if not r.startswith("-e")])
    assert conda_pins == wanted


def test_layout():
    for name in ["bafm", "experiments", "data", "checkpoints", "tests", "Makefile",
                 "environment.yml", "README.md", "pyproject.toml", ".ci/run"]:
        assert (ROOT / name).exists(), name


def test_makefile_targets_documented():
    text = (ROOT / "Makefile").read_text()
    for target in ["setup", "data", "backbone", "train", "eval-nfe-sweep", "edit", "test",
                   "tensorboard", "bench", "help"]:
        assert re.search(rf"^{re.escape(target)}:.*## ", text, re.M), f"target {target} missing or undocumented"
