"""Load and export backbones and SideNets: public release formats and bafm's own exports.

* ``load_backbone`` reads SiT/REPA release checkpoints (raw state dicts or training dicts with
  ``"ema"``/``"model"``) and bafm exports (``<stem>.safetensors`` + ``<stem>.json``).
* ``load_sidenet`` reads BA-solver release checkpoints (``"ema_side_model"``/``"side_model"``)
  and bafm exports.

Everything that the tensors determine (input size, channels, classes, sigma channels, REPA
projectors, qk-norm, SideNet widths and depth) is inferred from them; what they cannot tell
(number of heads without qk-norm) comes from the registry name, the JSON config or overrides.
Loading is strict: any missing, unexpected or mis-shaped tensor is an error naming it. Loaded
models are frozen (``eval()``, no gradients) unless asked otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from bafm.models.checkpoint_io import (
    CheckpointError,
    block_indices,
    cast_state_dict,
    check_against,
    config_path,
    load_weights,
    read_config,
    write_weights,
)
from bafm.models.model_size import check_model_size
from bafm.models.sidenet import SideNet
from bafm.models.sit import SIT_ARCHS, TIME_CONVENTIONS, SiT

BACKBONE_FORMAT = "bafm-backbone"
SIDENET_FORMAT = "bafm-sidenet"
_SIT_FIELDS = (
    "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
    "num_classes", "learn_sigma", "projector_dims", "projector_hidden", "qk_norm",
)  # fmt: skip
_SIDENET_FIELDS = ("in_channels", "channels", "emb_dim", "depth", "num_heads", "num_classes", "frequency_dim",
                   "feature_dim", "feature_layer")


def _require(state: Mapping[str, torch.Tensor], keys: tuple[str, ...], path: str | Path, what: str) -> None:
    """Raise CheckpointError naming the ``keys`` absent from ``state`` (it is not a ``what`` checkpoint)."""
    missing = [k for k in keys if k not in state]
    if missing:
        seen = ", ".join(list(state)[:6])
        raise CheckpointError(
            f"{path}: not a {what} checkpoint: missing keys {', '.join(missing)} (first keys present: {seen})"
        )


def _freeze(model: nn.Module, trainable: bool = False) -> nn.Module:
    """Frozen and visible as such: eval mode and no gradients (unless ``trainable``)."""
    if trainable:
        return model.train().requires_grad_(True)
    return model.eval().requires_grad_(False)


def _check_fields(overrides: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> Dict[str, Any]:
    """Reject unknown override names; drop None values (unset config fields)."""
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"unknown {what} override(s) {unknown}; valid: {', '.join(allowed)}")
    return {k: v for k, v in overrides.items() if v is not None}


def _saved_config(path: str | Path, expected_format: str) -> Dict[str, Any]:
    """The bafm config beside ``path`` ({} for none), checked to be of ``expected_format``."""
    saved = read_config(path) or {}
    if saved and saved.get("format") != expected_format:
        raise CheckpointError(
            f"{path}: its config says format '{saved.get('format')}', expected '{expected_format}'"
        )
    return saved


def _config_source(path: str | Path, saved: Mapping[str, Any]) -> str:
    """Where a model's config came from, for messages: the JSON beside ``path``, else ``path``."""
    json_file = config_path(path)
    return str(json_file) if saved and json_file.is_file() else str(path)


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------


