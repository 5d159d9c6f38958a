"""Checkpoint loading: diffusers folders -> rename table -> meta-built model, strict + assign.

    read_state_dict(folder)     tensors of one diffusers model folder (safetensors, shards, variants, .bin)
    assemble_unet(base, motion) the motion UNet's tensors, merged like diffusers' UNetMotionModel.from_unet2d
    remap(sd)                   diffusers names -> pia_torch names with weights_map/diffusers.json
    build(cls, config, sd)      cls(config) on the meta device; every key and shape checked, then
                                load_state_dict(strict=True, assign=True): no random init is wasted
    load_pipeline_components    a diffusers SD1.5 folder or Hub repo + a motion adapter -> PIAPipeline's parts

build_unet / build_vae take state dicts, so the full-size key-coverage test runs the same code on
meta tensors that load_unet / load_vae run on real files.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pia_torch import hub
from pia_torch.config import MotionConfig, UNetConfig, VAEConfig
from pia_torch.models.motion import frame_positions
from pia_torch.models.unet import UNet
from pia_torch.models.vae import AutoencoderKL
from pia_torch.schedulers import DDIMScheduler, SchedulerBase, scheduler_class

logger = logging.getLogger("pia_torch")
StateDict = dict[str, Tensor]


class CheckpointError(ValueError):
    """A checkpoint that does not fit its model. One error lists every missing, unexpected and
    mis-shaped (or wrongly valued) key; also raised for an unreadable file."""

    def __init__(
        self, message: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (), mismatched: Iterable[str] = ()
    ):
        self.missing, self.unexpected, self.mismatched = sorted(missing), sorted(unexpected), list(mismatched)
        for title, items in [
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped or wrong", self.mismatched),
        ]:
            if items:
                message += f"\n  {len(items)} {title}:" + "".join(f"\n    {item}" for item in items)
        super().__init__(message)


# --------------------------------------------------------------------------------------------- files


def read_config(folder: str | Path, *class_names: str) -> dict:
    """`folder/config.json`; its `_class_name`, when present, must be one of class_names."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    config = json.loads(path.read_text())
    if config.get("_class_name", class_names[0]) not in class_names:
        raise ValueError(f"{path}: _class_name {config['_class_name']!r}, expected {' or '.join(class_names)}")
    return config


def read_file(path: Path) -> StateDict:
    """The tensors of one file: .safetensors, or a torch pickle (.bin, .ckpt, .pt, .pth) read with
    torch.load(weights_only=True), unwrapped from {"state_dict": ...}. A pickle that needs code to load is
    refused before any of it runs."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle at all, or a damaged one
            raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
        # weights_only met a class or function it will not build
        raise CheckpointError(
            f"{path}: refused, it needs Python code to load (a pickle with objects, not only "
            "tensors), and running it could run anything; nothing in it was executed. Convert it "
            "to .safetensors with a tool you trust and load that"
        ) from e
    except Exception as e:  # truncated, corrupt, or not a tensor file at all
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning / LDM training checkpoints
        sd = sd["state_dict"]
    return {k: t for k, t in sd.items() if isinstance(t, Tensor)}


def read_state_dict(folder: str | Path, variant: str | None = None) -> StateDict:
    """Tensors of one diffusers model folder, as stored (dtype kept): the first of hub.weight_candidates
    (safetensors before .bin, the variant before the plain files), a single file or the shards of an index."""
    folder = Path(folder)
    v, single, index, _ = hub.find_weights(folder, variant)
    weight_map = None if (folder / single).is_file() else json.loads((folder / index).read_text())["weight_map"]
    files = [single] if weight_map is None else sorted(set(weight_map.values()))
    if v != variant:
        logger.info("%s: no %r variant, reading %s", folder, variant, files[0])
    sd = {k: t for name in files for k, t in read_file(folder / name).items()}
    if weight_map is not None and weight_map.keys() - sd.keys():
        raise CheckpointError(
            f"{folder / index}: shards lack keys listed in the index", missing=weight_map.keys() - sd.keys()
        )
    return sd


# --------------------------------------------------------------------------------------------- names


@cache
def load_table(name: str = "diffusers") -> dict:
    """Rename table weights_map/<name>.json, from the installed package, else from the repository."""
    packaged = resources.files("pia_torch") / "weights_map" / f"{name}.json"
    path = packaged if packaged.is_file() else Path(__file__).resolve().parents[1] / "weights_map" / f"{name}.json"
    return json.loads(path.read_text())


def component_pattern(old: str) -> re.Pattern:
    """`old` as whole dot-separated components: ff.net.2 matches in "ff.net.2.bias", not "ff.net.20"."""
    return re.compile(rf"(?<![^.]){re.escape(old)}(?![^.])")


def remap(sd: StateDict, table: str | dict = "diffusers") -> tuple[StateDict, StateDict]:
    """Rename keys with a table's ordered [old, new, reason] rules. Returns (renamed, ignored): ignored
    keys match one of the table's "ignore" rules, whose reason says what the caller does with them."""
    table = load_table(table) if isinstance(table, str) else table
    rules = [(component_pattern(old), new) for old, new, _ in table["rename"]]
    ignore = [component_pattern(old) for old, _ in table["ignore"]]
    renamed, ignored, origin = {}, {}, {}
    for key, value in sd.items():
        if any(p.search(key) for p in ignore):
            ignored[key] = value
            continue
        new = key
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        if new in renamed:
            raise CheckpointError(f"checkpoint keys {origin[new]!r} and {key!r} both map to {new!r}")
        renamed[new], origin[new] = value, key
    return renamed, ignored


