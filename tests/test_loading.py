"""Loading: diffusers folders in every stored form, strict errors, the PIA conv_in assembly, the rename
table (from an installed wheel too) and full SD1.5 + PIA key coverage on the meta device."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, make_unet2d, make_vae
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import MotionAdapter as DiffusersAdapter
from diffusers import UNet2DConditionModel, UNetMotionModel
from safetensors.torch import save_file

from pia_torch.config import MotionConfig
from pia_torch.loading import (
    CheckpointError,
    MotionAdapter,
    build_unet,
    build_vae,
    load_table,
    load_unet,
    load_vae,
    read_state_dict,
    remap,
)

REPO = Path(__file__).resolve().parents[1]
SPEC_KEYS = REPO.parent / "shared" / "spec" / "keys"
LEGACY_VAE = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)


def reference_unet(size: str) -> UNetMotionModel:
    return UNetMotionModel.from_unet2d(make_unet2d(size), make_adapter(size))


def copy_folder(src: Path, dst: Path, sd: dict | None = None) -> Path:
    """dst = src's config.json + sd (default: src's own weights) as one safetensors file."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst)
    save_file(read_state_dict(src) if sd is None else sd, dst / "diffusion_pytorch_model.safetensors")
    return dst


# --------------------------------------------------------------------------------------------- folders


@pytest.mark.parametrize("size", ["tiny", pytest.param("small", marks=pytest.mark.slow)])  # from_unet2d: ~7 s
def test_diffusers_folders_load(checkpoints, size, caplog):
    folders = checkpoints(size)
    adapter = MotionAdapter.from_pretrained(folders["adapter"])
    with caplog.at_level(logging.INFO, logger="pia_torch"):
        unet = load_unet(folders["unet"], adapter, convention="diffusers")
    assert "conv_in" in caplog.text and "base UNet channels 0-3" in caplog.text
    assert_same(unet.state_dict(), remap(reference_unet(size).state_dict())[0])
    assert unet.config.convention == "diffusers" and not unet.training
    vae = load_vae(folders["vae"])
    assert_same(vae.state_dict(), remap(make_vae(size).state_dict())[0])
    assert next(vae.parameters()).dtype == torch.float32


