"""Single-file checkpoints in their original layouts: Stable Diffusion 1.x in the LDM (CompVis) layout, as
personalised models are shared (civitai-style .safetensors, DreamBooth merges), a separate VAE file, and the
original PIA `pia.ckpt` (open-mmlab/PIA, AnimateDiff naming).

    ldm_path(component, key, unet)       a diffusers key -> its LDM name (weights_map/ldm.json + block arithmetic)
    from_ldm(sd, component, expected)    LDM tensors -> diffusers names, strictly, by the model's own keys
    load_single_file_components(path)    PIAPipeline's parts from one LDM checkpoint + a motion adapter
    read_pia_ckpt(path, config)          pia.ckpt -> MotionAdapter (weights_map/pia_ckpt.json)

Names are never guessed: every key the model has gets its LDM name, and the file must hold exactly those
(plus what weights_map/ldm.json ignores with a reason). Files are read safely (loading.read_file: no pickle
code runs).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from pia_torch import hub
from pia_torch.config import PIA_MOTION, MotionConfig, UNetConfig, VAEConfig
from pia_torch.loading import (
    CheckpointError,
    MotionAdapter,
    StateDict,
    build_unet,
    build_vae,
    check_frame_tables,
    component_pattern,
    diffusers_names,
    load_scheduler,
    load_table,
    load_vae,
    logger,
    read_config,
    read_file,
    remap,
)
from pia_torch.models.unet import UNet
from pia_torch.models.vae import AutoencoderKL

SD15_CONFIGS = resources.files("pia_torch") / "configs" / "sd15"  # unet/, vae/, text_encoder/, scheduler/
TOKENIZER = "openai/clip-vit-large-patch14"  # SD1.5's CLIP tokenizer on the Hub
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


def _rename(rules: list, path: str) -> str:
    for old, new, _ in rules:
        path = component_pattern(old).sub(new, path)
    return path


def ldm_path(component: str, key: str, unet: UNetConfig | None = None) -> str:
    """A diffusers key of "unet", "vae" or "text_encoder" -> its LDM name (without the component prefix).

    UNet down/up blocks are numbered across levels, n = layers_per_block + 1 per level:
    down_blocks.b.resnets.j -> input_blocks.{b·n + j + 1}.0 (attentions.j: .1), downsamplers.0.conv ->
    input_blocks.{(b + 1)·n}.0.op; up_blocks.b.resnets.j -> output_blocks.{b·n + j}.0 (attentions.j: .1),
    upsamplers.0 -> output_blocks.{b·n + n − 1}.{1, or 2 after an attention}. The rest is table rules.
    """
    table = load_table("ldm")
    if component != "unet":
        return _rename(table["vae"], key) if component == "vae" else key
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m is None:
        mid = re.fullmatch(r"(mid_block\.resnets\.\d+)\.(.+)", key)
        return (
            _rename(table["unet"], mid[1]) + "." + _rename(table["resnet"], mid[2])
            if mid
            else _rename(table["unet"], key)
        )
    side, b, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    n = unet.layers_per_block + 1
    if kind == "resnets":
        rest = _rename(table["resnet"], rest)
    if kind == "downsamplers":
        return f"input_blocks.{(b + 1) * n}.0.op.{rest.removeprefix('conv.')}"
    if kind == "upsamplers":
        return f"output_blocks.{b * n + n - 1}.{1 + unet.up_attention[b]}.{rest}"
    index = b * n + j + 1 if side == "down" else b * n + j
    return f"{side.replace('down', 'input').replace('up', 'output')}_blocks.{index}.{int(kind == 'attentions')}.{rest}"


def split_components(sd: StateDict) -> dict[str, StateDict]:
    """An LDM checkpoint -> {"unet", "vae", "text_encoder": tensors without their prefix}. Keys the table
    ignores (EMA, schedule buffers, position_ids) are dropped; keys of no component are dropped with one
    log line naming their prefixes."""
    table = load_table("ldm")
    ignore = [component_pattern(old) for old, _ in table["ignore"]]
    parts: dict[str, StateDict] = {"unet": {}, "vae": {}, "text_encoder": {}}
    other = set()
    for key, tensor in sd.items():
        if any(p.search(key) for p in ignore):
            continue
        match = next(((p, c) for p, c, _ in table["components"] if key.startswith(p)), None)
        if match is None:
            other.add(key.split(".")[0])
            continue
        prefix, component = match
        parts[component][key[len(prefix) :].removeprefix("text_model.")] = tensor
    if other:
        logger.info("ignored keys that belong to no model, with the prefixes: %s", ", ".join(sorted(other)))
    return parts


def from_ldm(
    sd: StateDict,
    component: str,
    expected: dict[str, tuple[int, ...]],
    unet: UNetConfig | None = None,
    source: str = "checkpoint",
) -> StateDict:
    """LDM-named tensors of one component -> the diffusers names in `expected` ({name: shape}). Every
    expected key must be present and every tensor used: one CheckpointError lists what is not. LDM's
    1x1-conv VAE attention weights are reshaped to Linear ones by the table's "squeeze" rule."""
    squeeze = [component_pattern(old) for old, _ in load_table("ldm")["squeeze"]]
    names = {ldm_path(component, key, unet): key for key in expected}
    out, unexpected = {}, []
    for key, tensor in sd.items():
        if key not in names:
            unexpected.append(key)
            continue
        if any(p.search(key) for p in squeeze) and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor.flatten(1)  # (c, c, 1, 1) -> (c, c)
        out[names[key]] = tensor
    missing = [ldm for ldm, key in names.items() if key not in out]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the {component} does not match the LDM layout of its config", missing, unexpected
        )
    return out


