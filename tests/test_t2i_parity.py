"""SD3 / Flux adapter: bafm's Euler through it reproduces diffusers' own pipelines.

Tiny random transformers (diffusers' pipeline-test configs), no text encoders: the pipelines run
from given prompt embeddings with ``output_type="latent"`` and the same noise.
"""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from t2i_factories import (
    flux_condition,
    pipeline_embeddings,
    sd3_conditions,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
)

from bafm.models.checkpoint_io import CheckpointError
from bafm.models.diffusers_flow import (
    FlowTransformerBackbone,
    image_ids,
    load_flow_transformer,
    pack_latents,
    unpack_latents,
)
from bafm.models.text_sampling import build_text_sampling_fns
from bafm.sampling import integrate
from bafm.solvers.grids import flux_mu, make_grid

# float32 round-off of a few steps on O(1) latents (the pipelines' own Euler steps in float32).
ROUND_OFF = dict(rtol=1e-5, atol=1e-5)


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (6, 3.0), (28, 3.0), (5, 1.0), (4, 6.0)])
def test_sd3_grid_is_the_sd3_schedulers_sigmas(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(make_grid("sd3", steps, shift=shift), scheduler.sigmas, rtol=0, atol=1e-7)


@pytest.mark.parametrize("steps,tokens", [(1, 4096), (4, 64), (28, 4096), (50, 1024)])
def test_flux_grid_is_the_flux_schedule(steps, tokens):
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert flux_mu(tokens) == pytest.approx(mu, rel=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(make_grid("flux", steps, mu=mu), scheduler.sigmas, rtol=0, atol=1e-6)


def test_flux_grid_needs_mu():
    with pytest.raises(ValueError, match="grid 'flux' needs a finite mu"):
        make_grid("flux", 4)


def test_pipeline_noising_is_the_project_convention():
    # diffusers' flow scheduler noises as x_t = (1 - sigma) x0 + sigma noise: sigma is our t.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    x0, noise = _noise((1, 4, 4, 4), 1), _noise((1, 4, 4, 4), 2)
    t = scheduler.sigmas[1]
    noised = scheduler.scale_noise(x0, scheduler.timesteps[1:2], noise)
    torch.testing.assert_close(noised, (1 - t) * x0 + t * noise)


def test_packing_matches_flux_pipeline():
    x = _noise((2, 3, 6, 8))
    torch.testing.assert_close(pack_latents(x), FluxPipeline._pack_latents(x, 2, 3, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(pack_latents(x), 6, 8), x, rtol=0, atol=0)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    torch.testing.assert_close(image_ids(6, 8, torch.device("cpu"), torch.float32), ref_ids, rtol=0, atol=0)


def test_sd3_euler_matches_stable_diffusion3_pipeline():
    pipe = tiny_sd3_pipeline(shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    cond, negative = sd3_conditions(2)
    noise = _noise((2, 4, 32, 32))
    expected = pipe(**pipeline_embeddings(cond, negative), latents=noise.clone(), num_inference_steps=6,
                    guidance_scale=4.0, height=32, width=32, output_type="latent").images  # fmt: skip

    backbone = FlowTransformerBackbone(pipe.transformer, "sd3")
    velocity_fn, _ = build_text_sampling_fns(backbone.velocity, cond, negative=negative, cfg_scale=4.0)
    result = integrate(velocity_fn, noise.clone(), "euler", nfe=6, grid="sd3", shift=3.0)
    assert result.nfe == 6
    torch.testing.assert_close(result.x, expected, **ROUND_OFF)
    # Not vacuous: the guided result differs from the unguided one by far more than round-off.
    plain_fn, _ = build_text_sampling_fns(backbone.velocity, cond)
    unguided = integrate(plain_fn, noise.clone(), "euler", nfe=6, grid="sd3", shift=3.0).x
    assert (unguided - expected).abs().max() > 1e-2


@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["schnell", "dev-distilled-guidance"])
def test_flux_euler_matches_flux_pipeline(guidance_embeds):
    pipe = tiny_flux_pipeline(guidance_embeds=guidance_embeds)
    pipe.set_progress_bar_config(disable=True)
    cond = flux_condition(2)
    noise = _noise((2, 1, 16, 16))  # (B, C, H, W); the pipeline takes it packed
    expected = pipe(**pipeline_embeddings(cond), latents=pack_latents(noise), num_inference_steps=4,
                    guidance_scale=3.5, height=16, width=16, output_type="latent").images  # fmt: skip

    backbone = FlowTransformerBackbone(pipe.transformer, "flux", distilled_guidance=3.5)
    assert (backbone.distilled_guidance is not None) == guidance_embeds
    velocity_fn, _ = build_text_sampling_fns(backbone.velocity, cond)
    mu = flux_mu(pack_latents(noise).shape[1])
    result = integrate(velocity_fn, noise.clone(), "euler", nfe=4, grid="flux", mu=mu)
    torch.testing.assert_close(pack_latents(result.x), expected, **ROUND_OFF)
    if guidance_embeds:  # the guidance input is really passed: another value moves the result
        backbone.distilled_guidance = 1.0
        moved = integrate(velocity_fn, noise.clone(), "euler", nfe=4, grid="flux", mu=mu).x
        assert (pack_latents(moved) - expected).abs().max() > 1e-3


def test_flux_true_cfg_matches_flux_pipeline():
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    cond, negative = flux_condition(1, seed=3), flux_condition(1, seed=4)
    noise = _noise((1, 1, 16, 16))
    expected = pipe(**pipeline_embeddings(cond, negative), true_cfg_scale=2.5, latents=pack_latents(noise),
                    num_inference_steps=3, height=16, width=16, output_type="latent").images  # fmt: skip
    backbone = FlowTransformerBackbone(pipe.transformer, "flux")
    velocity_fn, _ = build_text_sampling_fns(backbone.velocity, cond, negative=negative, cfg_scale=2.5)
    result = integrate(velocity_fn, noise, "euler", nfe=3, grid="flux", mu=flux_mu(64))
    torch.testing.assert_close(pack_latents(result.x), expected, **ROUND_OFF)


def test_guidance_without_negative_is_refused():
    cond, _ = sd3_conditions(1)
    backbone = FlowTransformerBackbone(tiny_sd3_transformer(), "sd3")
    with pytest.raises(ValueError, match="needs the negative prompt's embeddings"):
        build_text_sampling_fns(backbone.velocity, cond, cfg_scale=4.0)


def test_loader_reads_a_local_pipeline_folder(tmp_path):
    pipe = tiny_sd3_pipeline()
    pipe.transformer.save_pretrained(tmp_path / "pipe" / "transformer")
    backbone = load_flow_transformer(tmp_path / "pipe", "sd3")
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training
    assert (backbone.in_channels, backbone.pooled_dim, backbone.text_dim) == (4, 64, 32)
    x, t = _noise((1, 4, 32, 32)), torch.tensor([0.7])
    cond, _ = sd3_conditions(1)
    direct = FlowTransformerBackbone(pipe.transformer, "sd3").velocity(x, t, cond)
    torch.testing.assert_close(backbone.velocity(x, t, cond), direct)
    wrong = "holds a SD3Transformer2DModel, but backbone family 'flux' needs a FluxTransformer2DModel"
    with pytest.raises(CheckpointError, match=wrong):
        load_flow_transformer(tmp_path / "pipe", "flux")


def test_loader_names_what_is_missing(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"missing .*transformer/config\.json"):
        load_flow_transformer(tmp_path / "empty", "sd3")
    with pytest.raises(CheckpointError, match="no such folder, and not a hub id"):
        load_flow_transformer(tmp_path / "absent", "flux")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    offline = r"owner/not-downloaded/transformer: cannot load .*offline or not downloaded"
    with pytest.raises(CheckpointError, match=offline):
        load_flow_transformer("owner/not-downloaded", "sd3", local_files_only=True)


@pytest.mark.parametrize("kind,options", [("sd3", {"shift": 3.0}), ("flux", {"mu": 1.15})])
def test_every_fixed_step_solver_converges_on_the_pipeline_grids(kind, options):
    from bafm.solvers import SOLVERS, is_adaptive
    from bafm.solvers.grids import nfe_for_steps

    # dx/dt = x: from x(1) = x1 the exact x(0) is x1 / e; the exact SideNet is v(t - h) = v e^{-h}.
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    velocity_fn = lambda x, t: x  # noqa: E731
    side_fn = lambda x, v, t, h: v * torch.exp(-h).view(-1, 1)  # noqa: E731
    for name in sorted(n for n in SOLVERS if not is_adaptive(n)):
        errors = []
        for steps in (8, 32):
            nfe = nfe_for_steps(name, steps)
            result = integrate(velocity_fn, x1.clone(), name, nfe, side_fn, kind, **options)
            assert result.nfe == nfe, name
            errors.append(float((result.x - x1 / torch.e).abs().max()))
        assert errors[1] < 0.5 * errors[0] and errors[1] < 0.05, (name, errors)


@pytest.mark.parametrize("loss", ["chain", "grid"])
def test_training_losses_take_a_text_condition(loss):
    from bafm.models.anchor_features import plain_anchor
    from bafm.models.text_sidenet import TextSideNet
    from bafm.training.ba_loss import ChainLossConfig, chain_loss
    from bafm.training.grid_loss import grid_chain_loss

    backbone = FlowTransformerBackbone(tiny_sd3_transformer(), "sd3")
    torch.manual_seed(0)
    sidenet = TextSideNet(in_channels=4, pooled_dim=64, channels=8, emb_dim=16, depth=1, num_heads=2, frequency_dim=16)
    cond, _ = sd3_conditions(2)
    x0, gen = _noise((2, 4, 8, 8)), torch.Generator().manual_seed(0)
    if loss == "chain":
        value, _ = chain_loss(backbone.velocity, sidenet.velocity, x0, cond, ChainLossConfig(links=2), gen)
    else:
        value, _ = grid_chain_loss(plain_anchor(backbone.velocity), sidenet.velocity, x0, cond, [3, 4], 2, gen)
    value.backward()
    assert torch.isfinite(value) and sidenet.output_conv.weight.grad.abs().sum() > 0
