"""Layer 1 parity: each pia_torch block against the diffusers 0.42.1 module it mirrors (fp32, CPU).

Every reference is built here with random weights (constant ones perturbed by `randomize_`), its
weights are copied into the pia_torch block through the CONTRACT renames, and outputs are compared
within rounding: `conftest.tol` with the block's accumulation depth (`fan_in`), far below the 1e-4
contract. Sinusoidal tables run diffusers' own ops on the same shapes, so they must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from conftest import copy_from_diffusers, fan_in, randomize_, tol
from diffusers.models.attention import FeedForward as RefFeedForward
from diffusers.models.attention_processor import Attention as RefAttention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import SinusoidalPositionalEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from diffusers.models.upsampling import Upsample2D

from pia_torch.models.attention import Attention, FeedForward
from pia_torch.models.blocks import Downsample, ResnetBlock, SpatialTransformer, Upsample, timestep_embedding
from pia_torch.models.motion import TemporalTransformer, cached_frame_positions, frame_positions


def _ref(cls, *args, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(cls(*args, **kwargs).eval(), seed + 1)


@pytest.mark.parametrize("dim", [320, 32, 7])
def test_timestep_embedding_exact(dim):
    t = torch.cat([torch.arange(0, 1000, 7), torch.tensor([999, 0, 1])])
    ref = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, dim), ref(t))
    frac = torch.tensor([999.0, 937.25, 0.5, 12.3456], dtype=torch.float64)  # Euler timesteps are fractional
    assert torch.equal(timestep_embedding(frac, dim), ref(frac))
    assert torch.equal(timestep_embedding(t, dim, flip_sin_to_cos=False, shift=1), Timesteps(dim, False, 1)(t))


@pytest.mark.parametrize(
    "cin,cout,temb,groups,eps", [(32, 32, 64, 8, 1e-5), (32, 64, 64, 8, 1e-5), (16, 32, None, 4, 1e-6)]
)
def test_resnet_block(cin, cout, temb, groups, eps):
    ref = _ref(ResnetBlock2D, in_channels=cin, out_channels=cout, temb_channels=temb, groups=groups, eps=eps)
    block = copy_from_diffusers(ResnetBlock(cin, cout, temb_channels=temb, groups=groups, eps=eps), ref)
    assert (block.conv_shortcut is None) == (cin == cout)
    x = torch.randn(3, cin, 9, 7)
    e = torch.randn(3, temb) if temb else None
    with torch.no_grad():
        want = ref(x, e)
        torch.testing.assert_close(block(x, e), want, **tol(want, fan_in(ref)))


def test_resnet_block_shared_temb():
    """temb (b, c) shared by the f frames of each video = diffusers with temb repeated per frame (b f, c)."""
    ref = _ref(ResnetBlock2D, in_channels=16, out_channels=32, temb_channels=24, groups=4, eps=1e-5)
    block = copy_from_diffusers(ResnetBlock(16, 32, temb_channels=24, groups=4, eps=1e-5), ref)
    x, e = torch.randn(2 * 3, 16, 5, 4), torch.randn(2, 24)  # b = 2 videos of f = 3 frames
    with torch.no_grad():
        want = ref(x, e.repeat_interleave(3, dim=0))
        torch.testing.assert_close(block(x, e), want, **tol(want, fan_in(ref)))


@pytest.mark.parametrize("padding", [1, 0])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_downsample(padding, hw):
    ref = _ref(Downsample2D, 16, use_conv=True, out_channels=16, padding=padding, name="op")
    block = copy_from_diffusers(Downsample(16, padding=padding), ref)
    x = torch.randn(2, 16, *hw)
    with torch.no_grad():
        out, want = block(x), ref(x)
        torch.testing.assert_close(out, want, **tol(want, fan_in(ref)))
    ceil = padding == 1  # UNet: ceil(n/2); VAE (pad right/bottom, no padding): floor(n/2)
    assert out.shape[-2:] == tuple((n + ceil) // 2 for n in hw)


@pytest.mark.parametrize("size", [None, (9, 12), (5, 7)])
def test_upsample(size):
    ref = _ref(Upsample2D, 16, use_conv=True, out_channels=16)
    block = copy_from_diffusers(Upsample(16), ref)
    x = torch.randn(2, 16, 4, 6)
    with torch.no_grad():
        want = ref(x, output_size=size)
        torch.testing.assert_close(block(x, size), want, **tol(want, fan_in(ref)))


@pytest.mark.parametrize("context_dim,qkv_bias", [(None, False), (24, False), (None, True)])
def test_attention(context_dim, qkv_bias):
    ref = _ref(RefAttention, 32, heads=4, dim_head=8, cross_attention_dim=context_dim, bias=qkv_bias, out_bias=True)
    block = copy_from_diffusers(Attention(32, heads=4, dim_head=8, context_dim=context_dim, qkv_bias=qkv_bias), ref)
    x = torch.randn(3, 10, 32)
    ctx = torch.randn(3, 7, context_dim) if context_dim else None
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx)
        torch.testing.assert_close(block(x, ctx), want, **tol(want, fan_in(ref)))


def test_feed_forward_geglu():
    ref = _ref(RefFeedForward, 32, activation_fn="geglu")
    block = copy_from_diffusers(FeedForward(32), ref)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(block(x), want, **tol(want, fan_in(ref)))


def test_spatial_transformer_per_frame_and_shared_text():
    c, heads, ctx_dim, groups = 32, 4, 24, 8
    ref = _ref(
        Transformer2DModel, heads, c // heads, in_channels=c, cross_attention_dim=ctx_dim, norm_num_groups=groups
    )
    block = copy_from_diffusers(SpatialTransformer(c, heads=heads, context_dim=ctx_dim, groups=groups), ref)
    b, f = 2, 3
    x = torch.randn(b * f, c, 5, 6)
    text = torch.randn(b, 7, ctx_dim)
    per_frame = text.repeat_interleave(f, dim=0)  # ((b f), l, d), b-major like diffusers' pipeline
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=per_frame, return_dict=False)[0]
        torch.testing.assert_close(block(x, per_frame), want, **tol(want, fan_in(ref)))
        # keys/values once per video: the k/v matmuls see another batch size, so another summation order
        torch.testing.assert_close(block(x, text), want, **tol(want, fan_in(ref)))


def test_transformer_block_sums_are_contiguous_on_a_strided_input():
    """SpatialTransformer hands its block x as a strided view of NCHW memory. The residual sums must still be
    contiguous from the first one on (as in diffusers, branch + x), else every later sum and LayerNorm works on
    strided memory: on a GPU, extra copies and slow strided adds in every block. Same values either way."""
    block = SpatialTransformer(16, heads=2, context_dim=8, groups=4).transformer_blocks[0]
    torch.manual_seed(0)
    x = torch.randn(3, 16, 4, 5).flatten(2).transpose(1, 2)  # (N, h·w, c) over (N, c, h·w) memory
    assert not x.is_contiguous()
    text = torch.randn(3, 7, 8)
    with torch.no_grad():
        out = block(x, text)
        assert out.is_contiguous()
        assert torch.equal(out, block(x.contiguous(), text))


@pytest.mark.parametrize("frames", [1, 2, 5, 16])
def test_motion_module(frames):
    c, heads, groups = 32, 4, 8
    ref = _ref(
        AnimateDiffTransformer3D,
        num_attention_heads=heads,
        attention_head_dim=c // heads,
        in_channels=c,
        norm_num_groups=groups,
        positional_embeddings="sinusoidal",
        num_positional_embeddings=24,
        double_self_attention=True,
        activation_fn="geglu",
    )
    block = TemporalTransformer(c, heads=heads, groups=groups, max_seq_length=24, norm_over_frames=True)
    copy_from_diffusers(block, ref)
    x = torch.randn(2 * frames, c, 3, 5)
    with torch.no_grad():
        want = ref(x, num_frames=frames)
        torch.testing.assert_close(block(x, frames), want, **tol(want, fan_in(ref)))


def test_motion_module_rejects_too_many_frames():
    block = TemporalTransformer(16, heads=2, groups=4, max_seq_length=4, norm_over_frames=True)
    with pytest.raises(ValueError, match="max_seq_length"):
        block(torch.randn(5, 16, 2, 2), 5)


@pytest.mark.parametrize("channels,length", [(320, 32), (1280, 32), (32, 24), (8, 32)])
def test_frame_positions_bit_identical(channels, length):
    want = SinusoidalPositionalEmbedding(channels, max_seq_length=length).pe
    got = frame_positions(length, channels)
    assert got.dtype == torch.float32 and got.shape == (1, length, channels)
    assert torch.equal(got, want)


def test_cached_frame_positions():
    """Made once per (length, width, device, dtype), equal to frame_positions cast, and a normal tensor
    even when first asked for in inference mode (so a later autograd run can use it)."""
    with torch.inference_mode():
        first = cached_frame_positions(29, 48, torch.device("cpu"), torch.float16)
    assert not first.is_inference()
    assert cached_frame_positions(29, 48, torch.device("cpu"), torch.float16) is first
    assert torch.equal(first, frame_positions(29, 48).half())
    assert torch.equal(cached_frame_positions(29, 48, torch.device("cpu"), torch.float32), frame_positions(29, 48))
