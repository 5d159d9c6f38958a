"""UNet/VAE building blocks: timestep embedding, ResNet block, resampling, spatial transformer.

Mirrors diffusers 0.42.1 `models/embeddings.py` (`get_timestep_embedding`), `models/resnet.py`
(`ResnetBlock2D`), `models/downsampling.py`, `models/upsampling.py` and
`models/transformers/transformer_2d.py` (`Transformer2DModel`, continuous input, conv projections).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import TransformerBlock


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0) -> Tensor:
    """Sinusoidal timestep embedding, (b,) -> (b, dim) float32; t may be fractional (Euler).

    Same float32 operation order as diffusers' `get_timestep_embedding` (multiply, then divide).
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (b, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (b, dim): an odd dim gets one zero column


def group_norm(x: Tensor, norm: nn.GroupNorm, frames: int = 1) -> Tensor:
    """Apply `norm` to x ((b f), c, h, w) with statistics pooled over `frames` consecutive rows.

    frames=1: an ordinary per-image GroupNorm. frames=f: one set of statistics per video and group,
    over (c/g, f, h, w) -- the original PIA convention for its 3-D ResNet norms.
    """
    if frames == 1:
        return norm(x)
    x = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
    x = norm(x)  # GroupNorm over (c/g, f, h, w): stats span frames
    return rearrange(x, "b c f h w -> (b f) c h w")


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 (+ time embedding) -> GN -> SiLU -> conv3x3, plus the (1x1) shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None, frames: int = 1) -> Tensor:
        """x (N, c_in, h, w), temb (N, temb_c), (n, temb_c) shared by N/n consecutive rows (the frames of
        a video: projected once per video, not per frame), or None -> (N, c_out, h, w).

        frames > 1: GroupNorm statistics are pooled over `frames` consecutive rows of N = (b f).
        """
        h = self.conv1(F.silu(group_norm(x, self.norm1, frames)))
        if temb is not None:
            t = self.time_emb_proj(F.silu(temb))  # (n, c_out), broadcast over the N/n rows that share it
            h = (h.unflatten(0, (t.shape[0], -1)) + t[:, None, :, None, None]).flatten(0, 1)
        h = self.conv2(F.silu(group_norm(h, self.norm2, frames)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. padding=1: UNet (symmetric); padding=0: VAE (pad right/bottom by one first)."""

    def __init__(self, channels: int, *, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, c, h, w) -> (N, c, ceil(h/2), ceil(w/2)) for padding=1, (N, c, h//2, w//2) for padding=0."""
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (N, c, h+1, w+1)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to `size`), then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """x (N, c, h, w) -> (N, c, 2h, 2w), or (N, c, *size) when the skip size is forwarded."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (N, c, 2h, 2w)
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # (N, c, *size)
        return self.conv(x)


class SpatialTransformer(nn.Module):
    """Per-frame spatial self- and cross-attention (`Transformer2DModel`): GN, 1x1 conv, block, 1x1 conv."""

    def __init__(self, channels: int, *, heads: int, context_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x ((b f), c, h, w); context ((b f), l, d) per frame or (b, l, d) shared -> ((b f), c, h, w)."""
        _, _, height, width = x.shape
        h = rearrange(self.proj_in(self.norm(x)), "N c h w -> N (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context)
        h = rearrange(h, "N (h w) c -> N c h w", h=height, w=width).contiguous()  # NCHW, as diffusers
        return self.proj_out(h) + x
