"""Sampling latency with classifier-free guidance: backbone call, SideNet probes, BA vs Euler end to end.

For each batch size ``B`` (images; CFG doubles the rows) and each speed variant:

* components, timed alone: one backbone call on ``2B`` rows; the forward probe (one SideNet call
  on the ``3 x 2B`` stacked rows of a BA step); the backward probe (``2B`` rows); the overhead
  ``(forward + backward probe) / backbone call`` per BA step;
* end to end, through ``bafm.solvers.get_solver`` and ``bafm.models.guidance.build_sampling_fns``
  (what users run): BA at 5/10 NFE and Euler at 50/100 NFE from the same noise and labels, with
  the speed-ups Euler-100 / BA-10 and Euler-50 / BA-5.

Variants: ``naive`` (float32 weights under bf16 autocast on CUDA, NCHW, eager: the usual first
attempt), ``eager`` (bf16 weights, channels-last, eager), ``compiled`` (+ torch.compile),
``compiled-graphs`` (+ CUDA graphs). On CPU every variant runs in float32.

    python bench/bench_sampling.py                       # SiT-XL/2 on CUDA, tiny sizes on CPU
    python bench/bench_sampling.py --batch-sizes 64 --variants naive compiled-graphs
    python bench/bench_sampling.py --backbone ckpt.pt --sidenet sidenet.safetensors
"""

from __future__ import annotations

import argparse
import copy
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from common import (RESULTS_DIR, Deadline, ResultFile, add_run_arguments, device_and_preset, free_memory,  # noqa: E402
                    randomize_zero_init_)
from common import profile_call, time_call, wall_time  # noqa: E402

from bafm.models import SideNet, build_sit, count_parameters, load_backbone, load_sidenet  # noqa: E402
from bafm.models.fast import optimize_for_inference  # noqa: E402
from bafm.models.guidance import build_sampling_fns  # noqa: E402
from bafm.solvers import get_solver  # noqa: E402
from bafm.solvers.bi_anchor import LOBATTO_ALPHA  # noqa: E402
from bafm.solvers.grids import uniform_grid  # noqa: E402

# Model sizes: the paper's (SiT-XL/2 on 4x32x32 SD-VAE latents, release SideNet) and a CPU-sized one.
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "sit-xl2": {
        "backbone": dict(arch="SiT-XL/2", input_size=32, in_channels=4, num_classes=1000),
        "sidenet": dict(in_channels=4, channels=256, emb_dim=256, depth=4, num_heads=4, num_classes=1000),
    },
    "tiny": {
        "backbone": dict(arch="SiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=4, hidden_size=128,
                         num_heads=4),
        "sidenet": dict(in_channels=4, channels=16, emb_dim=16, depth=4, num_heads=4, num_classes=10),
    },
}  # fmt: skip
VARIANTS = ("naive", "eager", "compiled", "compiled-graphs")


@dataclass(frozen=True)
class SpeedSettings:
    """Compile settings shared by every compiled variant."""

    side_mode: str = "max-autotune-no-cudagraphs"
    backbone_mode: str = "default"
    backbone_scope: str = "blocks"
    backend: str = "inductor"


