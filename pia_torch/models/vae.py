"""AutoencoderKL: the Stable Diffusion VAE (encoder, decoder, diagonal-Gaussian posterior).

Mirrors diffusers 0.42.1 `models/autoencoders/autoencoder_kl.py` and `vae.py` (Encoder, Decoder,
DiagonalGaussianDistribution), with the blocks of `unets/unet_2d_blocks.py` (DownEncoderBlock2D,
UpDecoderBlock2D, UNetMidBlock2D). Module names are the checkpoint names, except
`downsamplers.0 -> downsample`, `upsamplers.0 -> upsample` and `to_out.0 -> to_out`.

The VAE never applies `config.scaling_factor`: the caller multiplies latents by it after `encode`
and divides by it before `decode`. Every GroupNorm in the VAE uses eps 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pia_torch.config import VAEConfig
from pia_torch.models.attention import Attention
from pia_torch.models.blocks import Downsample, ResnetBlock, Upsample

EPS = 1e-6  # GroupNorm eps everywhere in the VAE


def _resnets(in_channels: int, out_channels: int, layers: int, groups: int) -> nn.ModuleList:
    """`layers` ResnetBlocks without time embedding; only the first changes the channel count."""
    return nn.ModuleList(
        ResnetBlock(in_channels if j == 0 else out_channels, out_channels, temb_channels=None, groups=groups, eps=EPS)
        for j in range(layers)
    )


class MidAttention(Attention):
    """The VAE mid-block self-attention: GroupNorm, one head over all h·w positions, residual.

    diffusers: `Attention(c, heads=1, dim_head=c, bias=True, residual_connection=True,
    _from_deprecated_attn_block=True)`; SDPA, so `upcast_softmax` has no effect there either.
    """

    def __init__(self, channels: int, *, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, c, h, w) -> (N, c, h, w)."""
        n, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, h·w, c)
        out = super().forward(tokens)
        return out.transpose(1, 2).reshape(n, c, h, w) + x


