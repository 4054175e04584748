"""SideNet training throughput: the BA chain loss (K links) beside a frozen SiT backbone, one device.

One step is what ``SideNetModule`` does: ``bafm.training.ba_loss.chain_loss`` under bf16 autocast
(CUDA), backward, gradient clipping at 1.0, AdamW, and the SideNet EMA update. Per image it costs
``K + 1`` backbone calls, ``K`` three-node SideNet calls without gradient and ``K`` SideNet calls
with gradient. Reports images/s, step time and peak device memory.

Variants: ``eager`` (float32 weights, autocast, NCHW) and ``compiled`` (backbone in bf16,
channels-last, compiled block by block and replayed from CUDA graphs; SideNet channels-last and
compiled, forward and backward).

    python bench/bench_training.py                              # SiT-XL/2 on CUDA, tiny on CPU
    python bench/bench_training.py --batch-sizes 64 128 --links 8
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_sampling import PRESETS, AutocastVelocity, build_models  # noqa: E402
from common import (RESULTS_DIR, Deadline, ResultFile, add_run_arguments, device_and_preset, free_memory,  # noqa: E402
                    peak_memory_gib, reset_peak_memory, synchronize)  # fmt: skip

from bafm.models.fallback import FallbackChain  # noqa: E402
from bafm.models.fast import FastVelocity, optimize_for_inference  # noqa: E402
from bafm.models.fast import training_velocity  # noqa: E402
from bafm.training.ba_loss import ChainLossConfig, chain_loss  # noqa: E402

VARIANTS = ("eager", "compiled")


def make_step(backbone_velocity: Callable[..., torch.Tensor], side_velocity: Callable[..., torch.Tensor],
              sidenet: nn.Module, device: torch.device, links: int, num_classes: int,
              label_dropout: float = 0.1) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """One optimisation step as the training module runs it; returns ``step(x0, y, seed) -> loss``."""
    params = [p for p in sidenet.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=fused)
    ema = [p.detach().clone() for p in params]
    cfg = ChainLossConfig(links=links, offset_rate=50.0, p_backward=0.5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step(x0: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        """One step on clean latents ``x0`` (B, C, H, W) and labels ``y`` (B,); returns the loss."""
        generator = torch.Generator(device=device).manual_seed(seed)
        drop = torch.rand(y.shape[0], generator=generator, device=device) < label_dropout
        y = torch.where(drop, torch.full_like(y, num_classes), y)
        with autocast:
            loss, _ = chain_loss(backbone_velocity, side_velocity, x0, y, cfg, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - 0.9996)
        return loss.detach()

    return step


def measure(variant: str, backbone: nn.Module, sidenet: nn.Module, device: torch.device, batch: int,
            links: int, warmup: int, steps: int, side_mode: str, backend: str) -> Dict[str, Any]:
    """Throughput and peak memory of ``steps`` timed steps after ``warmup`` untimed ones."""
    side = copy.deepcopy(sidenet).train().requires_grad_(True)
    if variant == "eager":
        fast_backbone: nn.Module = AutocastVelocity(copy.deepcopy(backbone), device)
        side_velocity: Callable[..., torch.Tensor] = side.velocity
        paths = {"backbone": "naive", "sidenet": "eager"}
    elif variant == "compiled":
        dtype = torch.bfloat16 if device.type == "cuda" else None
        fast_backbone = optimize_for_inference(
            copy.deepcopy(backbone), compile=True, mode="default", channels_last=True, dtype=dtype,
            cuda_graphs=device.type == "cuda", backend=backend, compile_scope="blocks")  # fmt: skip
        side_velocity = training_velocity(side, compile=True, mode=side_mode, channels_last=True, backend=backend)
        paths = {}
    else:
        raise ValueError(f"unknown variant '{variant}', expected one of: {', '.join(VARIANTS)}")
    num_classes = backbone.num_classes
    size = backbone.grid_size * backbone.patch_size
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, backbone.in_channels, size, size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    step = make_step(fast_backbone.velocity, side_velocity, side, device, links, num_classes)

    warm_start = time.perf_counter()
    for i in range(warmup):
        step(x0, y, i)
    synchronize(device)
    warmup_s = time.perf_counter() - warm_start
    reset_peak_memory(device)
    losses = []
    start = time.perf_counter()
    for i in range(steps):
        losses.append(step(x0, y, warmup + i))
    synchronize(device)
    seconds = time.perf_counter() - start
    loss_values = [float(v) for v in losses]
    if not all(torch.isfinite(torch.tensor(loss_values))):
        raise FloatingPointError(f"non-finite training loss in variant {variant}: {loss_values}")
    if isinstance(fast_backbone, FastVelocity) and isinstance(side_velocity, FallbackChain):
        paths = {"backbone": fast_backbone.active_path, "sidenet": side_velocity.active,
                 "fallbacks": list(fast_backbone.fallbacks) + list(side_velocity.fallbacks)}  # fmt: skip
    return {
        "images_per_s": round(steps * batch / seconds, 3),
        "step_ms": round(1e3 * seconds / steps, 3),
        "peak_memory_gib": peak_memory_gib(device),
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 2),
        "timed_steps": steps,
        "losses": [round(v, 6) for v in loss_values],
        "paths": paths,
    }


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: sit-xl2 on CUDA, tiny on CPU")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 64 (CUDA), 4 (CPU)")
    p.add_argument("--links", type=int, default=8, help="K, chain links per sample")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (compilation); default 3 CUDA, 1 CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 10 CUDA, 2 CPU")
    p.add_argument("--side-mode", default="max-autotune-no-cudagraphs")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--backbone", default=None, help="backbone checkpoint (default: random weights)")
    p.add_argument("--source", default="repa", choices=["repa", "sit"])
    p.add_argument("--sidenet", default=None, help="initial SideNet weights (default: random)")
    return add_run_arguments(p)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; write JSON after every measurement."""
    args = build_parser().parse_args(argv)
    device, cuda, preset = device_and_preset(args)
    batch_sizes = args.batch_sizes or ([64] if cuda else [4])
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    steps = args.steps if args.steps is not None else (10 if cuda else 2)
    out = Path(args.out) if args.out else RESULTS_DIR / ("training_gpu.json" if cuda else "training_cpu_tiny.json")
    deadline = Deadline(args.budget_s)
    backbone, sidenet, model_info = build_models(preset, device, args.backbone, args.sidenet, args.source)
    settings = {**model_info, "batch_sizes": batch_sizes, "links": args.links, "variants": args.variants,
                "warmup_steps": warmup, "timed_steps": steps, "side_mode": args.side_mode,
                "precision": "bf16 autocast (SideNet float32 weights)" if cuda else "float32",
                "optimizer": "AdamW lr 1e-4 (fused on CUDA), grad clip 1.0, EMA 0.9996",
                "loss": "chain_loss, offset_rate 50, p_backward 0.5, label dropout 0.1"}  # fmt: skip
    note = "" if cuda else "CPU, tiny sizes: proves the harness; not the paper-scale figures (those need CUDA)."
    result = ResultFile(out, "sidenet training", device, settings, note=note)
    print(f"training benchmark on {result.payload['meta']['device']} ({preset}) -> {out}")
    for batch in batch_sizes:
        for variant in args.variants:
            if not deadline.allows(30):
                result.error(f"B={batch} {variant}", TimeoutError("skipped: time budget spent"))
                continue
            try:
                res = measure(variant, backbone, sidenet, device, batch, args.links, warmup, steps,
                              args.side_mode, args.backend)  # fmt: skip
                result.record(f"batch_{batch}", variant, value=res)
                print(f"B={batch:4d} {variant:9s} {res['images_per_s']:9.2f} images/s  step {res['step_ms']:9.1f} ms  "
                      f"peak {res['peak_memory_gib']} GiB")
            except Exception as err:  # record and go on
                result.error(f"B={batch} {variant}", err)
                print(f"B={batch} {variant}: FAILED {type(err).__name__}: {err}")
            finally:
                free_memory(device)
    result.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
