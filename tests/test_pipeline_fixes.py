"""Where diffusers 0.42.1 `PIAPipeline` is wrong, pia_torch does what the argument promises
(spec/pipeline.md §10, DESIGN.md §5). Each test checks pia_torch against a reference computed directly
(single runs per generator, transformers hidden states, ...) and, where cheap, shows the diffusers bug.
"""

from __future__ import annotations

import logging

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_DDIM, fan_in, image, pipeline_depth, run, tol

import pia_torch.schedulers as pia_sampling
from pia_torch.pipeline import preprocess_image

pytestmark = pytest.mark.usefixtures("one_thread")


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_num_videos_per_prompt(pipes):
    """Each video is its own draw; with a list of generators video k is the single run of generator k
    (up to rounding: every layer sees another batch size, so kernels sum in another order)."""
    ref, ours = pipes
    videos = ours(
        image(),
        "a cat in a field",
        num_frames=4,
        num_inference_steps=3,
        num_videos_per_prompt=2,
        generator=gens(1, 2),
        output_type="np",
    ).frames
    assert videos.shape == (2, 4, 16, 16, 3)
    for k, seed in enumerate((1, 2)):
        single = run(ours, seed=seed)[0]
        np.testing.assert_allclose(videos[k], single, **tol(single, pipeline_depth(ours, 3)))
    two = run(ours, num_videos_per_prompt=2)  # one generator: two different videos
    assert two.shape[0] == 2 and np.abs(two[0] - two[1]).max() > 1e-2
    four = ours(
        image(),
        ["a cat", "a hat"],
        num_frames=4,
        num_inference_steps=2,
        num_videos_per_prompt=2,
        generator=gens(1, 2, 3, 4),
        output_type="np",
    ).frames
    single = ours(image(), "a hat", num_frames=4, num_inference_steps=2, generator=gens(3)[0], output_type="np").frames
    np.testing.assert_allclose(four[2], single[0], **tol(single[0], pipeline_depth(ours, 2)))
    assert run(ref, num_videos_per_prompt=2).shape[0] == 1  # diffusers: silently 1


def test_batch_of_images_with_strength(pipes):
    """strength < 1 with two prompts and two images: video k starts from image k (diffusers: RuntimeError),
    equal to its single run up to rounding (another batch size)."""
    ref, ours = pipes
    images = [image(), image().transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)]
    prompts = ["a cat", "a hat"]
    args = dict(num_frames=4, num_inference_steps=5, strength=0.6, output_type="np")
    both = ours(images, prompts, generator=gens(1, 2), **args).frames
    for k in range(2):
        single = ours(images[k], prompts[k], generator=gens(k + 1)[0], **args).frames
        np.testing.assert_allclose(both[k], single[0], **tol(single[0], pipeline_depth(ours, 3)))  # int(5·0.6) steps
    assert np.abs(both[0] - both[1]).max() > 1e-2
    with pytest.raises(RuntimeError):
        ref(images, prompts, generator=gens(1, 2), **args)


def clip_reference(pipe, texts: list[str], k: int | None) -> torch.Tensor:
    """Text states straight from transformers: final_layer_norm(hidden_states[-(k+1)])."""
    te = pipe.text_encoder
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    if k is None:
        return te(ids).last_hidden_state
    return te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-(k + 1)])


@pytest.mark.parametrize("k", [None, 1, 2])
def test_clip_skip(pipes, k):
    """clip_skip on the positive and the negative prompt alike, under transformers 5.x."""
    ref, ours = pipes
    pos, neg = ours.encode_prompt("a cat", negative_prompt="dark", clip_skip=k)
    torch.testing.assert_close(pos, clip_reference(ours, ["a cat"], k), atol=0, rtol=0)
    torch.testing.assert_close(neg, clip_reference(ours, ["dark"], k), atol=0, rtol=0)
    if k is None:
        return
    frames = run(ours, prompt="a cat", negative_prompt="dark", clip_skip=k)
    direct = run(
        ours,
        prompt=None,
        prompt_embeds=clip_reference(ours, ["a cat"], k),
        negative_prompt_embeds=clip_reference(ours, ["dark"], k),
    )
    np.testing.assert_array_equal(frames, direct)
    with pytest.raises(AttributeError):  # diffusers: text_encoder.text_model
        run(ref, clip_skip=k)


