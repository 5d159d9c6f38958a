"""Layer 2 parity: the whole UNet, loaded through pia_torch.loading from folders saved by diffusers,
against diffusers' UNetMotionModel.from_unet2d(unet2d, adapter) (fp32, CPU, convention="diffusers").
Also: UNetConfig / VAEConfig readers, and proofs that the parity check can fail.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import MODEL_ATOL, UNET2D, fan_in, inputs, load_pia, make_adapter, randomize_, reference_unet, tol
from diffusers import UNetMotionModel

from pia_torch.config import PIA_UNET, SD15_UNET, MotionConfig, UNetConfig, VAEConfig, tiny_unet
from pia_torch.models.unet import UNet

TOL = MODEL_ATOL  # DESIGN.md §5: the contract bound itself (the UNet's outputs are of scale ~1)


@torch.no_grad()
def max_abs(model: UNet, ref: UNetMotionModel, x: torch.Tensor, t, text: torch.Tensor) -> float:
    """max |pia - diffusers|; diffusers gets the text repeated per frame, as its pipeline does."""
    want = ref(x, t, text.repeat_interleave(x.shape[2], dim=0)).sample
    got = model(x, t, text)
    assert got.shape == want.shape == (x.shape[0], 4, *x.shape[2:])
    return (got - want).abs().max().item()


CASES = {
    "one-frame-int": (1, 1, 999),
    "0d-tensor": (2, 4, torch.tensor(500)),
    "batch-tensor": (2, 3, torch.tensor([10, 900])),
    "fractional-euler": (1, 4, 937.25),
    "16-frames": (1, 16, 250),
}


@pytest.mark.parametrize("case", CASES)
def test_unet_matches_diffusers(size, checkpoints, case):
    b, f, t = CASES[case]
    x, text = inputs(size, b, f)
    assert max_abs(load_pia(checkpoints, size), reference_unet(size), x, t, text) <= TOL


def test_unet_latent_size_not_multiple_of_upsampling(size, checkpoints):
    hw = {"tiny": (7, 9), "small": (9, 12)}[size]  # not multiples of 2 (tiny) / 8 (small)
    x, text = inputs(size, 1, 2, hw)
    assert max_abs(load_pia(checkpoints, size), reference_unet(size), x, 321, text) <= TOL


def test_unet_with_non_mirrored_block_types(tmp_path):
    """diffusers' own PIA test model: down (CrossAttn, Down) with up (CrossAttn, Up), not a mirror. The up
    levels get their own attention flags; the UNet matches diffusers' from_unet2d."""
    from diffusers import UNet2DConditionModel

    from pia_torch.loading import MotionAdapter, load_unet

    config = {**UNET2D["tiny"], "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
    torch.manual_seed(3)
    unet2d = randomize_(UNet2DConditionModel(**config).eval(), 4)
    unet2d.save_pretrained(tmp_path / "unet")
    make_adapter("tiny").save_pretrained(tmp_path / "adapter")
    ours = load_unet(tmp_path / "unet", MotionAdapter.from_pretrained(tmp_path / "adapter"), convention="diffusers")
    assert ours.config.up_attention == (True, False) != ours.config.cross_attention[::-1]
    reference = UNetMotionModel.from_unet2d(unet2d, make_adapter("tiny")).eval()
    x, text = inputs("tiny", 2, 3)
    assert max_abs(ours, reference, x, 600, text) <= TOL


@torch.no_grad()
def test_shared_and_per_frame_text_agree(checkpoints):
    model = load_pia(checkpoints, "small")
    x, text = inputs("small", 2, 3)
    shared = model(x, 400, text)  # text keys/values computed once per video
    per_frame = model(x, 400, text.repeat_interleave(3, dim=0))
    # the k/v matmuls see another batch size (another summation order): rounding through the whole UNet
    torch.testing.assert_close(shared, per_frame, **tol(per_frame, fan_in(model)))


def test_parity_check_fails_on_one_perturbed_weight(checkpoints):
    model = load_pia(checkpoints, "small")
    x, text = inputs("small", 1, 4)
    assert max_abs(model, reference_unet("small"), x, 500, text) <= TOL
    with torch.no_grad():
        model.down_blocks[1].motion_modules[0].proj_out.weight[0, 0] += 0.05
    assert max_abs(model, reference_unet("small"), x, 500, text) > TOL


def test_parity_check_fails_with_the_wrong_convention(checkpoints):
    x, text = inputs("small", 1, 4)
    assert max_abs(load_pia(checkpoints, "small", "original"), reference_unet("small"), x, 500, text) > TOL


def test_bad_inputs_raise(checkpoints):
    model = load_pia(checkpoints, "tiny")
    x, text = inputs("tiny", 2, 3)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :4], 1, text)
    with pytest.raises(ValueError, match="text must be"):
        model(x, 1, text[:1])
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.tensor([1, 2, 3]), text)
    with pytest.raises(ValueError, match="max_seq_length"):
        model(torch.randn(1, 9, 33, 4, 4), 1, text[:1])


