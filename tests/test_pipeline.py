"""The whole pipeline against diffusers 0.42.1 `PIAPipeline` (fp32, CPU, convention="diffusers").

Both sides get the same tiny random weights (saved by diffusers as a hub-shaped folder), the same image
at the requested size, the same prompt and the same generator seed; frames (output_type="np") must
agree to 1e-3 (DESIGN.md §5), latents at every step in test_ddim_every_step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import make_adapter, make_unet2d, make_vae, randomize_
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import pia_torch.sampling as pia_sampling
from pia_torch.demo import ASSETS, demo_image
from pia_torch.loading import MotionAdapter
from pia_torch.pipeline import PIAPipeline, mask_coefficients

TOL = 1e-3
# spec/unet_motion.md §1.4: the tiny DDIM of diffusers' PIA fast test
TINY_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
# A runwayml-era SD1.5 scheduler_config.json (spec/schedulers.md §3.1)
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}


# --------------------------------------------------------------------------------------------- fixtures

def make_text_encoder(seed: int = 30) -> CLIPTextModel:
    """spec/unet_motion.md §1.4's tiny CLIP text tower (hidden 8 = the tiny UNet's cross_attention_dim)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=8, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                            vocab_size=1000, layer_norm_eps=1e-5, bos_token_id=527, eos_token_id=528, pad_token_id=528)
    return randomize_(CLIPTextModel(config).eval(), seed + 1)


def save_base(root: Path, scheduler_config: dict | None = None) -> Path:
    """A hub-shaped SD1.5-style folder of tiny components; returns root."""
    make_unet2d("tiny").save_pretrained(root / "unet")
    make_vae("tiny").save_pretrained(root / "vae")
    make_text_encoder().save_pretrained(root / "text_encoder")
    shutil.copytree(ASSETS / "tokenizer", root / "tokenizer")
    if scheduler_config is None:
        diffusers.DDIMScheduler(**TINY_DDIM).save_pretrained(root / "scheduler")
    else:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", json.loads((root / "scheduler" / "scheduler_config.json").read_text())["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on two shared, contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pia_tiny")
    make_adapter("tiny").save_pretrained(root / "adapter")
    return {"base": save_base(root / "base"), "adapter": root / "adapter"}


@pytest.fixture(scope="session")
def reference(folders) -> diffusers.PIAPipeline:
    """diffusers' PIAPipeline on the same weights."""
    pipe = diffusers.PIAPipeline(
        vae=make_vae("tiny"), text_encoder=make_text_encoder(), tokenizer=CLIPTokenizer.from_pretrained(ASSETS / "tokenizer"),
        unet=make_unet2d("tiny"), motion_adapter=diffusers.MotionAdapter.from_pretrained(folders["adapter"]),
        scheduler=diffusers.DDIMScheduler(**TINY_DDIM))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ours_session(folders) -> PIAPipeline:
    pipe = PIAPipeline.from_pretrained(folders["base"], motion_adapter=MotionAdapter.from_pretrained(folders["adapter"]),
                                       convention="diffusers")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipes(reference, ours_session):
    """(diffusers, pia_torch), each with a fresh tiny DDIM and FreeInit / FreeU off."""
    for pipe, module in ((reference, diffusers), (ours_session, pia_sampling)):
        pipe.scheduler = module.DDIMScheduler(**TINY_DDIM)
        pipe.disable_free_init()
        pipe.disable_freeu()
    yield reference, ours_session


def image(width: int = 16, height: int = 16):
    return demo_image().resize((width, height))


def run(pipe, seed: int = 0, **kwargs):
    args = dict(image=image(), prompt="a cat in a field", num_frames=4, num_inference_steps=3, output_type="np")
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).frames


def assert_parity(pipes, **kwargs) -> float:
    ref, ours = (run(p, **kwargs) for p in pipes)
    assert ref.shape == ours.shape and ours.dtype == np.float32
    err = float(np.abs(ref - ours).max())
    assert err <= TOL, err
    return err


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
    for (_, a), (_, b) in zip(steps["ref"], steps["ours"]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    assert np.abs(steps["ref_frames"] - steps["ours_frames"]).max() <= TOL


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
        if output_type != "np":
            torch.testing.assert_close(b, a, atol=TOL, rtol=0)
    a, b = run(ref, output_type="pil"), run(ours, output_type="pil")
    assert len(a) == len(b) == 1 and len(b[0]) == 4 and b[0][0].size == (16, 16) and b[0][0].mode == "RGB"
    assert max(np.abs(np.asarray(x, int) - np.asarray(y, int)).max() for x, y in zip(a[0], b[0])) <= 1
    (frames,) = ours(image(), "a cat", num_frames=4, num_inference_steps=1, output_type="latent", return_dict=False)
    assert frames.shape == (1, 4, 4, 8, 8)
    with pytest.raises(ValueError):
        ours(image(), "a cat", output_type="gif")


def test_decode_variants_agree(pipes):
    """decode_chunk_size and VAE slicing change only the conv batching (~1e-7)."""
    _, ours = pipes
    plain = run(ours, num_inference_steps=2)
    chunked = run(ours, num_inference_steps=2, decode_chunk_size=3)
    ours.enable_vae_slicing()
    try:
        sliced = run(ours, num_inference_steps=2)
    finally:
        ours.disable_vae_slicing()
    np.testing.assert_allclose(chunked, plain, atol=1e-5)
    np.testing.assert_allclose(sliced, plain, atol=1e-5)


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
        "<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"]
    img = demo_image()
    assert img.size == (64, 64) and img.mode == "RGB"
    pipe.set_progress_bar_config(disable=True)
    frames = run(pipe, image=img, num_inference_steps=2)
    assert frames.shape == (1, 4, 32, 32, 3) and np.isfinite(frames).all()
    again = tiny_pipeline(seed=1, convention="diffusers")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(again, image=img, num_inference_steps=2), frames)