def infer_sit_config(state: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> Dict[str, Any]:
    """Read a SiT's configuration off its tensors.

    Args:
        state: SiT/REPA-layout state dict.
        path: the file (for messages).

    Returns:
        ``input_size, patch_size, in_channels, hidden_size, depth, mlp_ratio, num_classes,
        learn_sigma, projector_dims, projector_hidden, qk_norm`` and, with qk-norm, ``num_heads``.

    Raises:
        CheckpointError: a key needed for inference is missing or a shape is inconsistent.
    """
    _require(state, ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                     "final_layer.linear.weight"), path, "SiT")  # fmt: skip
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    tokens = state["pos_embed"].shape[-2]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{path}: pos_embed has {tokens} tokens, not a square grid")
    out_features = state["final_layer.linear.weight"].shape[0]
    config: Dict[str, Any] = dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=len(block_indices(state)),
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_features == patch * patch * 2 * in_channels,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
    )
    if "blocks.0.mlp.fc1.weight" in state:
        config["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    projectors = block_indices(state, "projectors.")
    config["projector_dims"] = [state[f"projectors.{k}.4.weight"].shape[0] for k in projectors
                                if f"projectors.{k}.4.weight" in state]  # fmt: skip
    if projectors and f"projectors.{projectors[0]}.0.weight" in state:
        config["projector_hidden"] = state[f"projectors.{projectors[0]}.0.weight"].shape[0]
    if config["qk_norm"]:
        config["num_heads"] = hidden // state["blocks.0.attn.q_norm.weight"].shape[0]
    return config


def _registry_matches(depth: int, hidden: int, patch: int) -> list[str]:
    """Registry names with this depth, width and patch size."""
    return [n for n, s in SIT_ARCHS.items() if (s.depth, s.hidden_size, s.patch_size) == (depth, hidden, patch)]


def load_backbone(
    path: str | Path,
    arch: Optional[str] = None,
    source: Optional[str] = None,
    *,
    device: torch.device | str = "cpu",
    dtype: Optional[torch.dtype] = torch.float32,
    **overrides: Any,
) -> SiT:
    """Load a frozen SiT backbone whose ``.velocity(x, t, y)`` is in bafm's time convention.

    Args:
        path: ``.pt``/``.pth`` (raw state dict or training checkpoint; ``"ema"`` preferred over
            ``"model"``) or ``.safetensors`` (bafm export, with ``<stem>.json`` beside it).
        arch: registry name such as ``"SiT-XL/2"``; None: from the JSON config, else inferred
            from the tensors (depth, width and patch size must match one registry entry).
        source: ``"repa"`` (t = 1 noise, v = noise - data) or ``"sit"`` (original SiT: t = 0
            noise, v = data - noise; adapted in ``velocity``); None: from the JSON config, else
            ``"repa"``.
        device: where the weights end up.
        dtype: floating-point dtype of the weights (None keeps the stored one).
        **overrides: SiT fields (``depth``, ``hidden_size``, ``num_heads``, ``patch_size``,
            ``mlp_ratio``, ...); None values are ignored. Fields the tensors determine are checked.

    Returns:
        The model, in eval mode with ``requires_grad`` off.

    Raises:
        CheckpointError: unreadable/unsafe file, or tensors that do not match the architecture
            (listing the first mismatching keys and shapes and what the tensors look like).
        ValueError: unknown ``arch`` or ``source``, or a conflict with the saved config.
        TypeError: unknown override names.
    """
    overrides = _check_fields(overrides, _SIT_FIELDS, "backbone")
    state = load_weights(path, ("ema", "model"))
    if source is not None and source not in TIME_CONVENTIONS:
        raise ValueError(f"source is '{source}', expected one of {TIME_CONVENTIONS}")
    saved = _saved_config(path, BACKBONE_FORMAT)
    for name, given in (("arch", arch), ("time_convention", source)):
        if given is not None and saved.get(name) not in (None, given):
            raise ValueError(f"{path}: saved config has {name}='{saved[name]}' but '{given}' was requested")
    arch = arch or saved.get("arch")
    source = source or saved.get("time_convention") or "repa"
    if arch is not None and arch not in SIT_ARCHS:
        raise ValueError(f"unknown SiT architecture '{arch}'; known: {', '.join(SIT_ARCHS)}")

    inferred = infer_sit_config(state, path)
    matches = _registry_matches(inferred["depth"], inferred["hidden_size"], inferred["patch_size"])
    # Precedence: tensors < registry entry < saved config < explicit overrides.
    kwargs = {k: v for k, v in inferred.items() if k in _SIT_FIELDS}
    if arch is not None:
        size = SIT_ARCHS[arch]
        kwargs.update(depth=size.depth, hidden_size=size.hidden_size, patch_size=size.patch_size)
        kwargs.setdefault("num_heads", size.num_heads)
    kwargs.update({k: v for k, v in saved.items() if k in _SIT_FIELDS and v is not None})
    kwargs.update(overrides)
    if "num_heads" not in kwargs:
        if not matches:
            raise CheckpointError(
                f"{path}: cannot tell the architecture: depth {inferred['depth']}, hidden_size "
                f"{inferred['hidden_size']}, patch_size {inferred['patch_size']} match no registry entry; "
                f"pass arch=... with overrides, or num_heads=..."
            )
        kwargs["num_heads"] = SIT_ARCHS[matches[0]].num_heads
    if arch is None and matches:
        size = SIT_ARCHS[matches[0]]
        if (kwargs["depth"], kwargs["hidden_size"], kwargs["patch_size"], kwargs["num_heads"]) == (
            size.depth, size.hidden_size, size.patch_size, size.num_heads
        ):
            arch = matches[0]

    # Counted before anything is built: a config beside the weights may ask for any size.
    check_model_size(SiT, kwargs, _config_source(path, saved))
    with torch.device("meta"):
        model = SiT(**kwargs, time_convention=source, arch=arch)
    what = (
        f"{arch or 'SiT'} (depth {kwargs['depth']}, hidden_size {kwargs['hidden_size']}, "
        f"patch_size {kwargs['patch_size']}, input_size {kwargs['input_size']})"
    )
    hint = (
        f"The tensors look like depth {inferred['depth']}, hidden_size {inferred['hidden_size']}, "
        f"patch_size {inferred['patch_size']}" + (f" ({', '.join(matches)})." if matches else ".")
    )
    check_against({k: v.shape for k, v in model.state_dict().items()}, state, path, what, hint)
    model.load_state_dict(cast_state_dict(state, dtype), strict=True, assign=True)
    return _freeze(model.to(device))  # type: ignore[return-value]


def save_backbone(model: nn.Module, path: str | Path, extra_config: Optional[Dict[str, Any]] = None) -> Path:
    """Export a SiT as ``<stem>.safetensors`` + ``<stem>.json``.

    Args:
        model: a :class:`SiT` (a ``torch.compile`` wrapper is unwrapped).
        path: target ``.safetensors`` path.
        extra_config: more JSON-serialisable entries for the config (e.g. training settings);
            they must not reuse the model's own keys.

    Returns:
        The JSON config path.

    Raises:
        TypeError: ``model`` is not a SiT.
        ValueError: ``extra_config`` collides with a model key.
    """
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, SiT):
        raise TypeError(f"save_backbone expects a SiT, got {type(model).__name__}")
    config: Dict[str, Any] = {"format": BACKBONE_FORMAT, "arch": model.arch, **model.config}
    clash = sorted(set(extra_config or {}) & set(config))
    if clash:
        raise ValueError(f"extra_config keys {clash} collide with the model config")
    config.update(extra_config or {})
    return write_weights(model.state_dict(), path, config)


