"""The SideNet's relative error per anchor time and offset on the embedded default (README table).

For held-out noises (seed 2,000,000 + i, labels i % 10) the exact ODE is solved with RK4 and the
SideNet's forward probes at the 5- and 10-NFE uniform grids' offsets are compared with the
backbone's velocity at the exact point (``bafm.training.side_error``): 0 is an exact SideNet, 1 no
better than reusing the anchor's velocity.

    .venv/bin/python docs/digits/side_error_table.py [SIDENET.safetensors | run/checkpoints/stepN.ckpt ...]
        [--samples 256]

(A Lightning checkpoint of ``bafm train`` is read for its EMA SideNet, so a run can be measured
while it trains.)

Prints one Markdown row per (SideNet, anchor time) with the median error at each offset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bafm.models.loading import infer_sidenet_config, load_backbone, load_sidenet  # noqa: E402
from bafm.models.sidenet import SideNet  # noqa: E402
from bafm.sampling import latent_shape  # noqa: E402
from bafm.training.side_error import build_probe_set, side_relative_error, summarize  # noqa: E402


def ema_sidenet(checkpoint: Path) -> SideNet:
    """The EMA SideNet of a ``bafm train`` Lightning checkpoint (read without unpickling code)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {k[len("ema.module."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.module.")}
    sc = ckpt["hyper_parameters"]["sidenet"]
    model = SideNet(**infer_sidenet_config(state, checkpoint), num_heads=sc["num_heads"],
                    feature_layer=sc.get("feature_layer", -1))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sidenets", nargs="*", default=[str(ROOT / "checkpoints/digits/sidenet.safetensors")])
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    backbone = load_backbone(ROOT / "checkpoints/digits/backbone.safetensors", arch="SiT-S/2", depth=6,
                             hidden_size=128, num_heads=4)
    offsets = None
    for path in args.sidenets:
        sidenet = ema_sidenet(Path(path)) if path.endswith(".ckpt") else load_sidenet(path)
        probes = build_probe_set(backbone, sidenet, latent_shape(backbone), num_samples=args.samples, budgets=(5, 10))
        errors = side_relative_error(sidenet, probes)
        if offsets is None:
            offsets = sorted({round(h, 4) for _, h in errors})
            print("| SideNet | t | " + " | ".join(f"h={h:g}" for h in offsets) + " |")
            print("|---|---:|" + "---:|" * len(offsets))
        for t in sorted({t for t, _ in errors}, reverse=True):
            cells = {round(h, 4): e for (tt, h), e in errors.items() if tt == t}
            row = " | ".join(f"{cells[h]:.3f}" if h in cells else "" for h in offsets)
            print(f"| {Path(path).parent.name}/{Path(path).name} | {t:.1f} | {row} |")
        summary = summarize(errors)
        print(f"<!-- {path}: mean {summary['mean']:.3f}, worst {summary['worst']:.3f} -->", flush=True)


if __name__ == "__main__":
    main()