def diffusers_names(sd: StateDict) -> StateDict:
    """pia_torch names -> diffusers names, with the "to_diffusers" rules of weights_map/diffusers.json."""
    return remap(sd, {"rename": load_table("diffusers")["to_diffusers"], "ignore": []})[0]


def check_frame_tables(ignored: StateDict, sd: StateDict, motion: MotionConfig | None) -> tuple[list, list]:
    """The dropped motion `pos_embed.pe` tables must equal frame_positions(max_seq_length, C).
    Returns (unexpected, wrong) keys for CheckpointError."""
    unexpected, wrong = [], []
    for key, pe in ignored.items():
        proj_in = sd.get(key.split(".transformer_blocks.")[0] + ".proj_in.weight")
        if motion is None or proj_in is None:
            unexpected.append(key)  # no motion module here to use it
            continue
        want = (1, motion.max_seq_length, proj_in.shape[0])
        if tuple(pe.shape) != want:
            wrong.append(f"{key}: checkpoint {tuple(pe.shape)}, expected {want}")
        elif not pe.is_meta:
            err = (pe.float() - frame_positions(*want[1:])).abs().max().item()
            if err > (1e-4 if torch.finfo(pe.dtype).bits >= 32 else 1e-2):
                wrong.append(f"{key}: differs from frame_positions{want[1:]} by up to {err:.3g}")
    return unexpected, wrong


# --------------------------------------------------------------------------------------------- models


def build(
    model_cls: type[nn.Module],
    config,
    sd: StateDict,
    *,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    source: str = "checkpoint",
    unexpected: Iterable[str] = (),
    wrong: Iterable[str] = (),
) -> nn.Module:
    """model_cls(config) filled with sd (pia_torch names): strict, shapes checked, one error for all problems.
    Floating tensors are cast to torch_dtype (float32 by default, like diffusers) and moved to device."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    missing = expected.keys() - sd.keys()
    unexpected = [*unexpected, *(sd.keys() - expected.keys())]
    wrong = [
        *wrong,
        *(
            f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(t.shape)}"
            for k, t in expected.items()
            if k in sd and sd[k].shape != t.shape
        ),
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source}: checkpoint does not match {model_cls.__name__}", missing, unexpected, wrong)
    dtype = torch_dtype or torch.float32
    sd = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for k, t in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    meta_left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta_left or all(t.is_meta for t in sd.values()), f"not filled by the checkpoint: {meta_left}"
    return model.eval()


class MotionAdapter:
    """A motion adapter (AnimateDiff / PIA): its config and diffusers-named tensors (motion modules and,
    for PIA, a 9-channel conv_in). It only carries weights; load_unet merges it into a UNet."""

    def __init__(self, config: MotionConfig, state_dict: StateDict):
        self.config, self.state_dict = config, state_dict

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | Path,
        *,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
    ) -> MotionAdapter:
        """Read `config.json` (_class_name MotionAdapter) + weights from a folder or a Hub repo id."""
        folder = hub.fetch(
            repo_id_or_dir, variant=variant, cache_dir=cache_dir, local_files_only=local_files_only, revision=revision
        )
        config = MotionConfig.from_diffusers(read_config(folder, "MotionAdapter"))
        dtype = torch_dtype or torch.float32
        return cls(config, {k: t.to(dtype) for k, t in read_state_dict(folder, variant).items()})

    @classmethod
    def from_single_file(
        cls, path: str | Path, config: MotionConfig | None = None, torch_dtype: torch.dtype | None = None
    ) -> MotionAdapter:
        """The original PIA checkpoint `pia.ckpt` (open-mmlab/PIA layout), read safely; config: inferred from
        the file's shapes (PIA's heads and groups) unless given. See single_file.read_pia_ckpt."""
        from pia_torch.single_file import read_pia_ckpt  # single_file builds on this module

        adapter = read_pia_ckpt(path, config)
        dtype = torch_dtype or torch.float32
        return cls(adapter.config, {k: t.to(dtype) for k, t in adapter.state_dict.items()})

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write a diffusers MotionAdapter folder: config.json + diffusion_pytorch_model.safetensors."""
        from pia_torch.saving import save_adapter  # saving builds on this module

        save_adapter(self, save_directory)


