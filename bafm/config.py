"""Experiment configuration: the schema of ``bafm.schema`` merged with OmegaConf.

Merge order: dataclass defaults -> ``experiments/<name>.yaml`` -> CLI dotlist overrides.
Every key is validated against the schema before any work starts: an unknown key names the
closest valid ones, a wrong type names the key, the value and the expected type.

Paths (``PATH_KEYS``) are made absolute once, here, so that a command gives the same result from
any working folder: a relative path from the experiment file or from the defaults resolves
against the experiment's root (``experiment_root``), a relative path given on the command line
against the current folder, as a shell user expects.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bafm.schema import ExperimentConfig

if TYPE_CHECKING:
    from bafm.sampling import SamplingSettings


class ConfigError(ValueError):
    """A configuration file or override that does not match the schema."""


# Keys that hold file or folder paths; an empty value means "not set" and stays empty.
PATH_KEYS = (
    "runs_dir", "checkpoints_dir", "data.root", "data.image_dir", "data.list_file", "data.vae_path",
    "backbone.path", "sidenet.path", "sampling.grid_file", "eval.classifier_path", "eval.inception_weights",
    "eval.reference_stats", "eval.out_dir", "backbone_train.out", "backbone_train.classifier_out",
    "edit.image_dir", "edit.out_dir", "trainer.resume", "data.captions_file", "eval.captions_file",
    "eval.reference_images", "eval.clip_model",
)
# trainer.resume also takes this word instead of a path.
_NOT_PATHS = {"trainer.resume": ("last",)}

# Dict-valued keys whose experiment value replaces the default instead of merging into it.
_OPEN_DICTS = {"eval.budgets", "eval.tolerances", "edit.budgets", "optimize_grid.budgets"}


def _check_keys(schema: DictConfig, given: Any, where: str, prefix: str = "") -> None:
    """Raise ConfigError for keys in ``given`` that the schema does not have."""
    if not isinstance(given, (dict, DictConfig)):
        return
    valid = list(schema.keys())
    for key in given.keys():
        full = f"{prefix}{key}"
        if full in _OPEN_DICTS:
            continue
        if key not in valid:
            close = difflib.get_close_matches(str(key), [str(k) for k in valid], n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"{where}: unknown config key '{full}'.{hint} "
                f"Valid keys here: {', '.join(prefix + str(k) for k in valid)}."
            )
        child = schema._get_node(key)
        if isinstance(child, DictConfig):
            _check_keys(child, given[key], where, prefix=f"{full}.")


def _merge(base: DictConfig, update: DictConfig, where: str, replace_open_dicts: bool = True) -> DictConfig:
    """Merge ``update`` into ``base``; an experiment file's open dict replaces the default one,
    a command-line ``eval.budgets.euler=[5]`` changes only that key (``replace_open_dicts=False``)."""
    _check_keys(base, update, where)
    for key in _OPEN_DICTS if replace_open_dicts else ():
        if OmegaConf.select(update, key, default=None) is not None:
            OmegaConf.update(base, key, {}, merge=False)
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{where}: bad value for '{key}': {message}.") from None


def experiment_root(experiment: str | Path) -> Path:
    """The folder that relative paths in an experiment file resolve against.

    The folder above ``experiments/`` when the file lies in a folder of that name (every shipped
    experiment: ``<checkout>/experiments/<name>.yaml`` gives ``<checkout>``), else the file's own
    folder.
    """
    folder = Path(experiment).expanduser().resolve().parent
    return folder.parent if folder.name == "experiments" else folder


def _absolute(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _is_hub_id(cfg: DictConfig, key: str, value: str, base: Path) -> bool:
    """An SD3/Flux ``backbone.path`` or an ``eval.clip_model`` of the form ``owner/name`` with no such
    folder under ``base``: a Hugging Face hub id, which stays as written."""
    text_backbone = key == "backbone.path" and OmegaConf.select(cfg, "backbone.source", default=None) in ("sd3", "flux")
    if not (text_backbone or key == "eval.clip_model"):
        return False
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not (base / value).exists()


def _resolve_paths(cfg: DictConfig, base: Path, only: Optional[DictConfig] = None) -> None:
    """Make the relative ``PATH_KEYS`` of ``cfg`` absolute against ``base`` (in place).

    With ``only``, just the keys that ``only`` sets (the command-line overrides). Hub ids of
    SD3/Flux backbones are not paths and stay as they are.
    """
    for key in PATH_KEYS:
        if only is not None and OmegaConf.select(only, key, default=None) is None:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if not value or value in _NOT_PATHS.get(key, ()) or _is_hub_id(cfg, key, str(value), base):
            continue
        OmegaConf.update(cfg, key, _absolute(str(value), base), merge=False)


def load_config(
    experiment: Optional[str | Path] = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Build the experiment config.

    Args:
        experiment: path to an experiment YAML, or None for the defaults.
        overrides: OmegaConf dotlist entries such as ``"trainer.max_steps=10"``.

    Returns:
        A validated, read-only structured config (typed like ``ExperimentConfig``) whose paths
        are absolute: the experiment file's and the defaults' relative to ``experiment_root``
        (the current folder without an experiment file), the overrides' relative to the current
        folder.

    Raises:
        ConfigError: unknown key, wrong type or unreadable file, naming the culprit.
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    root = Path.cwd()
    if experiment:
        path = Path(experiment).expanduser().absolute()
        if not path.is_file():
            near = path.parent if path.parent.is_dir() else Path.cwd() / "experiments"
            available = sorted(p.name for p in near.glob("*.yaml"))
            listed = f" Available: {', '.join(available)} (in {near})." if available else f" No experiments in {near}."
            raise ConfigError(f"experiment file '{path}' not found.{listed}")
        try:
            exp = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
        if not isinstance(exp, DictConfig):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(exp).__name__}.")
        cfg = _merge(cfg, exp, str(path))
        root = experiment_root(path)
    _resolve_paths(cfg, root)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not of the form key=value.")
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from None
        cfg = _merge(cfg, dot, "command-line override", replace_open_dicts=False)
        _resolve_paths(cfg, Path.cwd(), only=dot)
    _validate_values(cfg)
    _check_plans(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


def _finite(value: float) -> bool:
    return math.isfinite(float(value))


def _probability(value: float) -> bool:
    return _finite(value) and 0.0 <= value <= 1.0


# key -> (check, what is expected); checked at load, so bad values fail before any work.
_RANGES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "data.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "data.shuffle_buffer": (lambda v: v >= 0, "an integer >= 0 (0: no shuffling)"),
    "data.samples_per_shard": (lambda v: v >= 1, "an integer >= 1"),
    "data.encode_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.max_sequence_length": (lambda v: v >= 1, "an integer >= 1"),
    "sidenet.patch_size": (lambda v: v >= 1, "an integer >= 1"),
    "loss.links": (lambda v: v >= 1, "an integer >= 1"),
    "loss.offset_rate": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "loss.p_backward": (_probability, "a probability in [0, 1]"),
    "loss.label_dropout": (_probability, "a probability in [0, 1]"),
    "optim.lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "optim.grad_clip": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    "optim.ema_decay": (_probability, "a number in [0, 1]"),
    "optim.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "data.val_fraction": (lambda v: _finite(v) and 0 < v < 1, "a fraction in (0, 1)"),
    "trainer.max_steps": (lambda v: v >= 1 or v == -1, "an integer >= 1, or -1 to train until stopped with Ctrl-C"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.checkpoint_every_n_steps": (lambda v: v >= 1, "an integer >= 1"),
    "sampling.cfg_scale": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (1: no guidance)"),
    "sampling.shift": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "sample.nfe": (lambda v: v >= 1, "an integer >= 1"),
    "sample.num_images": (lambda v: v >= 1, "an integer >= 1"),
    "sample.height": (lambda v: v >= 16 and v % 16 == 0, "a multiple of 16 pixels"),
    "sample.width": (lambda v: v >= 16 and v % 16 == 0, "a multiple of 16 pixels"),
    "eval.num_samples": (lambda v: v >= 2, "an integer >= 2 (FID needs at least two samples)"),
    "eval.callback_num_samples": (lambda v: v >= 2, "an integer >= 2 (FID needs at least two samples)"),
    "eval.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.every_n_steps": (lambda v: v >= 0, "an integer >= 0 (0: no sweeps while training)"),
}


def _check_run_name(cfg: DictConfig) -> None:
    """A run name is one path component, and run folders stay out of the committed checkpoints."""
    name = str(cfg.name)
    separators = {"/", os.sep, os.altsep or "/"}
    if not name.strip() or name in (".", "..") or any(sep in name for sep in separators):
        raise ConfigError(f"'name' is '{name}', expected a run name: one folder name under runs_dir "
                          "(not empty, no '/', not '.' or '..').")
    run, weights = Path(cfg.runs_dir, name).resolve(), Path(cfg.checkpoints_dir).resolve()
    if run == weights or weights in run.parents:
        raise ConfigError(f"the run folder '{run}' (runs_dir/name) lies inside checkpoints_dir '{weights}', "
                          "which holds the committed weights; choose another runs_dir.")


def _choices() -> Dict[str, Sequence[str]]:
    """key -> allowed values; the lists that a registry or a module owns are read from it."""
    from bafm.eval.features import FEATURE_EXTRACTORS
    from bafm.eval.grid_plan import SEARCH_METHODS
    from bafm.eval.metrics import METRICS_CONVENTIONS
    from bafm.models.diffusers_flow import FAMILIES
    from bafm.models.sit import TIME_CONVENTIONS
    from bafm.solvers import reference_solvers
    from bafm.solvers.grids import GRID_KINDS

    return {
        "data.on_error": ("raise", "skip"),
        "data.source": ("digits", "folder", "captions"),
        "backbone.source": (*TIME_CONVENTIONS, *FAMILIES),  # SiT conventions, or a diffusers SD3/Flux transformer
        "sampling.grid": GRID_KINDS,
        # "clip": FD on CLIP image embeddings, for the SD3/Flux sweep (bafm.eval.text_sweep).
        "eval.feature_extractor": (*FEATURE_EXTRACTORS, "clip"),
        "eval.metrics_convention": tuple(METRICS_CONVENTIONS),
        "optimize_grid.method": SEARCH_METHODS,
        "eval.reference_solver": tuple(reference_solvers()),
    }


def _check_plans(cfg: DictConfig) -> None:
    """Every plan (sweep, training callback, edit, grid search) against the solver registry (``bafm.plans``)."""
    from bafm.plans import check_plans

    try:
        check_plans(cfg)
    except ValueError as err:
        raise ConfigError(str(err).rstrip(".") + ".") from None


def _validate_values(cfg: DictConfig) -> None:
    """Check enumerated string values and numeric ranges, which OmegaConf types cannot express."""
    _check_run_name(cfg)
    for key, allowed in _choices().items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"'{key}' is '{value}', expected one of: {', '.join(allowed)}.")
    for key, (ok, expected) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None or not ok(value):
            raise ConfigError(f"'{key}' is {value}, expected {expected}.")
    from bafm.solvers import is_adaptive, reference_solvers

    ec = cfg.eval
    if not is_adaptive(reference_solvers()[ec.reference_solver]) and ec.reference_steps < 1:
        raise ConfigError(f"'eval.reference_steps' is {ec.reference_steps}, expected >= 1 for the "
                          f"{ec.reference_solver} reference.")
    interval = list(cfg.sampling.guidance_interval)
    if len(interval) != 2 or not 0.0 <= interval[0] < interval[1] <= 1.0:
        raise ConfigError(
            f"'sampling.guidance_interval' is {interval}, expected [lo, hi] with 0 <= lo < hi <= 1."
        )
    shift = cfg.backbone_train.classifier_max_shift
    if shift < 0:
        raise ConfigError(f"'backbone_train.classifier_max_shift' is {shift}, expected a number of pixels >= 0.")


def to_container(cfg: Any) -> Dict[str, Any]:
    """Plain-dict view of a config (for logging and export)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def run_dir(cfg: ExperimentConfig) -> Path:
    """``runs/<experiment>``."""
    return Path(cfg.runs_dir) / cfg.name


