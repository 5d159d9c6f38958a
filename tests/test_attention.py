"""Attention maps: the manual softmax path equals SDPA, and processors read or replace any layer's attention.

Tolerances come from float32 rounding, not from a run: `attention_tol` bounds |manual - SDPA| for one
attention call, and in the UNet the recording path may differ from SDPA by a few times the UNet's own
float32 rounding error, measured against the same UNet in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange

from pia_torch.config import tiny_unet
from pia_torch.models.attention import (
    Attention,
    AttentionRecorder,
    attention,
    attention_weights,
    manual_attention,
    set_attention_processor,
)
from pia_torch.models.unet import UNet

EPS = torch.finfo(torch.float32).eps


def attention_tol(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> float:
    """A float32 rounding bound for |manual - SDPA| (either may round in any order or block size).

    Each logit q·k/sqrt(d) is a sum of d products: its error is about eps·sqrt(d)·Σ|q_i k_i|/sqrt(d)
    = eps·Σ|q_i k_i|. A logit error δ moves the softmax weights by a relative δ, hence the output by
    up to 2δ·max|v|; the weighted sum over m keys adds about eps·sqrt(m)·max|v|.
    """
    qh, kh = (rearrange(x.abs(), "N n (nh d) -> N nh n d", nh=heads) for x in (q, k))
    logit_err = EPS * (qh @ kh.transpose(-1, -2)).max().item()
    return (2 * logit_err + EPS * k.shape[1] ** 0.5) * v.abs().max().item()


CASES = {  # (N, n, m, heads, d): queries n, keys m
    "self": (3, 64, 64, 2, 16),  # spatial attn1: ((b f), h·w, h·w)
    "cross": (2, 48, 7, 4, 8),  # spatial attn2: text keys
    "shared-text": (1, 4 * 64, 7, 2, 16),  # (b, f·h·w, l): frames folded into the queries
    "temporal": (2 * 8 * 8, 16, 16, 8, 40),  # motion: ((b h w), f, f)
    "vae-mid": (1, 256, 256, 1, 64),  # one head over h·w
}


@pytest.mark.parametrize("case", CASES)
def test_manual_attention_equals_sdpa(case):
    n_rows, n, m, heads, d = CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n_rows, n, heads * d, generator=g)
    k, v = (torch.randn(n_rows, m, heads * d, generator=g) for _ in range(2))
    out, weights = manual_attention(q, k, v, heads)
    assert out.shape == (n_rows, n, heads * d) and weights.shape == (n_rows, heads, n, m)
    torch.testing.assert_close(out, attention(q, k, v, heads), atol=attention_tol(q, k, v, heads), rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(n_rows, heads, n), atol=4 * EPS * m**0.5, rtol=0)
    assert torch.equal(weights, attention_weights(q, k, heads))


def test_manual_attention_keeps_dtype():
    q = k = v = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    out, weights = manual_attention(q, k, v, heads=2)
    assert out.dtype == torch.bfloat16 and weights.dtype == torch.float32


def tiny() -> tuple[UNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    unet = UNet(tiny_unet()).eval()
    g = torch.Generator().manual_seed(1)
    return unet, torch.randn(1, 9, 4, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g)


@torch.no_grad()
def test_processors_read_and_replace_the_unet_attention():
    unet, x, text = tiny()
    default = unet(x, 999, text)
    # Both fp32 paths are within the UNet's rounding error of the exact result, so within about twice it of
    # each other: allow 4x the fp32 error against a float64 copy (also a scale for "changed" below).
    rounding = (default.double() - copy.deepcopy(unet).double()(x.double(), 999, text.double())).abs().max().item()

    recorder = AttentionRecorder(unet)
    up1 = set_attention_processor(unet, recorder, where=lambda name: name.startswith("up_blocks.1.motion_modules."))
    assert up1 == [f"up_blocks.1.motion_modules.{j}.transformer_blocks.0.attn{a}" for j in (0, 1) for a in (1, 2)]
    recorded = unet(x, 999, text)
    torch.testing.assert_close(recorded, default, atol=4 * rounding, rtol=0)
    assert list(recorder.maps) == up1
    for weights in recorder.maps.values():
        assert weights.shape == (1 * 16 * 16, 2, 4, 4)  # ((b h w), nh, f, f) at up block 1's 16x16
        torch.testing.assert_close(weights.sum(-1), torch.ones(256, 2, 4), atol=4 * EPS * 4**0.5, rtol=0)

    # Shared text: the frames are folded into the queries of the cross-attention.
    shared = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    set_attention_processor(unet, recorder, where=lambda name: name == shared)
    unet(x, 999, text)
    assert recorder.maps[shared].shape == (1, 2, 4 * 16 * 16, 7)  # (b, nh, f·h·w, l)
    unet(x, 999, text.repeat_interleave(4, dim=0))  # per-frame text: ((b f), nh, h·w, l)
    assert recorder.maps[shared].shape == (4, 2, 16 * 16, 7)

    def no_attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(q)

    set_attention_processor(unet, no_attention, where=lambda name: name.startswith("up_blocks.1.motion_modules."))
    changed = unet(x, 999, text)
    assert (changed - default).abs().max() > 1e3 * rounding

    assert len(set_attention_processor(unet, None)) == sum(isinstance(m, Attention) for m in unet.modules())
    assert all(m.processor is None for m in unet.modules() if isinstance(m, Attention))
    assert torch.equal(unet(x, 999, text), default)


def test_set_attention_processor_rejects_a_filter_that_matches_nothing():
    unet, _, _ = tiny()
    with pytest.raises(ValueError, match="no Attention"):
        set_attention_processor(unet, None, where=lambda name: name.startswith("up_blocks.9."))
