"""The experiment config's schema: one dataclass per section, with its defaults.

``bafm.config`` merges it with an experiment file and overrides, and validates the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


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
    source: str = "digits"  # digits | folder | captions (image-caption pairs for backbone.source sd3 | flux)
    # ImageNet-style folder (class sub-folders) for source=folder; for source=captions, images with
    # same-stem .txt captions (or the root of captions_file's relative paths)
    image_dir: str = ""
    captions_file: str = ""  # source=captions: .jsonl ({"path", "caption"} per line) or .csv (path,caption header)
    max_sequence_length: int = 256  # source=captions: T5 tokens of the stored prompt embeddings
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
    source: str = "repa"  # repa (t=1 noise) | sit (t=0 noise, adapted in the loader) | sd3 | flux (diffusers)
    # sd3 | flux: `path` is a hub id or a pipeline folder (transformer in its `transformer/` subfolder).
    guidance: float = 3.5  # FLUX.1-dev's distilled guidance input (ignored by SD3 and FLUX.1-schnell)
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
    # Text-to-image SideNet only: its body runs on p x p latent patches folded into channels (2: 4x fewer
    # positions, ~11x fewer FLOPs at 128x128 latents); 1 is the release's layout.
    patch_size: int = 1
    # Start training from these SideNet weights (a bafm export): a fine-tuning stage. Weights the
    # export lacks (the feature maps of a feature SideNet started from a feature-free one) keep
    # their zero initialisation. Empty: train from scratch.
    init_from: str = ""
    # Beyond the paper: read the backbone's hidden tokens at each anchor (no extra NFE; see
    # bafm.models.anchor_features). False is the release architecture.
    backbone_features: bool = False
    feature_layer: int = -1  # backbone block whose output tokens are read (-1: the last)
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
    # Grid-aware fine-tuning (bafm.training.grid_loss): the last grid_steps steps train on the four
    # probes of BA steps on uniform grids of grid_budgets steps (0: the chain loss throughout).
    grid_steps: int = 0
    grid_budgets: List[int] = field(default_factory=lambda: [3, 4, 5, 6, 8, 10])


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
    # Validation: the EMA SideNet's chain loss on the first val_batches batches of the val split
    # (fixed draws) and val/side_rel_err on side_error_samples held-out exact-ODE states, every
    # val_every_n_steps steps (0: never).
    val_every_n_steps: int = 0
    val_batches: int = 2
    side_error_samples: int = 128


@dataclass
class SamplingConfig:
    """How samples are drawn: guidance and the time grid."""

    cfg_scale: float = 1.0  # 1.0: no guidance
    guidance_interval: List[float] = field(default_factory=lambda: [0.0, 0.7])  # CFG for t in (lo, hi]
    # uniform | shift (SD3 time shift by `shift`) | optimized (`bafm optimize-grid`) | sd3 (SD3 pipeline's
    # schedule, static `shift`) | flux (Flux pipeline's schedule, resolution-dependent `mu`)
    grid: str = "uniform"
    shift: float = 1.0
    mu: Optional[float] = None  # flux grid's log shift; null: from the latent size, as FluxPipeline computes it
    # optimized grids JSON; empty: <runs_dir>/<name>/<sidenet stem>.grids.json (what optimize-grid writes), else
    # the one shipped beside the SideNet in use. Grids searched for another SideNet are refused (sha256).
    grid_file: str = ""


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
    feature_extractor: str = "classifier"  # classifier | inception | clip (text-to-image sweeps: CLIP image embeddings)
    classifier_path: str = "checkpoints/digits/classifier.safetensors"
    inception_weights: str = ""  # local torch-fidelity inception-v3-compat weights
    reference_stats: str = ""  # .npz: ADM VIRTUAL_*.npz or bafm's own statistics
    # Text-to-image sweeps (backbone.source sd3 | flux): prompts, real images, CLIP score.
    captions_file: str = ""  # prompts: .jsonl/.csv with a 'caption' field, or .txt (one a line)
    reference_images: str = ""  # folder of real images for FID (else reference_stats)
    clip_model: str = "openai/clip-vit-large-patch14"  # torchmetrics CLIPScore model (its own loader)
    prc_reference_size: int = 10000  # real images precision/recall compare with (seeded subset if more); 0: off
    reference_rtol: float = 1e-5
    reference_atol: float = 1e-5
    reference_batch_size: int = 64  # the reference solves fixed groups of samples (batch-size independent)
    reference_solver: str = "dopri5"  # dopri5 (adaptive, reference_rtol/atol; unbounded NFE) | rk4 (bounded)
    reference_steps: int = 100  # rk4 steps of the reference: 4 x reference_steps NFE per sample
    out_dir: str = ""  # empty: runs/<name>/nfe_sweep
    save_npz: bool = False
    grid_images: int = 64
    is_splits: int = 10  # inception-score splits (torch-fidelity convention; ADM's are chunks of 5000)
    # torch-fidelity | adm: how precision/recall and IS are computed (README, "Metric conventions").
    metrics_convention: str = "torch-fidelity"
    include_reference: bool = True  # reference (dopri5) row; needed for traj_rmse
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:<i>
    # Training-time sweep (NFESweepCallback).
    every_n_steps: int = 500
    callback_solvers: List[str] = field(default_factory=lambda: ["ba", "euler"])
    callback_budgets: List[int] = field(default_factory=lambda: [5, 10])
    callback_num_samples: int = 500
    sweep_at_end: bool = False  # also sweep the final weights when no scheduled sweep fell due


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
    max_evals: int = 100  # objective evaluations per (solver, NFE), the uniform start included


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
class SampleConfig:
    """``bafm sample``: text-to-image samples from a diffusers pipeline (``backbone.source`` sd3 | flux)."""

    prompt: str = ""  # also settable as the bare override prompt="..."
    negative_prompt: str = ""  # SD3's (and Flux's true-CFG) unconditional branch; "" is the pipelines' default
    solver: str = "ba"
    nfe: int = 8
    num_images: int = 1
    seed: int = 0  # image i starts from noise seeded seed + i
    height: int = 1024
    width: int = 1024
    max_sequence_length: int = 256  # T5 tokens of the prompt embeddings


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
    sample: SampleConfig = field(default_factory=SampleConfig)
