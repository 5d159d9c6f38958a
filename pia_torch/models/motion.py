"""The motion module: self-attention along the frame axis at every pixel (AnimateDiff / PIA).

Mirrors diffusers 0.42.1 `AnimateDiffTransformer3D` (`models/unets/unet_motion_model.py`) and
`SinusoidalPositionalEmbedding` (`models/embeddings.py`); the original is PIA's
`TemporalTransformer3DModel` (`animatediff/models/motion_module.py`).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from .attention import TransformerBlock
from .blocks import group_norm


def frame_positions(num_positions: int, channels: int, device: torch.device | None = None) -> Tensor:
    """Sinusoidal frame embedding (1, n, c) float32: even channels sin, odd channels cos (interleaved).

    Bit-identical to diffusers' `pos_embed.pe` buffer (and PIA's `pos_encoder.pe`) on the CPU.
    """
    position = torch.arange(num_positions, device=device).unsqueeze(1)  # (n, 1) int64
    div_term = torch.exp(torch.arange(0, channels, 2, device=device) * (-math.log(10000.0) / channels))
    pe = torch.zeros(1, num_positions, channels, device=device)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


_POSITIONS: dict[tuple, Tensor] = {}


def cached_frame_positions(num_positions: int, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`frame_positions` in `dtype` on `device`, made once per (length, width, device, dtype) and shared by
    every motion module and step (a constant: never modify it in place). Under torch.compile it is
    computed in the graph, which folds it into a constant."""
    if torch.compiler.is_compiling():
        return frame_positions(num_positions, channels, device).to(dtype)
    key = (num_positions, channels, device, dtype)
    if key not in _POSITIONS:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first made in inference mode
            _POSITIONS[key] = frame_positions(num_positions, channels, device).to(dtype)
    return _POSITIONS[key]


class TemporalTransformer(nn.Module):
    """GroupNorm -> Linear -> transformer blocks over the frame axis -> Linear, plus the residual.

    Each pixel of each video is a sequence of `frames` tokens. Both attentions of a block are
    temporal self-attentions; diffusers calls the second one `attn2`, which reads like
    cross-attention but is not (its `double_self_attention=True`). The frame embedding is not a
    stored buffer: `cached_frame_positions` makes it once per width, device and dtype.
    norm_over_frames: True (diffusers) pools the input GroupNorm over all frames of a video;
    False (the original PIA) normalises each frame on its own.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        groups: int,
        max_seq_length: int,
        num_layers: int = 1,
        norm_over_frames: bool,
    ) -> None:
        super().__init__()
        self.max_seq_length = max_seq_length
        self.norm_over_frames = norm_over_frames
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads) for _ in range(num_layers))
        self.proj_out = nn.Linear(channels, channels)

    def extra_repr(self) -> str:
        return f"max_seq_length={self.max_seq_length}, norm_over_frames={self.norm_over_frames}"

    def forward(self, x: Tensor, frames: int) -> Tensor:
        """x ((b f), c, h, w) -> ((b f), c, h, w); attention runs over f for each of the b*h*w pixels."""
        if frames > self.max_seq_length:
            raise ValueError(f"{frames} frames exceed the motion module's max_seq_length={self.max_seq_length}")
        _, c, height, width = x.shape
        h = group_norm(x, self.norm, frames if self.norm_over_frames else 1)
        h = self.proj_in(rearrange(h, "(b f) c h w -> (b h w) f c", f=frames))
        pos = cached_frame_positions(self.max_seq_length, c, x.device, h.dtype)[:, :frames]  # (1, f, c)
        for block in self.transformer_blocks:
            h = block(h, pos=pos)
        h = rearrange(self.proj_out(h), "(b h w) f c -> (b f) c h w", h=height, w=width)
        return h + x
