"""Text-conditioned SideNet: identities, conditioning, export round trip, parameter count."""

from __future__ import annotations

import json

import pytest
import torch

from bafm.models.checkpoint_io import CheckpointError
from bafm.models.layers import count_parameters
from bafm.models.sidenet import SideNet
from bafm.models.text_condition import (
    TextCondition,
    concat_conditions,
    null_like,
    repeat_condition,
    select_rows,
)
from bafm.models.text_sidenet import TextSideNet, load_text_sidenet, save_text_sidenet

POOLED = 12


def _net(seed: int = 0, randomize_output: bool = True, patch_size: int = 1) -> TextSideNet:
    torch.manual_seed(seed)
    net = TextSideNet(in_channels=4, pooled_dim=POOLED, channels=16, emb_dim=16, depth=3, num_heads=2,
                      frequency_dim=8, patch_size=patch_size)  # fmt: skip
    if randomize_output:  # the zero output conv would hide every other weight
        torch.nn.init.normal_(net.output_conv.weight, std=0.1)
    return net.eval()


def _inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, v = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.rand(batch, generator=g)
    h = 0.1 * torch.rand(batch, generator=g)
    cond = TextCondition(torch.randn(batch, 5, 7, generator=g), torch.randn(batch, POOLED, generator=g))
    return x, v, t, h, cond


@pytest.mark.parametrize("patch_size", [1, 2])
def test_zero_offset_and_fresh_net_are_identity(patch_size):
    x, v, t, h, cond = _inputs()
    net = _net(patch_size=patch_size)
    torch.testing.assert_close(net.velocity(x, v, t, torch.zeros_like(h), cond), v, rtol=0, atol=0)
    fresh = _net(randomize_output=False, patch_size=patch_size)
    torch.testing.assert_close(fresh.velocity(x, v, t, h, cond), v, rtol=0, atol=0)


def test_patches_fold_into_channels():
    # patch_size 2 is a SideNet on pixel-unshuffled latents whose output is pixel-shuffled back.
    net2 = _net(patch_size=2)
    folded = TextSideNet(in_channels=16, pooled_dim=POOLED, channels=16, emb_dim=16, depth=3, num_heads=2,
                         frequency_dim=8)  # fmt: skip
    folded.load_state_dict(net2.state_dict())
    x, v, t, h, cond = _inputs()
    unshuffle = torch.nn.functional.pixel_unshuffle
    expected = torch.nn.functional.pixel_shuffle(folded(unshuffle(x, 2), unshuffle(v, 2), t, h, cond), 2)
    torch.testing.assert_close(net2(x, v, t, h, cond), expected)
    with pytest.raises(ValueError, match=r"latents of size \(7, 8\) are not divisible by the SideNet's patch_size 2"):
        net2(x[..., :7, :], v[..., :7, :], t, h, cond)


def test_reads_only_the_pooled_embedding():
    net = _net()
    x, v, t, h, cond = _inputs()
    out = net.velocity(x, v, t, h, cond)
    other_tokens = TextCondition(torch.randn_like(cond.prompt_embeds), cond.pooled)
    torch.testing.assert_close(net.velocity(x, v, t, h, other_tokens), out, rtol=0, atol=0)
    torch.testing.assert_close(net.velocity(x, v, t, h, cond.pooled), out, rtol=0, atol=0)
    other_pooled = TextCondition(cond.prompt_embeds, cond.pooled + 1.0)
    assert (net.velocity(x, v, t, h, other_pooled) - out).abs().max() > 1e-4


def test_rows_are_independent_so_a_doubled_cfg_batch_matches_two_calls():
    net = _net()
    x, v, t, h, cond = _inputs()
    null = TextCondition(torch.zeros(1, 5, 7), torch.full((1, POOLED), 0.3))
    uncond = null_like(null, 3)
    doubled = net.velocity(torch.cat([x, x]), torch.cat([v, v]), t.repeat(2), h.repeat(2),
                           concat_conditions([cond, uncond]))  # fmt: skip
    torch.testing.assert_close(doubled[:3], net.velocity(x, v, t, h, cond))
    torch.testing.assert_close(doubled[3:], net.velocity(x, v, t, h, uncond))