class AutocastVelocity(nn.Module):
    """The naive baseline: the model as loaded, its ``velocity`` under bf16 autocast (CUDA), no grad."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.device_type = device.type

    def velocity(self, *args: Any) -> Tensor:
        """``module.velocity(*args)`` in float32 out."""
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device_type == "cuda" else nullcontext())
        with torch.no_grad(), autocast:
            return self.module.velocity(*args).float()


def build_models(preset: str, device: torch.device, backbone_path: Optional[str] = None,
                 sidenet_path: Optional[str] = None, source: str = "repa",
                 seed: int = 0) -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
    """Float32 frozen backbone and SideNet: the preset's sizes with random weights, or checkpoints.

    Returns:
        ``(backbone, sidenet, info)``; ``info`` records parameter counts and where weights came from.
    """
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    if backbone_path:
        backbone = load_backbone(backbone_path, arch=spec["backbone"]["arch"], source=source, device=device)
    else:
        backbone = build_sit(**spec["backbone"], device=device)
        randomize_zero_init_(backbone, seed=seed)
    if sidenet_path:
        sidenet = load_sidenet(sidenet_path, device=device)
    else:
        with torch.device(device):
            sidenet = SideNet(**spec["sidenet"])
        randomize_zero_init_(sidenet, seed=seed + 1)
    backbone.eval().requires_grad_(False)
    sidenet.eval().requires_grad_(False)
    side_params, backbone_params = count_parameters(sidenet)[1], count_parameters(backbone)[1]
    info = {
        "preset": preset,
        "backbone": {**spec["backbone"], "weights": backbone_path or "random", "parameters": backbone_params},
        "sidenet": {**spec["sidenet"], "weights": sidenet_path or "random", "parameters": side_params},
        "sidenet_to_backbone_parameters_percent": round(100.0 * side_params / backbone_params, 3),
    }
    return backbone, sidenet, info


def make_variant(name: str, backbone: nn.Module, sidenet: nn.Module, device: torch.device,
                 speed: SpeedSettings) -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
    """Fresh copies of both models prepared as variant ``name``; returns them and their settings."""
    if name == "naive":
        pair = (AutocastVelocity(copy.deepcopy(backbone), device), AutocastVelocity(copy.deepcopy(sidenet), device))
        precision = "bf16 autocast, float32 weights" if device.type == "cuda" else "float32"
        return pair[0], pair[1], {"precision": precision, "channels_last": False, "compile": False}
    if name not in VARIANTS:
        raise ValueError(f"unknown variant '{name}', expected one of: {', '.join(VARIANTS)}")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    compiled = name in ("compiled", "compiled-graphs")
    graphs = name == "compiled-graphs"
    fast_backbone = optimize_for_inference(
        copy.deepcopy(backbone), compile=compiled, mode=speed.backbone_mode, channels_last=True, dtype=dtype,
        cuda_graphs=graphs, backend=speed.backend, compile_scope=speed.backbone_scope)
    fast_side = optimize_for_inference(
        copy.deepcopy(sidenet), compile=compiled, mode=speed.side_mode, channels_last=True, dtype=dtype,
        cuda_graphs=graphs, backend=speed.backend)  # fmt: skip
    return fast_backbone, fast_side, {"backbone": fast_backbone.settings, "sidenet": fast_side.settings}


def paths_in_use(backbone: nn.Module, sidenet: nn.Module) -> Dict[str, Any]:
    """Which implementation each model ended up using, and any fallback warnings."""
    out: Dict[str, Any] = {}
    for key, model in (("backbone", backbone), ("sidenet", sidenet)):
        out[key] = {"path": getattr(model, "active_path", "naive"), "fallbacks": list(getattr(model, "fallbacks", []))}
    return out


def component_inputs(batch: int, shape: Sequence[int], num_classes: int, device: torch.device,
                     seed: int = 0) -> Dict[str, Tuple[Tensor, ...]]:
    """Inputs of the three calls of a guided BA step, stacked as ``GuidedSide.probe`` stacks them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen)
    v_cond, v_uncond = torch.randn(2, batch, *shape, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    y2 = torch.cat([y, torch.full_like(y, num_classes)])
    t2 = torch.full((2 * batch,), 0.6)
    h = 0.1  # step size of a 10-step grid
    offsets = [LOBATTO_ALPHA * h, (1 - LOBATTO_ALPHA) * h, h]
    fwd = (torch.cat([x] * 6), torch.cat([v_cond, v_uncond] * 3), torch.full((6 * batch,), 0.6),
           torch.cat([torch.full((2 * batch,), o) for o in offsets]), y2.repeat(3))  # fmt: skip
    bwd = (torch.cat([x, x]), torch.cat([v_cond, v_uncond]), t2, torch.full((2 * batch,), -LOBATTO_ALPHA * h), y2)
    move = lambda ts: tuple(a.to(device) for a in ts)  # noqa: E731
    return {"backbone": move((torch.cat([x, x]), t2, y2)), "forward_probe": move(fwd), "backward_probe": move(bwd)}


def measure_components(backbone: nn.Module, sidenet: nn.Module, batch: int, shape: Sequence[int],
                       num_classes: int, device: torch.device, warmup: int, repeats: int,
                       profile: bool = False) -> Dict[str, Any]:
    """Median time of each call of a BA step and the SideNet overhead per step.

    With ``profile``, also the top kernels of one forward probe (where the SideNet time goes).
    """
    inputs = component_inputs(batch, shape, num_classes, device)
    calls: Dict[str, Callable[[], Any]] = {
        "backbone": lambda: backbone.velocity(*inputs["backbone"]),
        "forward_probe": lambda: sidenet.velocity(*inputs["forward_probe"]),
        "backward_probe": lambda: sidenet.velocity(*inputs["backward_probe"]),
    }
    out: Dict[str, Any] = {"rows": {k: int(v[0].shape[0]) for k, v in inputs.items()}}
    for key, fn in calls.items():
        out[key] = time_call(fn, device, warmup=warmup, repeats=repeats)
        out[key]["per_image_ms"] = round(out[key]["median_ms"] / batch, 5)
    side_ms = out["forward_probe"]["median_ms"] + out["backward_probe"]["median_ms"]
    out["sidenet_per_step_ms"] = round(side_ms, 4)
    out["overhead_ratio"] = round(side_ms / out["backbone"]["median_ms"], 5)
    if profile:
        out["forward_probe_profile"] = profile_call(calls["forward_probe"], device)
    return out


def solve(name: str, steps: int, backbone: nn.Module, sidenet: nn.Module, noise: Tensor, y: Tensor,
          num_classes: int, cfg_scale: float, interval: Optional[Tuple[float, float]]) -> Any:
    """One guided solve through the public solver API."""
    uses_side = name.startswith("ba")
    velocity_fn, side_fn = build_sampling_fns(
        backbone.velocity, y, null_class=num_classes, cfg_scale=cfg_scale, interval=interval,
        side_velocity=sidenet.velocity if uses_side else None)  # fmt: skip
    grid = uniform_grid(steps, device=noise.device)
    kwargs = {"side_fn": side_fn} if uses_side else {}
    return get_solver(name)(velocity_fn, noise, grid, **kwargs)


def measure_end_to_end(backbone: nn.Module, sidenet: nn.Module, batch: int, shape: Sequence[int],
                       num_classes: int, device: torch.device, runs: Sequence[Tuple[str, int]], cfg_scale: float,
                       interval: Optional[Tuple[float, float]], repeats: int) -> Tuple[Dict[str, Any], Tensor]:
    """Wall time of whole guided solves; returns the results and the last BA sample (for cross-checks)."""
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    args = (backbone, sidenet, noise, y, num_classes, cfg_scale, interval)
    for name in sorted({n for n, _ in runs}):  # warm-up: compiles/captures every shape a solver uses
        solve(name, 2, *args)
    out: Dict[str, Any] = {}
    sample = noise
    for name, steps in runs:
        holder: Dict[str, Any] = {}
        timing = wall_time(lambda: holder.update(res=solve(name, steps, *args)), device, repeats=repeats)
        res = holder["res"]
        if not bool(torch.isfinite(res.x).all()):
            raise FloatingPointError(f"{name}-{steps} produced non-finite samples")
        out[f"{name}-{steps}"] = {**timing, "per_image_ms": round(1e3 * timing["median_s"] / batch, 4),
                                  "nfe": res.nfe, "side_calls": res.side_calls}  # fmt: skip
        if name == "ba":
            sample = res.x.float().cpu()
    for fast, slow in (("ba-10", "euler-100"), ("ba-5", "euler-50")):
        if fast in out and slow in out:
            out[f"speedup_{slow}_over_{fast}"] = round(out[slow]["median_s"] / out[fast]["median_s"], 3)
    return out, sample


def parse_runs(specs: Sequence[str]) -> List[Tuple[str, int]]:
    """``["ba:5", "euler:100"]`` -> ``[("ba", 5), ("euler", 100)]``."""
    runs = []
    for spec in specs:
        name, _, steps = spec.partition(":")
        if not steps.isdigit():
            raise ValueError(f"solver run '{spec}' is not of the form name:steps (e.g. ba:10)")
        runs.append((name, int(steps)))
    return runs


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: sit-xl2 on CUDA, tiny on CPU")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 16 64 256 (CUDA), 2 4 (CPU)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--e2e-variants", nargs="*", default=None, help="default: every variant; none: skip")
    p.add_argument("--solvers", nargs="+", default=["ba:5", "ba:10", "euler:50", "euler:100"])
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--interval", type=float, nargs=2, default=[0.0, 1.0],
                   help="guidance interval (lo, hi]; the default guides every step, so Euler-100 makes 100 "
                        "doubled calls like BA's 10")  # fmt: skip
    p.add_argument("--backbone", default=None, help="backbone checkpoint (default: random weights)")
    p.add_argument("--source", default="repa", choices=["repa", "sit"])
    p.add_argument("--sidenet", default=None, help="SideNet checkpoint (default: random weights)")
    p.add_argument("--side-mode", default=SpeedSettings.side_mode)
    p.add_argument("--backbone-mode", default=SpeedSettings.backbone_mode)
    p.add_argument("--backbone-scope", default=SpeedSettings.backbone_scope, choices=["model", "blocks"])
    p.add_argument("--backend", default="inductor")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--e2e-repeats", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="record the top kernels of one forward probe")
    return add_run_arguments(p)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; write JSON after every measurement."""
    args = build_parser().parse_args(argv)
    device, cuda, preset = device_and_preset(args)
    batch_sizes = args.batch_sizes or ([16, 64, 256] if cuda else [2, 4])
    variants = args.variants or (list(VARIANTS) if cuda else ["naive", "eager", "compiled"])
    e2e_variants = variants if args.e2e_variants is None else args.e2e_variants
    runs = parse_runs(args.solvers)
    interval = (args.interval[0], args.interval[1])
    speed = SpeedSettings(args.side_mode, args.backbone_mode, args.backbone_scope, args.backend)
    out = Path(args.out) if args.out else RESULTS_DIR / ("sampling_gpu.json" if cuda else "sampling_cpu_tiny.json")
    deadline = Deadline(args.budget_s)

    backbone, sidenet, model_info = build_models(preset, device, args.backbone, args.sidenet, args.source)
    size = backbone.grid_size * backbone.patch_size
    shape = (backbone.in_channels, size, size)
    num_classes = backbone.num_classes
    settings = {**model_info, "batch_sizes": batch_sizes, "variants": variants, "e2e_variants": e2e_variants,
                "solvers": args.solvers, "cfg_scale": args.cfg_scale, "guidance_interval": list(interval),
                "latent_shape": list(shape), "speed": asdict(speed), "warmup": args.warmup, "repeats": args.repeats,
                "e2e_repeats": args.e2e_repeats, "profile": args.profile,
                "batch_meaning": "images per batch; CFG doubles the rows of each model call"}  # fmt: skip
    note = "" if cuda else "CPU, tiny sizes: proves the harness; not the paper-scale figures (those need CUDA)."
    result = ResultFile(out, "sampling", device, settings, note=note)
    print(f"sampling benchmark on {result.payload['meta']['device']} ({preset}) -> {out}")

    for batch in batch_sizes:
        reference_sample: Optional[Tensor] = None
        for variant in variants:
            if not deadline.allows(30):
                result.error(f"B={batch} {variant}", TimeoutError("skipped: time budget spent"))
                continue
            fast_backbone = fast_side = None
            try:
                fast_backbone, fast_side, variant_settings = make_variant(variant, backbone, sidenet, device, speed)
                result.record(f"batch_{batch}", variant, "settings", value=variant_settings)
                comp = measure_components(fast_backbone, fast_side, batch, shape, num_classes, device,
                                          args.warmup, args.repeats, args.profile)  # fmt: skip
                result.record(f"batch_{batch}", variant, "components", value=comp)
                print(f"B={batch:4d} {variant:16s} backbone {comp['backbone']['median_ms']:9.3f} ms  "
                      f"fwd probe {comp['forward_probe']['median_ms']:8.3f} ms  bwd probe "
                      f"{comp['backward_probe']['median_ms']:8.3f} ms  overhead {100 * comp['overhead_ratio']:6.2f} %")
                if variant in e2e_variants and deadline.allows(20):
                    e2e, sample = measure_end_to_end(fast_backbone, fast_side, batch, shape, num_classes, device,
                                                     runs, args.cfg_scale, interval, args.e2e_repeats)  # fmt: skip
                    if reference_sample is None:
                        reference_sample = sample
                    else:  # same noise and labels: how far this variant's BA sample is from the first one's
                        diff = (sample - reference_sample).norm() / reference_sample.norm().clamp_min(1e-12)
                        e2e["ba_sample_rel_l2_vs_first_variant"] = float(f"{float(diff):.3e}")
                    result.record(f"batch_{batch}", variant, "end_to_end", value=e2e)
                    speedups = {k: v for k, v in e2e.items() if k.startswith("speedup")}
                    print(f"B={batch:4d} {variant:16s} end to end: {speedups}")
                result.record(f"batch_{batch}", variant, "paths", value=paths_in_use(fast_backbone, fast_side))
            except Exception as err:  # record and go on: one failing variant must not lose the others
                result.error(f"B={batch} {variant}", err)
                print(f"B={batch} {variant}: FAILED {type(err).__name__}: {err}")
            finally:
                del fast_backbone, fast_side
                free_memory(device)
    result.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
