"""``ba_generate``: BA samples from a loaded SD3 / Flux pipeline (tiny, with tiny text encoders)."""

import numpy as np
import pytest
import torch
from PIL import Image
from t2i_text_factories import flux_pipeline_with_text, sd3_pipeline_with_text

from bafm.models.diffusers_flow import pack_latents
from bafm.models.text_sidenet import TextSideNet, save_text_sidenet
from bafm.pipelines import ba_generate, ba_sample_latents, pipeline_grid
from bafm.sampling import sample_noise

PROMPTS = ["a photo of a red cat", "a small blue dog"]


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sidenet(pipe, in_channels, seed=0):
    torch.manual_seed(seed)
    net = TextSideNet(in_channels=in_channels, pooled_dim=pipe.transformer.config.pooled_projection_dim,
                      channels=8, emb_dim=16, depth=1, num_heads=2, frequency_dim=16)  # fmt: skip
    with torch.no_grad():  # a non-zero offset (the output conv starts at zero)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_sd3_euler_from_prompts_matches_the_pipeline():
    pipe = _quiet(sd3_pipeline_with_text())
    noise = sample_noise(range(2), (4, 16, 16), seed=5)
    expected = pipe(prompt=PROMPTS, negative_prompt=["", "blurry"], latents=noise.clone(), num_inference_steps=5,
                    guidance_scale=4.0, height=16, width=16, output_type="latent").images  # fmt: skip
    got = ba_generate(pipe, None, PROMPTS, nfe=5, solver="euler", negative_prompt=["", "blurry"],
                      guidance_scale=4.0, height=16, width=16, seed=5, output_type="latent")  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The same images through the pipeline's own VAE decode and image processor.
    images = ba_generate(pipe, None, PROMPTS, nfe=5, solver="euler", negative_prompt=["", "blurry"],
                         guidance_scale=4.0, height=16, width=16, seed=5, output_type="np")  # fmt: skip
    pipe_images = pipe(prompt=PROMPTS, negative_prompt=["", "blurry"], latents=noise.clone(), num_inference_steps=5,
                       guidance_scale=4.0, height=16, width=16, output_type="np").images  # fmt: skip
    np.testing.assert_allclose(images, pipe_images, atol=1e-4)


def test_flux_euler_from_prompts_matches_the_pipeline():
    pipe = _quiet(flux_pipeline_with_text(guidance_embeds=True))
    noise = sample_noise(range(2), (1, 16, 16), seed=3)
    expected = pipe(prompt=PROMPTS, latents=pack_latents(noise), num_inference_steps=4, guidance_scale=3.5,
                    height=16, width=16, output_type="latent").images  # fmt: skip
    got = ba_generate(pipe, None, PROMPTS, nfe=4, solver="euler", distilled_guidance=3.5, height=16, width=16,
                      seed=3, output_type="latent")  # fmt: skip
    torch.testing.assert_close(pack_latents(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_pipe,channels,size", [(sd3_pipeline_with_text, 4, 16), (flux_pipeline_with_text, 1, 16)],
                         ids=["sd3", "flux"])
def test_ba_generate_gives_pil_images_at_the_nfe(tmp_path, make_pipe, channels, size):
    pipe = _quiet(make_pipe())
    sidenet = _sidenet(pipe, channels)
    path = tmp_path / "sidenet.safetensors"
    save_text_sidenet(sidenet, path)
    images = ba_generate(pipe, path, PROMPTS, nfe=3, height=size, width=size, seed=1)
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (size, size) for im in images)
    result = ba_sample_latents(pipe, sidenet, PROMPTS, nfe=3, height=size, width=size, seed=1)
    assert result.nfe == 3 and result.x.shape == (2, channels, size, size)
    # Per-image seeds: the second image does not depend on the first prompt being there.
    alone = ba_sample_latents(pipe, sidenet, PROMPTS[1:], nfe=3, height=size, width=size, seed=2)
    torch.testing.assert_close(alone.x[0], result.x[1], rtol=1e-5, atol=1e-5)
    # The SideNet is used: another one moves the result.
    other = ba_sample_latents(pipe, _sidenet(pipe, channels, seed=1), PROMPTS, nfe=3, height=size, width=size, seed=1)
    assert (other.x - result.x).abs().max() > 1e-4