# ------------------------------------------------------------------------------------------ configs


def test_convention_is_checked_and_shown():
    with pytest.raises(ValueError, match="convention"):
        replace(tiny_unet(), convention="pia")
    assert UNetConfig.from_diffusers(UNET2D["tiny"]).convention == "original"
    with torch.device("meta"):
        assert "convention='original'" in repr(UNet(tiny_unet()))
        assert "convention='diffusers'" in repr(UNet(replace(tiny_unet(), convention="diffusers")))


def test_unet_config_reads_motion_and_legacy_head_count():
    motion = MotionConfig.from_diffusers(dict(make_adapter("small").config))
    cfg = UNetConfig.from_diffusers(UNET2D["small"], motion)
    assert cfg.in_channels == 9 and cfg.num_attention_heads == (8, 8, 8, 8)  # attention_head_dim = heads
    assert cfg.cross_attention == (True, True, True, False) and not cfg.motion.use_mid_block
    # A UNetMotionModel config.json gives the same model as UNet2DConditionModel + MotionAdapter.
    for size in ("tiny", "small"):
        ref = reference_unet(size)
        own = UNetConfig.from_diffusers(dict(ref.config))
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in UNet(own).state_dict().items()}
        want = UNetConfig.from_diffusers(UNET2D[size], MotionConfig.from_diffusers(dict(make_adapter(size).config)))
        with torch.device("meta"):
            assert shapes == {k: v.shape for k, v in UNet(want).state_dict().items()}


def test_pia_preset_has_the_diffusers_tree():
    """PIA_UNET builds exactly the SD1.5 + PIA UNetMotionModel parameters (renamed; pe recomputed)."""
    renames = [
        (".to_out.0.", ".to_out."),
        (".ff.net.0.proj.", ".ff.proj_in."),
        (".ff.net.2.", ".ff.proj_out."),
        (".downsamplers.0.", ".downsample."),
        (".upsamplers.0.", ".upsample."),
    ]
    with torch.device("meta"):
        ref = UNetMotionModel(
            in_channels=9, cross_attention_dim=768, num_attention_heads=8, use_motion_mid_block=False, sample_size=64
        )
        ours = UNet(PIA_UNET)
    want = {}
    for key, value in ref.state_dict().items():
        if not key.endswith("pos_embed.pe"):
            for old, new in renames:
                key = key.replace(old, new)
            want[key] = value.shape
    assert {k: v.shape for k, v in ours.state_dict().items()} == want
    assert sum(p.numel() for p in ours.parameters()) == 1_276_672_964
    assert replace(SD15_UNET, in_channels=9, motion=PIA_UNET.motion) == PIA_UNET


@pytest.mark.parametrize(
    "key,value",
    [
        ("use_linear_projection", True),
        ("upcast_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("encoder_hid_dim", 768),
        ("transformer_layers_per_block", 2),
        ("dual_cross_attention", True),
        ("only_cross_attention", True),
        ("time_embedding_type", "fourier"),
        ("act_fn", "gelu"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
        ("up_block_types", ("SimpleCrossAttnUpBlock2D", "UpBlock2D")),
        ("flip_sin_to_cos", False),
        ("norm_num_groups", None),
        ("conv_in_kernel", 7),
        ("cross_attention_dim", [8, 16]),
    ],
)
def test_unet_config_rejects_unsupported_options(key, value):
    with pytest.raises(ValueError):
        UNetConfig.from_diffusers({**UNET2D["tiny"], key: value})


@pytest.mark.parametrize(
    "key,value",
    [
        ("shift_factor", 0.1),
        ("latents_mean", [0.0] * 4),
        ("use_quant_conv", False),
        ("mid_block_add_attention", False),
        ("down_block_types", ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")),
        ("act_fn", "relu"),
    ],
)
def test_vae_config_rejects_unsupported_options(key, value):
    base = {
        "block_out_channels": (8, 8),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "norm_num_groups": 2,
    }
    assert VAEConfig.from_diffusers(base).scaling_factor == 0.18215
    with pytest.raises(ValueError):
        VAEConfig.from_diffusers({**base, key: value})
