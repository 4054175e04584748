"""FLOPs of the embedded default's backbone and SideNet, and the SideNet's share of a BA step.

    python bench/bench_sidenet_flops.py [--sidenet other.safetensors ...] [--out FILE]

Counted with ``torch.utils.flop_counter`` (``bafm.models.flops``: matrix products, convolutions
and attention, the CPU attention kernel included) on a 2-sample batch of the committed digits
backbone (``experiments/digits.yaml``) and each SideNet: the committed
``checkpoints/digits/sidenet.safetensors`` and any export given with ``--sidenet`` (a SideNet
whose ``.json`` has ``feature_dim > 0`` is measured reading the backbone's tokens, as it samples).

Reported per SideNet: backbone MFLOP per sample, SideNet MFLOP per evaluation, one evaluation in
backbone calls, and one BA step's SideNet work, ``4`` evaluations (the forward probe at three
nodes and the backward probe), in backbone calls, against the bound of 0.20 (NFE stays an honest
cost). Writes ``bench/results/sidenet_flops.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, ResultFile  # noqa: E402

from bafm.config import load_config  # noqa: E402
from bafm.models.flops import describe, measure_flops  # noqa: E402
from bafm.models.loading import load_backbone, load_sidenet  # noqa: E402
from bafm.sampling import latent_shape  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIDENET = ROOT / "checkpoints" / "digits" / "sidenet.safetensors"
# One BA step: the forward probe at three nodes and the backward probe.
SIDE_EVALUATIONS_PER_STEP = 4
# The SideNet's work in one BA step may be at most this many backbone calls.
STEP_BOUND = 0.20


def _shown(path: Path) -> str:
    """A path relative to the repository when inside it (result files do not name the checkout)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _mflop(by_op: Dict[str, float]) -> Dict[str, float]:
    return {op: round(n / 1e6, 6) for op, n in sorted(by_op.items())}


def measure(backbone: torch.nn.Module, sidenet_path: Path) -> Dict[str, object]:
    """The figures of one SideNet export against ``backbone``."""
    sidenet = load_sidenet(sidenet_path)
    flops = measure_flops(backbone, sidenet, latent_shape(backbone))
    figures = describe(flops, SIDE_EVALUATIONS_PER_STEP)
    return {
        "sidenet": _shown(sidenet_path),
        "feature_dim": int(sidenet.feature_dim),
        "sidenet_parameters": sum(p.numel() for p in sidenet.parameters()),
        "backbone_parameters": sum(p.numel() for p in backbone.parameters()),
        **{k: round(v, 6) for k, v in figures.items()},
        "ba_step_bound": STEP_BOUND,
        "within_bound": bool(figures["ba_step_sidenet_in_backbone_calls"] <= STEP_BOUND),
        "backbone_mflop_by_op": _mflop(flops.backbone_by_op),
        "sidenet_mflop_by_op": _mflop(flops.sidenet_by_op),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidenet", type=Path, nargs="*", default=[],
                        help="more SideNet exports (.safetensors beside their .json) to measure")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sidenet_flops.json")
    args = parser.parse_args(argv)
    cfg = load_config(ROOT / "experiments" / "digits.yaml")
    backbone = load_backbone(ROOT / cfg.backbone.path, arch=cfg.backbone.arch, depth=cfg.backbone.depth,
                             hidden_size=cfg.backbone.hidden_size, num_heads=cfg.backbone.num_heads)
    paths: List[Path] = [DEFAULT_SIDENET, *(p.resolve() for p in args.sidenet)]
    for path in paths:
        if not path.is_file():
            print(f"error: SideNet export '{path}' does not exist", file=sys.stderr)
            return 2
    settings = {"backbone": _shown(ROOT / cfg.backbone.path), "sidenets": [_shown(p) for p in paths], "probe_rows": 2,
                "side_evaluations_per_step": SIDE_EVALUATIONS_PER_STEP}
    results = ResultFile(args.out, "sidenet_flops", torch.device("cpu"), settings,
                         note="torch.utils.flop_counter counts (2 FLOPs per multiply-add), per sample / per evaluation")
    rows = []
    for path in paths:
        try:
            row = measure(backbone, path)
        except Exception as err:  # noqa: BLE001  (one bad export must not hide the others)
            results.error(str(path), err)
            continue
        results.record(row["sidenet"], value=row)
        rows.append(row)
    results.finish("complete" if len(rows) == len(paths) else "failed")
    print("| SideNet | feature_dim | backbone MFLOP/sample | SideNet MFLOP/eval | eval in backbone calls "
          f"| BA step ({SIDE_EVALUATIONS_PER_STEP} evals) in backbone calls | <= {STEP_BOUND:g} |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['sidenet']} | {r['feature_dim']} | {r['backbone_mflop_per_sample']:.4g} "
              f"| {r['sidenet_mflop_per_evaluation']:.4g} | {r['sidenet_evaluation_in_backbone_calls']:.4f} "
              f"| {r['ba_step_sidenet_in_backbone_calls']:.4f} | {'yes' if r['within_bound'] else 'NO'} |")
    print(f"results: {args.out}")
    return 0 if len(rows) == len(paths) else 1


if __name__ == "__main__":
    raise SystemExit(main())
