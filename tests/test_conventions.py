"""Issue #6 (UNet part): the two GroupNorm conventions (spec original_pia.md §1.1).

"original" (default): ResNet norm1/norm2 (down, mid, up) and conv_norm_out pool statistics over all
frames of a video; each motion module's input norm normalises every frame on its own.
"diffusers": the reverse, as UNetMotionModel. The reference for "original" is diffusers' model with
its norms re-wired here, inside the test only.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_ATOL, copy_from_diffusers, fan_in, inputs, load_pia, randomize_, reference_unet, tol
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from einops import rearrange
from torch import nn

from pia_torch.loading import MotionAdapter, load_unet
from pia_torch.models.blocks import ResnetBlock, group_norm
from pia_torch.models.motion import TemporalTransformer


def pooled_group_norm(x: torch.Tensor, norm: nn.GroupNorm, frames: int) -> torch.Tensor:
    """The definition: F.group_norm on the 5-D video (b, c, f, h, w), stats over (c/g, f, h, w)."""
    video = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
    out = F.group_norm(video, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return rearrange(out, "b c f h w -> (b f) c h w")


class PooledNorm(nn.Module):
    """Test-only patch for diffusers' resnet norms / conv_norm_out: ((b f), c, h, w) pooled over frames."""

    def __init__(self, norm: nn.GroupNorm, frames: int) -> None:
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_group_norm(x, self.norm, self.frames)


class PerFrameNorm(nn.Module):
    """Test-only patch for diffusers' motion-module norm, which it calls on (b, c, f, h, w)."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        out = self.norm(rearrange(x, "b c f h w -> (b f) c h w"))  # each frame on its own
        return rearrange(out, "(b f) c h w -> b c f h w", f=frames)


def rewire_to_original(ref: nn.Module, frames: int) -> nn.Module:
    """A copy of diffusers' UNetMotionModel with the original PIA GroupNorm conventions."""
    ref = copy.deepcopy(ref)
    for module in ref.modules():
        if isinstance(module, ResnetBlock2D):
            module.norm1, module.norm2 = PooledNorm(module.norm1, frames), PooledNorm(module.norm2, frames)
        elif isinstance(module, AnimateDiffTransformer3D):
            module.norm = PerFrameNorm(module.norm)
    ref.conv_norm_out = PooledNorm(ref.conv_norm_out, frames)
    return ref


# ------------------------------------------------------------------------------ (a) each affected block


@pytest.mark.parametrize("frames", [2, 5])
def test_group_norm_pools_over_frames(frames):
    norm = randomize_(nn.GroupNorm(4, 16, eps=1e-5), 3)
    x = torch.randn(2 * frames, 16, 3, 5) * torch.linspace(0.5, 3, frames).repeat(2)[:, None, None, None]
    with torch.no_grad():
        want = pooled_group_norm(x, norm, frames)
        group = 16 // 4 * frames * 3 * 5  # the statistics sum (c/g, f, h, w) values
        torch.testing.assert_close(group_norm(x, norm, frames), want, **tol(want, group))
        assert (group_norm(x, norm, frames) - norm(x)).abs().max() > 0.1  # pooling really changes the result


@pytest.mark.parametrize("cin,cout", [(16, 16), (16, 32)])
def test_resnet_block_pooled_over_frames(cin, cout):
    torch.manual_seed(0)
    block = randomize_(ResnetBlock(cin, cout, temb_channels=24, groups=4, eps=1e-5), 1).eval()
    frames = 3
    x, temb = torch.randn(2 * frames, cin, 6, 5), torch.randn(2 * frames, 24)
    with torch.no_grad():
        h = block.conv1(F.silu(pooled_group_norm(x, block.norm1, frames)))
        h = h + F.linear(F.silu(temb), block.time_emb_proj.weight, block.time_emb_proj.bias)[:, :, None, None]
        h = block.conv2(F.silu(pooled_group_norm(h, block.norm2, frames)))
        want = (x if cin == cout else block.conv_shortcut(x)) + h
        torch.testing.assert_close(block(x, temb, frames), want, **tol(want, fan_in(block)))