def checkpoint_dir(cfg: ExperimentConfig) -> Path:
    """``checkpoints/<experiment>``."""
    return Path(cfg.checkpoints_dir) / cfg.name


def missing_backbone(cfg: ExperimentConfig) -> Optional[str]:
    """None when ``backbone.path`` is a file, else the one-line message every command gives."""
    if Path(cfg.backbone.path).is_file():
        return None
    hint = ("check backbone.path, or make it with `make backbone` (about 70 min on 2 CPU cores)"
            if cfg.data.source == "digits" else "download the pretrained checkpoint and set backbone.path")
    return f"backbone checkpoint '{cfg.backbone.path}' not found; {hint}."


def exported_sidenet_path(cfg: ExperimentConfig) -> Path:
    """Where ``bafm train`` exports the EMA SideNet: ``runs/<experiment>/sidenet.safetensors``."""
    return run_dir(cfg) / "sidenet.safetensors"


def sidenet_choice(cfg: ExperimentConfig) -> Tuple[Path, str]:
    """The SideNet used for sampling and why that one.

    ``sidenet.path`` when set; else this experiment's training export when one exists; else the
    default that ships with the repository, ``checkpoints/<experiment>/sidenet.safetensors``.

    Returns:
        ``(path, reason)``; ``reason`` is a short phrase for the user.
    """
    if cfg.sidenet.path:
        return Path(cfg.sidenet.path), "sidenet.path"
    export = exported_sidenet_path(cfg)
    if export.is_file():
        return export, "this experiment's training export"
    return checkpoint_dir(cfg) / "sidenet.safetensors", "default checkpoint; no training export in " + str(run_dir(cfg))