def test_conv_in_assembly_matches_from_unet2d(checkpoints):
    folders = checkpoints("tiny")
    base, adapter = read_state_dict(folders["unet"]), read_state_dict(folders["adapter"])
    unet = load_unet(folders["unet"], MotionAdapter.from_pretrained(folders["adapter"]))
    ref = reference_unet("tiny").conv_in
    torch.testing.assert_close(unet.conv_in.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(unet.conv_in.bias, ref.bias, rtol=0, atol=0)
    assert unet.conv_in.weight.shape[1] == 9
    assert torch.equal(unet.conv_in.weight[:, :4], base["conv_in.weight"])
    assert torch.equal(unet.conv_in.weight[:, 4:], adapter["conv_in.weight"][:, 4:])
    assert torch.equal(unet.conv_in.bias, base["conv_in.bias"])
    assert not torch.equal(unet.conv_in.bias, adapter["conv_in.bias"])


def test_motion_unet_folder_loads_alone(tmp_path, caplog):
    ref = reference_unet("tiny")
    ref.save_pretrained(tmp_path / "unet")
    expected = remap(ref.state_dict())[0]
    assert_same(load_unet(tmp_path / "unet").state_dict(), expected)
    adapter = MotionAdapter(MotionConfig.from_diffusers(dict(make_adapter("tiny").config)), {})
    with caplog.at_level(logging.WARNING, logger="pia_torch"):
        assert_same(load_unet(tmp_path / "unet", adapter).state_dict(), expected)
    assert "adapter is not used" in caplog.text


@pytest.fixture(scope="module")
def stored_forms(tmp_path_factory):
    """The tiny UNet saved by diffusers as: one file, shards, fp16 variant, sharded fp16 variant, .bin."""
    root = tmp_path_factory.mktemp("forms")
    ref, half = make_unet2d("tiny"), make_unet2d("tiny").half()
    ref.save_pretrained(root / "plain")
    ref.save_pretrained(root / "sharded", max_shard_size="20KB")
    half.save_pretrained(root / "fp16", variant="fp16")
    half.save_pretrained(root / "fp16_sharded", variant="fp16", max_shard_size="20KB")
    ref.save_pretrained(root / "bin", safe_serialization=False)
    return root, ref.state_dict()


@pytest.mark.parametrize(
    "form, variant", [("plain", None), ("sharded", None), ("fp16", "fp16"), ("fp16_sharded", "fp16"), ("bin", None)]
)
def test_stored_forms_give_identical_tensors(stored_forms, checkpoints, form, variant):
    root, expected = stored_forms
    if form.endswith("sharded"):
        assert len(list((root / form).glob("diffusion_pytorch_model*-of-*.safetensors"))) > 1
    if variant:
        expected = {k: v.half() for k, v in expected.items()}
    assert_same(read_state_dict(root / form, variant), expected)
    adapter = MotionAdapter.from_pretrained(checkpoints("tiny")["adapter"])
    unet = load_unet(root / form, adapter, variant=variant, torch_dtype=torch.float16)
    assert next(unet.parameters()).dtype == torch.float16
    assert torch.equal(unet.state_dict()["conv_in.weight"][:, :4], expected["conv_in.weight"].half())


def test_variant_falls_back_to_plain_and_missing_weights_are_listed(stored_forms):
    root, expected = stored_forms
    assert_same(read_state_dict(root / "plain", variant="fp16"), expected)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors.index.json"):
        read_state_dict(root / "fp16")  # only fp16 files there


def test_corrupt_files_name_the_file(checkpoints, tmp_path):
    vae = copy_folder(checkpoints("tiny")["vae"], tmp_path / "vae")
    weights = vae / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read .*diffusion_pytorch_model.safetensors"):
        load_vae(vae)
    weights.unlink()
    (vae / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read .*diffusion_pytorch_model.bin"):
        load_vae(vae)


# --------------------------------------------------------------------------------------------- strictness


def test_one_error_lists_missing_unexpected_and_misshaped(checkpoints, tmp_path):
    src = checkpoints("tiny")["vae"]
    sd = read_state_dict(src)
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra.weight"] = torch.zeros(3)
    sd["encoder.conv_in.weight"] = torch.zeros(8, 3, 1, 1)
    with pytest.raises(CheckpointError) as e:
        load_vae(copy_folder(src, tmp_path / "vae", sd))
    assert e.value.missing == ["decoder.conv_out.bias"]
    assert e.value.unexpected == ["decoder.extra.weight"]
    assert len(e.value.mismatched) == 1 and e.value.mismatched[0].startswith("encoder.conv_in.weight")
    message = str(e.value)
    for key in ("decoder.conv_out.bias", "decoder.extra.weight", "encoder.conv_in.weight: checkpoint (8, 3, 1, 1)"):
        assert key in message


def test_stored_frame_table_is_verified(checkpoints):
    folders = checkpoints("tiny")
    adapter = MotionAdapter.from_pretrained(folders["adapter"])
    key = "down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe"
    good = adapter.state_dict[key]
    for bad, expect in [(good + 0.01, "differs from frame_positions"), (good[:, :16], "expected (1, 32, 8)")]:
        adapter.state_dict[key] = bad
        with pytest.raises(CheckpointError, match=re.escape(key) + ": .*" + re.escape(expect)):
            load_unet(folders["unet"], adapter)
    del adapter.state_dict[key]  # no stored table at all: fine, it is recomputed
    load_unet(folders["unet"], adapter)


def test_incompatible_adapter(checkpoints):
    small_adapter = MotionAdapter.from_pretrained(checkpoints("small")["adapter"])
    with pytest.raises(ValueError, match="block_out_channels"):
        load_unet(checkpoints("tiny")["unet"], small_adapter)


def test_legacy_vae_attention_names(checkpoints, tmp_path):
    src = checkpoints("tiny")["vae"]
    sd = read_state_dict(src)
    legacy = {}
    for key, value in sd.items():
        for new, old in LEGACY_VAE.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert_same(load_vae(copy_folder(src, tmp_path / "vae", legacy)).state_dict(), load_vae(src).state_dict())


# --------------------------------------------------------------------------------------------- table


def test_rules_match_whole_components():
    table = {"rename": [["ff.net.2", "ff.proj_out", ""], ["key", "to_k", ""]], "ignore": [["pos_embed.pe", ""]]}
    keys = [
        "a.ff.net.2.bias",
        "a.ff.net.20.bias",
        "xff.net.2.bias",
        "a.key.weight",
        "a.keys.weight",
        "b.pos_embed.pe",
        "b.pos_embed.pe2",
    ]
    renamed, ignored = remap(dict.fromkeys(keys, torch.zeros(1)), table)
    assert list(renamed) == [
        "a.ff.proj_out.bias",
        "a.ff.net.20.bias",
        "xff.net.2.bias",
        "a.to_k.weight",
        "a.keys.weight",
        "b.pos_embed.pe2",
    ]
    assert list(ignored) == ["b.pos_embed.pe"]


def test_table_rules_have_reasons():
    table = load_table()
    assert all(len(rule) == 3 and rule[2] for rule in table["rename"])
    assert all(len(rule) == 2 and rule[1] for rule in table["ignore"])


def test_table_loads_from_installed_wheel(tmp_path):
    """Build the wheel, unpack it as site-packages, read the table with importlib.resources from there."""
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path / "dist")],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("pia_torch-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "pia_torch/weights_map/diffusers.json" in z.namelist()
        z.extractall(tmp_path / "site")
    code = (
        "import json, pia_torch, pia_torch.loading as L; from importlib import resources; "
        "p = resources.files('pia_torch') / 'weights_map' / 'diffusers.json'; "
        "print(json.dumps([pia_torch.__file__, p.is_file(), L.load_table()]))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # the wheel only, not the repository
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout
    file, packaged, table = json.loads(out.splitlines()[-1])
    assert file.startswith(str(tmp_path / "site")) and packaged
    assert table == json.loads((REPO / "weights_map" / "diffusers.json").read_text())


# --------------------------------------------------------------------------------------------- full size

SD15 = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    sample_size=64,
)
PIA = dict(
    block_out_channels=(320, 640, 1280, 1280),
    motion_layers_per_block=2,
    motion_num_attention_heads=8,
    motion_norm_num_groups=32,
    motion_max_seq_length=32,
    use_motion_mid_block=False,
    conv_in_channels=9,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


@pytest.fixture(scope="module")
def full_size():
    """diffusers SD1.5 UNet, PIA adapter and SD VAE on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15), DiffusersAdapter(**PIA), DiffusersVAE(**SD_VAE)


def legacy_names(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for new, old in LEGACY_VAE.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        out[key] = value
    return out


def test_key_coverage_full_size(full_size):
    unet2d, diffusers_adapter, diffusers_vae = full_size
    base, motion = unet2d.state_dict(), diffusers_adapter.state_dict()
    adapter = MotionAdapter(MotionConfig.from_diffusers(dict(diffusers_adapter.config)), motion)
    unet = build_unet(dict(unet2d.config), base, adapter)  # the code path of load_unet, on meta tensors
    params = unet.state_dict()
    assert all(t.is_meta for t in params.values())

    # Every source key lands on exactly one parameter of the same shape, or is dropped by a stated rule:
    # the 20 pos_embed.pe tables (table "ignore" rule) and the adapter's conv_in (merged into conv_in.weight).
    targets = {}
    for source, sd in (("base", base), ("adapter", motion)):
        if source == "adapter":
            sd = {k: v for k, v in sd.items() if not k.startswith("conv_in.")}
        renamed, ignored = remap(sd)
        assert len(renamed) + len(ignored) == len(sd)
        assert all(k.endswith("pos_embed.pe") for k in ignored) and len(ignored) == (20 if source == "adapter" else 0)
        for key, value in renamed.items():
            assert key not in targets, f"{key} filled twice"
            targets[key] = value.shape
    targets["conv_in.weight"] = motion["conv_in.weight"].shape  # (320, 9, 3, 3): base 0-3 + adapter 4-8
    assert targets == {k: t.shape for k, t in params.items()}
    assert len(params) == 686 + 542 - 2 - 20 == 1206
    assert sum(p.numel() for p in unet.parameters()) == 1_276_672_964

    vae = build_vae(dict(diffusers_vae.config), diffusers_vae.state_dict())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    expected = {k: t.shape for k, t in remap(diffusers_vae.state_dict())[0].items()}
    assert expected == {k: t.shape for k, t in vae.state_dict().items()}
    legacy = build_vae(dict(diffusers_vae.config), legacy_names(diffusers_vae.state_dict()))
    assert legacy.state_dict().keys() == vae.state_dict().keys()


def test_every_table_rule_is_used(full_size):
    unet2d, adapter, vae = full_size
    sources = [unet2d.state_dict(), adapter.state_dict(), vae.state_dict(), legacy_names(vae.state_dict())]
    table = load_table()

    def run(t):
        return [tuple(map(tuple, remap(sd, t))) for sd in sources]

    full = run(table)
    for section in ("rename", "ignore"):
        for i, rule in enumerate(table[section]):
            without = {**table, section: table[section][:i] + table[section][i + 1 :]}
            assert run(without) != full, f"rule {rule[:2]} is never used"


def test_full_size_motion_unet_config(full_size):
    """A UNetMotionModel folder's config (from_unet2d at SD1.5 + PIA shapes) builds the same UNet."""
    unet2d, adapter, _ = full_size
    with torch.device("meta"):
        motion_unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    cfg = {**motion_unet.config, "_class_name": "UNetMotionModel"}
    unet = build_unet(cfg, motion_unet.state_dict())
    assert sum(p.numel() for p in unet.parameters()) == 1_276_672_964


@pytest.mark.skipif(not SPEC_KEYS.is_dir(), reason="spec/keys not beside the repository")
def test_key_lists_match_spec(full_size):
    def tsv(name):
        rows = (line.split("\t") for line in (SPEC_KEYS / name).read_text().splitlines())
        return {k: tuple(json.loads(s.replace("(", "[").replace(",)", "]").replace(")", "]"))) for k, s in rows}

    unet2d, adapter, vae = full_size
    for name, model in [
        ("unet2d_sd15_keys.tsv", unet2d),
        ("adapter_pia_keys.tsv", adapter),
        ("vae_sd15_keys.tsv", vae),
    ]:
        assert tsv(name) == {k: tuple(t.shape) for k, t in model.state_dict().items()}
    expected, dropped = {}, 0
    for key, shape in tsv("unetmotion_pia_keys.tsv").items():  # diffusers' from_unet2d result, key by key
        renamed, ignored = remap({key: torch.zeros(())})
        expected.update(dict.fromkeys(renamed, shape))
        dropped += len(ignored)
    pia = MotionAdapter(MotionConfig.from_diffusers(dict(adapter.config)), adapter.state_dict())
    params = build_unet(dict(unet2d.config), unet2d.state_dict(), pia).state_dict()
    assert dropped == 20 and expected == {k: tuple(t.shape) for k, t in params.items()}
