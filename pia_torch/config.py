"""Frozen model configs, presets, and readers for diffusers `config.json` files.

`from_diffusers` reads a checkpoint's own config (defaults as in diffusers 0.42.1 when a key is
absent) and raises ValueError for any option pia_torch does not implement, instead of ignoring it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

CONVENTIONS = ("original", "diffusers")


def _per_level(value: Any, n: int, name: str) -> tuple[int, ...]:
    """An int, or a list of n ints, as a tuple of n ints."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be an int or {n} ints, got {value!r}")
    return values


def _one(value: Any, name: str) -> Any:
    """A scalar, or a list whose entries are all equal, as that scalar."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{name}: different values per level are not supported, got {value!r}")
        value = value[0]
    return value


def _require(config: dict, key: str, default: Any, allowed: tuple) -> None:
    """Raise unless config[key] (or the diffusers default) is one of `allowed`."""
    value = config.get(key, default)
    if isinstance(value, (list, tuple)) and value:
        value = _one(value, key)
    if value not in allowed:
        raise ValueError(f"unsupported {key}={value!r} in config.json (supported: {allowed})")


@dataclass(frozen=True)
class MotionConfig:
    """The motion modules of a MotionAdapter (AnimateDiff / PIA).

    Down level i has layers_per_block[i] modules, up level i (reversed) one more; heads and
    transformer layers per module are per down level (reversed for up levels).
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: tuple[int, ...]
    num_attention_heads: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    max_seq_length: int = 32
    use_mid_block: bool = False
    mid_block_layers: int = 1
    transformer_layers_per_mid_block: int = 1
    norm_num_groups: int = 32  # the adapter's value; the UNet uses its own norm_num_groups (as diffusers)
    conv_in_channels: int | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for name in ("layers_per_block", "num_attention_heads", "transformer_layers_per_block"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"MotionConfig.{name} needs {n} entries, got {getattr(self, name)}")
        for c, heads in zip(self.block_out_channels, self.num_attention_heads):
            if c % heads:
                raise ValueError(f"motion channels {c} not divisible by {heads} heads")
        if self.max_seq_length < 1 or self.mid_block_layers < 1:
            raise ValueError(f"bad MotionConfig: {self}")

    @classmethod
    def from_diffusers(cls, config: dict, class_name: str = "MotionAdapter") -> MotionConfig:
        """Read a MotionAdapter `config.json`, or the motion part of a UNetMotionModel one (class_name
        "UNetMotionModel"), which names some keys differently (_MOTION_KEYS)."""
        if config.get("_class_name") not in (None, class_name):
            raise ValueError(f"not a {class_name} config: _class_name={config.get('_class_name')!r}")
        key = _MOTION_KEYS[class_name]
        boc = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
        n = len(boc)
        return cls(
            block_out_channels=boc,
            layers_per_block=_per_level(config.get(key["layers"], 2), n, key["layers"]),
            num_attention_heads=_per_level(
                config.get("motion_num_attention_heads", 8), n, "motion_num_attention_heads"
            ),
            transformer_layers_per_block=_per_level(config.get(key["depth"], 1), n, key["depth"]),
            max_seq_length=config.get("motion_max_seq_length", 32),
            use_mid_block=config.get("use_motion_mid_block", True),
            mid_block_layers=config.get(key["mid_layers"], 1),
            transformer_layers_per_mid_block=_one(config.get(key["mid_depth"]) or 1, key["mid_depth"]),
            norm_num_groups=config.get(key["groups"], 32),
            conv_in_channels=config.get("conv_in_channels") or None,
        )


# The keys that MotionAdapter and UNetMotionModel name differently in config.json, with the same diffusers
# defaults (diffusers/models/unets/unet_motion_model.py); the other motion keys have one name in both.
_MOTION_KEYS = {
    "MotionAdapter": {
        "layers": "motion_layers_per_block",
        "depth": "motion_transformer_layers_per_block",
        "mid_layers": "motion_mid_block_layers_per_block",
        "mid_depth": "motion_transformer_layers_per_mid_block",
        "groups": "motion_norm_num_groups",
    },
    "UNetMotionModel": {
        "layers": "layers_per_block",
        "depth": "temporal_transformer_layers_per_block",
        "mid_layers": "mid_block_layers",
        "mid_depth": "temporal_transformer_layers_per_mid_block",
        "groups": "norm_num_groups",
    },
}


