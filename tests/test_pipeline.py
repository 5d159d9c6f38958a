"""The whole pipeline against diffusers 0.42.1 `PIAPipeline` (fp32, CPU, convention="diffusers").

Both sides get the same tiny random weights (saved by diffusers as a hub-shaped folder), the same image
at the requested size, the same prompt and the same generator seed; frames (output_type="np") must
agree to 1e-3 (DESIGN.md §5), latents at every step in test_ddim_every_step.
"""

from __future__ import annotations

import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from conftest import FRAMES_ATOL, SD15_PNDM, assert_parity, fan_in, image, pipeline_depth, run, tol

import pia_torch.schedulers as pia_sampling
from pia_torch.demo import demo_image
from pia_torch.loading import MotionAdapter
from pia_torch.long_video import mask_coefficients
from pia_torch.pipeline import PIAPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- parity


def test_ddim_every_step(pipes):
    """Latents after every step, then the frames; negative prompt and CFG on."""
    steps = {}

    def record(name):
        def callback(pipe, i, t, kwargs):
            steps.setdefault(name, []).append((int(t), kwargs["latents"].clone()))
            return {}

        return callback

    for name, pipe in zip(("ref", "ours"), pipes):
        frames = run(pipe, num_inference_steps=4, negative_prompt="blurry", callback_on_step_end=record(name))
        steps[name + "_frames"] = frames
    assert [t for t, _ in steps["ref"]] == [t for t, _ in steps["ours"]] == [750, 500, 250, 0]
    # the latents after step i carry the rounding of i + 1 UNet evaluations (and of the text and image encoders)
    for i, ((_, a), (_, b)) in enumerate(zip(steps["ref"], steps["ours"])):
        torch.testing.assert_close(b, a, **tol(a, pipeline_depth(pipes[1], i + 1)))
    assert np.abs(steps["ref_frames"] - steps["ours_frames"]).max() <= FRAMES_ATOL


def test_euler(pipes):
    for pipe, module in zip(pipes, (diffusers, pia_sampling)):
        pipe.scheduler = module.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert_parity(pipes)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("method", ["butterworth", "gaussian", "ideal"])
def test_free_init_ddim(pipes, method, fast):
    for pipe in pipes:
        pipe.enable_free_init(num_iters=2, use_fast_sampling=fast, method=method)
    assert_parity(pipes)


def test_freeu(pipes):
    for pipe in pipes:
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert_parity(pipes)


@pytest.mark.parametrize("motion_scale", list(range(9)) + [-1])
def test_motion_scale(pipes, motion_scale):
    assert_parity(pipes, motion_scale=motion_scale, num_frames=16, num_inference_steps=2)


def test_motion_scale_table():
    from diffusers.pipelines.deprecated.pia.pipeline_pia import prepare_mask_coef_by_statistics

    for scale in range(-9, 9):
        for frames in (1, 4, 16, 20):
            assert mask_coefficients(frames, scale) == prepare_mask_coef_by_statistics(frames, 0, scale)
    for bad in (9, -10, 1.0):
        with pytest.raises(ValueError):
            mask_coefficients(16, bad)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_strength(pipes, scheduler):
    if scheduler == "euler":
        for pipe, module in zip(pipes, (diffusers, pia_sampling)):
            pipe.scheduler = module.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert_parity(pipes, strength=0.6, num_inference_steps=5)


def test_no_guidance(pipes):
    assert_parity(pipes, guidance_scale=1.0)


def test_non_square(pipes):
    assert_parity(pipes, image=image(24, 16), height=16, width=24)


