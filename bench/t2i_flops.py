"""FLOPs of one BA step at SD3-medium and FLUX.1-dev 1024x1024 shapes, SideNet versus backbone.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device: the models are
built from their real configs (``bench/t2i_models.py``) without weights, so this runs on any CPU in
seconds. One BA step per image costs one backbone call (on the doubled batch with CFG) and two
SideNet calls: the forward probe on 3 offsets and the backward probe on 1 (each doubled with CFG).

Also written: parameter counts of every component and the memory their weights take in bf16 /
fp32, which the README's "what fits on one 80 GB GPU" figures are computed from.

    python bench/t2i_flops.py [--out bench/results/t2i_flops.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, atomic_write_json  # noqa: E402
from t2i_models import (  # noqa: E402
    SIDENET_RELEASE,
    SIZES,
    T2ISize,
    build_clip_scorer,
    build_encoder,
    build_sidenet,
    build_transformer,
    build_vae,
    inputs,
    parameter_count,
)

from bafm.models.diffusers_flow import FlowTransformerBackbone  # noqa: E402
from bafm.models.text_condition import repeat_condition  # noqa: E402

SIDENET_ROWS_PER_STEP = 4  # forward probe: 3 offsets in one call; backward probe: 1
GIB = 1024**3


def count_flops(fn) -> int:
    """Total FLOPs of ``fn()`` (a multiply-add counts 2).

    Attention runs on PyTorch's math backend: its matmuls are counted, whereas the fused CPU
    kernel that ``scaled_dot_product_attention`` picks by default has no FLOP formula.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure(size: T2ISize) -> Dict[str, Any]:
    """FLOPs per image of one BA step, and the parameters of every component, for ``size``."""
    backbone = FlowTransformerBackbone(build_transformer(size), size.family)
    x, t, cond = inputs(size, 1)
    backbone_flops = count_flops(lambda: backbone.velocity(x, t, cond))
    k = SIDENET_ROWS_PER_STEP

    def side_step_flops(sidenet) -> int:
        return count_flops(lambda: sidenet.velocity(x.repeat(k, 1, 1, 1), x.repeat(k, 1, 1, 1), t.repeat(k),
                                                    t.repeat(k), repeat_condition(cond, k)))  # fmt: skip

    sidenet = build_sidenet(size, dtype=torch.bfloat16)
    side_flops = side_step_flops(sidenet)
    # The release layout (body on every latent position) for comparison.
    full_res = build_sidenet(size, dtype=torch.bfloat16, patch_size=1)
    full_res_flops = side_step_flops(full_res)
    branches = 2 if size.cfg else 1
    params = {"transformer": parameter_count(backbone.transformer), "sidenet": parameter_count(sidenet),
              "vae": parameter_count(build_vae())}  # fmt: skip
    params.update({name: parameter_count(build_encoder(kind, cfg)) for name, (kind, cfg) in size.encoders.items()})
    params["eval_clip_vit_l14"] = parameter_count(build_clip_scorer())
    return {
        "family": size.family,
        "latent": list(size.latent),
        "text_tokens": size.text_tokens,
        "cfg_branches": branches,
        "backbone_tflops_per_call_per_image": backbone_flops * branches / 1e12,
        "sidenet_tflops_per_step_per_image": side_flops * branches / 1e12,
        "sidenet_rows_per_step": k * branches,
        "sidenet_over_backbone_flops": side_flops / backbone_flops,
        "sidenet_over_backbone_params": params["sidenet"] / params["transformer"],
        "patch_size_1": {"sidenet_tflops_per_step_per_image": full_res_flops * branches / 1e12,
                         "sidenet_over_backbone_flops": full_res_flops / backbone_flops,
                         "sidenet_parameters": parameter_count(full_res)},
        "parameters": params,
        "weights_gib": {
            "transformer_bf16": params["transformer"] * 2 / GIB,
            "text_encoders_bf16": sum(v for n, v in params.items() if n.startswith(("clip", "t5"))) * 2 / GIB,
            "vae_bf16": params["vae"] * 2 / GIB,
            "eval_clip_vit_l14_fp32": params["eval_clip_vit_l14"] * 4 / GIB,
            # SideNet training state: fp32 weights, EMA, gradients and AdamW's two moments.
            "sidenet_training_fp32": params["sidenet"] * 4 * 5 / GIB,
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "t2i_flops.json")
    args = parser.parse_args(argv)
    results = {name: measure(size) for name, size in SIZES.items()}
    payload = {
        "benchmark": "t2i_flops",
        "meta": {"counter": "torch.utils.flop_counter.FlopCounterMode on the meta device", "torch": torch.__version__,
                 "sidenet": SIDENET_RELEASE, "batch": 1, "note": "FLOPs per image; a multiply-add counts 2"},
        "results": results,
    }  # fmt: skip
    atomic_write_json(args.out, payload)
    for name, r in results.items():
        share = 100 * r["sidenet_over_backbone_flops"]
        params = r["parameters"]
        print(f"{name}: backbone {r['backbone_tflops_per_call_per_image']:.2f} TFLOP/call, SideNet "
              f"{r['sidenet_tflops_per_step_per_image']:.3f} TFLOP/step ({share:.2f} %), "
              f"params {params['transformer'] / 1e9:.3f} B vs {params['sidenet'] / 1e6:.2f} M")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
