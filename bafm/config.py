"""Experiment configuration: one dataclass per component, merged with OmegaConf.

Merge order: dataclass defaults -> ``experiments/<name>.yaml`` -> CLI dotlist overrides.
Every key is validated against the schema before any work starts: an unknown key names the
closest valid ones, a wrong type names the key, the value and the expected type.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:
    from bafm.sampling import SamplingSettings


class ConfigError(ValueError):
    """A configuration file or override that does not match the schema."""


@dataclass
class DataConfig:
    """Latent shards (reading) and their preparation (``bafm data``)."""

    dataset: str = "digits"  # shards live in <root>/<dataset>/<split>-%06d.tar
    root: str = "data"
    batch_size: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 1000
    use_flip: bool = True  # pick the flipped moments with probability 0.5 when present
    on_error: str = "raise"  # raise | skip: what a corrupt sample or shard does
    # Sizes are always checked against the manifest; this also checks each shard's sha256 the
    # first time a process opens it (false: size only).
    verify_checksums: bool = True
    # Preparation (``bafm data``).
    source: str = "digits"  # digits | folder
    image_dir: str = ""  # ImageNet-style folder (class sub-folders) for source=folder
    list_file: str = ""  # optional "relative/path.jpg <label>" lines instead of sub-folders
    resolution: int = 256  # ADM center crop + resize
    vae_path: str = ""  # diffusers AutoencoderKL folder or single .safetensors file
    vae_scaling_factor: float = 0.18215
    encode_batch_size: int = 64
    samples_per_shard: int = 1000
    split: str = "train"  # split written by ``bafm data`` for source=folder
    digits_size: int = 16  # digits are upsampled from 8x8 to this size
    val_fraction: float = 0.2  # digits held-out split, fixed by ``seed``


@dataclass
class BackboneConfig:
    """Frozen flow-matching backbone."""

    path: str = "checkpoints/digits/backbone.safetensors"
    arch: str = "SiT-S/2"
    source: str = "repa"  # repa (t=1 noise) | sit (t=0 noise, adapted in the loader)
    # Architecture overrides for non-registry sizes (None keeps the registry's value).
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    # Speed switches (bafm.models.fast.apply_speed_switches); the defaults keep eager float32.
    compile: bool = False  # torch.compile the velocity (eager fallback if compilation fails)
    compile_mode: str = "default"  # big GEMMs are at cuBLAS speed already; autotuning costs minutes
    compile_scope: str = "blocks"  # blocks: one shared graph for the identical blocks (seconds) | model
    channels_last: bool = True  # NHWC latents into the patch embedding (tokens come out contiguous)
    cuda_graphs: bool = False  # replay one CUDA graph per input shape (CUDA only)
    precision: str = "float32"  # float32 | bfloat16 | float16: weights and activations when sampling


@dataclass
class SideNetConfig:
    """Trainable SideNet (paper release defaults)."""

    # Trained SideNet for sampling/eval; empty: runs/<name>/sidenet.safetensors (the training
    # export) when it exists, else checkpoints/<name>/sidenet.safetensors.
    path: str = ""
    channels: int = 256
    emb_dim: int = 256
    depth: int = 4
    num_heads: int = 4
    # Speed switches (bafm.models.fast.apply_speed_switches); the defaults keep eager float32.
    compile: bool = False  # torch.compile the velocity (eager fallback if compilation fails)
    compile_mode: str = "max-autotune-no-cudagraphs"  # small fixed-shape calls: autotuning pays off
    channels_last: bool = True  # NHWC activations: fused channel RMSNorm, copy-free attention
    cuda_graphs: bool = False  # replay one CUDA graph per input shape (CUDA only)
    precision: str = "float32"  # float32 | bfloat16 | float16: weights and activations when sampling


@dataclass
class LossConfig:
    """BA chain-rollout loss."""

    links: int = 8  # K: chain links per sample
    offset_rate: float = 50.0  # rate of the truncated exponential for |h|
    p_backward: float = 0.5  # probability of a negative (toward noise) offset
    label_dropout: float = 0.1  # CFG null-class probability


@dataclass
class OptimConfig:
    """AdamW + EMA of the SideNet."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ema_decay: float = 0.9996
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    """Options passed to ``lightning.Trainer``."""

    accelerator: str = "auto"
    devices: Any = 1  # int, list of ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on CUDA, 32-true on CPU
    max_steps: int = 1000
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 200
    resume: str = ""  # "" | "last" | path to a .ckpt
    fast_dev_run: bool = False
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class SamplingConfig:
    """How samples are drawn: guidance and the time grid."""

    cfg_scale: float = 1.0  # 1.0: no guidance
    guidance_interval: List[float] = field(default_factory=lambda: [0.0, 0.7])  # CFG for t in (lo, hi]
    grid: str = "uniform"  # uniform | shift (SD3 time shift by `shift`) | optimized (`bafm optimize-grid`)
    shift: float = 1.0
    grid_file: str = ""  # optimized grids JSON; empty: <sidenet stem>.grids.json beside the SideNet in use