def test_image_of_another_size(pipes):
    """Resize to cover (height, width) keeping the aspect ratio, then center-crop; same size: untouched."""
    _, ours = pipes
    stripes = np.zeros((16, 32, 3), np.uint8)
    stripes[:, :8, 0] = stripes[:, 24:, 0] = 255  # red borders, green middle
    stripes[:, 8:24, 1] = 255
    x = preprocess_image(PIL.Image.fromarray(stripes), 16, 16)
    assert x.shape == (1, 3, 16, 16)
    torch.testing.assert_close(x, torch.tensor([-1.0, 1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 16, 16))
    same = preprocess_image(PIL.Image.fromarray(stripes), 16, 32)
    torch.testing.assert_close(same, torch.from_numpy(stripes).permute(2, 0, 1)[None] / 255 * 2 - 1, atol=0, rtol=0)
    big = image(40, 32)
    frames = run(ours, image=big)
    np.testing.assert_array_equal(frames, run(ours, image=preprocess_image(big, 16, 16)))


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_free_init_one_iteration_is_plain(pipes, scheduler, strength):
    _, ours = pipes
    if scheduler == "euler":
        ours.scheduler = pia_sampling.EulerDiscreteScheduler.from_config(ours.scheduler.config)
    plain = run(ours, strength=strength, num_inference_steps=5)
    ours.enable_free_init(num_iters=1)
    np.testing.assert_allclose(run(ours, strength=strength, num_inference_steps=5), plain, atol=1e-6, rtol=0)


def test_free_init_keeps_strength(pipes):
    """Every FreeInit pass runs the strength-truncated schedule (diffusers: a fresh full one)."""
    seen: dict[str, list[int]] = {"ref": [], "ours": []}
    for name, pipe in zip(seen, pipes):
        pipe.enable_free_init(num_iters=2)
        run(
            pipe,
            strength=0.6,
            num_inference_steps=5,
            callback_on_step_end=lambda p, i, t, kw, name=name: seen[name].append(int(t)) or {},
        )
    assert seen["ours"] == [400, 200, 0] * 2
    assert seen["ref"] == [666, 333, 0] * 2


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_free_init_fast_sampling_keeps_strength(pipes, scheduler):
    """Fast sampling at strength < 1: pass 0 is exactly the plain run with pass 0's (shorter) schedule,
    started from its own noise level, and a strength that would leave a short pass no step still runs."""
    ours = pipes[1]
    if scheduler == "euler":
        ours.scheduler = pia_sampling.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="linear", timestep_spacing="leading"
        )
    # N = 9, 3 iterations: the passes have 3, 6, 9 steps before the strength cut
    plain = run(ours, strength=0.7, num_inference_steps=3, output_type="latent")
    ends: list[torch.Tensor] = []

    def record(p, i, t, kw):
        if i == 1:  # int(3 * 0.7) = 2 steps in pass 0: its output is the latents after step i = 1
            ends.append(kw["latents"].clone())
        return {}

    ours.enable_free_init(num_iters=3, use_fast_sampling=True)
    run(ours, strength=0.7, num_inference_steps=9, output_type="latent", callback_on_step_end=record)
    torch.testing.assert_close(ends[0], plain, rtol=0, atol=1e-6)

    frames = run(ours, strength=0.2, num_inference_steps=10)  # fast passes of 3, 6, 10 steps keep 0, 1, 2
    assert np.isfinite(frames).all()


