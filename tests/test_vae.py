"""AutoencoderKL parity against diffusers 0.42.1 (fp32, CPU, max abs ≤ 1e-4).

The reference is conftest's `make_vae(size)` (seeded random weights, no constant layer); pia_torch's
VAE is loaded from the folder diffusers saved (`pia_torch.loading.load_vae`). `copy_of` copies the
weights directly through the three CONTRACT renames (module-tree and perturbation tests).
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_ATOL, fan_in, make_vae, tol

from pia_torch.config import VAEConfig
from pia_torch.loading import load_vae
from pia_torch.models.vae import AutoencoderKL, DiagonalGaussian

TOL = dict(atol=MODEL_ATOL, rtol=0)  # DESIGN.md §5 contract, for pia_torch vs diffusers on the same batches
RENAMES = [("downsamplers.0.", "downsample."), ("upsamplers.0.", "upsample."), ("to_out.0.", "to_out.")]
# Non-square inputs for each size: "tiny" downsamples ×2 (2 levels), "small" ×8 (4 levels).
PIXELS = {"tiny": (20, 12), "small": (40, 24)}


def renamed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for old, new in RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def copy_of(ref) -> AutoencoderKL:
    """A pia_torch VAE holding the weights of the diffusers VAE `ref`."""
    vae = AutoencoderKL(VAEConfig.from_diffusers(dict(ref.config))).eval()
    vae.load_state_dict(renamed(ref.state_dict()), strict=True)
    return vae


_PAIRS: dict[str, tuple] = {}


@pytest.fixture
def pair(size, checkpoints):
    """(diffusers reference, pia_torch VAE) for `size`, built once per session; tests reset the switches."""
    if size not in _PAIRS:
        ref = make_vae(size)
        ours = load_vae(checkpoints(size)["vae"])
        _PAIRS[size] = (ref, ours.eval())
    ref, ours = _PAIRS[size]
    for model in (ref, ours):
        model.disable_slicing()
        model.disable_tiling()
    return ref, ours


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(n: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))


def test_module_tree_is_the_renamed_checkpoint_tree():
    ref = make_vae("small")
    ours = AutoencoderKL(VAEConfig.from_diffusers(dict(ref.config)))
    expected = {k: tuple(v.shape) for k, v in renamed(ref.state_dict()).items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


@torch.no_grad()
def test_posterior_parity(pair, size):
    ref, ours = pair
    x = images(2, *PIXELS[size])
    want, got = ref.encode(x).latent_dist, ours.encode(x)
    assert isinstance(got, DiagonalGaussian) and got.mean.shape == want.mean.shape
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **TOL, msg=name)
    torch.testing.assert_close(got.mode(), want.mode(), **TOL)
    sample = got.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, want.sample(torch.Generator().manual_seed(7)), **TOL)
    assert not torch.allclose(sample, got.mode())  # the noise is really drawn


@torch.no_grad()
def test_decode_parity(pair, size):
    ref, ours = pair
    h, w = (p // (2 ** (len(ours.config.block_out_channels) - 1)) for p in PIXELS[size])
    z = latents(2, h, w)
    out = ours.decode(z)
    assert out.shape == (2, 3, *PIXELS[size])
    torch.testing.assert_close(out, ref.decode(z).sample, **TOL)


@torch.no_grad()
def test_slicing(pair, size):
    ref, ours = pair
    x = images(3, *PIXELS[size])
    z = latents(3, 6, 4)
    plain_moments, plain_pixels = ours.encode(x).moments, ours.decode(z)
    ours.enable_slicing()
    ref.enable_slicing()
    sliced_moments, sliced_pixels = ours.encode(x).moments, ours.decode(z)
    # One sample at a time: conv kernels chosen for batch 1 sum in another order than for batch 3 (diffusers
    # moves its own "small" pixels, max ≈ 3.5, by ~1e-5), so slicing agrees within rounding through the
    # encoder / decoder, absolute from the largest value (a near-zero pixel carries its neighbours' error).
    encoder_depth = fan_in(ours.encoder) + fan_in(ours.quant_conv)
    decoder_depth = fan_in(ours.post_quant_conv) + fan_in(ours.decoder)
    torch.testing.assert_close(sliced_moments, plain_moments, **tol(plain_moments, encoder_depth))
    torch.testing.assert_close(sliced_pixels, plain_pixels, **tol(plain_pixels, decoder_depth))
    torch.testing.assert_close(sliced_moments, ref.encode(x).latent_dist.parameters, **TOL)
    torch.testing.assert_close(sliced_pixels, ref.decode(z).sample, **TOL)
    ours.disable_slicing()
    assert not ours.use_slicing


# "small": sample_size 64 -> 8-latent tiles; tiles start every 48 px / 6 latents, so 160×96 px
# (20×12 latents) gives 4 rows × 2 columns of tiles, including a thin last row (blend band clipped).
# Blending copy-on-write instead of in place (spec/vae.md §7) misses these by 0.37 (encode) and 1.4 (decode).
@torch.no_grad()
@pytest.mark.parametrize("size", ["small"])
def test_tiled_encode(pair):
    ref, ours = pair
    x = images(2, 160, 96)
    untiled = ours.encode(x).moments
    ours.enable_tiling()
    ref.enable_tiling()
    got, want = ours.encode(x), ref.encode(x).latent_dist
    assert got.moments.shape == (2, 8, 20, 12)
    torch.testing.assert_close(got.moments, want.parameters, **TOL)
    torch.testing.assert_close(got.std, want.std, **TOL)
    assert (got.moments - untiled).abs().max() > 1e-2  # tiling was really used


@torch.no_grad()
@pytest.mark.parametrize("size", ["small"])
@pytest.mark.parametrize("slicing", [False, True])
def test_tiled_decode(pair, slicing):
    ref, ours = pair
    z = latents(2, 14, 10)  # tiles at latent rows 0, 6, 12 and columns 0, 6
    untiled = ours.decode(z)
    for model in (ours, ref):
        model.enable_tiling()
        if slicing:
            model.enable_slicing()
    got = ours.decode(z)
    assert got.shape == (2, 3, 112, 80)
    torch.testing.assert_close(got, ref.decode(z).sample, **TOL)
    assert (got - untiled).abs().max() > 1e-2  # tiling was really used
    ours.disable_tiling()
    assert not ours.use_tiling


@torch.no_grad()
def test_inputs_within_one_tile_are_not_tiled(pair, size):
    ref, ours = pair
    z = latents(1, 3, 5)
    plain = ours.decode(z)
    ours.enable_tiling()
    torch.testing.assert_close(ours.decode(z), plain, atol=0, rtol=0)


def test_sample_takes_one_generator():
    posterior = DiagonalGaussian(torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError):
        posterior.sample([torch.Generator()])
    assert posterior.sample(torch.Generator().manual_seed(0)).dtype == torch.float32
    assert posterior.std.eq(1).all() and posterior.mode().eq(0).all()


@torch.no_grad()
def test_parity_detects_one_perturbed_weight():
    ref = make_vae("tiny")
    ours = copy_of(ref)
    z = latents(1, 6, 4)
    torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, **TOL)
    ours.decoder.up_blocks[0].resnets[1].conv2.weight[0, 0, 1, 1] += 0.05
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, **TOL)
