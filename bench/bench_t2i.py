"""Text-to-image timings at real sizes with random weights: SD3-medium and FLUX.1-dev at 1024x1024.

For each size and batch (bf16 on CUDA): the backbone call (doubled batch with SD3's CFG), the
SideNet per BA step (forward probe on 3 offsets + backward probe on 1), their ratio (the BA
overhead), BA-N end to end against the pipelines' default Euler-28 and Euler-N, and the SideNet's
training throughput with the chain loss (K links, AdamW, bf16 autocast), with peak memory. The
time grids are the pipelines' own (``sd3`` shift 3, ``flux`` mu at 4096 tokens). No weights are
read and nothing is downloaded; the JSON is rewritten after every measurement.

    python bench/bench_t2i.py [--sizes sd3-medium-1024 flux1-dev-1024] [--batch-sizes 1 4]
                              [--out bench/results/t2i_gpu.json] [--budget-s 240]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    Deadline,
    ResultFile,
    free_memory,
    peak_memory_gib,
    prepare_device,
    randomize_zero_init_,
    reset_peak_memory,
    time_call,
    wall_time,
)
from t2i_models import (  # noqa: E402
    SIZES,
    TINY_SIZES,
    T2ISize,
    build_sidenet,
    build_transformer,
    inputs,
    parameter_count,
)

from bafm.models.diffusers_flow import FlowTransformerBackbone  # noqa: E402
from bafm.models.text_condition import TextCondition  # noqa: E402
from bafm.models.text_sampling import build_text_sampling_fns  # noqa: E402
from bafm.pipelines import cast_side_velocity  # noqa: E402
from bafm.sampling import integrate  # noqa: E402
from bafm.solvers.grids import flux_mu  # noqa: E402
from bafm.training.ba_loss import ChainLossConfig, chain_loss  # noqa: E402

LOBATTO_ALPHA = (1 - 5**-0.5) / 2
PIPELINE_EULER_STEPS = 28  # both pipelines' default num_inference_steps


def grid_options(size: T2ISize) -> Dict[str, object]:
    """The pipeline's own schedule: SD3 static shift 3, Flux mu of the packed token count."""
    if size.family == "sd3":
        return {"grid": "sd3", "shift": 3.0}
    tokens = (size.latent[1] // 2) * (size.latent[2] // 2)
    return {"grid": "flux", "mu": flux_mu(tokens)}


def doubled(size: T2ISize, x: torch.Tensor, t: torch.Tensor, cond: TextCondition):
    """The rows of one backbone call: the batch twice with SD3's CFG, once for Flux."""
    branches = 2 if size.cfg else 1
    cond = TextCondition(*(torch.cat([c] * branches) for c in cond))
    return torch.cat([x] * branches), torch.cat([t] * branches), cond


def time_components(size: T2ISize, backbone: FlowTransformerBackbone, sidenet: torch.nn.Module, x: torch.Tensor,
                    t: torch.Tensor, cond: TextCondition, device: torch.device) -> Dict[str, object]:  # fmt: skip
    """One backbone call against the SideNet calls of one BA step, on the same rows."""
    xx, tt, cc = doubled(size, x, t, cond)
    call = time_call(lambda: backbone.velocity(xx, tt, cc), device, warmup=2, repeats=5)
    h = torch.full_like(tt, 0.1)
    x3, t3 = torch.cat([xx] * 3), torch.cat([tt] * 3)
    c3 = TextCondition(*(torch.cat([c] * 3) for c in cc))
    forward_offsets = torch.cat([LOBATTO_ALPHA * h, (1 - LOBATTO_ALPHA) * h, h])

    def side_step() -> None:
        sidenet.velocity(x3, x3, t3, forward_offsets, c3)  # forward probe: 3 offsets in one call
        sidenet.velocity(xx, xx, tt, -LOBATTO_ALPHA * h, cc)  # backward probe

    side = time_call(side_step, device, warmup=2, repeats=5)
    return {"backbone_call": call, "sidenet_per_step": side, "cfg_branches": 2 if size.cfg else 1,
            "overhead_ratio": side["median_ms"] / call["median_ms"]}  # fmt: skip


def time_end_to_end(size: T2ISize, backbone: FlowTransformerBackbone, sidenet: torch.nn.Module, x: torch.Tensor,
                    cond: TextCondition, nfes: List[int], device: torch.device, deadline: Deadline,
                    record) -> None:  # fmt: skip
    """Whole solves on the pipeline's grid: BA-N, Euler-N and the pipelines' Euler-28."""
    guidance = dict(negative=TextCondition(*(torch.randn_like(c) for c in cond)), cfg_scale=7.0) if size.cfg else {}
    runs: Dict[str, object] = {}
    for solver, nfe in [*(("ba", n) for n in nfes), *(("euler", n) for n in nfes), ("euler", PIPELINE_EULER_STEPS)]:
        if not deadline.allows(20):
            break
        side_velocity = cast_side_velocity(sidenet) if solver == "ba" else None
        velocity_fn, side_fn = build_text_sampling_fns(backbone.velocity, cond, side_velocity=side_velocity,
                                                       **guidance)  # fmt: skip

        def solve(solver=solver, nfe=nfe, velocity_fn=velocity_fn, side_fn=side_fn):
            return integrate(velocity_fn, x.float(), solver, nfe, side_fn, **grid_options(size))

        runs[f"{solver}-{nfe}"] = wall_time(solve, device, repeats=2)
        record(runs)


def bench_size(size: T2ISize, batches: List[int], nfes: List[int], links: int, device: torch.device,
               results: ResultFile, deadline: Deadline) -> None:  # fmt: skip
    """Every figure for one size; each batch is skipped when the budget runs out."""
    dtype = torch.bfloat16
    backbone = FlowTransformerBackbone(build_transformer(size, device, dtype), size.family).to(device)
    sidenet = build_sidenet(size, device, dtype)
    randomize_zero_init_(sidenet)
    results.record(size.name, "parameters", value={"transformer": parameter_count(backbone.transformer),
                                                   "sidenet": parameter_count(sidenet)})  # fmt: skip
    for batch in batches:
        key = f"b{batch}"
        if not deadline.allows(30):
            results.record(size.name, key, value="skipped: budget")
            continue
        try:
            with torch.no_grad():
                x, t, cond = inputs(size, batch, device, dtype)
                results.record(size.name, key, "components",
                               value=time_components(size, backbone, sidenet, x, t, cond, device))  # fmt: skip
                time_end_to_end(size, backbone, sidenet, x, cond, nfes, device, deadline,
                                lambda runs: results.record(size.name, key, "end_to_end", value=runs))  # fmt: skip
            if deadline.allows(30):
                results.record(size.name, key, "training", value=bench_training(size, backbone, batch, links, device))
        except torch.cuda.OutOfMemoryError as err:
            results.error(f"{size.name} {key}", err)
        free_memory(device)


def bench_training(size: T2ISize, backbone: FlowTransformerBackbone, batch: int, links: int,
                   device: torch.device) -> Dict[str, object]:  # fmt: skip
    """Chain-loss steps per second of a float32 SideNet under bf16 autocast, with peak memory."""
    sidenet = build_sidenet(size, device, torch.float32).train()
    randomize_zero_init_(sidenet)
    optimizer = torch.optim.AdamW(sidenet.parameters(), lr=1e-4)
    x0, _, cond = inputs(size, batch, device, torch.float32)
    config = ChainLossConfig(links=links)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = chain_loss(backbone.velocity, sidenet.velocity, x0, cond, config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sidenet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    timing = time_call(step, device, warmup=1, repeats=3)
    return {"step": timing, "links": links, "images_per_s": batch * 1e3 / timing["median_ms"],
            "peak_memory_gib": peak_memory_gib(device)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=[*SIZES, *TINY_SIZES])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--nfes", nargs="+", type=int, default=[8])
    parser.add_argument("--links", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "t2i_gpu.json")
    parser.add_argument("--budget-s", type=float, default=None)
    args, _ = parser.parse_known_args(argv)  # gpu_all.sh appends options meant for other benchmarks
    device = prepare_device(args.device)
    deadline = Deadline(args.budget_s)
    results = ResultFile(args.out, "t2i", device, vars(args) | {"out": str(args.out)},
                         note="random weights at real sizes; bf16 backbone and SideNet")  # fmt: skip
    for name in args.sizes:
        if not deadline.allows(60):
            results.record(name, value="skipped: budget")
            continue
        try:
            size = {**SIZES, **TINY_SIZES}[name]
            bench_size(size, args.batch_sizes, args.nfes, args.links, device, results, deadline)
        except Exception as err:  # one size failing must not lose the other's figures
            results.error(name, err)
        free_memory(device)
    results.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