@dataclass
class EvalConfig:
    """NFE sweep: solvers, budgets, metrics and outputs."""

    solvers: List[str] = field(
        default_factory=lambda: ["ba", "euler", "heun", "midpoint", "ab2", "dpm++2m", "unipc", "ipndm"]
    )
    budgets: Dict[str, List[int]] = field(
        default_factory=lambda: {
            "ba": [3, 4, 5, 6, 7, 8, 10],
            "ba-single": [3, 4, 5, 6, 7, 8, 10],
            "euler": [5, 10, 20, 50, 100, 200],
            "heun": [4, 6, 8, 10, 12, 16, 20],
            "midpoint": [4, 6, 8, 10, 12, 16, 20],
            "rk4": [4, 8, 12, 16, 20],
            "ab2": [4, 5, 6, 8, 10, 12, 16, 20],
            "dpm++2m": [4, 5, 6, 8, 10, 12, 16, 20],
            "unipc": [4, 5, 6, 8, 10, 12, 16, 20],
            "ipndm": [4, 5, 6, 8, 10, 12, 16, 20],
        }
    )
    # Adaptive solvers: one row per tolerance level (rtol = atol), reported at its measured mean NFE.
    tolerances: Dict[str, List[float]] = field(default_factory=lambda: {"ba-adaptive": [1e-2, 3e-3, 1e-3]})
    num_samples: int = 1000
    batch_size: int = 250
    seed: int = 0  # per-sample seeds are seed + sample index
    feature_extractor: str = "classifier"  # classifier | inception
    classifier_path: str = "checkpoints/digits/classifier.safetensors"
    inception_weights: str = ""  # local torch-fidelity inception-v3-compat weights
    reference_stats: str = ""  # .npz: ADM VIRTUAL_*.npz or bafm's own statistics
    prc_reference_size: int = 10000  # real images precision/recall compare with (seeded subset if more); 0: off
    reference_rtol: float = 1e-5
    reference_atol: float = 1e-5
    reference_batch_size: int = 64  # the reference solves fixed groups of samples (batch-size independent)
    out_dir: str = ""  # empty: runs/<name>/nfe_sweep
    save_npz: bool = False
    grid_images: int = 64
    is_splits: int = 10  # inception-score splits
    include_reference: bool = True  # reference (dopri5) row; needed for traj_rmse
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:<i>
    # Training-time sweep (NFESweepCallback).
    every_n_steps: int = 500
    callback_solvers: List[str] = field(default_factory=lambda: ["ba", "euler"])
    callback_budgets: List[int] = field(default_factory=lambda: [5, 10])
    callback_num_samples: int = 500


@dataclass
class GridSearchConfig:
    """``bafm optimize-grid``: grids minimising the trajectory error per solver and NFE budget."""

    solvers: List[str] = field(default_factory=lambda: ["ba", "euler", "unipc", "ipndm", "dpm++2m"])
    budgets: Dict[str, List[int]] = field(default_factory=dict)  # empty for a solver: eval.budgets up to max_nfe
    max_nfe: int = 10
    num_samples: int = 256  # calibration samples, seeds seed + [0, num_samples): disjoint from eval's
    seed: int = 1_000_000
    batch_size: int = 256
    method: str = "nelder-mead"  # nelder-mead | powell (scipy.optimize, derivative-free)
    max_evals: int = 150  # objective evaluations per (solver, NFE), the uniform start included


@dataclass
class BackboneTrainConfig:
    """``bafm backbone``: flow-matching training of the embedded default's small SiT."""

    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    out: str = "checkpoints/digits/backbone.safetensors"
    snapshot_every: int = 0  # >0: also export the EMA weights every N steps to runs/<name>/backbone/snapshots
    classifier_steps: int = 1500
    classifier_max_shift: int = 2  # augmentation: random translations of up to this many pixels
    classifier_out: str = "checkpoints/digits/classifier.safetensors"