@pytest.mark.parametrize("frames", [1, 3, 8])
def test_motion_module_norm_per_frame(frames):
    c, heads, groups = 32, 4, 8
    torch.manual_seed(0)
    ref = randomize_(
        AnimateDiffTransformer3D(
            num_attention_heads=heads,
            attention_head_dim=c // heads,
            in_channels=c,
            norm_num_groups=groups,
            positional_embeddings="sinusoidal",
            num_positional_embeddings=32,
            double_self_attention=True,
        ).eval(),
        1,
    )
    block = TemporalTransformer(c, heads=heads, groups=groups, max_seq_length=32, norm_over_frames=False)
    copy_from_diffusers(block, ref)
    ref.norm = PerFrameNorm(ref.norm)
    x = torch.randn(2 * frames, c, 3, 4) * torch.linspace(0.5, 3, frames).repeat(2)[:, None, None, None]
    with torch.no_grad():
        want = ref(x, num_frames=frames)
        torch.testing.assert_close(block(x, frames), want, **tol(want, fan_in(ref)))


def test_unet_routes_each_norm_by_convention(checkpoints):
    """Every ResNet norm and conv_norm_out sees the 5-D video in "original", every motion norm one frame."""
    for convention in ("original", "diffusers"):
        model = load_pia(checkpoints, "tiny", convention)
        seen: dict[str, int] = {}
        hooks = [
            m.register_forward_hook(lambda m, args, out, name=name, seen=seen: seen.__setitem__(name, args[0].ndim))
            for name, m in model.named_modules()
            if isinstance(m, nn.GroupNorm)
        ]
        x, text = inputs("tiny", 2, 3)
        with torch.no_grad():
            model(x, 10, text)
        for hook in hooks:
            hook.remove()
        pooled = {name for name, ndim in seen.items() if ndim == 5}
        resnet_norms = {n for n in seen if ".resnets." in n} | {"conv_norm_out"}
        motion_norms = {n for n in seen if ".motion_modules." in n}
        assert len(resnet_norms) == 2 * (2 * 2 + 2 + 2 * 3) + 1 and len(motion_norms) == 2 + 2 + 1 + 3 + 3
        assert pooled == (resnet_norms if convention == "original" else motion_norms)


# ------------------------------------------------------------------------------- (b) one frame vs many


@torch.no_grad()
def test_conventions_agree_on_one_frame_and_differ_on_many(size, checkpoints):
    original, diffusers = load_pia(checkpoints, size, "original"), load_pia(checkpoints, size, "diffusers")
    x, text = inputs(size, 2, 1)
    # the same math, but the motion norms see (b f) c h w in one and b c 1 h w in the other: rounding only
    want = diffusers(x, 600, text)
    torch.testing.assert_close(original(x, 600, text), want, **tol(want, fan_in(diffusers)))
    x, text = inputs(size, 2, 4)
    assert (original(x, 600, text) - diffusers(x, 600, text)).abs().max() > 1e-2


# ------------------------------------------------------------------- (c) whole UNet vs re-wired diffusers


@pytest.mark.parametrize("b,f,hw", [(2, 4, (8, 8)), (1, 3, (9, 12))])
@torch.no_grad()
def test_original_unet_matches_rewired_diffusers(size, checkpoints, b, f, hw):
    folders = checkpoints(size)
    model = load_unet(folders["unet"], MotionAdapter.from_pretrained(folders["adapter"]))  # default convention
    assert model.config.convention == "original"
    ref = rewire_to_original(reference_unet(size), f)
    x, text = inputs(size, b, f, hw)
    want = ref(x, 750, text.repeat_interleave(f, dim=0)).sample
    assert (model(x, 750, text) - want).abs().max().item() <= MODEL_ATOL
    assert (reference_unet(size)(x, 750, text.repeat_interleave(f, dim=0)).sample - want).abs().max() > 1e-2