@dataclass(frozen=True)
class UNetConfig:
    """The denoising UNet: SD1.5-style levels, optional motion modules, a GroupNorm convention.

    num_attention_heads: spatial heads per level (diffusers' legacy `attention_head_dim` means this).
    convention: "original" (PIA as trained: ResNet norms and conv_norm_out pool statistics over all
    frames, motion-module input norm per frame) or "diffusers" (the reverse, as UNetMotionModel).
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    cross_attention: tuple[bool, ...]
    layers_per_block: int
    cross_attention_dim: int
    num_attention_heads: tuple[int, ...]
    norm_num_groups: int
    norm_eps: float
    sample_size: int | None
    motion: MotionConfig | None = None
    convention: str = "original"
    up_cross_attention: tuple[bool, ...] | None = None  # per up level, in up_blocks order; None: the mirror

    @property
    def up_attention(self) -> tuple[bool, ...]:
        """Whether up level i (up_blocks order) has spatial transformers: the down levels' mirror by default."""
        return self.cross_attention[::-1] if self.up_cross_attention is None else self.up_cross_attention

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
        n = len(self.block_out_channels)
        if len(self.cross_attention) != n or len(self.num_attention_heads) != n or len(self.up_attention) != n:
            raise ValueError(f"cross_attention, up_cross_attention and num_attention_heads need {n} entries: {self}")
        for c, heads in zip(self.block_out_channels, self.num_attention_heads):
            if c % self.norm_num_groups or c % heads:
                raise ValueError(f"channels {c} not divisible by {self.norm_num_groups} groups / {heads} heads")
        m = self.motion
        if m is not None:
            if m.block_out_channels != self.block_out_channels:
                raise ValueError(f"motion block_out_channels {m.block_out_channels} != {self.block_out_channels}")
            if m.layers_per_block != (self.layers_per_block,) * n:
                raise ValueError(f"motion layers_per_block {m.layers_per_block} != UNet {self.layers_per_block}")
            if m.conv_in_channels and m.conv_in_channels != self.in_channels:
                raise ValueError(f"adapter conv_in takes {m.conv_in_channels} channels, in_channels={self.in_channels}")

    @property
    def temb_channels(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(
        cls, config: dict, motion: MotionConfig | None = None, convention: str = "original"
    ) -> UNetConfig:
        """Read a UNet2DConditionModel (optionally + a MotionAdapter's config) or a UNetMotionModel config.json."""
        name = config.get("_class_name")
        if name not in (None, "UNet2DConditionModel", "UNetMotionModel"):
            raise ValueError(f"unsupported UNet class {name!r}")
        is_motion = name == "UNetMotionModel" or any("Motion" in t for t in config.get("down_block_types", ()))
        down_cross, up_cross = (
            ("CrossAttnDownBlockMotion", "CrossAttnUpBlockMotion")
            if is_motion
            else ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
        )
        down_plain, up_plain = ("DownBlockMotion", "UpBlockMotion") if is_motion else ("DownBlock2D", "UpBlock2D")
        down = tuple(config.get("down_block_types", (down_cross,) * 3 + (down_plain,)))
        up = tuple(config.get("up_block_types", (up_plain,) + (up_cross,) * 3))
        if any(t not in (down_cross, down_plain) for t in down) or any(t not in (up_cross, up_plain) for t in up):
            raise ValueError(f"unsupported block types {down} / {up}")
        cross, up_cross_attention = tuple(t == down_cross for t in down), tuple(t == up_cross for t in up)
        boc = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
        n = len(boc)
        if len(down) != n or len(up) != n:
            raise ValueError(f"{n} levels but block types {down} / {up}")

        for key, default, allowed in [
            ("act_fn", "silu", ("silu", "swish")),
            ("use_linear_projection", False, (False,)),
            ("upcast_attention", False, (False, None)),
            ("resnet_time_scale_shift", "default", ("default",)),
            ("time_embedding_type", "positional", ("positional",)),
            ("mid_block_type", "UNetMidBlock2DCrossAttn", ("UNetMidBlock2DCrossAttn",)),
            ("transformer_layers_per_block", 1, (1,)),
            ("reverse_transformer_layers_per_block", None, (None, 1)),
            ("transformer_layers_per_mid_block", None, (None, 1)),
            ("dual_cross_attention", False, (False,)),
            ("only_cross_attention", False, (False,)),
            ("mid_block_only_cross_attention", None, (None, False)),
            ("flip_sin_to_cos", True, (True,)),
            ("freq_shift", 0, (0,)),
            ("center_input_sample", False, (False,)),
            ("conv_in_kernel", 3, (3,)),
            ("conv_out_kernel", 3, (3,)),
            ("downsample_padding", 1, (1,)),
            ("mid_block_scale_factor", 1, (1,)),
            ("resnet_out_scale_factor", 1.0, (1,)),
            ("resnet_skip_time_act", False, (False,)),
            ("attention_type", "default", ("default",)),
            ("class_embeddings_concat", False, (False,)),
            ("reverse_temporal_transformer_layers_per_block", None, (None, 1)),
        ] + [
            (k, None, (None,))
            for k in (
                "class_embed_type",
                "addition_embed_type",
                "encoder_hid_dim",
                "encoder_hid_dim_type",
                "num_class_embeds",
                "time_cond_proj_dim",
                "time_embedding_dim",
                "time_embedding_act_fn",
                "timestep_post_act",
                "cross_attention_norm",
                "addition_time_embed_dim",
                "projection_class_embeddings_input_dim",
            )
        ]:
            _require(config, key, default, allowed)
        if config.get("norm_num_groups", 32) is None:
            raise ValueError("norm_num_groups=None (no conv_norm_out) is not supported")

        layers = _one(config.get("layers_per_block", 2), "layers_per_block")
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)  # legacy name = heads
        in_channels = config.get("in_channels", 4)
        if is_motion:
            own = MotionConfig.from_diffusers(config, "UNetMotionModel")
            rev = config.get("reverse_motion_num_attention_heads")
            if rev is not None and _per_level(rev, n, "reverse heads") != own.num_attention_heads[::-1]:
                raise ValueError(f"unsupported reverse_motion_num_attention_heads={rev!r}")
            if not own.use_mid_block and own.mid_block_layers != 1:
                raise ValueError(f"unsupported mid_block_layers={own.mid_block_layers} without a motion mid block")
            if motion is not None:
                raise ValueError("a UNetMotionModel config defines its own motion modules: pass motion=None")
            motion = own
        elif motion is not None and motion.conv_in_channels:
            in_channels = motion.conv_in_channels  # PIA: the adapter's 9-channel conv_in (from_unet2d)
        return cls(
            in_channels=in_channels,
            out_channels=config.get("out_channels", 4),
            block_out_channels=boc,
            cross_attention=cross,
            up_cross_attention=None if up_cross_attention == cross[::-1] else up_cross_attention,
            layers_per_block=layers,
            cross_attention_dim=_one(config.get("cross_attention_dim", 1280), "cross_attention_dim"),
            num_attention_heads=_per_level(heads, n, "attention_head_dim"),
            norm_num_groups=config.get("norm_num_groups", 32),
            norm_eps=config.get("norm_eps", 1e-5),
            sample_size=config.get("sample_size"),
            motion=motion,
            convention=convention,
        )


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (SD VAE). The VAE never applies scaling_factor; the caller does."""

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    scaling_factor: float = 0.18215
    sample_size: int = 32

    @classmethod
    def from_diffusers(cls, config: dict) -> VAEConfig:
        """Read an AutoencoderKL `config.json`."""
        if config.get("_class_name") not in (None, "AutoencoderKL"):
            raise ValueError(f"not an AutoencoderKL config: _class_name={config.get('_class_name')!r}")
        boc = tuple(config.get("block_out_channels", (64,)))
        down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",)))
        up = tuple(config.get("up_block_types", ("UpDecoderBlock2D",)))
        if down != ("DownEncoderBlock2D",) * len(boc) or up != ("UpDecoderBlock2D",) * len(boc):
            raise ValueError(f"unsupported VAE block types {down} / {up}")
        for key, default, allowed in [
            ("act_fn", "silu", ("silu", "swish")),
            ("shift_factor", None, (None,)),
            ("latents_mean", None, (None,)),
            ("latents_std", None, (None,)),
            ("use_quant_conv", True, (True,)),
            ("use_post_quant_conv", True, (True,)),
            ("mid_block_add_attention", True, (True,)),
        ]:
            _require(config, key, default, allowed)
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            latent_channels=config.get("latent_channels", 4),
            block_out_channels=boc,
            layers_per_block=config.get("layers_per_block", 1),
            norm_num_groups=config.get("norm_num_groups", 32),
            scaling_factor=config.get("scaling_factor") or 0.18215,
            sample_size=config.get("sample_size", 32),
        )


SD15_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention=(True, True, True, False),
    layers_per_block=2,
    cross_attention_dim=768,
    num_attention_heads=(8, 8, 8, 8),
    norm_num_groups=32,
    norm_eps=1e-5,
    sample_size=64,
)
PIA_MOTION = MotionConfig(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=(2, 2, 2, 2),
    num_attention_heads=(8, 8, 8, 8),
    transformer_layers_per_block=(1, 1, 1, 1),
    max_seq_length=32,
    use_mid_block=False,
    norm_num_groups=32,
    conv_in_channels=9,
)
PIA_UNET = replace(SD15_UNET, in_channels=9, motion=PIA_MOTION)
SD_VAE = VAEConfig(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    scaling_factor=0.18215,
    sample_size=512,
)


def tiny_unet() -> UNetConfig:
    """A PIA-shaped UNet small enough for tests and the offline demo (16/32 channels, 16x16 latents)."""
    motion = MotionConfig(
        block_out_channels=(16, 32),
        layers_per_block=(1, 1),
        num_attention_heads=(2, 2),
        transformer_layers_per_block=(1, 1),
        use_mid_block=False,
        norm_num_groups=8,
        conv_in_channels=9,
    )
    return UNetConfig(
        in_channels=9,
        out_channels=4,
        block_out_channels=(16, 32),
        cross_attention=(True, False),
        layers_per_block=1,
        cross_attention_dim=32,
        num_attention_heads=(2, 2),
        norm_num_groups=8,
        norm_eps=1e-5,
        sample_size=16,
        motion=motion,
    )


def tiny_vae() -> VAEConfig:
    """A 2-level VAE (scale factor 2) for tests and the offline demo."""
    return VAEConfig(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
