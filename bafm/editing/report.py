"""``bafm edit``'s measurements and outputs: PSNR and latent error, classifier scores, tables, image grid."""

from __future__ import annotations

import io
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from bafm.config import ExperimentConfig
from bafm.tables import csv_text, markdown_text

COLUMNS = ("solver", "grid", "tol", "nfe", "steps", "recon_psnr", "recon_latent_rmse", "edit_target_prob",
           "edit_target_acc", "seconds", "n_images")  # fmt: skip
Row = Dict[str, Any]


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of images ``(N, C, H, W)`` in ``[0, 1]``; ``(N,)``, in float64."""
    return peak_signal_noise_ratio(a.double(), b.double(), data_range=1.0, reduction="none", dim=(1, 2, 3))


def latent_rmse(a: Tensor, b: Tensor) -> float:
    """Root-mean-square difference of two latent batches ``(N, C, H, W)``."""
    return float((a.double() - b.double()).square().mean().sqrt())


def target_scores(classifier: Optional[nn.Module], images: Tensor, target: int) -> Tuple[float, float]:
    """Mean target-class probability and accuracy of images in ``[0, 1]``; NaN without a classifier."""
    if classifier is None:
        return math.nan, math.nan
    probs = classifier(images.float() * 2.0 - 1.0).softmax(-1)  # trained on [-1, 1] pixels
    return float(probs[:, target].mean()), float((probs.argmax(-1) == target).double().mean())


def notes(cfg: ExperimentConfig, has_classifier: bool) -> str:
    """The note under the table: guidance, what nfe counts, why a column is NaN."""
    scale = cfg.sampling.cfg_scale if cfg.edit.cfg_scale is None else cfg.edit.cfg_scale
    lines = [f"Guidance scale {scale} on {list(cfg.sampling.guidance_interval)}; nfe is per direction "
             "(inversion and each regeneration spend it once); recon_psnr against the decoded input latents."]
    if not has_classifier:
        lines.append(f"edit_target_prob/edit_target_acc are NaN: eval.feature_extractor is "
                     f"'{cfg.eval.feature_extractor}', and only a 'classifier' gives class probabilities.")
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: Sequence[Row]) -> str:
    """CSV text with the ``COLUMNS`` header."""
    return csv_text(rows, COLUMNS, ".6g")


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub Markdown table (the CSV's columns)."""
    return markdown_text(rows, COLUMNS, {c: ".6g" for c in COLUMNS})


def render_grid(rows: Sequence[Tuple[str, Tensor]], header: Sequence[str]) -> bytes:
    """PNG of labelled rows of images.

    Args:
        rows: ``(label, images)`` with images ``(N, 1 or 3, H, W)`` in ``[0, 1]``, all the same size.
        header: one caption per column.

    Returns:
        PNG bytes; small images are enlarged (nearest neighbour) to about 64 pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = [(label, images.float().cpu().clamp(0, 1)) for label, images in rows]
    cols, (h, w) = tiles[0][1].shape[0], tiles[0][1].shape[-2:]
    zoom = max(1, round(64 / max(h, w)))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(draw.textlength(label, font=font) for label, _ in rows)) + 8
    cell_w = max([w * zoom] + [int(draw.textlength(text, font=font)) + 4 for text in header])
    cell_h, head_h, pad = h * zoom, 14, 2
    canvas = Image.new("RGB", (label_w + cols * (cell_w + pad), head_h + len(tiles) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(header):
        draw.text((label_w + j * (cell_w + pad), 1), text, fill="black", font=font)
    for i, (label, images) in enumerate(tiles):
        top = head_h + i * (cell_h + pad)
        draw.text((2, top + cell_h // 2 - 6), label, fill="black", font=font)
        for j in range(images.shape[0]):
            arr = (images[j] * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")
            canvas.paste(tile.resize((w * zoom, cell_h), Image.NEAREST), (label_w + j * (cell_w + pad), top))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
