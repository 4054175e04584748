"""BA-solver samples from a diffusers SD3 / Flux pipeline the user already has.

```python
from bafm.pipelines import ba_generate
images = ba_generate(pipe, "runs/sd3_medium/sidenet.safetensors", "a photo of a cat", nfe=8)
```

The pipeline's own ``encode_prompt``, transformer, VAE and image processor are reused; only the
denoising loop is bafm's: any registered solver on the pipeline's own time schedule (its static
shift or resolution-dependent ``mu``), with the SideNet between the backbone's anchors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from bafm.models.diffusers_flow import FlowTransformerBackbone, pack_latents
from bafm.models.text_condition import TextCondition
from bafm.models.text_sampling import build_text_sampling_fns
from bafm.sampling import integrate, sample_noise
from bafm.solvers import SolveResult, uses_side_fn
from bafm.solvers.grids import GridSpec, flux_mu

# Pipeline defaults (diffusers 0.42.1): SD3's guidance_scale, FLUX.1-dev's distilled guidance.
SD3_DEFAULT_CFG = 7.0
FLUX_DEFAULT_GUIDANCE = 3.5
# T5 tokens of the prompt embeddings, each pipeline's default.
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}
Prompts = Union[str, Sequence[str]]


def pipeline_family(pipe: Any) -> str:
    """``"sd3"`` or ``"flux"``, from the class of the pipeline's transformer.

    Raises:
        ValueError: a pipeline without an SD3 or Flux transformer.
    """
    name = type(getattr(pipe, "transformer", None)).__name__
    family = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(name)
    if family is None:
        raise ValueError(f"{type(pipe).__name__} has a {name} transformer; bafm samples SD3 and Flux pipelines only")
    return family


def pipeline_grid(pipe: Any, family: str, latent_hw: Tuple[int, int]) -> Tuple[str, float, Optional[float]]:
    """The grid kind, shift and ``mu`` that reproduce the pipeline's own time schedule.

    SD3: ``sd3`` with the scheduler's static shift. Flux: ``flux`` with ``mu`` from the number of
    packed tokens and the scheduler's config when it shifts dynamically (FLUX.1-dev), else
    ``shift`` of ``linspace(1, 1/N, N)`` (FLUX.1-schnell: shift 1, the uniform grid).

    Args:
        pipe: the pipeline (its ``scheduler.config`` is read).
        family: ``"sd3"`` or ``"flux"``.
        latent_hw: unpacked latent height and width.

    Returns:
        ``(grid, shift, mu)`` for ``bafm.sampling.integrate``.

    Raises:
        ValueError: a schedule bafm has no grid kind for (SD3 with dynamic shifting).
    """
    config = pipe.scheduler.config
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if family == "sd3":
        if dynamic:
            raise ValueError("SD3 pipelines with a dynamically shifting scheduler have no bafm grid kind; pass grid=")
        return "sd3", float(config.get("shift", 1.0)), None
    if not dynamic:
        return "shift", float(config.get("shift", 1.0)), None
    return "flux", 1.0, pipeline_mu(pipe, latent_hw)


def pipeline_mu(pipe: Any, latent_hw: Tuple[int, int]) -> float:
    """Flux's ``mu`` for unpacked latents of ``latent_hw``, from the pipeline's scheduler config."""
    config = pipe.scheduler.config
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    return flux_mu(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                   config.get("base_shift", 0.5), config.get("max_shift", 1.15))  # fmt: skip


def encode_prompts(
    pipe: Any, family: str, prompt: Prompts, negative_prompt: Optional[Prompts], guided: bool,
    max_sequence_length: int,
) -> Tuple[TextCondition, Optional[TextCondition]]:
    """Prompt (and, when ``guided``, negative prompt) embeddings from the pipeline's ``encode_prompt``."""
    device = pipe._execution_device
    if family == "sd3":
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt, max_sequence_length=max_sequence_length,
        )  # fmt: skip
        return TextCondition(embeds, pooled), (TextCondition(neg_embeds, neg_pooled) if guided else None)
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                           max_sequence_length=max_sequence_length)  # fmt: skip
    negative = None
    if guided:
        batch = embeds.shape[0]
        neg = negative_prompt if negative_prompt is not None else ""
        neg = [neg] * batch if isinstance(neg, str) else list(neg)
        neg_embeds, neg_pooled, _ = pipe.encode_prompt(prompt=neg, prompt_2=None, device=device,
                                                       max_sequence_length=max_sequence_length)  # fmt: skip
        negative = TextCondition(neg_embeds, neg_pooled)
    return TextCondition(embeds, pooled), negative


def cast_side_velocity(sidenet: nn.Module):
    """The SideNet's ``velocity`` in its own dtype, answering in the state's dtype."""
    dtype = next(sidenet.parameters()).dtype

    def velocity(x: Tensor, v: Tensor, t: Tensor, h: Tensor, cond: TextCondition) -> Tensor:
        cond = TextCondition(*(c.to(dtype) for c in cond))
        return sidenet.velocity(x.to(dtype), v.to(dtype), t.to(dtype), h.to(dtype), cond).to(x.dtype)

    return velocity


def _load_sidenet(sidenet: Union[nn.Module, str, Path, None], device: torch.device) -> Optional[nn.Module]:
    if sidenet is None or isinstance(sidenet, nn.Module):
        return sidenet
    from bafm.models.text_sidenet import load_text_sidenet

    return load_text_sidenet(sidenet, device=device)