def sidenet_path(cfg: ExperimentConfig) -> Path:
    """The SideNet used for sampling (see ``sidenet_choice``)."""
    return sidenet_choice(cfg)[0]


def grid_file_path(cfg: ExperimentConfig) -> Path:
    """Where ``bafm optimize-grid`` writes: ``sampling.grid_file``, else ``<stem>.grids.json`` in the run folder.

    ``<stem>`` is the SideNet in use's. The run folder, not the SideNet's own folder, so a search never
    rewrites the grids shipped beside a committed SideNet.
    """
    if cfg.sampling.grid_file:
        return Path(cfg.sampling.grid_file)
    return run_dir(cfg) / f"{sidenet_path(cfg).stem}.grids.json"


def grid_file_candidates(cfg: ExperimentConfig) -> List[Path]:
    """Where ``sampling.grid=optimized`` looks, in order: ``sampling.grid_file`` alone when set; else
    ``grid_file_path(cfg)`` (a search's output), then ``<stem>.grids.json`` beside the SideNet in use
    (grids shipped with it)."""
    if cfg.sampling.grid_file:
        return [Path(cfg.sampling.grid_file)]
    side = sidenet_path(cfg)
    searched, shipped = grid_file_path(cfg), side.with_name(f"{side.stem}.grids.json")
    return [searched] if searched == shipped else [searched, shipped]


def sampling_settings(cfg: ExperimentConfig, cfg_scale: Optional[float] = None) -> "SamplingSettings":
    """``cfg.sampling`` as the sampling path's settings; ``cfg_scale`` overrides the guidance scale."""
    from bafm.sampling import SamplingSettings  # noqa: F811 (deferred: the config loads without torch)

    sc = cfg.sampling
    return SamplingSettings(grid=str(sc.grid), shift=float(sc.shift),
                            cfg_scale=float(sc.cfg_scale if cfg_scale is None else cfg_scale),
                            guidance_interval=tuple(float(v) for v in sc.guidance_interval),
                            mu=None if sc.mu is None else float(sc.mu))  # fmt: skip
