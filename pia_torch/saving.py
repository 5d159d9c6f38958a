"""Saving: pia_torch models -> diffusers 0.42.1 folders (config.json and safetensors as diffusers writes them).

    unet_config_dict / motion_config_dict / vae_config_dict   UNetMotionModel / MotionAdapter / AutoencoderKL
    save_model(folder, config, sd) / save_adapter / save_pipeline   model, MotionAdapter and PIAPipeline folders

Configs round-trip through `from_diffusers` except for `convention`, which is no diffusers setting (a saved
folder loads with the convention its loader asks for), and two adapter-only values a UNetMotionModel config has
no place for: conv_in_channels (in_channels carries it) and the motion norm_num_groups (both libraries use the
UNet's). Tensors keep their dtype; every file appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pia_torch import hub
from pia_torch.config import MotionConfig, UNetConfig, VAEConfig
from pia_torch.loading import MotionAdapter, StateDict, diffusers_names
from pia_torch.models.motion import frame_positions

DIFFUSERS_VERSION = "0.42.1"  # the format written
WEIGHTS = hub.weight_candidates()[0][1]  # diffusion_pytorch_model.safetensors, the name loaders look for first


def _compact(values: tuple[int, ...]) -> int | list[int]:
    """A per-level tuple as diffusers writes it: one int when all levels agree."""
    return values[0] if len(set(values)) == 1 else list(values)


def unet_config_dict(config: UNetConfig) -> dict[str, Any]:
    """The UNetMotionModel config.json that rebuilds this UNet (what diffusers' from_unet2d writes)."""
    c, m = config, config.motion
    if m is None:
        raise ValueError("only a UNet with motion modules saves as a diffusers UNetMotionModel")
    return {
        "_class_name": "UNetMotionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": c.sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": list(c.block_out_channels),
        "down_block_types": ["CrossAttnDownBlockMotion" if x else "DownBlockMotion" for x in c.cross_attention],
        "up_block_types": ["CrossAttnUpBlockMotion" if x else "UpBlockMotion" for x in c.up_attention],
        "layers_per_block": c.layers_per_block,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": c.norm_num_groups,
        "norm_eps": c.norm_eps,
        "cross_attention_dim": c.cross_attention_dim,
        "num_attention_heads": _compact(c.num_attention_heads),
        "use_linear_projection": False,
        "transformer_layers_per_block": 1,
        "transformer_layers_per_mid_block": None,
        "reverse_transformer_layers_per_block": None,
        "reverse_temporal_transformer_layers_per_block": None,
        "temporal_transformer_layers_per_block": _compact(m.transformer_layers_per_block),
        "temporal_transformer_layers_per_mid_block": m.transformer_layers_per_mid_block,
        "motion_max_seq_length": m.max_seq_length,
        "motion_num_attention_heads": _compact(m.num_attention_heads),
        "reverse_motion_num_attention_heads": None,
        "use_motion_mid_block": m.use_mid_block,
        "mid_block_layers": m.mid_block_layers,
        **dict.fromkeys(
            (
                "encoder_hid_dim",
                "encoder_hid_dim_type",
                "addition_embed_type",
                "addition_time_embed_dim",
                "projection_class_embeddings_input_dim",
                "time_cond_proj_dim",
            )
        ),
    }


def motion_config_dict(config: MotionConfig) -> dict[str, Any]:
    """The MotionAdapter config.json."""
    m = config
    return {
        "_class_name": "MotionAdapter",
        "_diffusers_version": DIFFUSERS_VERSION,
        "block_out_channels": list(m.block_out_channels),
        "motion_layers_per_block": _compact(m.layers_per_block),
        "motion_transformer_layers_per_block": _compact(m.transformer_layers_per_block),
        "motion_mid_block_layers_per_block": m.mid_block_layers,
        "motion_transformer_layers_per_mid_block": m.transformer_layers_per_mid_block,
        "motion_num_attention_heads": _compact(m.num_attention_heads),
        "motion_norm_num_groups": m.norm_num_groups,
        "motion_max_seq_length": m.max_seq_length,
        "use_motion_mid_block": m.use_mid_block,
        "conv_in_channels": m.conv_in_channels,
    }


def vae_config_dict(config: VAEConfig) -> dict[str, Any]:
    """The AutoencoderKL config.json."""
    c, n = config, len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "latent_channels": c.latent_channels,
        "block_out_channels": list(c.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": c.layers_per_block,
        "norm_num_groups": c.norm_num_groups,
        "act_fn": "silu",
        "sample_size": c.sample_size,
        "scaling_factor": c.scaling_factor,
        "force_upcast": True,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


@contextmanager
def _staged(folder: Path) -> Iterator[Path]:
    """Write into a temporary sibling folder; on success it becomes `folder` (or, if that exists, its files
    replace their namesakes, each with one atomic os.replace); on failure it is deleted."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if not folder.exists():
            tmp.rename(folder)
            return
        for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
            dst = folder / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")  # diffusers' to_json_string format


def save_model(folder: str | Path, config_dict: dict, state_dict: StateDict) -> None:
    """config.json + diffusion_pytorch_model.safetensors ({"format": "pt"}), as a diffusers model folder."""
    tensors, storages = {}, set()
    for key, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in storages:  # safetensors refuses tensors sharing memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    with _staged(Path(folder)) as tmp:
        _write_json(tmp / "config.json", config_dict)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})


def with_frame_tables(sd: StateDict, max_seq_length: int) -> StateDict:
    """sd (diffusers names) + the motion modules' `pos_embed.pe` buffers diffusers stores, where missing."""
    sd = dict(sd)
    for key, w in list(sd.items()):
        if ".motion_modules." in key and key.endswith(".attn1.to_q.weight"):
            pe = key.removesuffix("attn1.to_q.weight") + "pos_embed.pe"
            sd.setdefault(pe, frame_positions(max_seq_length, w.shape[0]).to(w.dtype))  # (1, n, C)
    return sd


def save_adapter(adapter: MotionAdapter, folder: str | Path) -> None:
    """A diffusers MotionAdapter folder: config.json + the adapter's (diffusers-named) tensors."""
    save_model(
        folder, motion_config_dict(adapter.config), with_frame_tables(adapter.state_dict, adapter.config.max_seq_length)
    )


def save_pipeline(pipe: Any, folder: str | Path) -> None:
    """A diffusers PIAPipeline folder, as diffusers' own save_pretrained writes it. motion_adapter/ holds the
    UNet's motion modules and (PIA) its whole conv_in, as a diffusers-saved PIAPipeline's adapter does."""
    lora = getattr(pipe, "_lora", None)
    if lora is not None and lora.weights and not lora.originals:
        raise ValueError("an unfused LoRA is not part of the weights: fuse_lora() (or unload_lora_weights()) first")
    c = pipe.unet.config
    unet_sd = with_frame_tables(diffusers_names(pipe.unet.state_dict()), c.motion.max_seq_length)
    conv_in = c.motion.conv_in_channels or (c.in_channels if c.in_channels != 4 else None)  # 4: plain SD latents
    adapter_sd = {k: t for k, t in unet_sd.items() if ".motion_modules." in k or (conv_in and k.startswith("conv_in."))}
    scheduler = {k: v for k, v in dict(pipe.scheduler.config).items() if k != "_use_default_values"}
    with _staged(Path(folder)) as tmp:
        save_model(tmp / "unet", unet_config_dict(c), unet_sd)
        save_adapter(MotionAdapter(replace(c.motion, conv_in_channels=conv_in), adapter_sd), tmp / "motion_adapter")
        save_model(tmp / "vae", vae_config_dict(pipe.vae.config), diffusers_names(pipe.vae.state_dict()))
        pipe.text_encoder.save_pretrained(tmp / "text_encoder")
        pipe.tokenizer.save_pretrained(tmp / "tokenizer")
        _write_json(tmp / "scheduler" / "scheduler_config.json", {**scheduler, "_diffusers_version": DIFFUSERS_VERSION})
        _write_json(
            tmp / "model_index.json",
            {
                "_class_name": "PIAPipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "motion_adapter": ["diffusers", "MotionAdapter"],
                "scheduler": ["diffusers", scheduler["_class_name"]],
                "text_encoder": ["transformers", type(pipe.text_encoder).__name__],
                "tokenizer": ["transformers", type(pipe.tokenizer).__name__],
                "unet": ["diffusers", "UNetMotionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
        )