def test_negative_prompt_tuple_is_a_list(pipes):
    ours = pipes[1]
    np.testing.assert_array_equal(run(ours, negative_prompt=("bad",)), run(ours, negative_prompt=["bad"]))
    with pytest.raises(ValueError, match="negative_prompt"):
        run(ours, negative_prompt=3)


def test_free_init_euler(pipes):
    """Euler + FreeInit: runs (diffusers: IndexError with "leading" spacing), and every pass starts in
    Euler's σ scale: the re-initialised latents' std is within 5% of Euler's own starting latents."""
    ref, ours = pipes
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", timestep_spacing="leading")
    ref.scheduler = diffusers.EulerDiscreteScheduler(**config)
    ours.scheduler = pia_sampling.EulerDiscreteScheduler(**config)
    for pipe in pipes:
        pipe.enable_free_init(num_iters=3)
    with pytest.raises(IndexError):
        run(ref)

    starts: list[torch.Tensor] = []
    step = ours.scheduler.step_with_x0

    def record(model_output, t, x, **options):  # x: the latents a step starts from
        if int(t) == int(ours.scheduler.timesteps[0]) and len(starts) < 3:
            starts.append(x[:1].clone())
        return step(model_output, t, x, **options)

    ours.scheduler.step_with_x0 = record
    args = dict(num_frames=8, height=32, width=32, image=image(32, 32), num_inference_steps=4)
    frames = run(ours, **args)
    del ours.scheduler.step_with_x0
    assert len(starts) == 3 and np.isfinite(frames).all()
    std0 = starts[0].std().item()
    assert abs(std0 / float(ours.scheduler.init_noise_sigma) - 1) < 0.05
    for later in starts[1:]:
        assert abs(later.std().item() / std0 - 1) < 0.05, (later.std().item(), std0)
    np.testing.assert_array_equal(frames, run(ours, **args))  # deterministic
    assert np.isfinite(run(ours, strength=0.6, **args)).all()


def test_scheduler_warning(pipes, caplog):
    """One log line per scheduler whose config hurts PIA (not "linear" betas, or clip_sample on)."""
    _, ours = pipes

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "pia_torch" and r.levelno == logging.WARNING]

    with caplog.at_level(logging.WARNING, logger="pia_torch"):
        run(ours, num_inference_steps=1)
        assert warnings() == []
        ours.scheduler = pia_sampling.DDIMScheduler(**dict(TINY_DDIM, beta_schedule="scaled_linear"))
        run(ours, num_inference_steps=1)
        run(ours, num_inference_steps=1)
        assert len(warnings()) == 1 and "scaled_linear" in warnings()[0]
        ours.scheduler = pia_sampling.DDIMScheduler(**dict(TINY_DDIM, clip_sample=True))
        run(ours, num_inference_steps=1)
        assert len(warnings()) == 2 and "clip_sample" in warnings()[1]


def test_offload_and_vae_slicing_without_accelerator(pipes, caplog, monkeypatch):
    """The docs' enable_model_cpu_offload() + enable_vae_slicing() work on a CPU-only machine."""
    ref, ours = pipes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = run(ours)
    with caplog.at_level(logging.INFO, logger="pia_torch"):
        ours.enable_model_cpu_offload()
    assert any("no accelerator" in r.getMessage() for r in caplog.records)
    ours.enable_vae_slicing()
    try:
        # offload is a no-op without an accelerator; slicing decodes one video at a time (rounding only)
        decoder_depth = fan_in(ours.vae.post_quant_conv) + fan_in(ours.vae.decoder)
        np.testing.assert_allclose(run(ours), before, **tol(before, decoder_depth))
        assert ours.device.type == "cpu"
    finally:
        ours.disable_vae_slicing()
    assert not hasattr(ref, "enable_vae_slicing")  # diffusers 0.42.1 removed it
    with pytest.raises((RuntimeError, ImportError)):  # no accelerator (or no accelerate)
        ref.enable_model_cpu_offload()
