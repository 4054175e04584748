"""A text-to-image pipeline's own VAE and prompt encoder, without its transformer.

Latents and prompt embeddings for SD3 and Flux data must come from the exact components the
backbone was trained with, so they are taken from the diffusers pipeline itself
(``StableDiffusion3Pipeline`` / ``FluxPipeline`` built with ``transformer=None``) and its
``encode_prompt`` is called as the pipeline calls it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from bafm.models.text_condition import TextCondition

log = logging.getLogger(__name__)

PIPELINE_FAMILIES = ("sd3", "flux")


def pipeline_class(family: str) -> Any:
    """The diffusers pipeline class of a model family (``"sd3"`` or ``"flux"``).

    Raises:
        ValueError: unknown family.
    """
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    classes = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
    if family not in classes:
        raise ValueError(f"backbone.source is '{family}', expected one of {', '.join(PIPELINE_FAMILIES)} for text-to-image data")
    return classes[family]


def load_text_pipeline(path: str | Path, family: str, *, device: torch.device | str = "cpu",
                       text_dtype: torch.dtype = torch.float32) -> Any:
    """The pipeline at ``path`` (hub id or local folder) without its transformer.

    Text encoders are cast to ``text_dtype`` (bfloat16 halves T5-XXL's memory on a GPU); the VAE
    stays in float32 so the stored latent moments do not depend on the device.

    Args:
        path: hub id (fetched into the usual cache when online) or a ``save_pretrained`` folder.
        family: ``"sd3"`` or ``"flux"``.
        device: where the components go.
        text_dtype: dtype of the text encoders.

    Returns:
        The pipeline (``transformer`` is None).

    Raises:
        FileNotFoundError: the pipeline cannot be found or read (offline without the files), in
            one line naming ``path``.
    """
    cls = pipeline_class(family)
    try:
        # safetensors only: reading the weights never unpickles anything.
        pipe = cls.from_pretrained(str(path), transformer=None, use_safetensors=True)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FileNotFoundError(
            f"cannot load the {family} pipeline (VAE, text encoders, tokenizers) from '{path}': {reason}"
        ) from None
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.to(device=device, dtype=text_dtype).eval().requires_grad_(False)
    pipe.vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str], max_sequence_length: int,
                   device: torch.device | str | None = None) -> TextCondition:
    """Prompt embeddings exactly as the pipeline computes them for its conditional branch.

    The unconditional branch of both pipelines is the same call on the negative prompt, so
    ``encode_prompts(pipe, [""], ...)`` is the default unconditional (empty prompt) encoding.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (transformer not needed).
        prompts: ``B`` prompts.
        max_sequence_length: T5 tokens (SD3: 77 CLIP tokens come first, so ``L = 77 + this``;
            Flux: ``L = this``).
        device: where the encoders run (default: the pipeline's execution device).

    Returns:
        ``TextCondition(prompt_embeds (B, L, D), pooled (B, P))`` in the encoders' dtype.
    """
    from diffusers import FluxPipeline

    prompts = list(prompts)
    device = device if device is not None else pipe._execution_device
    if isinstance(pipe, FluxPipeline):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)  # fmt: skip
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)  # fmt: skip
    return TextCondition(embeds, pooled)
