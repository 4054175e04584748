"""SideNet: release layout and computation, identity at h = 0, parameter count, attention path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bafm.models import SideNet, count_parameters


def _randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def release_keys(depth: int) -> set[str]:
    """Parameter names of the BA-solver release SideNet, from its documented layout."""
    keys = {"y_embedder.embedding_table.weight", "input_conv.weight", "output_conv.weight", "output_conv.bias"}
    for prefix in ("t_embedder.mlp", "h_embedder.mlp", "emb_fusion"):
        keys |= {f"{prefix}.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for i in range(depth):
        b = f"blocks.{i}."
        keys |= {b + "emb_proj.weight", b + "emb_proj.bias"}
        if i == depth // 2:
            keys |= {b + "qkv.weight", b + "proj.weight"}
        else:
            keys |= {b + f"{n}.weight" for n in ("conv1_dw", "conv1_pw", "conv2_dw", "conv2_pw")}
            keys.add(b + "conv2_pw.bias")
    return keys


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-5)


def _embed(sd, prefix, t):
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t.view(-1, 1).float() * freqs.view(1, -1)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(sd[prefix + ".0.weight"].dtype)
    emb = F.silu(F.linear(emb, sd[prefix + ".0.weight"], sd[prefix + ".0.bias"]))
    return F.linear(emb, sd[prefix + ".2.weight"], sd[prefix + ".2.bias"])


def reference_sidenet(sd, x, v, t, h, y, *, depth: int, num_heads: int = 4) -> torch.Tensor:
    """Functional BA-solver release forward (the offset, already times h)."""
    emb = torch.cat([_embed(sd, "t_embedder.mlp", t), _embed(sd, "h_embedder.mlp", h),
                     sd["y_embedder.embedding_table.weight"][y]], dim=-1)  # fmt: skip
    emb = F.linear(F.silu(F.linear(emb, sd["emb_fusion.0.weight"], sd["emb_fusion.0.bias"])),
                   sd["emb_fusion.2.weight"], sd["emb_fusion.2.bias"])  # fmt: skip
    feat = F.conv2d(torch.cat([x, v], dim=1), sd["input_conv.weight"], padding=1)
    B, C, H, W = feat.shape
    for i in range(depth):
        b = f"blocks.{i}."
        style = F.linear(emb, sd[b + "emb_proj.weight"], sd[b + "emb_proj.bias"]).view(-1, 2 * C, 1, 1)
        scale, shift = style.chunk(2, dim=1)
        if i == depth // 2:
            z = _rms(feat) * (scale + 1.0) + shift
            qkv = F.conv2d(z, sd[b + "qkv.weight"]).view(B, 3, num_heads, C // num_heads, H * W)
            q, k, vv = qkv.permute(1, 0, 2, 4, 3)
            attn = (q @ k.transpose(-2, -1) / math.sqrt(C // num_heads)).softmax(dim=-1)
            out = (attn @ vv).transpose(2, 3).reshape(B, C, H, W)
            feat = feat + F.conv2d(out, sd[b + "proj.weight"])
        else:
            z = F.conv2d(_rms(feat), sd[b + "conv1_dw.weight"], padding=1, groups=C)
            z = F.conv2d(z, sd[b + "conv1_pw.weight"])
            z = _rms(z) * (scale + 1.0) + shift
            z = F.conv2d(F.silu(z), sd[b + "conv2_dw.weight"], padding=1, groups=C)
            feat = feat + F.conv2d(z, sd[b + "conv2_pw.weight"], sd[b + "conv2_pw.bias"])
    delta = F.conv2d(F.silu(_rms(feat)), sd["output_conv.weight"], sd["output_conv.bias"], padding=1)
    return delta * h.view(-1, 1, 1, 1)


def _inputs(batch=3, channels=4, size=8, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
    v = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype)
    h = (torch.rand(batch, generator=gen, dtype=dtype) - 0.5) * 0.4  # both signs
    return x, v, t, h


def test_release_defaults_parameter_count_and_keys():
    model = SideNet()  # release: 4-channel latents, 256 channels, emb 256, depth 4, 1000 classes
    trainable, total = count_parameters(model)
    assert total == trainable == 2_006_020
    assert set(model.state_dict()) == release_keys(4)
    assert model.y_embedder.embedding_table.weight.shape == (1001, 256)


@pytest.mark.parametrize("depth,heads", [(4, 4), (3, 2), (1, 4)])
def test_matches_release_computation(depth, heads):
    model = SideNet(in_channels=4, channels=16, emb_dim=24, depth=depth, num_heads=heads, num_classes=5).double()
    _randomize(model)
    assert set(model.state_dict()) == release_keys(depth)
    x, v, t, h = _inputs()
    y = torch.tensor([0, 4, 5])
    expected = reference_sidenet(model.state_dict(), x, v, t, h, y, depth=depth, num_heads=heads)
    torch.testing.assert_close(model(x, v, t, h, y), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.velocity(x, v, t, h, y), v + expected, rtol=1e-10, atol=1e-12)


def test_zero_offset_is_identity():
    model = SideNet(in_channels=2, channels=16, emb_dim=16, depth=2, num_classes=3)
    _randomize(model, std=0.5)
    x, v, t, _ = _inputs(channels=2, dtype=torch.float32)
    out = model.velocity(x, v, t, torch.zeros(3), torch.tensor([0, 1, 3]))
    torch.testing.assert_close(out, v, rtol=0.0, atol=0.0)


def test_fresh_sidenet_is_identity_for_any_h():
    model = SideNet(in_channels=2, channels=16, emb_dim=16, depth=2, num_classes=3)
    x, v, t, h = _inputs(channels=2, dtype=torch.float32)
    torch.testing.assert_close(model.velocity(x, v, t, h, torch.tensor([0, 1, 3])), v, rtol=0.0, atol=0.0)


def test_batch_independence_and_scalar_times():
    model = SideNet(in_channels=2, channels=16, emb_dim=16, depth=3, num_classes=3).eval()
    _randomize(model)
    x, v, _, _ = _inputs(channels=2, dtype=torch.float32)
    y = torch.tensor([0, 1, 2])
    full = model.velocity(x, v, torch.tensor(0.4), torch.tensor(0.1), y)
    torch.testing.assert_close(full, model.velocity(x, v, torch.full((3,), 0.4), torch.full((3,), 0.1), y))
    for i in range(3):
        part = model.velocity(x[i : i + 1], v[i : i + 1], torch.tensor([0.4]), torch.tensor([0.1]), y[i : i + 1])
        torch.testing.assert_close(part, full[i : i + 1])


def test_gradients_reach_all_parameters():
    model = SideNet(in_channels=2, channels=16, emb_dim=16, depth=3, num_classes=3)
    with torch.no_grad():
        model.output_conv.weight.normal_(0, 0.1)
    x, v, t, h = _inputs(channels=2, dtype=torch.float32)
    model.velocity(x, v, t, h, torch.tensor([0, 1, 2])).pow(2).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # Row 3 (null class) of the table is unused by these labels; every other tensor gets gradient.
    assert no_grad == []


def test_bad_heads_raise():
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        SideNet(channels=16, num_heads=3)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """No graph breaks (dynamo traces the whole forward); inductor codegen is slow on CPU, so marked slow."""
    model = SideNet(in_channels=2, channels=16, emb_dim=16, depth=2, num_classes=3).eval()
    _randomize(model)
    x, v, t, h = _inputs(channels=2, dtype=torch.float32)
    y = torch.tensor([0, 1, 2])
    try:
        out = torch.compile(model.velocity, fullgraph=True, backend=backend)(x, v, t, h, y)
    except Exception as err:
        if backend == "inductor":  # no C++ toolchain on this machine
            pytest.skip(f"inductor unavailable: {type(err).__name__}")
        raise
    torch.testing.assert_close(out, model.velocity(x, v, t, h, y), rtol=1e-4, atol=1e-5)
