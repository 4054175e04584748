"""Speed paths: compiled vs eager numerics, channels-last vs contiguous, fallbacks, graph breaks, bench harness."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bafm.config import load_config
from bafm.experiment import speed_switches
from bafm.models import SideNet, build_sit
from bafm.models.compiling import parse_precision
from bafm.models.cuda_graphs import GraphedFunction
from bafm.models.fallback import FallbackChain
from bafm.models.fast import FastVelocity, apply_speed_switches, optimize_for_inference, training_velocity
from bafm.models.guidance import build_sampling_fns
from bafm.models.sidenet import SideAttentionBlock, channel_rms_norm, is_channels_last
from bafm.solvers import get_solver
from bafm.solvers.grids import uniform_grid

BENCH = Path(__file__).resolve().parents[1] / "bench"
CL = torch.channels_last


def _randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model.eval()


def _sidenet(dtype: torch.dtype = torch.float32) -> SideNet:
    return _randomize(SideNet(in_channels=4, channels=16, emb_dim=16, depth=4, num_heads=4, num_classes=5).to(dtype))


def _sit() -> torch.nn.Module:
    return _randomize(build_sit("SiT-S/2", input_size=8, in_channels=4, num_classes=5, depth=2, hidden_size=32,
                                num_heads=4), std=0.05)  # fmt: skip


def _side_inputs(batch: int = 6, dtype: torch.dtype = torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x, v = torch.randn(2, batch, 4, 8, 8, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype)
    h = (torch.rand(batch, generator=gen, dtype=dtype) - 0.5) * 0.4
    y = torch.randint(0, 6, (batch,), generator=gen)
    return x, v, t, h, y


# Layout: channels-last storage must give the same numbers as NCHW.


def test_channel_rms_norm_paths_agree():
    x = torch.randn(3, 16, 5, 7, dtype=torch.float64)
    ref = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-5)
    fused = channel_rms_norm(x.contiguous(memory_format=CL))
    assert is_channels_last(fused)
    torch.testing.assert_close(channel_rms_norm(x), ref, rtol=0.0, atol=0.0)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    # Half precision: accumulated in float32, returned in the input dtype.
    half = channel_rms_norm(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), ref, rtol=1e-2, atol=1e-2)


def test_attention_block_channels_last_matches_contiguous():
    block = _randomize(SideAttentionBlock(16, 8, num_heads=4).double())
    x, emb = torch.randn(2, 16, 4, 6, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    ref = block(x, emb)
    block_cl = copy.deepcopy(block).to(memory_format=CL)
    out = block_cl(x.contiguous(memory_format=CL), emb)
    assert is_channels_last(out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_sidenet_channels_last_matches_contiguous():
    model = _sidenet(torch.float64)
    x, v, t, h, y = _side_inputs(dtype=torch.float64)
    ref = model.velocity(x, v, t, h, y)
    model_cl = copy.deepcopy(model).to(memory_format=CL)
    out = model_cl.velocity(x.contiguous(memory_format=CL), v.contiguous(memory_format=CL), t, h, y)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# Wrappers: same .velocity API and numbers, whichever path runs.


@pytest.mark.parametrize("compile", [False, True])
def test_fast_sidenet_matches_eager(compile):
    model = _sidenet()
    x, v, t, h, y = _side_inputs()
    ref = model.velocity(x, v, t, h, y)
    fast = optimize_for_inference(copy.deepcopy(model), compile=compile, channels_last=True, backend="aot_eager")
    out = fast.velocity(x, v, t, h, y)
    assert fast.active_path == ("compiled[aot_eager:max-autotune-no-cudagraphs]" if compile else "eager")
    assert fast.fallbacks == [] and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_fast_backbone_matches_eager(scope):
    model = _sit()
    x, _, t, _, y = _side_inputs()
    ref = model.velocity(x, t, y)
    fast = optimize_for_inference(copy.deepcopy(model), compile=True, mode="default", channels_last=True,
                                  backend="aot_eager", compile_scope=scope)  # fmt: skip
    torch.testing.assert_close(fast.velocity(x, t, y), ref, rtol=1e-5, atol=1e-6)
    assert fast.active_path.startswith("compiled-blocks" if scope == "blocks" else "compiled[")
    assert fast.num_classes == 5 and fast.in_channels == 4  # attributes read through the wrapper


def test_bf16_sidenet_keeps_exact_identity_and_float32_interface():
    model = _sidenet()
    x, v, t, h, y = _side_inputs()
    fast = optimize_for_inference(copy.deepcopy(model), compile=False, channels_last=True, dtype=torch.bfloat16)
    assert next(fast.module.parameters()).dtype == torch.bfloat16
    # h = 0: the offset is exactly zero, and v is added in float32, so S(x, v, t, 0) = v bit for bit.
    torch.testing.assert_close(fast.velocity(x, v, t, torch.zeros_like(h), y), v, rtol=0.0, atol=0.0)
    ref = model.velocity(x, v, t, h, y)
    out = fast.velocity(x, v, t, h, y)
    assert out.dtype == torch.float32
    # bf16 noise only: relative to the size of the offset the network adds.
    offset = (ref - v).abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0.0, atol=0.03 * offset)


def test_explicit_dtype_switches_caller_autocast_off():
    model = _sit()
    x, _, t, _, y = _side_inputs()
    fast = optimize_for_inference(copy.deepcopy(model), compile=False, channels_last=False, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast.velocity(x.double(), t.double(), y)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, model.double().velocity(x.double(), t.double(), y), rtol=1e-12, atol=1e-12)


def test_ba_solve_through_compiled_wrappers_matches_eager():
    backbone, sidenet = _sit(), _sidenet()
    x, _, _, _, _ = _side_inputs(batch=3)
    y = torch.tensor([0, 2, 4])
    results = []
    for compile in (False, True):
        fb = optimize_for_inference(copy.deepcopy(backbone), compile=compile, mode="default", backend="aot_eager")
        fs = optimize_for_inference(copy.deepcopy(sidenet), compile=compile, backend="aot_eager")
        velocity_fn, side_fn = build_sampling_fns(fb.velocity, y, null_class=5, cfg_scale=1.5, interval=(0.0, 0.7),
                                                  side_velocity=fs.velocity)  # fmt: skip
        res = get_solver("ba")(velocity_fn, x, uniform_grid(4), side_fn=side_fn)
        assert (res.nfe, res.side_calls) == (4, 7)
        results.append(res.x)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_training_velocity_gradients_match_eager():
    model = _sidenet()
    x, v, t, h, y = _side_inputs()
    grads = []
    for compile in (False, True):
        net = copy.deepcopy(model).train()
        velocity = training_velocity(net, compile=compile, channels_last=True, backend="aot_eager")
        velocity(x, v, t, h, y).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    ref = copy.deepcopy(model).train()
    ref.velocity(x, v, t, h, y).pow(2).mean().backward()
    for name, param in ref.named_parameters():
        for got in grads:
            torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


# Fallbacks and switches.


def test_compile_off_never_calls_torch_compile(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called with compile=False")

    monkeypatch.setattr(torch, "compile", refuse)
    fast = optimize_for_inference(_sidenet(), compile=False, cuda_graphs=True)  # graphs: CUDA only, noted
    assert fast.active_path == "eager" and "cuda_graphs_skipped" in fast.settings
    x, v, t, h, y = _side_inputs()
    torch.testing.assert_close(fast.velocity(x, v, t, h, y), _sidenet().velocity(x, v, t, h, y))


def test_failing_compiler_falls_back_to_eager_with_a_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model = _sidenet()
    x, v, t, h, y = _side_inputs()
    fast = optimize_for_inference(copy.deepcopy(model), compile=True, backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="falling back to 'eager'"):
        out = fast.velocity(x, v, t, h, y)
    assert fast.active_path == "eager" and len(fast.fallbacks) == 1 and "no C++ compiler" in fast.fallbacks[0]
    torch.testing.assert_close(out, model.velocity(x, v, t, h, y), rtol=1e-5, atol=1e-6)


def test_failing_block_compile_restores_eager_blocks():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("broken")

    model = _sit()
    x, _, t, _, y = _side_inputs()
    fast = optimize_for_inference(copy.deepcopy(model), compile=True, mode="default", backend=broken_backend,
                                  compile_scope="blocks")  # fmt: skip
    with pytest.warns(RuntimeWarning):
        out = fast.velocity(x, t, y)
    assert all(block._compiled_call_impl is None for block in fast.module.blocks)
    torch.testing.assert_close(out, model.velocity(x, t, y), rtol=1e-5, atol=1e-6)


def test_fallback_chain_propagates_errors_of_the_last_implementation():
    chain = FallbackChain([("eager", lambda: 1 / 0)], "test")
    with pytest.raises(ZeroDivisionError):
        chain()


def test_fallback_chain_degrades_only_on_a_first_call():
    calls = {"fast": 0}

    def fast(x):  # builds on the first call of a shape, then fails at run time on the third call
        calls["fast"] += 1
        if x.shape[0] == 3:
            raise RuntimeError("capture failed")
        if calls["fast"] == 3:
            raise RuntimeError("CUDA out of memory")
        return x + 1

    chain = FallbackChain([("fast", fast), ("eager", lambda x: x + 2)], "test")
    assert chain(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert chain(torch.zeros(2)).tolist() == [1.0, 1.0]
    with pytest.raises(RuntimeError, match="out of memory"):  # a later runtime error propagates ...
        chain(torch.zeros(2))
    assert chain.active == "fast" and chain.fallbacks == []  # ... and does not demote the run
    with pytest.warns(RuntimeWarning, match="'fast' failed .*capture failed.*falling back to 'eager'"):
        out = chain(torch.zeros(3))  # a first call with a new shape builds anew: a failure degrades
    assert out.tolist() == [2.0, 2.0, 2.0] and chain.active == "eager" and len(chain.fallbacks) == 1


def test_runtime_error_after_compiling_does_not_fall_back_to_eager():
    class Flaky(torch.nn.Module):
        velocity_kind = "backbone"

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.fail = False

        def velocity(self, x, t, y):
            if self.fail:
                raise RuntimeError("device lost")
            return x * self.scale

    model = Flaky()
    fast = optimize_for_inference(model, compile=True, backend="eager", channels_last=False)
    x, _, t, _, y = _side_inputs()
    torch.testing.assert_close(fast.velocity(x, t, y), x)
    model.fail = True  # a Python-level flag: the traced graph guards on it and retraces on the next call
    with pytest.raises(RuntimeError, match="device lost"):
        fast.velocity(x, t, y)
    assert fast.active_path.startswith("compiled[") and fast.fallbacks == []


def test_models_declare_their_velocity_kind():
    class Undeclared(torch.nn.Module):
        def velocity(self, x, t, y):
            return x

    with pytest.raises(TypeError, match="velocity_kind is None, expected one of"):
        optimize_for_inference(Undeclared(), compile=False)
    assert (SideNet.velocity_kind, type(_sit()).velocity_kind) == ("side_offset", "backbone")


def test_bad_switches_raise():
    with pytest.raises(ValueError, match="compile mode is 'fast'"):
        optimize_for_inference(_sidenet(), compile=True, mode="fast")
    with pytest.raises(ValueError, match="records its own CUDA graphs"):
        optimize_for_inference(_sidenet(), compile=True, mode="reduce-overhead", cuda_graphs=True)
    with pytest.raises(ValueError, match="compile_scope is 'layers'"):
        optimize_for_inference(_sit(), compile=True, compile_scope="layers")
    with pytest.raises(ValueError, match="precision is 'fp8'"):
        parse_precision("fp8")
    with pytest.raises(TypeError, match="no .velocity"):
        optimize_for_inference(torch.nn.Linear(2, 2), compile=False)


def test_speed_switches_from_config():
    cfg = load_config(overrides=["sidenet.compile=true", "sidenet.precision=bfloat16"])
    assert cfg.sidenet.compile_mode == "max-autotune-no-cudagraphs" and cfg.backbone.compile_scope == "blocks"
    fast = apply_speed_switches(_sidenet(), **speed_switches(cfg.sidenet))
    assert isinstance(fast, FastVelocity)
    assert fast.settings["dtype"] == "bfloat16" and fast.settings["compile"] and fast.settings["channels_last"]
    plain = _sit()
    assert apply_speed_switches(plain, compile=False, compile_mode="default", channels_last=False, cuda_graphs=False,
                                precision="float32") is plain


# Graph breaks: dynamo must trace each whole forward (cheap: eager backend).


def test_no_graph_breaks_channels_last():
    side = _sidenet().to(memory_format=CL)
    x, v, t, h, y = _side_inputs()
    explained = torch._dynamo.explain(side.velocity)(x.contiguous(memory_format=CL), v.contiguous(memory_format=CL),
                                                     t, h, y)  # fmt: skip
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    sit = _sit().to(memory_format=CL)
    explained = torch._dynamo.explain(sit.velocity)(x.contiguous(memory_format=CL), t, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


# CUDA graphs (the GPU session runs these).


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager_and_outputs_stay_valid():
    model = _sidenet().cuda()
    x, v, t, h, y = (a.cuda() for a in _side_inputs())
    fast = optimize_for_inference(copy.deepcopy(model), compile=False, channels_last=True, cuda_graphs=True)
    first = fast.velocity(x, v, t, h, y)
    second = fast.velocity(x + 1.0, v, t, h, y)  # a second replay must not overwrite the first result
    assert isinstance(fast.graphed, GraphedFunction) and fast.graphed.num_graphs == 1
    torch.testing.assert_close(first, model.velocity(x, v, t, h, y), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, model.velocity(x + 1.0, v, t, h, y), rtol=1e-4, atol=1e-5)


# Inductor on CPU (real code generation; slow, and needs a C++ compiler).


@pytest.mark.slow
@pytest.mark.parametrize("which", ["sidenet", "sit"])
def test_inductor_matches_eager(which):
    model = _sidenet() if which == "sidenet" else _sit()
    x, v, t, h, y = _side_inputs()
    args = (x, v, t, h, y) if which == "sidenet" else (x, t, y)
    ref = model.velocity(*args)
    fast = optimize_for_inference(copy.deepcopy(model), compile=True, mode="default", channels_last=True)
    out = fast.velocity(*args)
    if fast.fallbacks:
        pytest.skip(f"inductor unavailable: {fast.fallbacks[0]}")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# Bench harness at tiny size.


def _load_bench(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_sampling_bench_end_to_end_tiny(tmp_path):
    bench = _load_bench("bench_sampling")
    out = tmp_path / "sampling.json"
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--batch-sizes", "2", "--variants", "naive",
                       "compiled", "--backend", "aot_eager", "--repeats", "2", "--warmup", "1", "--solvers", "ba:2",
                       "euler:4", "ba:10", "euler:100", "--out", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["status"] == "complete" and data["errors"] == []
    assert data["meta"]["device"] == "cpu" and data["meta"]["torch"] == torch.__version__
    assert data["meta"]["settings"]["batch_sizes"] == [2] and "tiny" in data["note"]
    for variant in ("naive", "compiled"):
        r = data["results"]["batch_2"][variant]
        comp, e2e = r["components"], r["end_to_end"]
        assert comp["rows"] == {"backbone": 4, "forward_probe": 12, "backward_probe": 4}
        # Counted by the harness (independent of timing): 10 anchors, 10 forward + 9 backward probes.
        assert (e2e["ba-10"]["nfe"], e2e["ba-10"]["side_calls"], e2e["euler-100"]["nfe"]) == (10, 19, 100)
    compiled = data["results"]["batch_2"]["compiled"]
    assert compiled["paths"]["sidenet"]["path"].startswith("compiled[aot_eager")
    assert compiled["end_to_end"]["ba_sample_rel_l2_vs_first_variant"] < 1e-5


def test_training_bench_end_to_end_tiny(tmp_path):
    bench = _load_bench("bench_training")
    out = tmp_path / "training.json"
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--batch-sizes", "2", "--links", "2", "--warmup",
                       "1", "--steps", "1", "--backend", "aot_eager", "--out", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["status"] == "complete" and data["errors"] == []
    for variant in ("eager", "compiled"):
        r = data["results"]["batch_2"][variant]
        assert len(r["losses"]) == 1 and math.isfinite(r["losses"][0])
    assert data["results"]["batch_2"]["compiled"]["paths"]["sidenet"].startswith("compiled[aot_eager")


def test_sidenet_flops_bench(tmp_path):
    """The committed models and a feature SideNet export; the JSON agrees with an independent count."""
    from torch.utils.flop_counter import FlopCounterMode

    from bafm.models.loading import load_sidenet, save_sidenet
    from bafm.models.sidenet import SideNet

    feature_net = SideNet(in_channels=1, channels=8, emb_dim=16, depth=2, num_heads=1, num_classes=10,
                          feature_dim=128)
    save_sidenet(feature_net, tmp_path / "feat.safetensors")
    bench = _load_bench("bench_sidenet_flops")
    out = tmp_path / "flops.json"
    assert bench.main(["--sidenet", str(tmp_path / "feat.safetensors"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["status"] == "complete" and data["errors"] == []
    committed = data["results"]["checkpoints/digits/sidenet.safetensors"]
    feature = data["results"][str((tmp_path / "feat.safetensors").resolve())]
    assert (committed["feature_dim"], feature["feature_dim"]) == (0, 128)
    # The committed SideNet's count without the attention (PyTorch's own table, no CPU kernel formula).
    sidenet = load_sidenet(BENCH.parent / "checkpoints" / "digits" / "sidenet.safetensors")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as mode:
        sidenet.velocity(x, x, torch.full((2,), 0.5), torch.full((2,), 0.1), torch.tensor([1, 2]))
    attention = committed["sidenet_mflop_by_op"]["_scaled_dot_product_flash_attention_for_cpu"]
    assert attention == pytest.approx(4 * 64 * 64 * 32 / 1e6)  # q k^T and p v over 8 x 8 positions, 32 channels
    assert committed["sidenet_mflop_per_evaluation"] == pytest.approx(mode.get_total_flops() / 2 / 1e6 + attention)
    assert committed["ba_step_sidenet_in_backbone_calls"] == pytest.approx(
        4 * committed["sidenet_mflop_per_evaluation"] / committed["backbone_mflop_per_sample"], rel=1e-5)
    assert committed["within_bound"] == (committed["ba_step_sidenet_in_backbone_calls"] <= 0.2)
    assert feature["backbone_mflop_per_sample"] == committed["backbone_mflop_per_sample"]


@pytest.mark.slow
def test_run_all_quick(tmp_path):
    """``make bench``'s script with --quick end to end (subprocesses: sampling, training, loader, flops)."""
    done = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == ["loader_cpu.json", "sampling_cpu_tiny.json", "sidenet_flops.json", "training_cpu_tiny.json"]
    loader = json.loads((tmp_path / "loader_cpu.json").read_text())
    assert loader["device"] == "cpu"
    for name in ("sampling_cpu_tiny.json", "training_cpu_tiny.json"):
        data = json.loads((tmp_path / name).read_text())
        assert data["status"] == "complete" and data["errors"] == [] and data["meta"]["device"] == "cpu"
