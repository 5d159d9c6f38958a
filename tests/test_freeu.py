"""FreeU (spec unet_motion.md §8) against diffusers' UNetMotionModel.enable_freeu (fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODEL_ATOL, inputs, load_pia, reference_unet, tol

from pia_torch.models.unet import fourier_filter

VIDEO = (0.9, 0.2, 1.2, 1.4)  # s1, s2, b1, b2: the values diffusers suggests for video pipelines


@torch.no_grad()
def run(model, ref, x, t, text, factors):
    """(pia, diffusers) outputs with FreeU set to `factors` (None: off) on both."""
    ref = copy.deepcopy(ref)  # the cached reference stays without FreeU
    if factors is None:
        model.disable_freeu()
        ref.disable_freeu()
    else:
        model.enable_freeu(*factors)
        ref.enable_freeu(*factors)
    return model(x, t, text), ref(x, t, text.repeat_interleave(x.shape[2], dim=0)).sample


@pytest.mark.parametrize("factors", [VIDEO, (1.1, 0.6, 1.5, 1.6)])
def test_freeu_matches_diffusers(size, checkpoints, factors):
    model, ref = load_pia(checkpoints, size), reference_unet(size)
    x, text = inputs(size, 2, 3)
    got, want = run(model, ref, x, 700, text, factors)
    plain, _ = run(model, ref, x, 700, text, None)
    assert (got - want).abs().max().item() <= MODEL_ATOL
    assert (got - plain).abs().max().item() > 1e-2  # FreeU is really on


def test_freeu_factor_zero_disables_and_disable_restores(checkpoints):
    model, ref = load_pia(checkpoints, "small"), reference_unet("small")
    x, text = inputs("small", 1, 4)
    plain, want_plain = run(model, ref, x, 300, text, None)
    assert (plain - want_plain).abs().max().item() <= MODEL_ATOL
    zero, want_zero = run(model, ref, x, 300, text, (0.9, 0.2, 0.0, 1.4))  # any factor 0: FreeU off
    assert torch.equal(zero, plain)
    assert (zero - want_zero).abs().max().item() <= MODEL_ATOL
    run(model, ref, x, 300, text, VIDEO)
    restored, _ = run(model, ref, x, 300, text, None)
    assert torch.equal(restored, plain)
    assert "freeu=None" in repr(model)


@pytest.mark.parametrize("hw", [(8, 8), (4, 6), (5, 7), (1, 3)])
def test_fourier_filter_matches_diffusers(hw):
    from diffusers.utils.torch_utils import fourier_filter as ref_filter

    x = torch.randn(2, 6, *hw)
    want = ref_filter(x, 1, 0.2)
    # an FFT and its inverse, each output a sum over the h·w values of one map
    torch.testing.assert_close(fourier_filter(x, 1, 0.2), want, **tol(want, 2 * hw[0] * hw[1]))
    half = x.to(torch.bfloat16)
    out = fourier_filter(half, 1, 0.2)
    assert out.dtype == torch.bfloat16
    # both compute in float32 and round once to bfloat16: torch's bfloat16 defaults (rtol 1.6e-2 ≈ 2 ulps)
    torch.testing.assert_close(out, ref_filter(half, 1, 0.2))