# --------------------------------------------------------------------------------------------
# SideNet
# --------------------------------------------------------------------------------------------


def infer_sidenet_config(state: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> Dict[str, Any]:
    """Read a SideNet's configuration off its tensors (BA-solver release layout).

    Args:
        state: SideNet state dict.
        path: the file (for messages).

    Returns:
        ``in_channels, channels, emb_dim, depth, num_classes, frequency_dim``.

    Raises:
        CheckpointError: a key needed for inference is missing.
    """
    _require(state, ("input_conv.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight"),
             path, "SideNet")  # fmt: skip
    channels, double_in = state["input_conv.weight"].shape[:2]
    emb_dim, frequency_dim = state["t_embedder.mlp.0.weight"].shape
    return dict(
        in_channels=double_in // 2,
        channels=channels,
        emb_dim=emb_dim,
        depth=len(block_indices(state)),
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        frequency_dim=frequency_dim,
        # Backbone-feature SideNets (bafm only); the release's have no feature maps.
        feature_dim=state["feature_map.weight"].shape[1] if "feature_map.weight" in state else 0,
    )


def load_sidenet(
    path: str | Path,
    *,
    trainable: bool = False,
    device: torch.device | str = "cpu",
    dtype: Optional[torch.dtype] = torch.float32,
    **overrides: Any,
) -> SideNet:
    """Load a SideNet whose ``.velocity(x, v, t, h, y)`` estimates the velocity at ``t - h``.

    Args:
        path: BA-solver release checkpoint (``{"side_model", "ema_side_model", ...}``,
            ``ema_side_model`` preferred, or a raw state dict) or a bafm export
            (``.safetensors`` + ``<stem>.json``).
        trainable: keep it in training mode with gradients (e.g. to fine-tune); default frozen.
        device: where the weights end up.
        dtype: floating-point dtype of the weights (None keeps the stored one).
        **overrides: SideNet fields (``num_heads`` is the one the tensors cannot tell; the
            release uses 4); None values are ignored. Fields the tensors determine are checked.

    Returns:
        The SideNet (frozen: eval mode, no gradients, unless ``trainable``).

    Raises:
        CheckpointError: unreadable/unsafe file or tensors that do not match, naming the keys.
        TypeError: unknown override names.
    """
    overrides = _check_fields(overrides, _SIDENET_FIELDS, "SideNet")
    state = load_weights(path, ("ema_side_model", "side_model", "ema", "model"))
    saved = _saved_config(path, SIDENET_FORMAT)
    inferred = infer_sidenet_config(state, path)
    kwargs: Dict[str, Any] = {**inferred, "num_heads": 4}
    kwargs.update({k: v for k, v in saved.items() if k in _SIDENET_FIELDS and v is not None})
    kwargs.update(overrides)
    check_model_size(SideNet, kwargs, _config_source(path, saved))
    with torch.device("meta"):
        model = SideNet(**kwargs)
    what = (
        f"SideNet (channels {kwargs['channels']}, depth {kwargs['depth']} with attention at block "
        f"{kwargs['depth'] // 2}, emb_dim {kwargs['emb_dim']}, in_channels {kwargs['in_channels']})"
    )
    attention_at = [i for i in block_indices(state) if f"blocks.{i}.qkv.weight" in state]
    hint = (
        f"The tensors look like channels {inferred['channels']}, depth {inferred['depth']}, "
        f"attention at blocks {attention_at}."
    )
    check_against({k: v.shape for k, v in model.state_dict().items()}, state, path, what, hint)
    model.load_state_dict(cast_state_dict(state, dtype), strict=True, assign=True)
    return _freeze(model.to(device), trainable)  # type: ignore[return-value]


def save_sidenet(model: nn.Module, path: str | Path) -> Path:
    """Export a SideNet as ``<stem>.safetensors`` + ``<stem>.json`` (no backbone weights).

    Args:
        model: a :class:`SideNet` (a ``torch.compile`` wrapper is unwrapped).
        path: target ``.safetensors`` path.

    Returns:
        The JSON config path.

    Raises:
        TypeError: ``model`` is not a SideNet.
    """
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, SideNet):
        raise TypeError(f"save_sidenet expects a SideNet, got {type(model).__name__}")
    return write_weights(model.state_dict(), path, {"format": SIDENET_FORMAT, **model.config})
