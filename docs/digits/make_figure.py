"""Compose docs/digits/samples.png from a sweep's grids next to real digits.

Nine panels in a 3 x 3 layout, each the first 32 samples (labels 0-9 cyclic, four rows of
eight) of one sweep row at about 50 pixels per digit, so a digit can be judged by eye.

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


SHOWN, PER_ROW = 32, 8  # samples per panel, and per row of the sweep's 8-wide grids
TILE = 9  # one 8x8 digit plus make_grid's 1-pixel padding


def first_rows(grid: np.ndarray, rows: int) -> np.ndarray:
    """The top ``rows`` rows of digits of a sweep grid (``make_grid`` layout, padding 1)."""
    return grid[: 1 + rows * TILE]


def main(sweep: Path) -> None:
    cfg = load_config("experiments/digits.yaml")
    images, labels = load_digits_images("val", **digits_options(cfg.data, cfg.seed))
    # Same label order as the sweep's first samples (label = index mod 10).
    picks = [int((labels == i % 10).nonzero()[i // 10]) for i in range(SHOWN)]
    real = make_grid((images[picks] + 1) / 2, nrow=PER_ROW, padding=1, pad_value=1.0).permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(3, 3, figsize=(12.0, 7.2), dpi=110)
    axes = axes.ravel()
    axes[0].imshow(real, cmap="gray", interpolation="nearest")
    axes[0].set_title("real digits (validation split)", fontsize=11)
    for ax, (solver, nfe) in zip(axes[1:], PANELS):
        pattern = f"{solver}_nfe{nfe:03d}.png" if nfe else f"{solver}_nfe*.png"  # the reference's NFE is measured
        path = sorted((sweep / "grids").glob(pattern))[0]
        ax.imshow(first_rows(np.asarray(Image.open(path)), SHOWN // PER_ROW), interpolation="nearest")
        what = "exact ODE (reference)" if solver == "reference" else solver
        ax.set_title(f"{what} @ {int(path.stem.rsplit('nfe', 1)[1])} NFE", fontsize=11)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("digits: the first 32 samples of each row (same noises and labels)", fontsize=12)
    fig.tight_layout()
    fig.savefig("docs/digits/samples.png")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/digits/nfe_sweep"))