def test_latents_given(pipes):
    latents = torch.randn((1, 4, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    assert_parity(pipes, latents=latents)


def test_eta_and_batch(pipes):
    """DDIM step noise (eta > 0) and a batch of two prompts with one generator."""
    assert_parity(pipes, eta=0.7)
    assert_parity(pipes, prompt=["a cat", "a hat"], negative_prompt=["dark", "sketch"])


def test_prompt_embeds(pipes):
    embeds = torch.randn((1, 77, 8), generator=torch.Generator().manual_seed(2))
    negative = torch.randn((1, 77, 8), generator=torch.Generator().manual_seed(3))
    assert_parity(pipes, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)


def test_output_types(pipes):
    ref, ours = pipes
    for output_type, shape in [("np", (1, 4, 16, 16, 3)), ("pt", (1, 4, 3, 16, 16)), ("latent", (1, 4, 4, 8, 8))]:
        a, b = run(ref, output_type=output_type), run(ours, output_type=output_type)
        assert tuple(a.shape) == tuple(b.shape) == shape and type(a) is type(b)
        if output_type == "pt":
            torch.testing.assert_close(b, a, atol=FRAMES_ATOL, rtol=0)
        elif output_type == "latent":  # the denoised latents: rounding through the 3 steps
            torch.testing.assert_close(b, a, **tol(a, pipeline_depth(ours, 3)))
    a, b = run(ref, output_type="pil"), run(ours, output_type="pil")
    assert len(a) == len(b) == 1 and len(b[0]) == 4 and b[0][0].size == (16, 16) and b[0][0].mode == "RGB"
    assert max(np.abs(np.asarray(x, int) - np.asarray(y, int)).max() for x, y in zip(a[0], b[0])) <= 1
    (frames,) = ours(image(), "a cat", num_frames=4, num_inference_steps=1, output_type="latent", return_dict=False)
    assert frames.shape == (1, 4, 4, 8, 8)
    with pytest.raises(ValueError):
        ours(image(), "a cat", output_type="gif")


def test_decode_variants_agree(pipes):
    """decode_chunk_size and VAE slicing change only the conv batching: the frames agree up to rounding."""
    _, ours = pipes
    plain = run(ours, num_inference_steps=2)
    chunked = run(ours, num_inference_steps=2, decode_chunk_size=3)
    ours.enable_vae_slicing()
    try:
        sliced = run(ours, num_inference_steps=2)
    finally:
        ours.disable_vae_slicing()
    # the VAE decoder's convs see other batch sizes: rounding through the decoder only
    decoder = tol(plain, fan_in(ours.vae.post_quant_conv) + fan_in(ours.vae.decoder))
    np.testing.assert_allclose(chunked, plain, **decoder)
    np.testing.assert_allclose(sliced, plain, **decoder)


# --------------------------------------------------------------------------------------------- loading


def test_from_pretrained_sd15_folder(folders, tmp_path, caplog):
    """A runwayml-style folder (PNDM scheduler) gives DDIM with the same betas, logged; the docs' Euler
    swap sees the file's keys (Euler's own "linspace" spacing, as in diffusers)."""
    base = tmp_path / "sd15"
    shutil.copytree(folders["base"], base)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_PNDM))
    adapter = MotionAdapter.from_pretrained(folders["adapter"])
    with caplog.at_level("INFO", logger="pia_torch"):
        pipe = PIAPipeline.from_pretrained(base, motion_adapter=adapter)
    assert any("PNDMScheduler" in r.getMessage() for r in caplog.records)
    assert isinstance(pipe.scheduler, pia_sampling.DDIMScheduler)
    ref = diffusers.DDIMScheduler.from_config(diffusers.PNDMScheduler.from_config(SD15_PNDM).config)
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
    assert pipe.unet.config.convention == "original"  # the default
    euler = pia_sampling.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref_euler = diffusers.EulerDiscreteScheduler.from_config(diffusers.PNDMScheduler.from_config(SD15_PNDM).config)
    euler.set_timesteps(4), ref_euler.set_timesteps(4)
    torch.testing.assert_close(euler.timesteps, ref_euler.timesteps)
    with pytest.raises(ValueError, match="motion adapter"):
        PIAPipeline.from_pretrained(base)


def test_to_dtype(ours_session):
    pipe = ours_session
    try:
        pipe.to(torch.float64)
        assert pipe.dtype == torch.float64 and pipe.text_encoder.dtype == torch.float64
        frames = run(pipe, num_inference_steps=1, output_type="pt")
        assert frames.dtype == torch.float32 and torch.isfinite(frames).all()
    finally:
        pipe.to(torch.float32)


# --------------------------------------------------------------------------------------------- demo


def test_demo_pipeline_offline():
    """tiny_pipeline(): no diffusers, no download, seeded, the bundled tokenizer and image."""
    from pia_torch.demo import tiny_pipeline

    pipe = tiny_pipeline(seed=1, convention="diffusers")
    assert pipe.unet.config.convention == "diffusers" and tiny_pipeline().unet.config.convention == "original"
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a cat").input_ids) == [
        "<|startoftext|>",
        "a</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    img = demo_image()
    assert img.size == (64, 64) and img.mode == "RGB"
    pipe.set_progress_bar_config(disable=True)
    frames = run(pipe, image=img, num_inference_steps=2)
    assert frames.shape == (1, 4, 32, 32, 3) and np.isfinite(frames).all()
    again = tiny_pipeline(seed=1, convention="diffusers")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(again, image=img, num_inference_steps=2), frames)