def test_pipeline_grid_follows_the_scheduler():
    sd3 = sd3_pipeline_with_text()
    assert pipeline_grid(sd3, "sd3", (32, 32)) == ("sd3", 3.0, None)
    flux = flux_pipeline_with_text()
    kind, _, mu = pipeline_grid(flux, "flux", (128, 128))
    assert kind == "flux" and mu == pytest.approx(1.15)
    flux.scheduler.register_to_config(use_dynamic_shifting=False, shift=1.0)  # FLUX.1-schnell's scheduler
    assert pipeline_grid(flux, "flux", (128, 128)) == ("shift", 1.0, None)


def test_ba_without_sidenet_is_refused():
    with pytest.raises(ValueError, match="solver 'ba' needs a trained SideNet"):
        ba_generate(_quiet(sd3_pipeline_with_text()), None, "a cat", nfe=2, height=16, width=16)


def test_explicit_grids_reach_the_solver(monkeypatch):
    import bafm.pipelines as pipelines

    seen = {}

    def spy(velocity_fn, x, solver, nfe, side_fn, grid, **kw):
        seen.update(grid=grid, **kw)
        return pipelines.SolveResult(x=x, nfe=nfe)

    monkeypatch.setattr(pipelines, "integrate", spy)
    flux = _quiet(flux_pipeline_with_text())
    ba_sample_latents(flux, None, "a cat", nfe=2, solver="euler", height=16, width=16, grid="flux")
    assert seen == {"grid": "flux", "shift": 1.0, "mu": pytest.approx(0.5 + 0.65 / 3840 * (64 - 256))}
    ba_sample_latents(flux, None, "a cat", nfe=2, solver="euler", height=16, width=16, grid="sd3", shift=5.0)
    assert seen == {"grid": "sd3", "shift": 5.0, "mu": None}


def test_ba_adaptive_with_cfg_runs_through_the_text_closures():
    # ba-adaptive merges velocities row by row; with CFG their raw pairs must follow (AnchorMemo.select).
    pipe = _quiet(sd3_pipeline_with_text())
    result = ba_sample_latents(pipe, _sidenet(pipe, 4), PROMPTS, nfe=None, solver="ba-adaptive", guidance_scale=4.0,
                               height=16, width=16, seed=1)  # fmt: skip
    assert result.x.shape == (2, 4, 16, 16) and bool(torch.isfinite(result.x).all()) and result.nfe >= 2


def test_flux_schnell_static_schedule_matches_the_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _quiet(flux_pipeline_with_text())
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # FLUX.1-schnell's: no dynamic shift
    noise = sample_noise(range(1), (1, 16, 16), seed=7)
    expected = pipe(prompt="a cat", latents=pack_latents(noise), num_inference_steps=4, height=16, width=16,
                    output_type="latent").images  # fmt: skip
    got = ba_generate(pipe, None, "a cat", nfe=4, solver="euler", height=16, width=16, seed=7, output_type="latent")
    torch.testing.assert_close(pack_latents(got), expected, rtol=1e-5, atol=1e-5)


def test_the_readme_plug_in_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### In your own pipeline", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    pipe = _quiet(sd3_pipeline_with_text())
    export = tmp_path / "runs" / "sd3_medium" / "sidenet.safetensors"
    export.parent.mkdir(parents=True)
    save_text_sidenet(_sidenet(pipe, 4), export)
    monkeypatch.chdir(tmp_path)  # the snippet's relative SideNet path
    scope = {"pipe": pipe}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["images"]) == 1 and isinstance(scope["images"][0], Image.Image)