class MidBlock(nn.Module):
    """UNetMidBlock2D: resnets[0] -> attentions[0] -> resnets[1], constant width."""

    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.resnets = _resnets(channels, channels, 2, groups)
        self.attentions = nn.ModuleList([MidAttention(channels, groups=groups)])

    def forward(self, x: Tensor) -> Tensor:
        """x (N, c, h, w) -> (N, c, h, w)."""
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nn.Module):
    """DownEncoderBlock2D: resnets, then (except at the last level) a pad-(0,1,0,1) stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        self.downsample = Downsample(out_channels, padding=0) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        """x (N, c_in, h, w) -> (N, c_out, h//2, w//2) (pad right/bottom, stride 2: floor), or (N, c_out, h, w)
        at the last level."""
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nn.Module):
    """UpDecoderBlock2D: resnets, then (except at the last level) nearest ×2 and a conv."""

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        """x (N, c_in, h, w) -> (N, c_out, 2h, 2w), or (N, c_out, h, w) at the last level."""
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Pixels -> 2·latent_channels moments (mean and log-variance), downsampled 2^(levels−1) times."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups, last = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], layers=config.layers_per_block, groups=groups, downsample=i < last)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], groups=groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, in_ch, H, W) -> (N, 2·latent_ch, H/s, W/s), s = 2^(levels−1) (floor at odd sizes)."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.functional.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents -> pixels; up blocks have layers_per_block + 1 resnets and reversed widths."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups=groups)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                ch[max(i - 1, 0)], ch[i], layers=config.layers_per_block + 1, groups=groups, upsample=i < len(ch) - 1
            )
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """z (N, latent_ch, h, w) -> (N, out_ch, h·s, w·s), s = 2^(levels−1); values ≈ [-1, 1], unclamped."""
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.functional.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)); diffusers' DiagonalGaussianDistribution.

    moments (N, 2·c, h, w): channels [0, c) are the mean, [c, 2c) the log-variance (clamped to [-30, 20]).
    """

    def __init__(self, moments: Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # (N, c, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std·ε, ε drawn like diffusers' `randn_tensor(mean.shape, generator, device, dtype)`.

        ε has the moments' dtype; a CPU generator draws on the CPU and the noise moves to the
        moments' device. One generator only: the pipeline calls this per item for a list.
        """
        if isinstance(generator, (list, tuple)):
            raise ValueError(f"sample() takes one torch.Generator, got a {type(generator).__name__}")
        device = self.moments.device
        draw_on = torch.device("cpu") if generator is not None and generator.device.type == "cpu" else device
        eps = torch.randn(self.mean.shape, generator=generator, device=draw_on, dtype=self.moments.dtype)
        return self.mean + self.std * eps.to(device)

    def mode(self) -> Tensor:
        """The mean, (N, c, h, w)."""
        return self.mean


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """Fade b's first rows (dim=2) or columns (dim=3) in from a's last ones, IN PLACE; returns b.

    Exactly diffusers' `blend_v` / `blend_h`, including the mutation: a later tile blends against
    this already-blended one (a copy-on-write version gives different pixels).
    """
    e = min(a.shape[dim], b.shape[dim], extent)
    for k in range(e):
        b.select(dim, k).copy_(a.select(dim, k - e) * (1 - k / e) + b.select(dim, k) * (k / e))
    return b


class AutoencoderKL(nn.Module):
    """encode: pixels (N, 3, H, W) in [-1, 1] -> DiagonalGaussian over (N, 4, H/8, W/8) for SD;
    decode: latents (N, 4, h, w) -> pixels (N, 3, 8h, 8w). No scaling factor inside.

    Slicing runs the batch one sample at a time; tiling splits inputs larger than one tile
    (config.sample_size pixels, sample_size / 2^(levels−1) latents) into tiles that overlap by
    `tile_overlap_factor` and blends the seams, as diffusers does.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_size = config.sample_size
        self.tile_latent_min_size = int(config.sample_size / 2 ** (len(config.block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x (N, in_ch, H, W) in [-1, 1] -> posterior over (N, latent_ch, H/s, W/s)."""
        if self.use_slicing and x.shape[0] > 1:
            return DiagonalGaussian(torch.cat([self._encode(item) for item in x.split(1)]))
        return DiagonalGaussian(self._encode(x))

    def decode(self, z: Tensor) -> Tensor:
        """z (N, latent_ch, h, w) (already divided by scaling_factor) -> (N, out_ch, h·s, w·s)."""
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(item) for item in z.split(1)])
        return self._decode(z)

    def forward(self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruction: x (N, in_ch, H, W) -> (N, out_ch, H, W); the posterior mode unless sample_posterior."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    def _encode(self, x: Tensor) -> Tensor:
        """x (N, in_ch, H, W) -> moments (N, 2·latent_ch, H/s, W/s)."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size)
        return self._encode_tile(x)

    def _decode(self, z: Tensor) -> Tensor:
        """z (N, latent_ch, h, w) -> (N, out_ch, h·s, w·s)."""
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size)
        return self._decode_tile(z)

    def _encode_tile(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode_tile(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def _tiled(self, x: Tensor, run: Callable[[Tensor], Tensor], tile_in: int, tile_out: int) -> Tensor:
        """Run `run` on overlapping tile_in² tiles of x, blend seams, keep the top-left part of each tile.

        diffusers' `_tiled_encode` (tile_in = sample tile, tile_out = latent tile) and `tiled_decode`
        (the reverse). Tiles start every int(tile_in·(1−overlap)); the blend band is int(tile_out·overlap).
        """
        stride = int(tile_in * (1 - self.tile_overlap_factor))
        extent = int(tile_out * self.tile_overlap_factor)
        keep = tile_out - extent
        rows = [
            [run(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)
        ]
        for i, row in enumerate(rows):  # row-major order matters: blends read already-blended tiles
            for j, tile in enumerate(row):
                if i > 0:
                    _blend(rows[i - 1][j], tile, extent, dim=2)
                if j > 0:
                    _blend(row[j - 1], tile, extent, dim=3)
        return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in rows], dim=2)
