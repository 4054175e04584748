"""SiT backbone: registry sizes, release-exact computation, time conventions, training hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bafm.models import SIT_ARCHS, build_sit, count_parameters, drop_labels
from bafm.models.layers import sincos_pos_embed_2d, timestep_frequencies

EXPECTED_SIZES = {  # SiT paper, Table 1: depth, width, heads
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def _randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Non-zero weights everywhere (adaLN-Zero init would hide most of the computation)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def reference_sit(sd, x, t, y, *, num_heads: int, patch: int, learn_sigma: bool) -> torch.Tensor:
    """Functional SiT/REPA release forward, written directly from the release formulas."""
    B, C, H, W = x.shape
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
    temb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])  # fmt: skip
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    D = tok.shape[-1]
    hd = D // num_heads
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        p = f"blocks.{i}."
        mods = F.linear(F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = mods.chunk(6, dim=1)
        h = F.layer_norm(tok, (D,), eps=1e-6) * (1 + sc_msa[:, None]) + s_msa[:, None]
        N = h.shape[1]
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        qkv = qkv.reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if p + "attn.q_norm.weight" in sd:
            q = F.layer_norm(q, (hd,), sd[p + "attn.q_norm.weight"], sd[p + "attn.q_norm.bias"], eps=1e-5)
            k = F.layer_norm(k, (hd,), sd[p + "attn.k_norm.weight"], sd[p + "attn.k_norm.bias"], eps=1e-5)
        attn = (q @ k.transpose(-2, -1) * hd**-0.5).softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(B, N, D)
        a = F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        tok = tok + g_msa[:, None] * a
        h = F.layer_norm(tok, (D,), eps=1e-6) * (1 + sc_mlp[:, None]) + s_mlp[:, None]
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])  # fmt: skip
        tok = tok + g_mlp[:, None] * h
        i += 1
    mods = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    shift, scale = mods.chunk(2, dim=1)
    h = F.layer_norm(tok, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    c_out = 2 * C if learn_sigma else C
    g = H // patch
    out = out.reshape(B, g, g, patch, patch, c_out)
    out = torch.einsum("nhwpqc->nchpwq", out).reshape(B, c_out, H, W)
    return out.chunk(2, dim=1)[0] if learn_sigma else out


def numpy_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE/DiT reference (meshgrid with w first, [sin, cos] halves, w-half first)."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gh, gh), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("arch", sorted(SIT_ARCHS))
def test_registry_full_size_on_meta(arch):
    size, patch = arch[4:].split("/")
    depth, width, heads = EXPECTED_SIZES[size]
    model = build_sit(arch, input_size=32, device="meta")
    assert (len(model.blocks), model.pos_embed.shape[-1], model.blocks[0].attn.num_heads) == (depth, width, heads)
    assert model.patch_size == int(patch)
    assert model.pos_embed.shape == (1, (32 // int(patch)) ** 2, width)
    assert model.y_embedder.embedding_table.weight.shape == (1001, width)


def test_parameter_counts_xl2():
    # DiT/SiT-XL/2 (learn_sigma, 256px): 675,129,632 parameters incl. the frozen pos_embed.
    trainable, total = count_parameters(build_sit("SiT-XL/2", learn_sigma=True, device="meta"))
    assert total == 675_129_632
    assert total - trainable == 256 * 1152  # pos_embed only
    # REPA: no sigma channels (2 * 2 * 4 fewer outputs), one 1152 -> 2048 -> 2048 -> 768 projector.
    _, repa_total = count_parameters(build_sit("SiT-XL/2", projector_dims=[768], device="meta"))
    head = 1152 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 768 + 768
    assert repa_total == total + head - (1152 * 16 + 16)


@pytest.mark.parametrize("arch", sorted(SIT_ARCHS))
def test_registry_small_width_shapes(arch):
    heads = SIT_ARCHS[arch].num_heads
    model = build_sit(arch, input_size=16, in_channels=3, num_classes=5, depth=1, hidden_size=4 * heads)
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.rand(2), torch.tensor([0, 5]))
    assert out.shape == x.shape
    # adaLN-Zero: the freshly initialised network outputs exactly zero.
    torch.testing.assert_close(out, torch.zeros_like(out), atol=0.0, rtol=0.0)


@pytest.mark.parametrize(
    "learn_sigma,qk_norm,patch", [(False, False, 2), (True, False, 4), (False, True, 2), (True, True, 8)]
)
def test_matches_release_computation(learn_sigma, qk_norm, patch):
    model = build_sit("SiT-S/2", input_size=16, in_channels=4, num_classes=7, depth=2, hidden_size=48,
                      num_heads=6, patch_size=patch, learn_sigma=learn_sigma, qk_norm=qk_norm,
                      projector_dims=[32], projector_hidden=40).double()  # fmt: skip
    _randomize(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 16, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 6, 7])
    expected = reference_sit(model.state_dict(), x, t, y, num_heads=6, patch=patch, learn_sigma=learn_sigma)
    torch.testing.assert_close(model(x, t, y), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim,grid", [(384, 16), (48, 4), (8, 1)])
def test_pos_embed_matches_mae_reference(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid)
    ref = torch.from_numpy(numpy_pos_embed(dim, grid)).float()
    torch.testing.assert_close(ours, ref, rtol=0.0, atol=0.0)
    model = build_sit("SiT-S/2", input_size=2 * grid, hidden_size=dim, num_heads=4, depth=1, num_classes=2)
    torch.testing.assert_close(model.pos_embed.data[0], ref, rtol=0.0, atol=0.0)


def test_timestep_frequencies():
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = timestep_frequencies(t, 256)
    assert emb.shape == (3, 256)
    # [cos, sin] order; first frequency is 1, times used as given (no * 1000).
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    torch.testing.assert_close(emb[2, 0], torch.tensor(math.cos(1.0)))
    torch.testing.assert_close(emb[2, 128], torch.tensor(math.sin(1.0)))
    f1 = math.exp(-math.log(10000) / 128)
    torch.testing.assert_close(emb[1, 129], torch.tensor(math.sin(0.5 * f1)))
    assert timestep_frequencies(t, 7).shape == (3, 7)


def test_time_conventions_agree():
    """A sit-convention network and its repa-adapted counterpart give one velocity."""
    kwargs = dict(input_size=8, in_channels=2, num_classes=3, depth=2, hidden_size=32, num_heads=4, learn_sigma=True)
    sit = build_sit("SiT-S/2", time_convention="sit", **kwargs).double()
    _randomize(sit, seed=3)
    repa = build_sit("SiT-S/2", time_convention="repa", **kwargs).double()
    repa.load_state_dict(sit.state_dict())
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    v = sit.velocity(x, t, y)
    torch.testing.assert_close(v, -repa.velocity(x, 1.0 - t, y), rtol=0.0, atol=0.0)
    torch.testing.assert_close(v, -sit(x, 1.0 - t, y), rtol=0.0, atol=0.0)
    torch.testing.assert_close(repa.velocity(x, t, y), repa(x, t, y), rtol=0.0, atol=0.0)
    assert v.shape == x.shape  # sigma channels dropped


def test_scalar_time_broadcasts_and_batch_independence():
    model = build_sit("SiT-S/4", input_size=8, in_channels=1, num_classes=2, depth=1, hidden_size=24, num_heads=6)
    _randomize(model)
    model.eval()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    full = model.velocity(x, torch.tensor(0.3), y)
    torch.testing.assert_close(full, model.velocity(x, torch.full((3,), 0.3), y))
    torch.testing.assert_close(full, model.velocity(x, 0.3, y))
    for i in range(3):
        torch.testing.assert_close(model.velocity(x[i : i + 1], torch.tensor([0.3]), y[i : i + 1]), full[i : i + 1])


def test_training_step_updates_weights_not_pos_embed():
    model = build_sit("SiT-S/2", input_size=8, in_channels=1, num_classes=2, depth=1, hidden_size=24, num_heads=6)
    pos = model.pos_embed.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 1, 8, 8)
    for _ in range(2):
        loss = (model(x, torch.rand(4), torch.tensor([0, 1, 2, 0])) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed.detach(), pos, rtol=0.0, atol=0.0)
    assert model.final_layer.linear.weight.abs().sum() > 0


def test_bf16_autocast_close_to_fp32():
    model = build_sit("SiT-S/2", input_size=8, in_channels=2, num_classes=2, depth=2, hidden_size=48, num_heads=6)
    _randomize(model, std=0.02)
    model.eval()
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([0.1, 0.9]), torch.tensor([0, 2])
    ref = model.velocity(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.velocity(x, t, y)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_drop_labels():
    y = torch.arange(1000) % 10
    gen = torch.Generator().manual_seed(0)
    dropped = drop_labels(y, 0.3, num_classes=10, generator=gen)
    frac = (dropped == 10).float().mean().item()
    assert 0.25 < frac < 0.35
    kept = dropped != 10
    torch.testing.assert_close(dropped[kept], y[kept])
    torch.testing.assert_close(drop_labels(y, 0.0, 10), y)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="unknown SiT architecture 'SiT-M/2'"):
        build_sit("SiT-M/2")
    with pytest.raises(ValueError, match="time_convention"):
        build_sit("SiT-S/2", time_convention="edm", device="meta")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        build_sit("SiT-S/8", input_size=12, device="meta")


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """No graph breaks (dynamo traces the whole forward); inductor codegen is slow on CPU, so marked slow."""
    model = build_sit("SiT-S/2", input_size=8, in_channels=1, num_classes=2, depth=1, hidden_size=24, num_heads=6)
    _randomize(model)
    model.eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.8]), torch.tensor([0, 1])
    try:
        out = torch.compile(model.velocity, fullgraph=True, backend=backend)(x, t, y)
    except Exception as err:
        if backend == "inductor":  # no C++ toolchain on this machine
            pytest.skip(f"inductor unavailable: {type(err).__name__}")
        raise
    torch.testing.assert_close(out, model.velocity(x, t, y), rtol=1e-4, atol=1e-5)
