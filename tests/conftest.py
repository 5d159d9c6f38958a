"""Shared fixtures: diffusers reference models with seeded random weights, saved with save_pretrained.

Every factory returns a *diffusers* model (the reference). `randomize_` re-randomises every constant
tensor (norm weights = 1, norm biases = 0, anything zero-initialised), so no layer is left all zeros
or all ones and a parity test cannot pass by accident.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel

# Model sizes. "tiny": the old diffusers PIA fast test (spec/unet_motion.md §1.4; has a motion mid
# block). "small": the SD1.5 block layout (4 levels, 3 cross-attention levels, 32 groups, no motion
# mid block, max_seq_length 32) at 1/10 of the width.
UNET2D = {
    "tiny": dict(
        block_out_channels=(8, 8), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2,
    ),
    "small": dict(
        block_out_channels=(32, 64, 128, 128), layers_per_block=2, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, norm_num_groups=32, attention_head_dim=8,
    ),
}
ADAPTER = {
    "tiny": dict(
        block_out_channels=(8, 8), motion_layers_per_block=2, motion_norm_num_groups=2,
        motion_num_attention_heads=4, conv_in_channels=9,
    ),
    "small": dict(
        block_out_channels=(32, 64, 128, 128), motion_layers_per_block=2, motion_norm_num_groups=32,
        motion_num_attention_heads=8, conv_in_channels=9, use_motion_mid_block=False,
        motion_max_seq_length=32,
    ),
}
VAE = {
    "tiny": dict(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2, layers_per_block=1, sample_size=16,
    ),
    "small": dict(
        block_out_channels=(32, 64, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, layers_per_block=2, sample_size=64,
    ),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every constant parameter (norm weights/biases, zero inits) with seeded noise."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        flat = p.detach().flatten()
        if bool((flat == flat[0]).all()):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    assert_no_constant_layers(model)
    return model


def assert_no_constant_layers(model: torch.nn.Module) -> None:
    """Fail if any parameter is all zeros (or constant): parity against it would prove nothing."""
    bad = [n for n, p in model.named_parameters() if p.numel() > 1 and bool((p == p.flatten()[0]).all())]
    assert not bad, f"constant parameters: {bad[:5]}"


def make_unet2d(size: str = "tiny", seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**UNET2D[size]).eval(), seed + 1)


def make_adapter(size: str = "tiny", seed: int = 10) -> MotionAdapter:
    torch.manual_seed(seed)
    return randomize_(MotionAdapter(**ADAPTER[size]).eval(), seed + 1)


def make_vae(size: str = "tiny", seed: int = 20) -> AutoencoderKL:
    torch.manual_seed(seed)
    return randomize_(AutoencoderKL(**VAE[size]).eval(), seed + 1)


@pytest.fixture(scope="session", params=["tiny", "small"])
def size(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Factory: `checkpoints(size)` -> dict of folders {"unet", "adapter", "vae"} saved by diffusers.

    Saved once per size and session. The reference models themselves are rebuilt from the same
    seeds by the make_* factories when a test needs them.
    """
    cache: dict[str, dict] = {}

    def build(size: str = "tiny") -> dict:
        if size not in cache:
            root = tmp_path_factory.mktemp(f"ckpt_{size}")
            make_unet2d(size).save_pretrained(root / "unet")
            make_adapter(size).save_pretrained(root / "adapter")
            make_vae(size).save_pretrained(root / "vae")
            cache[size] = {"root": root, "unet": root / "unet", "adapter": root / "adapter", "vae": root / "vae"}
        return cache[size]

    return build
