"""``bafm sample``: PNGs from a diffusers SD3 / Flux pipeline with the BA-solver.

``bafm sample --config experiments/sd3_medium.yaml prompt="a photo of a cat" --out DIR`` loads
the pipeline named by ``backbone.path`` (a hub id or a local pipeline folder), the trained text
SideNet (``sidenet.path``, else the experiment's training export), and writes
``DIR/<index>.png`` for ``sample.num_images`` images, each from noise seeded ``sample.seed + index``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional

import torch

from bafm.config import ConfigError, run_dir, sidenet_choice
from bafm.io import atomic_write_bytes, atomic_write_json, check_not_tracked, check_output_folder
from bafm.models.checkpoint_io import CheckpointError
from bafm.schema import ExperimentConfig

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def load_pipeline(path: str, family: str, dtype: torch.dtype, device: torch.device) -> Any:
    """The diffusers pipeline of ``family`` from a hub id or local folder (safetensors only).

    Raises:
        CheckpointError: one line naming the folder or hub id and what is missing or wrong.
    """
    import diffusers

    cls = getattr(diffusers, PIPELINES[family])
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise CheckpointError(f"backbone.path '{path}': no such folder, and not a hub id of the form owner/name")
    if local.exists() and not (local / "model_index.json").is_file():
        raise CheckpointError(f"{local}: not a diffusers pipeline folder (missing {local / 'model_index.json'})")
    try:
        pipe = cls.from_pretrained(str(local) if local.exists() else path, torch_dtype=dtype, use_safetensors=True,
                                   local_files_only=offline)  # fmt: skip
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if local.exists() else f" (offline or not downloaded: `hf download {path}`)"
        raise CheckpointError(f"{path}: cannot load a {PIPELINES[family]}{hint}: {first}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _grid_options(cfg: ExperimentConfig) -> dict:
    """``grid`` / ``shift`` / ``mu`` for ``ba_sample_latents`` (``flux`` without ``sampling.mu``: the
    pipeline's ``mu`` for the image size)."""
    kind = str(cfg.sampling.grid)
    if kind == "optimized":
        raise ConfigError("'sampling.grid' is 'optimized'; `bafm sample` takes uniform, shift, sd3 or flux")
    mu = None if cfg.sampling.mu is None else float(cfg.sampling.mu)
    return {"grid": kind, "shift": float(cfg.sampling.shift), "mu": mu}


def run(cfg: ExperimentConfig, out: Optional[str]) -> int:
    """Write ``sample.num_images`` PNGs for ``sample.prompt`` into ``out``; returns 0.

    Raises:
        ConfigError: not a text-to-image experiment, or no prompt.
        CheckpointError: a pipeline or SideNet that cannot be loaded (one line).
        OutputFolderError: ``out`` cannot be written.
    """
    from bafm.pipelines import ba_generate
    from bafm.solvers import SOLVERS, uses_side_fn

    family, sc = str(cfg.backbone.source), cfg.sample
    if family not in PIPELINES:
        raise ConfigError(
            f"'backbone.source' is '{family}'; `bafm sample` draws from a text-to-image pipeline (sd3 or flux)"
        )
    if not str(sc.prompt).strip():
        raise ConfigError("no prompt: pass prompt=\"...\" (or sample.prompt)")
    if sc.solver not in SOLVERS:
        raise ConfigError(f"'sample.solver' is '{sc.solver}', not a registered solver")
    folder = check_output_folder(out or run_dir(cfg) / "samples")
    names = {f"{int(sc.seed) + i:06d}.png" for i in range(int(sc.num_images))} | {"samples.json"}
    check_not_tracked(folder, "bafm sample's output folder", "pass another --out", writes=lambda p: p.name in names)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sidenet = None
    if uses_side_fn(sc.solver):
        path, reason = sidenet_choice(cfg)
        if not path.is_file():
            raise CheckpointError(f"{path}: no trained text SideNet ({reason}); train one or set sidenet.path")
        sidenet = path
    pipe = load_pipeline(str(cfg.backbone.path), family, PRECISIONS[str(cfg.backbone.precision)], device)
    interval = tuple(float(v) for v in cfg.sampling.guidance_interval)
    images = ba_generate(
        pipe, sidenet, [str(sc.prompt)] * int(sc.num_images), nfe=int(sc.nfe), solver=str(sc.solver),
        negative_prompt=str(sc.negative_prompt), guidance_scale=float(cfg.sampling.cfg_scale),
        distilled_guidance=float(cfg.backbone.guidance), interval=interval, height=int(sc.height),
        width=int(sc.width), seed=int(sc.seed), max_sequence_length=int(sc.max_sequence_length),
        **_grid_options(cfg),
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(folder / f"{int(sc.seed) + index:06d}.png", buffer.getvalue())
    atomic_write_json(folder / "samples.json", {
        "prompt": str(sc.prompt), "negative_prompt": str(sc.negative_prompt), "solver": str(sc.solver),
        "nfe": int(sc.nfe), "seeds": [int(sc.seed) + i for i in range(len(images))],
        "cfg_scale": float(cfg.sampling.cfg_scale), "backbone": str(cfg.backbone.path),
        "sidenet": str(sidenet) if sidenet is not None else None,
    })  # fmt: skip
    print(f"bafm sample: {len(images)} image(s) at {int(sc.nfe)} NFE ({sc.solver}) in {folder}")
    return 0
