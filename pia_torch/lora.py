"""LoRA on the UNet and the CLIP text encoder: applied at forward time, or fused into the weights.

    read_lora(path)                  a LoRA file's tensors and its diffusers `lora_adapter_metadata`
    lora_names(unet, text_encoder)   every name a LoRA file may give a Linear / Conv2d -> its target module
    parse_lora(sd, metadata, names)  kohya / A1111 and diffusers / PEFT layouts -> {target: LoraLayer}
    LoraAdapters(unet, text_encoder) load, set_adapters, fuse, unfuse, unload: PIAPipeline's LoRA methods

Layouts (kohya sd-scripts, diffusers/loaders/lora_conversion_utils.py, PEFT): kohya `lora_unet_<path>`
with the diffusers path or the LDM one (`input_blocks_4_1_...`), `lora_te_` / `lora_te1_text_model_<path>`,
`.lora_down/.lora_up.weight` and `.alpha`, LoCon convs (3x3 down, 1x1 up) included; diffusers / PEFT
`unet.<path>.lora_A/lora_B.weight` and `text_encoder.<path>...`, alphas from `lora_adapter_metadata`
(lora_alpha, alpha_pattern). A name is looked up in a table of the model's own module paths, never split on underscores.

Merge (kohya `merge_to`, PEFT, diffusers `fuse_lora`): W' = W + Σ_i w_i · (α_i / r_i) · up_i @ down_i,
r = rows of down, α = the module's own `.alpha` (missing: α = r). diffusers applies the most common
alpha to attention and text-encoder layers; the original PIA merge ignores alpha; both differ here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from pia_torch.loading import diffusers_names
from pia_torch.single_file import ldm_path

SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",  # kohya
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
}  # PEFT
Target = tuple[str, nn.Module]  # ("unet.<pia_torch path>" or "text_encoder.<path>", the Linear / Conv2d)


@dataclass
class LoraLayer:
    """One low-rank update of one layer, shaped for its target: down (r, in) and up (out, r) for a
    Linear, down (r, in, kh, kw) and up (out, r, 1, 1) for a Conv2d; scale = α / r. float32."""

    down: Tensor
    up: Tensor
    scale: float

    def delta(self) -> Tensor:
        """up @ down in float32, shaped like the target weight: (out, in) or (out, in, kh, kw)."""
        return (self.up.flatten(1) @ self.down.flatten(1)).view(self.up.shape[0], *self.down.shape[1:])


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and the `lora_adapter_metadata` JSON ({} if none) of a .safetensors file; .pt / .bin / .ckpt
    are read with torch.load(weights_only=True) and have no metadata."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            metadata = (f.metadata() or {}).get("lora_adapter_metadata")
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(metadata) if metadata else {}
    if path.suffix in (".pt", ".bin", ".ckpt"):
        return torch.load(path, map_location="cpu", weights_only=True), {}
    raise ValueError(f"{path}: a LoRA file must be .safetensors, .pt, .bin or .ckpt")


def lora_names(unet: nn.Module, text_encoder: nn.Module | None = None) -> dict[str, Target]:
    """Every name a LoRA file may give a Linear / Conv2d -> (target key, module). UNet module d (diffusers
    path): `unet.d`, `lora_unet_` + d and its LDM path (single_file.ldm_path) with "." -> "_".
    Text encoder module q (path without `text_model.`, transformers 4.x or 5.x): `text_encoder.q`,
    `text_encoder.text_model.q`, `lora_te_text_model_q` and `lora_te1_text_model_q` with "." -> "_"."""
    names: dict[str, Target] = {}
    modules = {p: m for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    diffusers = diffusers_names({p: p for p in modules})  # {diffusers path: pia_torch path}
    ldm = {d: ldm_path("unet", f"{d}.weight", unet.config).removesuffix(".weight") for d in diffusers}
    for d, p in diffusers.items():
        target = (f"unet.{p}", modules[p])
        for name in (f"unet.{d}", "lora_unet_" + d.replace(".", "_"), "lora_unet_" + ldm[d].replace(".", "_")):
            names[name] = target
    for p, m in text_encoder.named_modules() if text_encoder is not None else []:
        if isinstance(m, nn.Linear):
            q = p.removeprefix("text_model.")
            for name in (
                f"text_encoder.{q}",
                f"text_encoder.text_model.{q}",
                *(f"{prefix}_text_model_{q.replace('.', '_')}" for prefix in ("lora_te", "lora_te1")),
            ):
                names[name] = (f"text_encoder.{p}", m)
    return names


def peft_alpha(name: str, rank: int, metadata: dict) -> float:
    """α of PEFT module `name` (`unet.<path>`): its component's alpha_pattern (PEFT's rule: the first key
    matching the end of the path at a "." boundary), else lora_alpha, else the rank (scale 1)."""
    component, _, path = name.partition(".")
    config = {k.removeprefix(f"{component}."): v for k, v in metadata.items() if k.startswith(f"{component}.")}
    for pattern, alpha in config.get("alpha_pattern", {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", path):
            return alpha
    return config.get("lora_alpha", rank)


def parse_lora(sd: dict[str, Tensor], metadata: dict, names: dict[str, Target]) -> dict[str, LoraLayer]:
    """Any supported layout -> {target key: LoraLayer}, float32 on the target's device. One ValueError
    lists every key that matches no module or belongs to no complete down/up pair; DoRA is refused."""
    dora = [k for k in sd if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora or any(k.endswith("use_dora") and v for k, v in metadata.items()):
        raise ValueError(
            f"DoRA LoRA (weight-decomposed, e.g. {dora[:2]}) is not supported: its magnitude "
            "vectors cannot be dropped without changing the result"
        )
    groups, bad = {}, []
    for key, tensor in sd.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None or key[: -len(suffix)] not in names:
            bad.append(key)
        else:
            groups.setdefault(key[: -len(suffix)], {})[SUFFIXES[suffix]] = tensor
    bad += [f"{name}: no {part}" for name, g in groups.items() for part in ("down", "up") if part not in g]
    layers = {}
    for name, g in groups.items():
        if "down" not in g or "up" not in g:
            continue
        key, module = names[name]
        weight, r = module.weight, g["down"].shape[0]
        down, up = (t.to(weight.device, torch.float32) for t in (g["down"], g["up"]))
        if key in layers:
            bad.append(f"{name}: a second entry for {key}")
            continue
        if up.flatten(1).shape != (weight.shape[0], r) or down[0].numel() != weight[0].numel():
            bad.append(f"{name}: down {tuple(down.shape)}, up {tuple(up.shape)} do not fit {tuple(weight.shape)}")
            continue
        alpha = float(g["alpha"]) if "alpha" in g else peft_alpha(name, r, metadata)
        scale = alpha / (math.sqrt(r) if metadata.get(f"{name.split('.')[0]}.use_rslora") else r)
        ones = [1] * (weight.ndim - 2)  # conv: up is a 1x1 conv, down has the target's kernel
        layers[key] = LoraLayer(down.reshape(r, *weight.shape[1:]), up.reshape(-1, r, *ones), scale)
    if bad:
        raise ValueError(
            f"{len(bad)} LoRA keys match no module of this model, or are incomplete or mis-shaped "
            "(LyCORIS LoHa / LoKr / Tucker keys are not supported):" + "".join(f"\n  {k}" for k in sorted(bad))
        )
    return layers


class LoraAdapters:
    """Named LoRA adapters on a UNet and a text encoder, for PIAPipeline's diffusers-named methods.

    Unfused, each target layer has a forward hook adding Σ_i w_i·(α_i/r_i)·up_i(down_i(x)) (down with the
    layer's own stride and padding), so weights may change between calls. `fuse` writes the same sum into
    the weights in float32 and keeps the original Parameters, which `unfuse` puts back bit for bit
    (so move or cast the models while unfused).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> None:
        self.unet, self.text_encoder = unet, text_encoder
        self.adapters: dict[str, dict[str, LoraLayer]] = {}  # name -> {target key: layer}
        self.weights: dict[str, float] = {}  # active adapters -> weight
        self.modules: dict[str, nn.Module] = {}  # target key -> hooked Linear / Conv2d
        self.hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self.originals: dict[str, nn.Parameter] = {}  # target key -> weight before fuse

    def _refuse_if_fused(self, action: str) -> None:
        if self.originals:
            raise ValueError(f"{action}: the LoRA is fused into the weights; call unfuse_lora() first")

    def load(self, source: str | Path | dict[str, Tensor], adapter_name: str | None = None) -> str:
        """Read a LoRA file (or a state dict) as adapter `adapter_name` (default "default_<n>"). As in
        diffusers, it becomes the only active adapter, with weight 1. Returns its name."""
        self._refuse_if_fused("load_lora_weights")
        name = f"default_{len(self.adapters)}" if adapter_name is None else adapter_name
        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} is already in use")
        sd, metadata = (source, {}) if isinstance(source, dict) else read_lora(source)
        names = lora_names(self.unet, self.text_encoder)
        self.adapters[name] = parse_lora(sd, metadata, names)
        for key, module in names.values():
            if key in self.adapters[name] and key not in self.hooks:
                self.modules[key], self.hooks[key] = module, module.register_forward_hook(self._hook(key))
        self.weights = {name: 1.0}
        return name

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Activate exactly these adapters, with these weights (one number for all, or one each; None = 1)."""
        self._refuse_if_fused("set_adapters")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if isinstance(adapter_weights, dict):
            raise ValueError("per-block adapter weights (dicts) are not supported: give one number per adapter")
        many = isinstance(adapter_weights, (list, tuple))
        weights = list(adapter_weights) if many else [adapter_weights] * len(names)
        if unknown := [n for n in names if n not in self.adapters]:
            raise ValueError(f"unknown adapters {unknown}; loaded: {list(self.adapters)}")
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
        self.weights = {n: 1.0 if w is None else float(w) for n, w in zip(names, weights, strict=True)}

    def _delta(self, key: str) -> Tensor | None:
        """Σ over active adapters of w·(α/r)·up @ down for one target, float32; None if none touches it."""
        deltas = [
            w * self.adapters[n][key].scale * self.adapters[n][key].delta()
            for n, w in self.weights.items()
            if key in self.adapters[n]
        ]
        return sum(deltas) if deltas else None

    def _hook(self, key: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            """x (..., in) or (N, in, h, w) -> output + Σ w·(α/r)·up(down(x)); nothing while fused."""
            if self.originals:
                return output
            x = args[0]
            for n, w in self.weights.items():
                layer = self.adapters[n].get(key)
                if layer is None:
                    continue
                down, up = layer.down.to(x), layer.up.to(x)  # device and dtype of the input
                if isinstance(module, nn.Conv2d):
                    h = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
                    h = F.conv2d(h, up)  # (N, out, h', w')
                else:
                    h = F.linear(F.linear(x, down), up)  # (..., out)
                output = output + (w * layer.scale) * h
            return output

        return hook

    @torch.no_grad()
    def fuse(self, lora_scale: float = 1.0) -> None:
        """W <- W + lora_scale · Σ_i w_i·(α_i/r_i)·ΔW_i, computed in float32, cast to W's dtype."""
        self._refuse_if_fused("fuse_lora")
        for key, module in self.modules.items():
            delta = self._delta(key)
            if delta is not None:
                weight = module.weight
                fused = (weight.float() + lora_scale * delta.to(weight.device)).to(weight.dtype)
                self.originals[key], module.weight = weight, nn.Parameter(fused, weight.requires_grad)

    def unfuse(self) -> None:
        """Put the original weights back (the very Parameters: bit-exact); no-op when not fused."""
        for key, weight in self.originals.items():
            self.modules[key].weight = weight
        self.originals = {}

    def unload(self) -> None:
        """Remove every adapter and hook. As in diffusers, fused weights stay fused (unfuse first to undo)."""
        for hook in self.hooks.values():
            hook.remove()
        self.adapters, self.weights, self.modules, self.hooks, self.originals = {}, {}, {}, {}, {}