def _expected(model_cls: type[nn.Module], config) -> dict[str, tuple[int, ...]]:
    """{diffusers name: shape} of a pia_torch model built on the meta device."""
    with torch.device("meta"):
        return {k: tuple(t.shape) for k, t in diffusers_names(model_cls(config).state_dict()).items()}


def load_vae_file(
    path: str | Path, config_dict: dict | None = None, torch_dtype: torch.dtype | None = None
) -> AutoencoderKL:
    """A separate VAE as one file: LDM layout (a vae-ft-mse-840000 style file, bare or under
    `first_stage_model.` / `vae.`) or diffusers names. config_dict: the VAE's config.json (SD1.5's if None)."""
    config_dict = config_dict or json.loads((SD15_CONFIGS / "vae" / "config.json").read_text())
    sd = read_file(Path(path))
    for prefix, _ in load_table("ldm")["vae_file_prefixes"]:
        if any(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): t for k, t in sd.items() if k.startswith(prefix)}
    if not any(k.startswith("encoder.down_blocks.") for k in sd):  # LDM names (encoder.down.0.block...)
        sd = from_ldm(sd, "vae", _expected(AutoencoderKL, VAEConfig.from_diffusers(config_dict)), source=str(path))
    return build_vae(config_dict, sd, torch_dtype=torch_dtype, source=str(path))


def load_any_vae(vae: str | Path | AutoencoderKL, dtype: torch.dtype, config_dict: dict | None = None) -> AutoencoderKL:
    """vae=: a model, a diffusers folder or one file (LDM or diffusers names; config_dict: SD1.5's if None)."""
    if isinstance(vae, AutoencoderKL):
        return vae.to(dtype)
    return load_vae(vae, torch_dtype=dtype) if Path(vae).is_dir() else load_vae_file(vae, config_dict, dtype)