@torch.no_grad()
def ba_sample_latents(
    pipe: Any,
    sidenet: Union[nn.Module, str, Path, None],
    prompt: Prompts,
    *,
    nfe: int = 8,
    solver: str = "ba",
    negative_prompt: Optional[Prompts] = None,
    guidance_scale: Optional[float] = None,
    distilled_guidance: float = FLUX_DEFAULT_GUIDANCE,
    interval: Optional[Tuple[float, float]] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    seed: int = 0,
    latents: Optional[Tensor] = None,
    max_sequence_length: Optional[int] = None,
    grid: Optional[GridSpec] = None,
    shift: Optional[float] = None,
    mu: Optional[float] = None,
) -> SolveResult:
    """Denoised latents ``(B, C, H, W)`` (unpacked, before the VAE's scaling) and the NFE spent.

    Arguments as ``ba_generate``; ``latents`` (``(B, C, H, W)``, unpacked) replace the seeded noise.
    ``grid`` None follows the pipeline's own schedule (``pipeline_grid``; ``shift`` / ``mu`` given
    here replace its values), else a grid kind or explicit grid as ``bafm.sampling.integrate`` takes
    (``"flux"`` without ``mu``: the pipeline's ``mu`` for the latent size).
    """
    family = pipeline_family(pipe)
    device = pipe._execution_device
    if guidance_scale is None:
        guidance_scale = SD3_DEFAULT_CFG if family == "sd3" else 1.0
    guided = float(guidance_scale) != 1.0
    max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
    cond, negative = encode_prompts(pipe, family, prompt, negative_prompt, guided, max_sequence_length)
    backbone = FlowTransformerBackbone(pipe.transformer, family, distilled_guidance=distilled_guidance)
    batch = cond.pooled.shape[0]
    if latents is None:
        # The pipelines' latent sizes: the VAE's factor, and Flux's 2x2 packing on top.
        multiple = pipe.vae_scale_factor * (2 if family == "flux" else backbone.spatial_multiple)
        size = pipe.default_sample_size * pipe.vae_scale_factor
        h_lat = (int(height or size) // multiple) * multiple // pipe.vae_scale_factor
        w_lat = (int(width or size) // multiple) * multiple // pipe.vae_scale_factor
        latents = sample_noise(range(batch), (backbone.in_channels, h_lat, w_lat), seed, device=device)
    elif latents.shape[0] != batch:
        raise ValueError(f"latents of batch {latents.shape[0]} for {batch} prompt(s)")
    sidenet = _load_sidenet(sidenet, device) if uses_side_fn(solver) else None
    if uses_side_fn(solver) and sidenet is None:
        raise ValueError(f"solver '{solver}' needs a trained SideNet; pass one (module or .safetensors path)")
    velocity_fn, side_fn = build_text_sampling_fns(
        backbone.velocity, cond, negative=negative, cfg_scale=float(guidance_scale), interval=interval,
        side_velocity=cast_side_velocity(sidenet) if sidenet is not None else None,
    )  # fmt: skip
    if grid is None:
        grid, own_shift, own_mu = pipeline_grid(pipe, family, tuple(latents.shape[-2:]))
        shift, mu = own_shift if shift is None else shift, own_mu if mu is None else mu
    elif grid == "flux" and mu is None:
        mu = pipeline_mu(pipe, tuple(latents.shape[-2:]))
    shift = 1.0 if shift is None else float(shift)
    return integrate(velocity_fn, latents.float(), solver, nfe, side_fn, grid, shift=shift, mu=mu)


def decode_latents(pipe: Any, latents: Tensor, output_type: str = "pil") -> Any:
    """The pipeline's VAE decode and image post-processing of unpacked latents ``(B, C, H, W)``."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scaled = latents / vae.config.scaling_factor + shift
    image = vae.decode(scaled.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


@torch.no_grad()
def ba_generate(
    pipe: Any,
    sidenet: Union[nn.Module, str, Path, None],
    prompt: Prompts,
    *,
    nfe: int = 8,
    solver: str = "ba",
    output_type: str = "pil",
    **options: Any,
) -> Any:
    """Images from a loaded SD3 or Flux pipeline with the BA-solver (or any registered solver).

    Args:
        pipe: a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (or one with the same
            components, e.g. built with ``from_pipe``).
        sidenet: a trained text SideNet, or its ``.safetensors`` export; None for solvers without one.
        prompt: one prompt or a list (one image each).
        nfe: backbone calls per image (a CFG call on the doubled batch counts once).
        solver: registry name (``ba``; ``euler`` reproduces the pipeline's own sampler).
        output_type: ``"pil"`` (list of images), ``"np"``, ``"pt"``, or ``"latent"`` (unpacked
            latents ``(B, C, H, W)``; Flux's packed form is ``pack_latents`` of them).
        **options: ``ba_sample_latents``'s: ``negative_prompt``, ``guidance_scale`` (SD3's CFG,
            default 7; Flux's true CFG, default 1), ``distilled_guidance`` (FLUX.1-dev, 3.5),
            ``interval``, ``height``, ``width``, ``seed`` (image ``i`` starts from noise seeded
            ``seed + i``), ``latents``, ``grid`` / ``shift`` / ``mu``, ``max_sequence_length``
            (T5 tokens; the pipeline's default, SD3 256, Flux 512).

    Returns:
        What the pipeline's image processor returns for ``output_type`` (a list of PIL images by
        default), or the latents.
    """
    result = ba_sample_latents(pipe, sidenet, prompt, nfe=nfe, solver=solver, **options)
    if output_type == "latent":
        return result.x
    return decode_latents(pipe, result.x, output_type)


__all__: List[str] = ["ba_generate", "ba_sample_latents", "cast_side_velocity", "decode_latents", "pipeline_family",
                      "pipeline_grid", "pack_latents"]  # fmt: skip