def assemble_unet(base: StateDict, adapter: StateDict, conv_in: str = "base") -> StateDict:
    """UNetMotionModel.from_unet2d (diffusers/models/unets/unet_motion_model.py): everything from the base UNet,
    motion modules (down, up, and mid if the adapter has one) from the adapter. PIA's conv_in, conv_in="base":
    input channels 0-3 and the bias from the base UNet, channels 4.. from the adapter (diffusers, and the
    original PIA with a personalised model); conv_in="adapter": all of it from the adapter (the original PIA
    on the plain SD1.5 base)."""
    if conv_in not in ("base", "adapter"):
        raise ValueError(f"conv_in must be 'base' or 'adapter', got {conv_in!r}")
    sd = dict(base)
    for key, value in adapter.items():
        if key.startswith("conv_in."):
            continue
        if key in sd:
            raise CheckpointError(f"adapter key {key!r} is also in the base UNet")
        sd[key] = value
    if "conv_in.weight" in adapter and conv_in == "adapter":
        sd["conv_in.weight"], sd["conv_in.bias"] = adapter["conv_in.weight"], adapter["conv_in.bias"]
        logger.info("conv_in: all %d input channels and the bias from the adapter", adapter["conv_in.weight"].shape[1])
    elif "conv_in.weight" in adapter:
        w_base, w_adapter = base["conv_in.weight"], adapter["conv_in.weight"]
        dtype = torch.promote_types(w_base.dtype, w_adapter.dtype)  # an fp16 file beside an fp32 one loses nothing
        sd["conv_in.weight"] = torch.cat([w_base.to(dtype), w_adapter[:, 4:].to(dtype)], dim=1)  # (C, 4 + 5, 3, 3)
        logger.info(
            "conv_in: %d input channels = base UNet channels 0-3 + adapter channels 4-%d; bias from the "
            "base UNet (adapter conv_in.bias and channels 0-3 unused, as diffusers' from_unet2d)",
            sd["conv_in.weight"].shape[1],
            w_adapter.shape[1] - 1,
        )
    return sd


def build_unet(
    config_dict: dict,
    base: StateDict,
    adapter: MotionAdapter | None = None,
    *,
    convention: str = "original",
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    source: str = "unet",
    conv_in: str = "base",
) -> UNet:
    """The UNet from a diffusers config.json dict and its diffusers-named tensors (+ an adapter, merged by
    assemble_unet with its conv_in rule)."""
    if adapter is not None and config_dict.get("_class_name") == "UNetMotionModel":
        logger.warning(
            "%s is a UNetMotionModel with its own motion modules: the adapter is not used (as diffusers' PIAPipeline)",
            source,
        )
        adapter = None
    config = UNetConfig.from_diffusers(config_dict, motion=adapter.config if adapter else None, convention=convention)
    sd = assemble_unet(base, adapter.state_dict, conv_in) if adapter is not None else base
    sd, ignored = remap(sd)
    unexpected, wrong = check_frame_tables(ignored, sd, config.motion)
    return build(
        UNet, config, sd, torch_dtype=torch_dtype, device=device, source=source, unexpected=unexpected, wrong=wrong
    )


def build_vae(
    config_dict: dict,
    sd: StateDict,
    *,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    source: str = "vae",
) -> AutoencoderKL:
    """The VAE from a diffusers config.json dict and its diffusers-named (or legacy-named) tensors."""
    sd, ignored = remap(sd)
    return build(
        AutoencoderKL,
        VAEConfig.from_diffusers(config_dict),
        sd,
        torch_dtype=torch_dtype,
        device=device,
        source=source,
        unexpected=ignored.keys(),
    )