def _config_root(config: str | Path | None) -> Path:
    """The folder holding unet/, vae/, text_encoder/ configs and scheduler/ (and maybe tokenizer/)."""
    if config is None:
        return Path(str(SD15_CONFIGS))
    return hub.resolve(config, ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*"])


def _tokenizer(root: Path):
    """The CLIP tokenizer: root/tokenizer if present, else SD1.5's from the Hub (or its cache)."""
    from transformers import CLIPTokenizer

    if (root / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(root / "tokenizer")
    try:
        return CLIPTokenizer.from_pretrained(hub.resolve(TOKENIZER, TOKENIZER_FILES))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the CLIP tokenizer is not in the Hugging Face cache: download it once with `huggingface-cli download "
            f"{TOKENIZER} {' '.join(TOKENIZER_FILES)}`, or pass config= a diffusers SD1.5 folder with tokenizer/"
        ) from e


def load_single_file_components(
    path: str | Path,
    motion_adapter: MotionAdapter,
    config: str | Path | None = None,
    vae: str | Path | AutoencoderKL | None = None,
    torch_dtype: torch.dtype | None = None,
    convention: str = "original",
    conv_in: str = "base",
) -> dict:
    """PIAPipeline's components from one LDM-layout SD1.x checkpoint (.safetensors; .ckpt/.pt/.pth read with
    torch.load(weights_only=True)) + a PIA motion adapter. The component configs are SD1.5's (shipped in
    pia_torch/configs/sd15), or those of `config` (a diffusers folder or Hub id, e.g. for other widths).
    vae: a separate VAE (file, diffusers folder or model) replacing the checkpoint's own."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root, dtype, source = _config_root(config), torch_dtype or torch.float32, str(path)
    parts = split_components(read_file(Path(path)))
    unet_dict = read_config(root / "unet", "UNet2DConditionModel")
    base = UNetConfig.from_diffusers(unet_dict)
    unet_sd = from_ldm(parts["unet"], "unet", _expected(UNet, base), base, source)
    unet = build_unet(
        unet_dict, unet_sd, motion_adapter, convention=convention, torch_dtype=dtype, source=source, conv_in=conv_in
    )
    vae_dict = read_config(root / "vae", "AutoencoderKL")
    if vae is not None:
        vae = load_any_vae(vae, dtype, vae_dict)
    elif parts["vae"]:
        vae_sd = from_ldm(
            parts["vae"], "vae", _expected(AutoencoderKL, VAEConfig.from_diffusers(vae_dict)), source=source
        )
        vae = build_vae(vae_dict, vae_sd, torch_dtype=dtype, source=source)
    else:
        raise ValueError(f"{source} holds no VAE (no first_stage_model.* keys): pass vae= a VAE file or folder")
    if not parts["text_encoder"]:
        raise ValueError(f"{source} holds no CLIP text encoder (no cond_stage_model.transformer.* keys)")
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    own = text_encoder.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in own) else ""  # transformers 4.x / 5.x
    text_sd = from_ldm(
        parts["text_encoder"],
        "text_encoder",
        {k.removeprefix(prefix): tuple(t.shape) for k, t in own.items()},
        source=source,
    )
    text_encoder.load_state_dict({prefix + k: t for k, t in text_sd.items()}, strict=True)
    return {
        "vae": vae,
        "text_encoder": text_encoder.to(dtype).eval(),
        "tokenizer": _tokenizer(root),
        "unet": unet,
        "scheduler": load_scheduler(root / "scheduler"),
    }


def infer_motion_config(sd: StateDict) -> MotionConfig:
    """PIA's adapter config with what an AnimateDiff-layout file shows: widths and module counts per down
    level, the frame-table length, conv_in's channels and a mid-block module. Heads and GroupNorm groups are
    not in the shapes: PIA's 8 and 32."""
    widths, counts = {}, {}
    for key, t in sd.items():
        if m := re.fullmatch(r"down_blocks\.(\d+)\.motion_modules\.(\d+)\.temporal_transformer\.proj_in\.weight", key):
            widths[int(m[1])], counts[int(m[1])] = t.shape[0], max(counts.get(int(m[1]), 0), int(m[2]) + 1)
    if not widths:
        raise CheckpointError("no AnimateDiff motion modules (down_blocks.*.motion_modules.*.temporal_transformer)")
    n, pe = len(widths), next((t for k, t in sd.items() if k.endswith("pos_encoder.pe")), None)
    conv_in = sd.get("conv_in.weight")
    return replace(
        PIA_MOTION,
        block_out_channels=tuple(widths[i] for i in range(n)),
        layers_per_block=tuple(counts[i] for i in range(n)),
        num_attention_heads=(8,) * n,
        transformer_layers_per_block=(1,) * n,
        max_seq_length=pe.shape[-2] if pe is not None else 32,
        use_mid_block=any(k.startswith("mid_block.motion_modules.") for k in sd),
        conv_in_channels=conv_in.shape[1] if conv_in is not None else None,
    )


def read_pia_ckpt(path: str | Path, config: MotionConfig | None = None) -> MotionAdapter:
    """The original open-mmlab/PIA `pia.ckpt` (AnimateDiff names, `temporal_transformer`, `pos_encoder.pe`
    tables, 9-channel conv_in) -> a MotionAdapter with diffusers names, by weights_map/pia_ckpt.json. The
    file holds the whole trained UNet: its spatial keys are not the adapter's and are left out (logged).
    A stored frame table is dropped only if it equals the recomputed one. config: inferred if None."""
    sd = {k.removeprefix("module."): t for k, t in read_file(Path(path)).items()}
    config = config or infer_motion_config(sd)
    motion = {k: t for k, t in sd.items() if ".motion_modules." in k or k.startswith("conv_in.")}
    if len(motion) < len(sd):
        logger.info(
            "%s: %d keys outside the motion modules and conv_in (the UNet's own) are not used",
            path,
            len(sd) - len(motion),
        )
    renamed, ignored = remap(motion, "pia_ckpt")
    ignored = remap(ignored, {"rename": load_table("pia_ckpt")["rename"], "ignore": []})[0]  # named as the rest
    n = len(config.block_out_channels)
    with torch.device("meta"):  # a UNet without spatial attention carries exactly the adapter's keys
        model = UNet(
            UNetConfig(
                in_channels=config.conv_in_channels or 4,
                out_channels=4,
                block_out_channels=config.block_out_channels,
                cross_attention=(False,) * n,
                layers_per_block=config.layers_per_block[0],
                cross_attention_dim=8,
                num_attention_heads=(1,) * n,
                norm_num_groups=config.norm_num_groups,
                norm_eps=1e-5,
                sample_size=None,
                motion=config,
            )
        )
    expected = {
        k: t
        for k, t in diffusers_names(model.state_dict()).items()
        if ".motion_modules." in k or (config.conv_in_channels and k.startswith("conv_in."))
    }
    unexpected, wrong = check_frame_tables(ignored, renamed, config)
    wrong += [
        f"{k}: checkpoint {tuple(renamed[k].shape)}, model {tuple(t.shape)}"
        for k, t in expected.items()
        if k in renamed and renamed[k].shape != t.shape
    ]
    missing, unexpected = expected.keys() - renamed.keys(), [*unexpected, *(renamed.keys() - expected.keys())]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: not a PIA checkpoint for this motion config", missing, unexpected, wrong)
    return MotionAdapter(config, renamed)