@dataclass
class EditConfig:
    """``bafm edit``: inversion and regeneration under another class."""

    indices: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7])
    image_dir: str = ""  # folder of images instead of dataset indices
    source_class: Optional[int] = None  # None: the dataset label
    target_class: int = 0
    solvers: List[str] = field(default_factory=lambda: ["ba", "euler", "heun"])
    budgets: Dict[str, List[int]] = field(
        default_factory=lambda: {"ba": [5, 10], "euler": [10, 50, 100], "heun": [10, 50, 100]}
    )
    out_dir: str = ""  # empty: runs/<name>/edit
    cfg_scale: Optional[float] = None  # None: sampling.cfg_scale (inversion and both regenerations)
    center_crop: bool = False  # ADM-crop image_dir images to the backbone's size instead of requiring it
    batch_size: int = 32
    grid_images: int = 8  # images (columns) shown in edit_grid.png
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:<i>


@dataclass
class ExperimentConfig:
    """A whole experiment."""

    name: str = "digits"
    seed: int = 0
    runs_dir: str = "runs"
    checkpoints_dir: str = "checkpoints"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sidenet: SideNetConfig = field(default_factory=SideNetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    backbone_train: BackboneTrainConfig = field(default_factory=BackboneTrainConfig)
    optimize_grid: GridSearchConfig = field(default_factory=GridSearchConfig)
    edit: EditConfig = field(default_factory=EditConfig)


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


def load_config(
    experiment: Optional[str | Path] = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Build the experiment config.

    Args:
        experiment: path to an experiment YAML, or None for the defaults.
        overrides: OmegaConf dotlist entries such as ``"trainer.max_steps=10"``.

    Returns:
        A validated, read-only structured config (typed like ``ExperimentConfig``).

    Raises:
        ConfigError: unknown key, wrong type or unreadable file, naming the culprit.
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    if experiment:
        path = Path(experiment)
        if not path.is_file():
            available = sorted(p.name for p in Path("experiments").glob("*.yaml"))
            raise ConfigError(f"experiment file '{path}' not found. Available: {', '.join(available)}.")
        try:
            exp = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
        if not isinstance(exp, DictConfig):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(exp).__name__}.")
        cfg = _merge(cfg, exp, str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not of the form key=value.")
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from None
        cfg = _merge(cfg, dot, "command-line override", replace_open_dicts=False)
    _validate_values(cfg)
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
    "loss.links": (lambda v: v >= 1, "an integer >= 1"),
    "loss.offset_rate": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "loss.p_backward": (_probability, "a probability in [0, 1]"),
    "loss.label_dropout": (_probability, "a probability in [0, 1]"),
    "optim.lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "optim.grad_clip": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    "optim.ema_decay": (_probability, "a number in [0, 1]"),
    "optim.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.checkpoint_every_n_steps": (lambda v: v >= 1, "an integer >= 1"),
    "sampling.cfg_scale": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (1: no guidance)"),
    "sampling.shift": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "eval.num_samples": (lambda v: v >= 2, "an integer >= 2 (FID needs at least two samples)"),
    "eval.callback_num_samples": (lambda v: v >= 2, "an integer >= 2 (FID needs at least two samples)"),
    "eval.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.every_n_steps": (lambda v: v >= 0, "an integer >= 0 (0: no sweeps while training)"),
}


def _validate_values(cfg: DictConfig) -> None:
    """Check enumerated string values and numeric ranges, which OmegaConf types cannot express."""
    choices = {
        "data.on_error": ("raise", "skip"),
        "data.source": ("digits", "folder"),
        "backbone.source": ("repa", "sit"),
        "sampling.grid": ("uniform", "shift", "optimized"),
        "eval.feature_extractor": ("classifier", "inception"),
        "optimize_grid.method": ("nelder-mead", "powell"),
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"'{key}' is '{value}', expected one of: {', '.join(allowed)}.")
    for key, (ok, expected) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None or not ok(value):
            raise ConfigError(f"'{key}' is {value}, expected {expected}.")
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
    hint = ("make it with `make backbone`" if cfg.data.source == "digits"
            else "download the pretrained checkpoint and set backbone.path")
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
    """Optimized grids: ``sampling.grid_file``, else ``<stem>.grids.json`` beside ``sidenet_path(cfg)``."""
    if cfg.sampling.grid_file:
        return Path(cfg.sampling.grid_file)
    side = sidenet_path(cfg)
    return side.with_name(f"{side.stem}.grids.json")


def sampling_settings(cfg: ExperimentConfig, cfg_scale: Optional[float] = None) -> "SamplingSettings":
    """``cfg.sampling`` as the sampling path's settings; ``cfg_scale`` overrides the guidance scale."""
    from bafm.sampling import SamplingSettings  # noqa: F811 (deferred: the config loads without torch)

    sc = cfg.sampling
    return SamplingSettings(grid=str(sc.grid), shift=float(sc.shift),
                            cfg_scale=float(sc.cfg_scale if cfg_scale is None else cfg_scale),
                            guidance_interval=tuple(float(v) for v in sc.guidance_interval))  # fmt: skip
