"""The PIA UNet: SD1.5's UNet with motion modules and a 9-channel input (latent, mask, condition).

Mirrors diffusers 0.42.1 `UNetMotionModel` (`models/unets/unet_motion_model.py`) with
`convention="diffusers"`, and the original open-mmlab/PIA `UNet3DConditionModel` with
`convention="original"` (the default; see `UNetConfig`). FreeU follows `utils/torch_utils.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from pia_torch.config import UNetConfig

from .blocks import Downsample, ResnetBlock, SpatialTransformer, Upsample, group_norm, timestep_embedding
from .motion import TemporalTransformer


def fourier_filter(x: Tensor, threshold: int, scale: float) -> Tensor:
    """FreeU: scale the 2*threshold square of lowest frequencies of each (h, w) map, in float32.

    x (N, c, h, w) -> same shape and dtype. The square spans rows h//2-t .. h//2+t-1 (asymmetric
    around DC for t=1), as diffusers' `fourier_filter`.
    """
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = x.shape[-2:]
    mask = torch.ones(x.shape, device=x.device)
    rows = slice(height // 2 - threshold, height // 2 + threshold)
    mask[..., rows, width // 2 - threshold : width // 2 + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def _resnet(config: UNetConfig, in_channels: int, out_channels: int) -> ResnetBlock:
    return ResnetBlock(
        in_channels,
        out_channels,
        temb_channels=config.temb_channels,
        groups=config.norm_num_groups,
        eps=config.norm_eps,
    )


def _spatial(config: UNetConfig, channels: int, heads: int) -> SpatialTransformer:
    return SpatialTransformer(
        channels, heads=heads, context_dim=config.cross_attention_dim, groups=config.norm_num_groups
    )


def _motion(config: UNetConfig, channels: int, heads: int, layers: int) -> TemporalTransformer:
    # Groups: the UNet's norm_num_groups, as diffusers (the original hard-codes 32; same for SD1.5).
    return TemporalTransformer(
        channels,
        heads=heads,
        groups=config.norm_num_groups,
        max_seq_length=config.motion.max_seq_length,
        num_layers=layers,
        norm_over_frames=config.convention == "diffusers",
    )


class DownBlock(nn.Module):
    """Level i going down: layers of [resnet, (spatial attention), (motion)], then a stride-2 conv."""

    def __init__(self, config: UNetConfig, i: int) -> None:
        super().__init__()
        boc, m = config.block_out_channels, config.motion
        in_ch, out_ch = boc[max(i - 1, 0)], boc[i]
        layers = range(config.layers_per_block)
        self.resnets = nn.ModuleList(_resnet(config, in_ch if j == 0 else out_ch, out_ch) for j in layers)
        self.attentions = nn.ModuleList()
        if config.cross_attention[i]:
            self.attentions.extend(_spatial(config, out_ch, config.num_attention_heads[i]) for j in layers)
        self.motion_modules = nn.ModuleList()
        if m is not None:
            heads, depth = m.num_attention_heads[i], m.transformer_layers_per_block[i]
            self.motion_modules.extend(_motion(config, out_ch, heads, depth) for j in layers)
        self.downsample = Downsample(out_ch, padding=1) if i < len(boc) - 1 else None

    def forward(
        self, x: Tensor, temb: Tensor, text: Tensor, frames: int, norm_frames: int
    ) -> tuple[Tensor, list[Tensor]]:
        """x ((b f), c_in, h, w) -> ((b f), c, h', w') and the skips (one per layer, then the downsampled)."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb, norm_frames)
            if self.attentions:
                x = self.attentions[j](x, text)
            if self.motion_modules:
                x = self.motion_modules[j](x, frames)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)  # ((b f), c, ceil(h/2), ceil(w/2))
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet, then per layer [spatial attention, (motion), resnet]."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        m, c, heads = config.motion, config.block_out_channels[-1], config.num_attention_heads[-1]
        motion = m is not None and m.use_mid_block
        layers = range(m.mid_block_layers if motion else 1)
        self.resnets = nn.ModuleList(_resnet(config, c, c) for j in range(len(layers) + 1))
        self.attentions = nn.ModuleList(_spatial(config, c, heads) for j in layers)
        self.motion_modules = nn.ModuleList()
        if motion:
            heads, depth = m.num_attention_heads[-1], m.transformer_layers_per_mid_block
            self.motion_modules.extend(_motion(config, c, heads, depth) for j in layers)

    def forward(self, x: Tensor, temb: Tensor, text: Tensor, frames: int, norm_frames: int) -> Tensor:
        """x ((b f), c, h, w) -> ((b f), c, h, w)."""
        x = self.resnets[0](x, temb, norm_frames)
        for j, attn in enumerate(self.attentions):
            x = attn(x, text)
            if self.motion_modules:
                x = self.motion_modules[j](x, frames)
            x = self.resnets[j + 1](x, temb, norm_frames)
        return x


