"""Image <-> latent codecs: diffusers ``AutoencoderKL`` from local files, and the identity.

A codec maps images in ``[-1, 1]`` to posterior moments (mean, std) and latents back to
images. Latents in shards are unscaled; the scaling factor (0.18215 for SD-VAE) is applied at
load time, and ``build_decoder`` divides it out again before decoding.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from bafm.data.manifest import latent_scaling_factor

log = logging.getLogger(__name__)

WEIGHTS_HINT = (
    "Put a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, e.g. "
    "stabilityai/sd-vae-ft-ema as used by DiT/SiT) under checkpoints/vae/<name>/ and set "
    "data.vae_path=checkpoints/vae/<name>, or give a single .safetensors file with its config.json "
    "in the same folder. Nothing is downloaded."
)


class IdentityCodec(nn.Module):
    """The embedded default's "VAE": latents are the pixels, the posterior std is zero."""

    kind = "identity"

    def __init__(self, channels: int = 1) -> None:
        """Identity for ``channels``-channel images."""
        super().__init__()
        self.latent_channels, self.downsample = channels, 1

    def encode_moments(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(images, 0)`` for images ``(B, C, H, W)`` in ``[-1, 1]``."""
        return images, torch.zeros_like(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``(B, C, H, W)`` -> images in ``[-1, 1]`` (the same tensor)."""
        return latents


class AutoencoderKLCodec(nn.Module):
    """Posterior moments and decoding with a diffusers ``AutoencoderKL`` (kept in float32)."""

    kind = "autoencoder_kl"

    def __init__(self, vae: nn.Module, source: str = "") -> None:
        """Wrap a loaded ``AutoencoderKL``; ``source`` is the path it came from (for the manifest)."""
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.source = source
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of images ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            ``(mean, std)``, each ``(B, C, H / f, W / f)`` float32, unscaled.
        """
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``(B, C, h, w)`` -> images ``(B, 3, h * f, w * f)`` in about ``[-1, 1]``."""
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    def describe(self) -> Dict[str, Any]:
        """Manifest entry: class, source path and the architecture numbers."""
        cfg = self.vae.config
        return {
            "kind": self.kind, "path": self.source, "latent_channels": self.latent_channels,
            "downsample": self.downsample, "block_out_channels": list(cfg.block_out_channels),
            "config_scaling_factor": float(cfg.scaling_factor),
        }


def _state_dict_from_file(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _from_single_file(path: Path) -> nn.Module:
    """AutoencoderKL from one weights file, with ``config.json`` next to it.

    Diffusers-format weights are loaded strictly into a model built from the config (missing or
    extra keys are errors); original-LDM-format weights go through diffusers'
    ``from_single_file``, which converts the key names, with the local config so it stays offline.
    """
    from diffusers import AutoencoderKL

    config_dir = path.parent
    if not (config_dir / "config.json").is_file():
        try:  # works only if diffusers' cache already holds the matching config
            return AutoencoderKL.from_single_file(str(path), local_files_only=True)
        except Exception as err:
            raise FileNotFoundError(
                f"VAE weights file '{path}' needs its config.json in '{config_dir}' to load offline "
                f"({type(err).__name__}: {str(err)[:200]}). {WEIGHTS_HINT}"
            ) from None
    config = AutoencoderKL.load_config(str(config_dir), local_files_only=True)
    state = _state_dict_from_file(path)
    model = AutoencoderKL.from_config(config)
    expected = set(model.state_dict())
    if expected & set(state):  # diffusers key names
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"VAE weights '{path}' do not match '{config_dir / 'config.json'}': "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
            )
        model.load_state_dict(state, strict=True)
        return model
    if not any(k.endswith("encoder.conv_in.weight") for k in state):
        raise ValueError(f"'{path}' is not an AutoencoderKL checkpoint (no encoder.conv_in.weight key).")
    return AutoencoderKL.from_single_file(str(path), config=str(config_dir), local_files_only=True)


def load_autoencoder(path: str | Path) -> AutoencoderKLCodec:
    """Load a diffusers ``AutoencoderKL`` from local files only.

    Args:
        path: a folder with ``config.json`` and weights (``from_pretrained`` layout; a pipeline
            folder with a ``vae/`` sub-folder also works), or a single ``.safetensors`` /
            ``.ckpt`` / ``.pt`` file with a ``config.json`` beside it.

    Returns:
        The codec on CPU in eval mode, float32.

    Raises:
        FileNotFoundError: nothing usable at ``path``; the message says where weights go.
        ValueError: weights that do not fit the config.
    """
    if not str(path):
        raise FileNotFoundError(f"data.vae_path is empty. {WEIGHTS_HINT}")
    p = Path(path)
    if p.is_dir():
        from diffusers import AutoencoderKL

        sub = None if (p / "config.json").is_file() else "vae" if (p / "vae" / "config.json").is_file() else ""
        if sub == "":
            raise FileNotFoundError(f"VAE folder '{p}' has no config.json (nor vae/config.json). {WEIGHTS_HINT}")
        try:
            vae = AutoencoderKL.from_pretrained(str(p), subfolder=sub, local_files_only=True)
        except (OSError, EnvironmentError) as err:
            raise FileNotFoundError(f"cannot load the VAE from '{p}': {err}. {WEIGHTS_HINT}") from None
    elif p.is_file():
        vae = _from_single_file(p)
    else:
        raise FileNotFoundError(f"VAE path '{p}' does not exist. {WEIGHTS_HINT}")
    return AutoencoderKLCodec(vae.float(), source=str(p))


def build_decoder(vae_path: Optional[str], scaling_factor: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> images for evaluation.

    Args:
        vae_path: a diffusers ``AutoencoderKL`` (folder or ``.safetensors``); None for pixel
            "latents" (the embedded digits), which are only mapped from ``[-1, 1]`` to ``[0, 1]``.
        scaling_factor: the factor the latents were multiplied by after encoding.

    Returns:
        ``decode(latents)``: scaled latents ``(B, C, H, W)`` float -> images ``(B, 3 or 1, H', W')``
        in ``[0, 1]``. Without a VAE: ``(x + 1) / 2`` clamped. Otherwise the VAE decodes
        ``latents / scaling_factor``; the VAE follows the latents' device.
    """
    if vae_path is None:
        return lambda latents: ((latents.float() + 1.0) / 2.0).clamp_(0.0, 1.0)
    codec = load_autoencoder(vae_path)
    scale = float(scaling_factor)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if next(codec.parameters()).device != latents.device:
            codec.to(latents.device)
        images = codec.decode(latents.float() / scale)
        return ((images + 1.0) / 2.0).clamp_(0.0, 1.0)

    return decode


def decoder_options(data: Any) -> Dict[str, Any]:
    """``build_decoder``'s arguments from a ``data`` config section: no VAE for the digits, else
    ``data.vae_path`` and the scaling factor from the manifest when present, else
    ``data.vae_scaling_factor``."""
    if data.source == "digits":
        return dict(vae_path=None)
    return dict(vae_path=str(data.vae_path),
                scaling_factor=latent_scaling_factor(Path(data.root) / data.dataset, data.vae_scaling_factor))


class LatentShapeError(ValueError):
    """The experiment's latents and the backbone disagree in shape."""


def _vae_config(vae_path: str | Path) -> Optional[Dict[str, Any]]:
    """The ``config.json`` of a VAE folder (or of the folder holding a single weights file), or None."""
    p = Path(vae_path)
    candidates = (p / "config.json", p / "vae" / "config.json") if p.is_dir() else (p.parent / "config.json",)
    for candidate in candidates if p.exists() else ():
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError:
                return None
    return None


def expected_latent_shape(data: Any) -> Optional[Tuple[Tuple[int, int, int], str, str]]:
    """The latent shape ``(C, H, W)`` the experiment's data (its ``data`` section) has, and where it comes from.

    The shards' manifest when ``data/<dataset>`` has one; else, for ``data.source=folder``,
    ``data.resolution`` over the VAE's downsampling with its latent channels (read from its
    ``config.json``, no weights loaded); else ``data.digits_size`` for the digits.

    Returns:
        ``(shape, where it comes from, the key that sets it)``, or None when nothing says (e.g.
        no readable VAE config).
    """
    from bafm.data.manifest import MANIFEST

    d = data
    manifest = Path(d.root) / d.dataset / MANIFEST
    if manifest.is_file():
        try:
            shape = json.loads(manifest.read_text()).get("latent_shape")
        except json.JSONDecodeError:
            shape = None
        if shape and len(shape) == 3:
            return (int(shape[0]), int(shape[1]), int(shape[2])), f"the shards in {manifest.parent}", "data.dataset"
    if d.source == "digits":
        return (1, int(d.digits_size), int(d.digits_size)), f"data.digits_size={d.digits_size}", "data.digits_size"
    config = _vae_config(d.vae_path) if d.vae_path else None
    if not config or "latent_channels" not in config or "block_out_channels" not in config:
        return None
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    size = int(d.resolution) // factor
    where = f"data.resolution={d.resolution} with the VAE at '{d.vae_path}'"
    return (int(config["latent_channels"]), size, size), where, "data.resolution"


def check_latent_shape(data: Any, backbone_shape: Sequence[int], backbone_path: str = "") -> None:
    """Fail before any work when the experiment's latents do not fit the backbone.

    Args:
        data: the ``data`` config section.
        backbone_shape: ``(C, H, W)`` the backbone takes.
        backbone_path: the backbone's checkpoint, for the message.

    Raises:
        LatentShapeError: one line naming both shapes, where each comes from and what to change.
    """
    found = expected_latent_shape(data)
    if found is None or tuple(found[0]) == tuple(backbone_shape):
        return
    shape, source, key = found
    raise LatentShapeError(
        f"latent shape mismatch: {source} gives latents of shape {tuple(shape)} (C, H, W), but the backbone "
        f"'{backbone_path}' expects {tuple(int(s) for s in backbone_shape)}; use a backbone trained on "
        f"latents of that shape, or change {key} to match it."
    )
