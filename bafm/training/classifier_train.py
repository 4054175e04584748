"""Train the digits classifier that serves as the embedded default's feature extractor.

AdamW with cosine decay on the digits train split, light augmentation (random shifts of up to
``backbone_train.classifier_max_shift`` pixels), accuracy on the held-out split, weights and a
JSON sidecar written atomically to ``backbone_train.classifier_out``.

A plain PyTorch loop, unlike the Lightning loops of the backbone and the SideNet: the network
is a ~94k-parameter CNN trained for ~1.5k steps on one device, on a data set that fits in one
tensor, without checkpoints, resumption, distributed ranks or TensorBoard curves, which are what
a Trainer adds. Batches are index draws from that tensor and the shifts come from one seeded
generator, so the run is reproducible; the held-out accuracy goes to the JSON sidecar and is printed.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from bafm.config import ExperimentConfig
from bafm.models.classifier import DigitsClassifier, save_classifier

BACKGROUND = -1.0  # pixel value of empty digits background in [-1, 1]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an independent integer offset, filling with background.

    Args:
        x: images ``(B, C, H, W)``.
        max_shift: largest offset in pixels along each axis.
        generator: CPU generator for the offsets.

    Returns:
        Shifted images, same shape as ``x``.
    """
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=BACKGROUND)  # (B, C, H + 2m, W + 2m)
    dy = torch.randint(0, 2 * m + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * m + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode.

    Args:
        model: the classifier.
        images: ``(N, C, H, W)`` in ``[-1, 1]``.
        labels: ``(N,)`` int64.
        batch_size: evaluation batch size.

    Returns:
        Fraction of correct predictions in ``[0, 1]``.
    """
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i : i + batch_size])
        correct += int((logits.argmax(dim=1) == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, images.shape[0])


def train_classifier(
    cfg: ExperimentConfig,
    *,
    out: Optional[str | Path] = None,
    max_shift: Optional[int] = None,
    device: torch.device | str = "cpu",
    save: bool = True,
    log_every: int = 250,
    num_threads: Optional[int] = 1,
) -> Tuple[DigitsClassifier, Dict[str, Any]]:
    """Train the digits CNN and (optionally) save it.

    Uses ``backbone_train.classifier_steps``, ``backbone_train.batch_size``, ``backbone_train.lr``,
    ``backbone_train.classifier_max_shift`` and ``seed``; data from
    ``bafm.data.digits.load_digits_images``.

    Args:
        cfg: experiment config (the embedded default's digits).
        out: weights path; ``None`` means ``backbone_train.classifier_out``.
        max_shift: augmentation: random translations of up to this many pixels; ``None`` means
            ``backbone_train.classifier_max_shift``.
        device: training device.
        save: write ``<out>`` and its ``.json`` sidecar.
        log_every: print the running loss every this many steps (0: silent).
        num_threads: CPU threads while training (restored afterwards); None keeps torch's
            setting. One is fastest for this tiny network: more threads only add
            synchronisation, and oversubscribed cores make it many times slower.

    Returns:
        ``(model, metrics)``: the frozen model in eval mode and a dict with ``val_accuracy``,
        ``train_accuracy``, ``steps``, ``seconds``, ``num_params``, ``n_train``, ``n_val``.
    """
    if max_shift is None:
        max_shift = int(cfg.backbone_train.classifier_max_shift)
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(cfg, out, max_shift, device, save, log_every)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: ExperimentConfig, out: Optional[str | Path], max_shift: int, device: torch.device | str, save: bool,
    log_every: int,
) -> Tuple[DigitsClassifier, Dict[str, Any]]:
    """The training loop of ``train_classifier``."""
    from bafm.data.digits import digits_options, load_digits_images

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = load_digits_images("train", **digits_options(cfg.data, cfg.seed))
    x_val, y_val = load_digits_images("val", **digits_options(cfg.data, cfg.seed))
    x_train, y_train = x_train.float().to(device), y_train.long().to(device)
    x_val, y_val = x_val.float().to(device), y_val.long().to(device)
    num_classes = int(max(int(y_train.max()), int(y_val.max())) + 1)

    model = DigitsClassifier(
        in_channels=x_train.shape[1], num_classes=num_classes, image_size=x_train.shape[-1]
    ).to(device)
    steps = int(cfg.backbone_train.classifier_steps)
    batch_size = min(int(cfg.backbone_train.batch_size), x_train.shape[0])
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.backbone_train.lr), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / max(1, steps))))

    model.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, x_train.shape[0], (batch_size,), generator=gen).to(device)
        xb = random_shift(x_train[idx], max_shift, gen)
        loss = F.cross_entropy(model(xb), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if step > 1 else value
        if log_every and step % log_every == 0:
            print(f"classifier step {step}/{steps}  loss {running:.4f}", file=sys.stderr)
    seconds = time.perf_counter() - start

    model.requires_grad_(False).eval()
    metrics: Dict[str, Any] = {
        "val_accuracy": accuracy(model, x_val, y_val),
        "train_accuracy": accuracy(model, x_train, y_train),
        "steps": steps,
        "seconds": round(seconds, 2),
        "num_params": sum(p.numel() for p in model.parameters()),
        "n_train": int(x_train.shape[0]),
        "n_val": int(x_val.shape[0]),
        "max_shift": max_shift,
        "seed": int(cfg.seed),
    }
    if save:
        save_classifier(model, out if out is not None else cfg.backbone_train.classifier_out, metrics)
    return model, metrics


def classifier_destination(cfg: ExperimentConfig, out: Optional[str] = None) -> Path:
    """Where the classifier goes: ``out`` (a ``.safetensors`` file, or a folder for
    ``classifier.safetensors``), else ``backbone_train.classifier_out``.

    Raises:
        OutputFolderError: ``out`` is a folder whose ``classifier.safetensors`` git tracks (a
            committed file is replaced only when named exactly).
    """
    from bafm.io import check_not_tracked

    if not out:
        return Path(cfg.backbone_train.classifier_out)
    if str(out).endswith(".safetensors"):
        return Path(out)
    dest = Path(out) / "classifier.safetensors"
    check_not_tracked(dest, "bafm backbone's classifier file", "pass the file itself with --out to replace it")
    return dest


def run(cfg: ExperimentConfig, out: Optional[str] = None) -> int:
    """Command-style entry: train, save, print the held-out accuracy.

    Args:
        cfg: experiment config.
        out: a ``.safetensors`` path, or a folder to write ``classifier.safetensors`` into,
            instead of ``backbone_train.classifier_out``.

    Returns:
        0.
    """
    dest = classifier_destination(cfg, out)
    _, metrics = train_classifier(cfg, out=dest)
    print(f"digits classifier: held-out accuracy {100 * metrics['val_accuracy']:.2f} % "
          f"({metrics['n_val']} images), {metrics['seconds']:.0f} s -> {dest}")
    return 0


if __name__ == "__main__":
    from bafm.config import load_config

    args = sys.argv[1:]
    exp = args.pop(0) if args and "=" not in args[0] else None
    raise SystemExit(run(load_config(exp, args)))