class UpBlock(nn.Module):
    """Level i going up: layers of [(FreeU), concat skip, resnet, (attention), (motion)], then upsample."""

    def __init__(self, config: UNetConfig, i: int) -> None:
        super().__init__()
        rev, m, n = config.block_out_channels[::-1], config.motion, len(config.block_out_channels)
        out_ch, prev_ch, skip_ch = rev[i], rev[max(i - 1, 0)], rev[min(i + 1, n - 1)]
        layers = range(config.layers_per_block + 1)
        self.resnets = nn.ModuleList()
        for j in layers:  # input = previous output (prev_ch, then out_ch) + the skip (skip_ch for the last layer)
            hidden = prev_ch if j == 0 else out_ch
            skip = skip_ch if j == config.layers_per_block else out_ch
            self.resnets.append(_resnet(config, hidden + skip, out_ch))
        cross, heads = config.up_attention[i], config.num_attention_heads[::-1][i]
        self.attentions = nn.ModuleList()
        if cross:
            self.attentions.extend(_spatial(config, out_ch, heads) for j in layers)
        self.motion_modules = nn.ModuleList()
        if m is not None:
            heads, depth = m.num_attention_heads[::-1][i], m.transformer_layers_per_block[::-1][i]
            self.motion_modules.extend(_motion(config, out_ch, heads, depth) for j in layers)
        self.upsample = Upsample(out_ch) if i < n - 1 else None

    def forward(
        self,
        x: Tensor,
        skips: list[Tensor],
        temb: Tensor,
        text: Tensor,
        frames: int,
        norm_frames: int,
        freeu: tuple[float, float] | None = None,
        size: tuple[int, int] | None = None,
    ) -> Tensor:
        """x ((b f), c_prev, h, w), skips in pop order -> ((b f), c, 2h, 2w) (or `size`)."""
        for j, resnet in enumerate(self.resnets):
            skip = skips[j]
            if freeu is not None:  # FreeU: boost half the backbone channels, damp the skip's low frequencies
                b, s = freeu
                half = x.shape[1] // 2
                x = torch.cat([x[:, :half] * b, x[:, half:]], dim=1)
                skip = fourier_filter(skip, threshold=1, scale=s)
            x = resnet(torch.cat([x, skip], dim=1), temb, norm_frames)  # hidden first, then skip
            if self.attentions:
                x = self.attentions[j](x, text)
            if self.motion_modules:
                x = self.motion_modules[j](x, frames)
        if self.upsample is not None:
            x = self.upsample(x, size)
        return x


class UNet(nn.Module):
    """x (b, c_in, f, h, w), timestep, text states -> (b, c_out, f, h, w).

    The module tree is the diffusers checkpoint tree (renames: to_out.0 -> to_out, ff.net.0.proj ->
    ff.proj_in, ff.net.2 -> ff.proj_out, downsamplers.0 -> downsample, upsamplers.0 -> upsample).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        boc, n = config.block_out_channels, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, boc[0], 3, padding=1)
        temb = config.temb_channels
        self.time_embedding = nn.ModuleDict({"linear_1": nn.Linear(boc[0], temb), "linear_2": nn.Linear(temb, temb)})
        self.down_blocks = nn.ModuleList(DownBlock(config, i) for i in range(n))
        self.mid_block = MidBlock(config)
        self.up_blocks = nn.ModuleList(UpBlock(config, i) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, boc[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(boc[0], config.out_channels, 3, padding=1)
        self.freeu: tuple[float, float, float, float] | None = None

    def extra_repr(self) -> str:
        return f"convention={self.config.convention!r}, freeu={self.freeu}"

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (arXiv 2309.11497) on up blocks 0 and 1: backbone x b1/b2, skip low frequencies x s1/s2.

        As diffusers, any factor equal to 0 leaves FreeU off.
        """
        self.freeu = (s1, s2, b1, b2)

    def disable_freeu(self) -> None:
        self.freeu = None

    def forward(self, x: Tensor, t: Tensor | float | int, text: Tensor) -> Tensor:
        """x (b, c_in, f, h, w); t a number, a 0-d tensor, or (b,); text (b, l, d) shared by all frames
        of a video, or (b*f, l, d) per frame (b-major, as diffusers). Returns (b, c_out, f, h, w).
        """
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (b, {self.config.in_channels}, f, h, w), got {tuple(x.shape)}")
        b, _, f, height, width = x.shape
        if text.ndim != 3 or text.shape[0] not in (b, b * f):
            raise ValueError(f"text must be ({b}, l, d) or ({b * f}, l, d), got {tuple(text.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t[None] if t.ndim == 0 else t
        if t.ndim != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"timestep must be a number, a 0-d tensor or ({b},), got shape {tuple(t.shape)}")

        te = self.time_embedding
        emb = timestep_embedding(t.expand(b), self.config.block_out_channels[0]).to(te.linear_1.weight.dtype)
        emb = te.linear_2(F.silu(te.linear_1(emb)))  # (b, 4 c0): shared by the f frames of a video
        # "original": ResNet norms and conv_norm_out pool statistics over the f frames of a video.
        norm_frames = f if self.config.convention == "original" else 1

        x = self.conv_in(rearrange(x, "b c f h w -> (b f) c h w"))  # ((b f), c0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, text, f, norm_frames)
            skips += block_skips
        x = self.mid_block(x, emb, text, f, norm_frames)

        # Latent sizes that are not multiples of 2^(levels - 1): upsample to the next skip's size.
        forward_size = any(s % 2 ** (len(self.up_blocks) - 1) for s in (height, width))
        freeu = []  # FreeU (backbone, skip) factors of up blocks 0 and 1; any factor 0 leaves it off
        if self.freeu is not None and all(self.freeu):
            s1, s2, b1, b2 = self.freeu
            freeu = [(b1, s1), (b2, s2)]
        for i, block in enumerate(self.up_blocks):
            block_skips = [skips.pop() for _ in block.resnets]  # LIFO
            size = tuple(skips[-1].shape[-2:]) if forward_size and block.upsample is not None else None
            x = block(x, block_skips, emb, text, f, norm_frames, freeu[i] if i < len(freeu) else None, size)

        x = self.conv_out(F.silu(group_norm(x, self.conv_norm_out, norm_frames)))  # ((b f), c_out, h, w)
        return rearrange(x, "(b f) c h w -> b c f h w", f=f)
