"""`encode_prompt` with diffusers' signature and layout, and the half-precision VAE guard.

encode_prompt is compared with diffusers' own `PIAPipeline.encode_prompt` on the same text encoder, and
its output fed back as `prompt_embeds` must reproduce the prompt run. The guard is tested on a VAE whose
decoder is scaled so that float16 overflows: the frames must be finite and equal a float32 decode.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from conftest import image, run
from einops import rearrange

from pia_torch.demo import tiny_pipeline
from pia_torch.pipeline import decode_latents


@pytest.mark.parametrize("per_prompt", [1, 3])
@pytest.mark.parametrize("guided", [True, False])
def test_encode_prompt_matches_diffusers(pipes, per_prompt, guided):
    ref, ours = pipes
    args = ("a cat in a field", torch.device("cpu"), per_prompt, guided)
    want = ref.encode_prompt(*args, negative_prompt="dark")
    got = ours.encode_prompt(*args, negative_prompt="dark")
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)  # the same transformers module and ids
    assert got[0].shape[0] == per_prompt
    if guided:
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    else:
        assert got[1] is None and want[1] is None
    keyword = ours.encode_prompt(
        prompt=["a", "b"],
        device=torch.device("cpu"),
        num_images_per_prompt=2,
        do_classifier_free_guidance=True,
        negative_prompt_embeds=got[0][:2],
        lora_scale=1.0,
        clip_skip=None,
    )
    assert keyword[0].shape[0] == 4 and torch.equal(keyword[1][0], keyword[1][1])  # row i·r + k: prompt i


@pytest.mark.parametrize("per_prompt", [1, 2])
def test_encode_prompt_round_trip(pipes, per_prompt):
    """pipe(prompt_embeds=encode_prompt(...)) is the prompt run, video for video."""
    _, ours = pipes
    text, negative = ours.encode_prompt(
        "a cat in a field", torch.device("cpu"), per_prompt, True, negative_prompt="dark"
    )
    by_text = run(ours, negative_prompt="dark", num_videos_per_prompt=per_prompt)
    by_embeds = run(ours, prompt=None, prompt_embeds=text, negative_prompt_embeds=negative)
    assert by_text.shape[0] == per_prompt
    np.testing.assert_array_equal(by_embeds, by_text)


@pytest.fixture
def overflowing_vae():
    """The demo pipeline's VAE in float16, decoder input conv scaled by 1e5: its activations pass 65504."""
    pipe = tiny_pipeline(0, torch_dtype=torch.float16)
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(1e5)
    return pipe


@torch.no_grad()
def test_half_vae_overflow_is_decoded_in_float32(overflowing_vae, caplog):
    pipe = overflowing_vae
    vae = pipe.vae
    latents = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0)).half()  # (b, c, f, h, w)
    assert not torch.isfinite(vae.decode(latents[:, :, 0] / vae.config.scaling_factor)).all()  # it overflows
    weights = copy.deepcopy(vae.state_dict())
    # The float32 decode of the same float16 decoder input (z = latents / scaling_factor, rounded to float16
    # as decode_latents computes it), in the same chunks (conv kernels may depend on the batch size).
    z = rearrange(1 / vae.config.scaling_factor * latents, "b c f h w -> (b f) c h w")
    vae32 = copy.deepcopy(vae).float()
    reference = rearrange(
        torch.cat([vae32.decode(chunk.float()) for chunk in z.split(2)]), "(b f) c h w -> b c f h w", b=1
    )
    with caplog.at_level(logging.WARNING, logger="pia_torch"):
        video = decode_latents(vae, latents, chunk_size=2)
    assert torch.isfinite(video).all()
    # the same float32 ops on the same values: equal up to float32 rounding of the output's magnitude
    torch.testing.assert_close(
        video, reference, atol=64 * torch.finfo(torch.float32).eps * float(reference.abs().max()), rtol=0
    )
    assert [r.getMessage().count("overflowed on 2 of 2 chunks") for r in caplog.records] == [1]
    assert all(torch.equal(t, weights[k]) and t.dtype == torch.float16 for k, t in vae.state_dict().items())


def test_half_pipeline_writes_no_black_frames(overflowing_vae):
    frames = overflowing_vae(
        image(32, 32),
        "hills",
        num_frames=2,
        num_inference_steps=1,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert np.isfinite(frames).all() and frames.std() > 0
