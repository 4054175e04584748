"""Small CNN classifier for the embedded default's 1x16x16 digits.

It plays Inception's part for the digits: its penultimate features give FID, its logits IS.
Weights are stored as ``<name>.safetensors`` with a ``<name>.json`` sidecar that holds the
architecture and the held-out accuracy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bafm.io import atomic_path, atomic_write_json

ARCH_NAME = "digits-cnn"


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),  # bias folded into BN
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DigitsClassifier(nn.Module):
    """Conv 32 -> pool -> conv 64 -> pool -> conv 128 -> global average -> linear.

    Input: images ``(B, in_channels, H, W)`` in ``[-1, 1]`` (the digits' pixel "latents").
    ``features`` is the 128-d global-average-pooled activation, ``forward`` the class logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 128),
        image_size: int = 16,
    ) -> None:
        """Create the network.

        Args:
            in_channels: image channels.
            num_classes: number of output logits.
            channels: widths of the three conv stages; the last is the feature dimension.
            image_size: expected spatial size (checked at call time, recorded in the sidecar).
        """
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels must have 3 entries, got {list(channels)}.")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.channels = tuple(int(c) for c in channels)
        self.image_size = int(image_size)
        c1, c2, c3 = self.channels
        self.body = nn.Sequential(
            _conv_block(in_channels, c1),
            nn.MaxPool2d(2),  # (B, c1, H/2, W/2)
            _conv_block(c1, c2),
            nn.MaxPool2d(2),  # (B, c2, H/4, W/4)
            _conv_block(c2, c3),
            nn.AdaptiveAvgPool2d(1),  # (B, c3, 1, 1)
            nn.Flatten(),  # (B, c3)
        )
        self.head = nn.Linear(c3, num_classes)

    @property
    def feature_dim(self) -> int:
        """Width of ``features``."""
        return self.channels[-1]

    def _check(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"the digits classifier expects images (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}.")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features.

        Args:
            x: images ``(B, C, H, W)`` in ``[-1, 1]``.

        Returns:
            ``(B, feature_dim)``.
        """
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            x: images ``(B, C, H, W)`` in ``[-1, 1]``.

        Returns:
            ``(B, num_classes)`` logits.
        """
        return self.head(self.features(x))

    def config(self) -> Dict[str, Any]:
        """Constructor arguments, for the JSON sidecar."""
        return {
            "arch": ARCH_NAME,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "channels": list(self.channels),
            "image_size": self.image_size,
        }


def sidecar_path(path: str | Path) -> Path:
    """``classifier.safetensors`` -> ``classifier.json``."""
    return Path(path).with_suffix(".json")


def save_classifier(model: DigitsClassifier, path: str | Path, metrics: Optional[Dict[str, Any]] = None) -> Path:
    """Save weights (safetensors) and ``config + metrics`` (JSON sidecar), each atomically.

    Args:
        model: the classifier.
        path: ``.safetensors`` destination; the sidecar goes next to it with a ``.json`` suffix.
        metrics: extra entries for the sidecar (e.g. ``val_accuracy``).

    Returns:
        The weights path.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {**model.config(), **(metrics or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"arch": ARCH_NAME})
    atomic_write_json(sidecar_path(path), meta, sort_keys=True)
    return path


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> DigitsClassifier:
    """Load a frozen classifier saved by ``save_classifier``.

    Args:
        path: the ``.safetensors`` file (its ``.json`` sidecar must sit beside it).
        device: where to put the weights.

    Returns:
        The model in eval mode with ``requires_grad`` off.

    Raises:
        FileNotFoundError: weights or sidecar missing (says how to make them).
        ValueError: the sidecar describes another architecture or the weights do not fit.
    """
    path = Path(path)
    meta_path = sidecar_path(path)
    for p in (path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"digits classifier file '{p}' not found; train it with `make backbone` "
                "(writes backbone_train.classifier_out and its .json sidecar)."
            )
    meta = json.loads(meta_path.read_text())
    if meta.get("arch") != ARCH_NAME:
        raise ValueError(f"{meta_path}: 'arch' is {meta.get('arch')!r}, expected {ARCH_NAME!r}.")
    model = DigitsClassifier(
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        channels=meta["channels"],
        image_size=meta["image_size"],
    )
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the architecture in {meta_path}: {err}") from None
    return model.to(device).requires_grad_(False).eval()


def read_classifier_metrics(path: str | Path) -> Dict[str, Any]:
    """The JSON sidecar of a saved classifier (architecture and accuracy)."""
    return json.loads(sidecar_path(path).read_text())


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a weights file, used to invalidate cached statistics."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
