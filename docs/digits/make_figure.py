"""Compose docs/digits/samples.png from a sweep's grids next to real digits.

Usage: .venv/bin/python docs/digits/make_figure.py [runs/digits/nfe_sweep]
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from bafm.config import load_config  # noqa: E402
from bafm.data.digits import digits_options, load_digits_images  # noqa: E402

PANELS = [("ba", 5), ("euler", 5), ("unipc", 5), ("ipndm", 5), ("ba", 10), ("euler", 10), ("euler", 100),
          ("reference", None)]


def main(sweep: Path) -> None:
    cfg = load_config("experiments/digits.yaml")
    images, labels = load_digits_images("val", **digits_options(cfg.data, cfg.seed))
    # Same label order as the sweep's first 64 samples (label = index mod 10).
    picks = [int((labels == i % 10).nonzero()[i // 10]) for i in range(64)]
    real = make_grid((images[picks] + 1) / 2, nrow=8, padding=2).permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(2.0 * (len(PANELS) + 1), 2.4), dpi=150)
    axes[0].imshow(real, cmap="gray", interpolation="nearest")
    axes[0].set_title("real (val)", fontsize=8)
    for ax, (solver, nfe) in zip(axes[1:], PANELS):
        pattern = f"{solver}_nfe{nfe:03d}.png" if nfe else f"{solver}_nfe*.png"  # the reference's NFE is measured
        path = sorted((sweep / "grids").glob(pattern))[0]
        ax.imshow(np.asarray(Image.open(path)), interpolation="nearest")
        ax.set_title(f"{solver} @ {int(path.stem.rsplit('nfe', 1)[1])} NFE", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig("docs/digits/samples.png")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/digits/nfe_sweep"))