def load_unet(
    unet_dir: str | Path,
    adapter: MotionAdapter | None = None,
    *,
    convention: str = "original",
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    variant: str | None = None,
    conv_in: str = "base",
) -> UNet:
    """A diffusers `unet/` folder (UNet2DConditionModel) + a MotionAdapter -> the PIA UNet, assembled like
    diffusers' UNetMotionModel.from_unet2d. A UNetMotionModel folder loads alone (adapter=None)."""
    config_dict = read_config(unet_dir, "UNet2DConditionModel", "UNetMotionModel")
    return build_unet(
        config_dict,
        read_state_dict(unet_dir, variant),
        adapter,
        convention=convention,
        torch_dtype=torch_dtype,
        device=device,
        source=str(unet_dir),
        conv_in=conv_in,
    )


def load_vae(
    vae_dir: str | Path,
    *,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    variant: str | None = None,
) -> AutoencoderKL:
    """A diffusers `vae/` folder (AutoencoderKL) -> pia_torch AutoencoderKL."""
    return build_vae(
        read_config(vae_dir, "AutoencoderKL"),
        read_state_dict(vae_dir, variant),
        torch_dtype=torch_dtype,
        device=device,
        source=str(vae_dir),
    )


# --------------------------------------------------------------------------------------------- pipeline


def load_pipeline_components(
    repo_id_or_dir: str | Path,
    motion_adapter: MotionAdapter | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    convention: str = "original",
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
    vae: str | Path | AutoencoderKL | None = None,
    conv_in: str = "base",
) -> dict:
    """PIAPipeline's components {vae, text_encoder, tokenizer, unet, scheduler} from a diffusers Stable
    Diffusion 1.5 folder or Hub repo (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    + a PIA motion adapter (else the repo's motion_adapter/). Only those files are fetched. vae: a separate
    VAE (a single LDM or diffusers file, a diffusers folder, or a model) instead of the repo's."""
    from transformers import CLIPTextModel, CLIPTokenizer

    where = {"cache_dir": cache_dir, "local_files_only": local_files_only, "revision": revision}
    root = hub.resolve(
        repo_id_or_dir,
        ["model_index.json", "scheduler/*.json", "tokenizer/*", "text_encoder/*.json", "vae/config.json"],
        **where,
    )
    unet_dir = hub.fetch(repo_id_or_dir, "unet", variant=variant, **where)
    own_motion = (
        read_config(unet_dir, "UNet2DConditionModel", "UNetMotionModel").get("_class_name") == "UNetMotionModel"
    )
    if motion_adapter is None and not own_motion:
        if not (root / "motion_adapter" / "config.json").is_file():
            raise ValueError(
                "PIA needs a motion adapter: pass motion_adapter="
                "MotionAdapter.from_pretrained('openmmlab/PIA-condition-adapter')"
            )
        motion_adapter = MotionAdapter.from_pretrained(root / "motion_adapter", variant=variant)
    dtype = torch_dtype or torch.float32
    unet = load_unet(
        unet_dir, motion_adapter, convention=convention, torch_dtype=dtype, variant=variant, conv_in=conv_in
    )
    if vae is None:
        vae = load_vae(hub.fetch(repo_id_or_dir, "vae", variant=variant, **where), torch_dtype=dtype, variant=variant)
    else:
        from pia_torch.single_file import load_any_vae  # single_file builds on this module

        vae = load_any_vae(vae, dtype, read_config(root / "vae", "AutoencoderKL"))  # a file: the repo's VAE config
    text_dir = hub.fetch(repo_id_or_dir, "text_encoder", variant=variant, stems=hub.TRANSFORMERS, **where)
    text_variant = hub.find_weights(text_dir, variant, hub.TRANSFORMERS)[0]
    text_encoder = CLIPTextModel.from_pretrained(text_dir, variant=text_variant).to(dtype).eval()
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
        "unet": unet,
        "scheduler": load_scheduler(root / "scheduler"),
    }


def load_scheduler(folder: Path) -> SchedulerBase:
    """scheduler_config.json -> the SAMPLERS class of its `_class_name`; any other class (e.g. SD1.5's PNDM)
    -> DDIM with the same betas."""
    config = json.loads((folder / "scheduler_config.json").read_text())
    cls = scheduler_class(config.get("_class_name"))
    if cls is None:
        logger.info(
            "scheduler %s is not offered by pia_torch: using DDIMScheduler with the same betas",
            config.get("_class_name"),
        )
        cls = DDIMScheduler
    return cls.from_config(config)