def test_condition_helpers():
    _, _, _, _, cond = _inputs()
    tiled = repeat_condition(cond, 2)
    assert isinstance(tiled, TextCondition)
    torch.testing.assert_close(tiled.pooled, torch.cat([cond.pooled, cond.pooled]))
    null = TextCondition(torch.zeros(1, 5, 7), torch.zeros(1, POOLED))
    mixed = select_rows(torch.tensor([True, False, True]), cond, null)
    torch.testing.assert_close(mixed.pooled[[0, 2]], cond.pooled[[0, 2]])
    assert mixed.pooled[1].abs().sum() == 0 and mixed.prompt_embeds[1].abs().sum() == 0
    torch.testing.assert_close(repeat_condition(torch.tensor([4, 7]), 2), torch.tensor([4, 7, 4, 7]))


def test_wrong_pooled_width_is_named():
    x, v, t, h, _ = _inputs()
    with pytest.raises(ValueError, match=r"pooled text embedding has shape \(3, 5\), expected \(3, 12\)"):
        _net()(x, v, t, h, torch.zeros(3, 5))


@pytest.mark.parametrize("patch_size", [1, 2])
def test_export_round_trip(tmp_path, patch_size):
    net = _net(seed=3, patch_size=patch_size)
    path = tmp_path / "text_sidenet.safetensors"
    json_path = save_text_sidenet(net, path, {"backbone": "tiny-sd3"})
    assert json.loads(json_path.read_text())["format"] == "bafm-text-sidenet"
    loaded = load_text_sidenet(path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x, v, t, h, cond = _inputs()
    torch.testing.assert_close(loaded.velocity(x, v, t, h, cond), net.velocity(x, v, t, h, cond), rtol=0, atol=0)


def test_loading_refuses_other_formats_and_mismatched_tensors(tmp_path):
    path = tmp_path / "side.safetensors"
    save_text_sidenet(_net(), path)
    config = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**config, "format": "bafm-sidenet"}))
    with pytest.raises(CheckpointError, match="format 'bafm-sidenet', expected 'bafm-text-sidenet'"):
        load_text_sidenet(path)
    path.with_suffix(".json").write_text(json.dumps({**config, "pooled_dim": POOLED + 1}))
    with pytest.raises(CheckpointError, match="text_embedder.weight: checkpoint"):
        load_text_sidenet(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_text_sidenet(tmp_path / "none.safetensors")


def test_patch_size_two_widens_only_the_end_convs():
    # In and out convs see 4x the channels: 3 x (2 * 16) x 256 x 9 more input weights, 3 x 16 x (256 x 9 + 1)
    # more output weights and biases.
    with torch.device("meta"):
        one, two = TextSideNet(in_channels=16, patch_size=1), TextSideNet(in_channels=16, patch_size=2)
    assert count_parameters(two)[1] - count_parameters(one)[1] == 3 * 32 * 256 * 9 + 3 * 16 * (256 * 9 + 1)


@pytest.mark.parametrize("pooled_dim", [768, 2048])
def test_parameter_count_is_the_class_sidenets_with_a_pooled_projection(pooled_dim):
    # Release sizes at 16 latent channels: the class table (1001 x 256) is replaced by a
    # (pooled_dim x 256 + 256) linear map; every other tensor is the class SideNet's.
    with torch.device("meta"):
        text = TextSideNet(in_channels=16, pooled_dim=pooled_dim)
        classes = SideNet(in_channels=16, num_classes=1000)
    expected = count_parameters(classes)[1] - 1001 * 256 + pooled_dim * 256 + 256
    assert count_parameters(text)[1] == expected
