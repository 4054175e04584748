"""Checkpoint loading: release formats, bafm exports, strictness and refusal of unsafe pickles."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch

from bafm.models import (
    CheckpointError,
    SideNet,
    build_sit,
    load_backbone,
    load_sidenet,
    save_backbone,
    save_sidenet,
)


def official_sit_layout(depth, hidden, in_ch, patch, grid, classes, *, learn_sigma=False, projector_dims=(),
                        projector_hidden=64, qk_norm=False, mlp_ratio=4.0):  # fmt: skip
    """{name: shape} of a SiT/REPA release state dict, from the documented key layout."""
    out_ch = 2 * in_ch if learn_sigma else in_ch
    mlp = int(hidden * mlp_ratio)
    layout = {
        "pos_embed": (1, grid * grid, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (mlp, hidden), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (hidden, mlp), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })  # fmt: skip
        if qk_norm:
            head_dim = hidden // 6
            for n in ("q_norm", "k_norm"):
                layout.update({b + f"attn.{n}.weight": (head_dim,), b + f"attn.{n}.bias": (head_dim,)})
    for k, z in enumerate(projector_dims):
        dims = [(projector_hidden, hidden), (projector_hidden, projector_hidden), (z, projector_hidden)]
        for j, shape in zip((0, 2, 4), dims):
            layout.update({f"projectors.{k}.{j}.weight": shape, f"projectors.{k}.{j}.bias": (shape[0],)})
    return layout


def random_state(layout, seed=0, std=0.05, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=gen) * std).to(dtype) for k, s in layout.items()}


def _inputs(channels, size, batch=3, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    return x, torch.tensor([0.0, 0.45, 1.0])[:batch], torch.arange(batch) % 4


SMALL = dict(depth=2, hidden=48, in_ch=4, patch=2, grid=4, classes=10)  # SiT-S/2 shrunk: 6 heads of 8
SMALL_OVERRIDES = dict(depth=2, hidden_size=48, num_heads=6)


def _frozen(model: torch.nn.Module) -> bool:
    return not model.training and not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------


def test_model_keys_follow_documented_layout():
    kw = dict(learn_sigma=True, projector_dims=(16, 8), qk_norm=True)
    layout = official_sit_layout(**SMALL, **kw)
    model = build_sit("SiT-S/2", input_size=8, in_channels=4, num_classes=10, projector_hidden=64, device="meta",
                      **SMALL_OVERRIDES, **kw)  # fmt: skip
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout


def test_sit_release_state_dict_loads_strictly(tmp_path):
    """Original SiT release: a raw state dict, learn_sigma, t = 0 noise."""
    state = random_state(official_sit_layout(**SMALL, learn_sigma=True))
    path = tmp_path / "SiT-tiny.pt"
    torch.save(state, path)
    model = load_backbone(path, "SiT-S/2", source="sit", **SMALL_OVERRIDES)
    source = build_sit("SiT-S/2", input_size=8, num_classes=10, learn_sigma=True, time_convention="sit",
                       **SMALL_OVERRIDES)  # fmt: skip
    source.load_state_dict(state, strict=True)
    source.eval()
    x, t, y = _inputs(4, 8)
    torch.testing.assert_close(model.velocity(x, t, y), source.velocity(x, t, y), rtol=0.0, atol=0.0)
    torch.testing.assert_close(model.velocity(x, t, y), -source(x, 1.0 - t, y), rtol=0.0, atol=0.0)
    assert _frozen(model) and model.config["learn_sigma"] and model.time_convention == "sit"


def test_repa_training_checkpoint_prefers_ema(tmp_path):
    """REPA layout: projectors + qk-norm, a training dict with args, 'module.' prefixes."""
    layout = official_sit_layout(**SMALL, projector_dims=(32,), qk_norm=True)
    ema, raw = random_state(layout, seed=1), random_state(layout, seed=2)
    opt = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}],
    }
    ckpt = {
        "model": {f"module.{k}": v for k, v in raw.items()},
        "ema": {f"_orig_mod.{k}": v for k, v in ema.items()},
        "opt": opt,
        "args": argparse.Namespace(model="SiT-S/2", qk_norm=True),
        "steps": 4000,
    }
    path = tmp_path / "repa.pt"
    torch.save(ckpt, path)
    model = load_backbone(path, "SiT-S/2", source="repa", **SMALL_OVERRIDES)
    assert model.config["projector_dims"] == [32] and model.config["qk_norm"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ema[name], rtol=0.0, atol=0.0)
    source = build_sit("SiT-S/2", input_size=8, num_classes=10, projector_dims=[32], projector_hidden=64,
                       qk_norm=True, **SMALL_OVERRIDES).eval()  # fmt: skip
    source.load_state_dict(ema)
    x, t, y = _inputs(4, 8)
    torch.testing.assert_close(model.velocity(x, t, y), source.velocity(x, t, y), rtol=0.0, atol=0.0)


def test_conventions_give_same_velocity_for_same_weights(tmp_path):
    state = random_state(official_sit_layout(**SMALL, learn_sigma=True), seed=4)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    as_sit = load_backbone(path, "SiT-S/2", source="sit", **SMALL_OVERRIDES)
    as_repa = load_backbone(path, "SiT-S/2", source="repa", **SMALL_OVERRIDES)
    x, t, y = _inputs(4, 8)
    torch.testing.assert_close(as_sit.velocity(x, t, y), -as_repa.velocity(x, 1.0 - t, y), rtol=0.0, atol=0.0)


def test_backbone_roundtrip_safetensors_json(tmp_path):
    model = build_sit("SiT-S/2", input_size=16, in_channels=1, num_classes=10, depth=6, hidden_size=192,
                      num_heads=3)  # fmt: skip
    state = random_state({k: v.shape for k, v in model.named_parameters() if k != "pos_embed"}, seed=7)
    model.load_state_dict({**state, "pos_embed": model.pos_embed.detach()})
    model.eval()
    path = tmp_path / "digits" / "backbone.safetensors"
    json_path = save_backbone(model, path, extra_config={"dataset": "digits", "train_steps": 10})
    assert json_path == tmp_path / "digits" / "backbone.json"
    saved = json.loads(json_path.read_text())
    assert saved["arch"] == "SiT-S/2" and saved["time_convention"] == "repa"
    assert (saved["depth"], saved["hidden_size"], saved["num_heads"]) == (6, 192, 3)
    assert (saved["input_size"], saved["in_channels"], saved["num_classes"], saved["dataset"]) == (16, 1, 10, "digits")
    loaded = load_backbone(path)  # arch, source and overrides all from the JSON
    assert _frozen(loaded) and loaded.arch == "SiT-S/2"
    x, t, y = _inputs(1, 16)
    torch.testing.assert_close(loaded.velocity(x, t, y), model.velocity(x, t, y), rtol=0.0, atol=0.0)
    # The same config is embedded in the weights file, so it survives without the JSON.
    json_path.unlink()
    alone = load_backbone(path)
    torch.testing.assert_close(alone.velocity(x, t, y), model.velocity(x, t, y), rtol=0.0, atol=0.0)


def test_registry_arch_inferred_without_name(tmp_path):
    layout = official_sit_layout(depth=12, hidden=384, in_ch=4, patch=8, grid=2, classes=3)
    path = tmp_path / "s8.pt"
    torch.save(random_state(layout), path)
    model = load_backbone(path)
    assert model.arch == "SiT-S/8" and model.blocks[0].attn.num_heads == 6 and model.config["input_size"] == 16


def test_dtype_handling(tmp_path):
    state = random_state(official_sit_layout(**SMALL), dtype=torch.float16)
    path = tmp_path / "half.pt"
    torch.save(state, path)
    assert load_backbone(path, "SiT-S/2", **SMALL_OVERRIDES).pos_embed.dtype == torch.float32
    kept = load_backbone(path, "SiT-S/2", dtype=None, **SMALL_OVERRIDES)
    assert all(p.dtype == torch.float16 for p in kept.parameters())
    bf16 = load_backbone(path, "SiT-S/2", dtype=torch.bfloat16, **SMALL_OVERRIDES)
    assert bf16.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


def test_wrong_architecture_lists_mismatches(tmp_path):
    path = tmp_path / "s2.pt"
    torch.save(random_state(official_sit_layout(**SMALL)), path)
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, "SiT-B/2")
    msg = str(err.value)
    assert "does not match SiT-B/2" in msg and str(path) in msg
    assert "x_embedder.proj.weight: checkpoint (48, 4, 2, 2) vs model (768, 4, 2, 2)" in msg
    assert "missing keys: blocks.2." in msg
    assert "The tensors look like depth 2, hidden_size 48, patch_size 2" in msg


def test_missing_and_unexpected_keys_are_errors(tmp_path):
    state = random_state(official_sit_layout(**SMALL))
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.bias"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"1 missing keys: blocks\.1\.mlp\.fc2\.bias"):
        load_backbone(tmp_path / "missing.pt", "SiT-S/2", **SMALL_OVERRIDES)
    extra = {**state, "blocks.0.attn.extra.weight": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: blocks\.0\.attn\.extra\.weight"):
        load_backbone(tmp_path / "extra.pt", "SiT-S/2", **SMALL_OVERRIDES)
    not_sit = {k: v for k, v in state.items() if k != "pos_embed"}
    torch.save(not_sit, tmp_path / "nopos.pt")
    with pytest.raises(CheckpointError, match="not a SiT checkpoint: missing keys pos_embed"):
        load_backbone(tmp_path / "nopos.pt", "SiT-S/2", **SMALL_OVERRIDES)


def test_bad_arguments(tmp_path):
    model = build_sit("SiT-S/2", input_size=8, num_classes=10, **SMALL_OVERRIDES)
    path = tmp_path / "b.safetensors"
    save_backbone(model, path)
    with pytest.raises(ValueError, match="saved config has arch='SiT-S/2' but 'SiT-XL/2' was requested"):
        load_backbone(path, "SiT-XL/2")
    with pytest.raises(ValueError, match="source is 'edm'"):
        load_backbone(path, source="edm")
    with pytest.raises(TypeError, match="unknown backbone override"):
        load_backbone(path, widht=3)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "nope.pt", "SiT-S/2")
    with pytest.raises(ValueError, match="collide"):
        save_backbone(model, tmp_path / "c.safetensors", extra_config={"depth": 3})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_backbone(tmp_path / "junk.pt", "SiT-S/2")


class _Payload:
    """Pickles to a call that creates a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"ema": {"pos_embed": torch.zeros(1, 4, 8)}, "extra": _Payload(marker)}
    if writer == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(CheckpointError, match="refused to load") as err:
        load_backbone(path, "SiT-S/2")
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_sidenet(path)
    assert not marker.exists()
    # The payload is live: an unrestricted load would have run it.
    live = tmp_path / "live"
    torch.save({"x": _Payload(live)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.exists()


# ---------------------------------------------------------------------------------------------
# SideNets
# ---------------------------------------------------------------------------------------------


def _random_sidenet(seed, **kwargs):
    model = SideNet(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _side_inputs(channels=4, size=8):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, channels, size, size, generator=gen)
    v = torch.randn(2, channels, size, size, generator=gen)
    return x, v, torch.tensor([0.9, 0.3]), torch.tensor([0.1, -0.05]), torch.tensor([1, 5])


def test_release_sidenet_checkpoint_prefers_ema(tmp_path):
    cfg = dict(in_channels=4, channels=32, emb_dim=16, depth=4, num_classes=5)
    live, ema = _random_sidenet(0, **cfg).train(), _random_sidenet(1, **cfg)
    optimizer = torch.optim.AdamW(live.parameters(), lr=1e-4)
    x, v, t, h, y = _side_inputs()
    live.velocity(x, v, t, h, y).pow(2).mean().backward()
    optimizer.step()
    path = tmp_path / "BA_side_002000.pt"
    torch.save({"side_model": live.state_dict(), "ema_side_model": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "step": 2000}, path)  # fmt: skip
    model = load_sidenet(path)
    # A release checkpoint is the feature-free architecture.
    assert _frozen(model) and model.config == {**cfg, "num_heads": 4, "frequency_dim": 256, "feature_dim": 0,
                                               "feature_layer": -1}
    torch.testing.assert_close(model.velocity(x, v, t, h, y), ema.velocity(x, v, t, h, y), rtol=0.0, atol=0.0)
    trainable = load_sidenet(path, trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_raw_sidenet_state_dict_with_heads_override(tmp_path):
    source = _random_sidenet(2, in_channels=3, channels=24, emb_dim=8, depth=3, num_heads=2, num_classes=2)
    path = tmp_path / "raw.pth"
    torch.save(source.state_dict(), path)
    model = load_sidenet(path, num_heads=2)
    x, v, t, h, _ = _side_inputs(channels=3)
    y = torch.tensor([0, 2])
    torch.testing.assert_close(model.velocity(x, v, t, h, y), source.velocity(x, v, t, h, y), rtol=0.0, atol=0.0)


def test_sidenet_roundtrip_safetensors_json(tmp_path):
    source = _random_sidenet(3, in_channels=1, channels=32, emb_dim=32, depth=4, num_heads=8, num_classes=10)
    path = tmp_path / "sidenet.safetensors"
    json_path = save_sidenet(source, path)
    saved = json.loads(json_path.read_text())
    assert saved == {"format": "bafm-sidenet", **source.config}
    model = load_sidenet(path)  # num_heads = 8 from the JSON
    assert model.blocks[2].num_heads == 8 and _frozen(model)
    x, v, t, h, y = _side_inputs(channels=1)
    torch.testing.assert_close(model.velocity(x, v, t, h, y), source.velocity(x, v, t, h, y), rtol=0.0, atol=0.0)


def test_sidenet_errors(tmp_path):
    source = _random_sidenet(4, in_channels=2, channels=16, emb_dim=16, depth=2, num_classes=3)
    state = source.state_dict()
    torch.save({k: v for k, v in state.items() if k != "blocks.0.conv2_pw.bias"}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.0\.conv2_pw\.bias"):
        load_sidenet(tmp_path / "m.pt")
    torch.save(state, tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match=r"channels 16"):
        load_sidenet(tmp_path / "ok.pt", channels=32)
    with pytest.raises(TypeError, match="unknown SideNet override"):
        load_sidenet(tmp_path / "ok.pt", width=3)
    backbone = build_sit("SiT-S/2", input_size=8, num_classes=10, **SMALL_OVERRIDES)
    save_backbone(backbone, tmp_path / "bb.safetensors")
    with pytest.raises(CheckpointError, match="format 'bafm-backbone', expected 'bafm-sidenet'"):
        load_sidenet(tmp_path / "bb.safetensors")
    torch.save({"optimizer": {}, "step": 3}, tmp_path / "noweights.pt")
    with pytest.raises(CheckpointError, match="no weights found.*'optimizer', 'step'"):
        load_sidenet(tmp_path / "noweights.pt")
