"""Single-file checkpoints: an SD1.x model in the original LDM layout, a separate VAE file and the original
`pia.ckpt`, read safely and strictly.

The fixture files are written from the random diffusers fixtures with the verified key maps of
shared/spec/keys (ldm_sd15_keymap.tsv, pia_ckpt_motion_keymap.tsv: what diffusers' own converters produce),
not with pia_torch's tables, so the tables are checked against an independent source. The "small" models
have SD1.5's block layout (4 levels, 2 layers each) at a tenth of the width.
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import ADAPTER, TINY_DDIM, make_adapter, make_unet2d, make_vae, pipeline_depth, randomize_, tol
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pia_torch import MotionAdapter, PIAPipeline
from pia_torch.config import PIA_MOTION, MotionConfig, UNetConfig, VAEConfig
from pia_torch.demo import ASSETS, demo_image
from pia_torch.loading import CheckpointError, diffusers_names, load_unet
from pia_torch.models.motion import frame_positions
from pia_torch.models.unet import UNet
from pia_torch.models.vae import AutoencoderKL
from pia_torch.single_file import SD15_CONFIGS, _expected, from_ldm, ldm_path, split_components

KEYS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "keys"


def keymap() -> dict[str, str]:
    """diffusers key (with its component prefix: unet., vae., text_encoder.text_model.) -> LDM key."""
    with open(KEYS / "ldm_sd15_keymap.tsv") as f:
        return {row["diffusers_key"]: row["ldm_key"] for row in csv.DictReader(f, delimiter="\t")}


def text_encoder(seed: int = 40) -> CLIPTextModel:
    """A small CLIP text tower whose width is the small UNet's cross_attention_dim (32)."""
    torch.manual_seed(seed)
    vocab = len(CLIPTokenizer.from_pretrained(ASSETS / "tokenizer"))
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return randomize_(CLIPTextModel(config).eval(), seed + 1)


def to_ldm(models: dict[str, torch.nn.Module], text_prefix: str = "text_model.") -> dict[str, torch.Tensor]:
    """diffusers / transformers models -> one LDM state dict, by the spec's key map (VAE attention
    weights become 1x1 convs, as LDM stores them)."""
    names, sd = keymap(), {}
    for component, model in models.items():
        for key, tensor in model.state_dict().items():
            key = key.removeprefix("text_model.")
            ldm = names[f"{component}.text_model.{key}" if component == "text_encoder" else f"{component}.{key}"]
            if component == "text_encoder":
                ldm = ldm.replace(
                    "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer." + text_prefix
                )
            if (
                component == "vae"
                and ".mid.attn_1." in ldm
                and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
            ):
                tensor = tensor[:, :, None, None]  # (c, c) -> (c, c, 1, 1)
            sd[ldm] = tensor.clone()
    return sd


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """A small diffusers SD folder (config= for pia_torch and diffusers), the same weights as one LDM
    file (with EMA, schedule buffers, position ids and a stray key), the PIA adapter folder."""
    root = tmp_path_factory.mktemp("single_file")
    models = {"unet": make_unet2d("small"), "vae": make_vae("small"), "text_encoder": text_encoder()}
    folder = root / "sd"
    for name, model in models.items():
        model.save_pretrained(folder / name)
    shutil.copytree(ASSETS / "tokenizer", folder / "tokenizer")
    diffusers.DDIMScheduler(**TINY_DDIM).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    make_adapter("small").save_pretrained(root / "adapter")
    sd = to_ldm(models)
    ema = {
        "model_ema." + k.removeprefix("model.diffusion_model.").replace(".", ""): t + 1
        for k, t in list(sd.items())[:5]
        if k.startswith("model.diffusion_model.")
    }
    extras = {
        "model_ema.decay": torch.tensor(0.999),
        "betas": torch.linspace(0, 1, 1000),
        "alphas_cumprod": torch.ones(1000),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "lora_te_something.weight": torch.ones(2),
    }
    save_file({**sd, **ema, **extras}, root / "model.safetensors")
    return {
        "root": root,
        "folder": folder,
        "file": root / "model.safetensors",
        "adapter": root / "adapter",
        "models": models,
        "ldm": sd,
    }


def state(pipe: PIAPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": t
        for name in ("unet", "vae", "text_encoder")
        for k, t in getattr(pipe, name).state_dict().items()
    }


def assert_same_weights(a: PIAPipeline, b: PIAPipeline) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]


def frames(pipe: PIAPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        demo_image().resize((32, 32)),
        "hills",
        num_frames=2,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames


# --------------------------------------------------------------------------------------------- LDM checkpoints


def test_single_file_equals_the_folder(small):
    adapter = MotionAdapter.from_pretrained(small["adapter"])
    ours = PIAPipeline.from_single_file(
        small["file"], motion_adapter=adapter, config=small["folder"], convention="diffusers"
    )
    folder = PIAPipeline.from_pretrained(small["folder"], motion_adapter=adapter, convention="diffusers")
    assert_same_weights(ours, folder)
    # same weights at other memory addresses: kernels may round differently (seen with one thread)
    want = frames(folder)
    np.testing.assert_allclose(frames(ours), want, atol=tol(want, pipeline_depth(folder, 2))["atol"], rtol=0)


@pytest.mark.parametrize("form", ["ckpt without text_model.", "pt with state_dict wrapper", "fp16"])
def test_single_file_forms(small, tmp_path, form):
    """The text encoder with or without its text_model. level, a torch pickle of tensors (read with
    weights_only=True) in Lightning's {"state_dict": ...}, fp16 tensors."""
    adapter = MotionAdapter.from_pretrained(small["adapter"])
    sd = small["ldm"]
    if form == "ckpt without text_model.":
        sd, path = to_ldm(small["models"], text_prefix=""), tmp_path / "m.ckpt"
        torch.save(sd, path)
    elif form == "pt with state_dict wrapper":
        path = tmp_path / "m.pt"
        torch.save({"state_dict": sd, "global_step": 10}, path)
    else:
        path = tmp_path / "m.safetensors"
        save_file({k: t.half() for k, t in sd.items()}, path)
    ours = PIAPipeline.from_single_file(path, motion_adapter=adapter, config=small["folder"])
    folder = PIAPipeline.from_pretrained(small["folder"], motion_adapter=adapter)
    if form == "fp16":
        # the file's tensors rounded to fp16; the motion modules and conv_in's channels 4-8 are the adapter's
        want = {k: t if "motion_modules" in k else t.half().float() for k, t in state(folder).items()}
        want["unet.conv_in.weight"][:, 4:] = folder.unet.conv_in.weight[:, 4:]
        assert [k for k, t in state(ours).items() if not torch.equal(t, want[k])] == []
    else:
        assert_same_weights(ours, folder)


def test_diffusers_reads_the_same_weights(small):
    """diffusers' own from_single_file(config=...) on the same file gives the same UNet and VAE tensors."""
    unet = diffusers.UNet2DConditionModel.from_single_file(
        small["file"], config=str(small["folder"]), subfolder="unet", local_files_only=True
    )
    vae = diffusers.AutoencoderKL.from_single_file(
        small["file"], config=str(small["folder"]), subfolder="vae", local_files_only=True
    )
    ours = PIAPipeline.from_single_file(
        small["file"], motion_adapter=MotionAdapter.from_pretrained(small["adapter"]), config=small["folder"]
    )
    unet_sd = diffusers_names(ours.unet.state_dict())
    for key, tensor in unet.state_dict().items():
        want = unet_sd[key][:, :4] if key == "conv_in.weight" else unet_sd[key]  # channels 0-3 come from the file
        assert torch.equal(tensor, want), key
    assert {k: t for k, t in diffusers_names(ours.vae.state_dict()).items()}.keys() == vae.state_dict().keys()
    assert all(torch.equal(t, diffusers_names(ours.vae.state_dict())[k]) for k, t in vae.state_dict().items())


def test_separate_vae(small, tmp_path):
    """vae=: an LDM VAE file (bare keys, as vae-ft-mse-840000) for from_single_file and from_pretrained,
    and a diffusers folder; each equals that VAE loaded from its diffusers folder."""
    other = make_vae("small", seed=77)
    other.save_pretrained(tmp_path / "vae_folder")
    bare = {k.removeprefix("first_stage_model."): t for k, t in to_ldm({"vae": other}).items()}
    save_file(bare, tmp_path / "vae.safetensors")
    adapter = MotionAdapter.from_pretrained(small["adapter"])
    want = PIAPipeline.from_pretrained(small["folder"], motion_adapter=adapter, vae=tmp_path / "vae_folder").vae
    for pipe in (
        PIAPipeline.from_single_file(small["file"], adapter, config=small["folder"], vae=tmp_path / "vae.safetensors"),
        PIAPipeline.from_pretrained(small["folder"], motion_adapter=adapter, vae=tmp_path / "vae.safetensors"),
    ):
        got = pipe.vae.state_dict()
        assert all(torch.equal(t, got[k]) for k, t in want.state_dict().items())
    assert not torch.equal(
        want.state_dict()["decoder.conv_in.weight"],
        diffusers_names(make_vae("small").state_dict())["decoder.conv_in.weight"],
    )


def test_strict(small, tmp_path):
    sd = dict(small["ldm"])
    del sd["model.diffusion_model.input_blocks.4.0.in_layers.2.weight"]
    sd["model.diffusion_model.input_blocks.4.0.in_layers.9.weight"] = torch.zeros(1)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "bad.safetensors")
    adapter = MotionAdapter.from_pretrained(small["adapter"])
    with pytest.raises(CheckpointError) as e:
        PIAPipeline.from_single_file(tmp_path / "bad.safetensors", adapter, config=small["folder"])
    assert "input_blocks.4.0.in_layers.2.weight" in str(e.value) and "in_layers.9.weight" in str(e.value)
    del sd["model.diffusion_model.input_blocks.4.0.in_layers.9.weight"]
    sd["model.diffusion_model.input_blocks.4.0.in_layers.2.weight"] = small["ldm"][
        "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"
    ]
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"decoder\.conv_in\.weight: checkpoint \(3,\)"):
        PIAPipeline.from_single_file(tmp_path / "bad.safetensors", adapter, config=small["folder"])
    save_file(
        {k: t for k, t in small["ldm"].items() if not k.startswith("first_stage_model.")},
        tmp_path / "novae.safetensors",
    )
    with pytest.raises(ValueError, match="holds no VAE"):
        PIAPipeline.from_single_file(tmp_path / "novae.safetensors", adapter, config=small["folder"])


class Payload:
    """A pickle that would create a file when loaded: what a malicious .ckpt does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_code_is_refused(small, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused, it needs Python code to load") as e:
        PIAPipeline.from_single_file(path, MotionAdapter.from_pretrained(small["adapter"]), config=small["folder"])
    assert "safetensors" in str(e.value) and isinstance(e.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_tokenizer_from_the_hub_cache(small, tmp_path, monkeypatch):
    """Without config= the tokenizer comes from the Hub cache (openai/clip-vit-large-patch14); offline
    without it, the error names what to download."""
    from pia_torch.single_file import TOKENIZER, _tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=f"huggingface-cli download {TOKENIZER} vocab.json"):
        _tokenizer(tmp_path)
    repo = tmp_path / "hub" / f"models--{TOKENIZER.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(ASSETS / "tokenizer", repo / "snapshots" / "abc123")
    tokenizer = _tokenizer(tmp_path)
    assert tokenizer.model_max_length == 77 and len(tokenizer) == len(
        CLIPTokenizer.from_pretrained(ASSETS / "tokenizer")
    )


def test_full_sd15_key_coverage():
    """Every key of a real SD1.5 single file (the spec's 1130-row map, shapes included) maps onto the models
    built from the shipped SD1.5 configs, and each lands on the diffusers key diffusers' converter gives."""
    rows = list(csv.DictReader(open(KEYS / "ldm_sd15_keymap.tsv"), delimiter="\t"))
    sd = {r["ldm_key"]: torch.empty(eval(r["ldm_shape"]), device="meta") for r in rows}
    parts = split_components(sd)
    unet = UNetConfig.from_diffusers(json.loads((SD15_CONFIGS / "unet" / "config.json").read_text()))
    vae = VAEConfig.from_diffusers(json.loads((SD15_CONFIGS / "vae" / "config.json").read_text()))
    text_config = CLIPTextConfig.from_pretrained(SD15_CONFIGS / "text_encoder")
    with torch.device("meta"):
        text = {
            k.removeprefix("text_model."): tuple(t.shape) for k, t in CLIPTextModel(text_config).state_dict().items()
        }
    mapped = {
        "unet": from_ldm(parts["unet"], "unet", _expected(UNet, unet), unet),
        "vae": from_ldm(parts["vae"], "vae", _expected(AutoencoderKL, vae)),
        "text_encoder": from_ldm(parts["text_encoder"], "text_encoder", text),
    }
    got = {f"{c}.text_model.{k}" if c == "text_encoder" else f"{c}.{k}" for c, m in mapped.items() for k in m}
    assert got == {r["diffusers_key"] for r in rows if not r["ldm_key"].endswith("position_ids")}
    assert sum(len(m) for m in mapped.values()) == 686 + 248 + 196


def test_ldm_names_of_non_mirrored_blocks():
    """up_blocks' upsampler index follows the up level's own attention (diffusers' PIA test model has
    down (CrossAttn, Down) with up (CrossAttn, Up), not a mirror)."""
    config = UNetConfig.from_diffusers(
        dict(
            block_out_channels=(8, 8),
            layers_per_block=2,
            norm_num_groups=2,
            cross_attention_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )
    )
    assert config.up_attention == (True, False) and config.cross_attention == (True, False)
    assert ldm_path("unet", "up_blocks.0.upsamplers.0.conv.weight", config) == "output_blocks.2.2.conv.weight"
    with torch.device("meta"):
        model = UNet(config)
    assert len(model.up_blocks[0].attentions) == 3 and len(model.up_blocks[1].attentions) == 0


# --------------------------------------------------------------------------------------------- pia.ckpt


def to_pia_ckpt(adapter_sd: dict[str, torch.Tensor], max_seq_length: int) -> dict[str, torch.Tensor]:
    """A diffusers MotionAdapter state dict -> the original PIA layout, by the spec's substitutions
    (the inverse of diffusers' convert_animatediff_checkpoint_to_diffusers), with pos_encoder.pe tables
    and a few of the UNet's own (spatial) keys, as train.py saves the whole model."""
    out = {}
    for key, tensor in adapter_sd.items():
        if key.endswith("pos_embed.pe"):
            continue
        if ".motion_modules." in key:
            block, rest = key.split(".motion_modules.")
            index, rest = rest.split(".", 1)
            rest = (
                rest.replace("norm1", "norms.0")
                .replace("norm2", "norms.1")
                .replace("norm3", "ff_norm")
                .replace("attn1", "attention_blocks.0")
                .replace("attn2", "attention_blocks.1")
            )
            key = f"{block}.motion_modules.{index}.temporal_transformer.{rest}"
            if key.endswith("attention_blocks.0.to_q.weight") or key.endswith("attention_blocks.1.to_q.weight"):
                pe = key.replace("to_q.weight", "pos_encoder.pe")
                out[pe] = frame_positions(max_seq_length, tensor.shape[0]).reshape(1, max_seq_length, -1)
        out[key] = tensor.clone()
    out["down_blocks.0.attentions.0.proj_in.weight"] = torch.ones(3)  # the UNet's own, not the adapter's
    return out


def test_pia_ckpt_equals_the_adapter(tmp_path):
    reference = make_adapter("small")
    config = MotionConfig.from_diffusers(dict(reference.config))
    reference.save_pretrained(tmp_path / "adapter")
    torch.save(to_pia_ckpt(reference.state_dict(), config.max_seq_length), tmp_path / "pia.ckpt")
    ours = MotionAdapter.from_single_file(tmp_path / "pia.ckpt", config=config)
    folder = MotionAdapter.from_pretrained(tmp_path / "adapter")
    assert ours.config == folder.config == MotionAdapter.from_single_file(tmp_path / "pia.ckpt").config  # inferred
    want = {k: t for k, t in folder.state_dict.items() if not k.endswith("pos_embed.pe")}
    assert ours.state_dict.keys() == want.keys() and all(torch.equal(ours.state_dict[k], t) for k, t in want.items())
    base = tmp_path / "unet"
    make_unet2d("small").save_pretrained(base)
    a, b = load_unet(base, ours), load_unet(base, folder)
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


def test_pia_ckpt_corrupted_frame_table_is_refused(tmp_path):
    reference = make_adapter("small")
    config = MotionConfig.from_diffusers(dict(reference.config))
    sd = to_pia_ckpt(reference.state_dict(), config.max_seq_length)
    key = next(k for k in sd if k.endswith("pos_encoder.pe"))
    sd[key] = sd[key] + 0.01
    save_file(sd, tmp_path / "pia.safetensors")
    with pytest.raises(CheckpointError, match=f"{key.replace('.temporal_transformer', '')[:30]}.*differs from"):
        MotionAdapter.from_single_file(tmp_path / "pia.safetensors", config=config)


def test_pia_ckpt_full_key_map():
    """The spec's pia.ckpt key map (562 keys of the released layout) through weights_map/pia_ckpt.json gives
    exactly the PIA MotionAdapter's names; the 40 frame tables are the ignored ones."""
    from pia_torch.loading import remap

    rows = list(csv.DictReader(open(KEYS / "pia_ckpt_motion_keymap.tsv"), delimiter="\t"))
    renamed, ignored = remap({r["pia_ckpt_key"]: r["shape"] for r in rows}, "pia_ckpt")
    assert len(ignored) == 40 and all(k.endswith("pos_encoder.pe") for k in ignored)
    want = {
        r["diffusers_motion_adapter_key"].split(" (")[0]: r["shape"]
        for r in rows  # "conv_in.bias (note)"
        if not r["diffusers_motion_adapter_key"].startswith("(dropped")
    }
    assert renamed == want and len(want) == 522
    assert PIA_MOTION.conv_in_channels == 9 and ADAPTER["small"]["conv_in_channels"] == 9


def test_conv_in_from_the_adapter(tmp_path):
    """conv_in="adapter" (the original PIA on the plain SD1.5 base): all 9 channels and the bias from the adapter."""
    make_unet2d("small").save_pretrained(tmp_path / "unet")
    make_adapter("small").save_pretrained(tmp_path / "adapter")
    adapter = MotionAdapter.from_pretrained(tmp_path / "adapter")
    unet = load_unet(tmp_path / "unet", adapter, conv_in="adapter")
    assert torch.equal(unet.conv_in.weight, adapter.state_dict["conv_in.weight"])
    assert torch.equal(unet.conv_in.bias, adapter.state_dict["conv_in.bias"])
    default = load_unet(tmp_path / "unet", adapter)
    assert not torch.equal(default.conv_in.bias, unet.conv_in.bias)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_single_files_vae_lora(small, tmp_path, capsys):
    """pia-torch with a single-file --base (+ --config), pia.ckpt as --adapter, a --vae file and two --lora
    files: it runs, the LoRAs change the video, and the sidecar records every file with its sha256."""
    import hashlib

    from PIL import Image

    from pia_torch import cli

    adapter = make_adapter("small")
    torch.save(to_pia_ckpt(adapter.state_dict(), 32), tmp_path / "pia.ckpt")
    save_file(
        {k.removeprefix("first_stage_model."): t for k, t in to_ldm({"vae": make_vae("small", seed=5)}).items()},
        tmp_path / "vae.safetensors",
    )
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    for i in range(2):
        save_file(
            {
                f"{name}.lora_down.weight": torch.randn(4, 32, generator=g),
                f"{name}.lora_up.weight": torch.randn(32, 4, generator=g),
                f"{name}.alpha": torch.tensor(4.0),
            },
            tmp_path / f"l{i}.safetensors",
        )
    Image.new("RGB", (32, 32), (20, 120, 220)).save(tmp_path / "img.png")
    common = [
        "--base",
        str(small["file"]),
        "--config",
        str(small["folder"]),
        "--adapter",
        str(tmp_path / "pia.ckpt"),
        "--vae",
        str(tmp_path / "vae.safetensors"),
        "--image",
        str(tmp_path / "img.png"),
        "--prompt",
        "p",
        "--frames",
        "2",
        "--steps",
        "1",
        "--guidance",
        "1",
    ]
    assert cli.main([*common, "--out", str(tmp_path / "plain.gif")]) == 0
    assert (
        cli.main(
            [
                *common,
                "--lora",
                f"{tmp_path / 'l0.safetensors'}:0.5",
                "--lora",
                str(tmp_path / "l1.safetensors"),
                "--out",
                str(tmp_path / "lora.gif"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (tmp_path / "plain.gif").read_bytes() != (tmp_path / "lora.gif").read_bytes()
    info = json.loads((tmp_path / "lora.json").read_text())

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    models = info["models"]
    assert models["base"]["sha256"] == sha(small["file"]) and models["adapter"]["sha256"] == sha(tmp_path / "pia.ckpt")
    assert models["vae"]["sha256"] == sha(tmp_path / "vae.safetensors")
    assert [(m["sha256"], m["weight"]) for m in models["lora"]] == [
        (sha(tmp_path / "l0.safetensors"), 0.5),
        (sha(tmp_path / "l1.safetensors"), 1.0),
    ]
    assert info["image"]["sha256"] == sha(tmp_path / "img.png")
    assert cli.main([*common, "--lora", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x.gif")]) == 2
    assert "not found" in capsys.readouterr().err
