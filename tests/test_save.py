"""saving.py: pia_torch -> diffusers folders that diffusers 0.42.1 loads with identical tensors and frames."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from conftest import ADAPTER, FRAMES_ATOL, UNET2D, VAE, make_adapter, make_vae, pipeline_depth, reference_unet, run, tol
from safetensors import safe_open
from safetensors.torch import load_file

from pia_torch import saving
from pia_torch.config import PIA_MOTION, PIA_UNET, SD_VAE, MotionConfig, UNetConfig, VAEConfig
from pia_torch.loading import MotionAdapter, diffusers_names
from pia_torch.models.unet import UNet
from pia_torch.models.vae import AutoencoderKL
from pia_torch.pipeline import PIAPipeline


def as_saved(model) -> dict:
    """A diffusers model's (or scheduler's) config as its save_pretrained writes it: JSON, with the class
    name and version, without loading bookkeeping."""
    drop = ("_use_default_values", "_name_or_path")
    config = json.loads(json.dumps({k: v for k, v in model.config.items() if k not in drop}))
    return {**config, "_class_name": type(model).__name__, "_diffusers_version": "0.42.1"}


def motion_unet(config: UNetConfig) -> UNetConfig:
    """`config` as a UNetMotionModel config.json can carry it: the motion modules normalise with the UNet's
    groups, and conv_in_channels lives in in_channels (saving.py's docstring)."""
    return replace(config, motion=replace(config.motion, conv_in_channels=None, norm_num_groups=config.norm_num_groups))


def unet_sd(unet: UNet) -> dict[str, torch.Tensor]:
    return saving.with_frame_tables(diffusers_names(unet.state_dict()), unet.config.motion.max_seq_length)


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    bad = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k].cpu(), theirs[k].cpu())]
    assert not bad, bad[:5]


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("convention", ["original", "diffusers"])
def test_configs_match_diffusers_and_round_trip(size, convention):
    motion = MotionConfig.from_diffusers(as_saved(make_adapter(size)))
    unet = UNetConfig.from_diffusers(UNET2D[size], motion=motion, convention=convention)
    reference = reference_unet(size)  # diffusers' UNetMotionModel.from_unet2d of the same configs
    assert saving.unet_config_dict(unet) == as_saved(reference)
    assert UNetConfig.from_diffusers(saving.unet_config_dict(unet), convention=convention) == motion_unet(unet)
    own = UNetConfig.from_diffusers(dict(reference.config), convention=convention)  # read back from diffusers
    assert UNetConfig.from_diffusers(saving.unet_config_dict(own), convention=convention) == own
    assert own == motion_unet(unet)

    assert saving.motion_config_dict(motion) == as_saved(make_adapter(size))
    assert MotionConfig.from_diffusers(saving.motion_config_dict(motion)) == motion
    assert motion == MotionConfig.from_diffusers(ADAPTER[size] | {"_class_name": "MotionAdapter"})
    vae = VAEConfig.from_diffusers(VAE[size])
    assert saving.vae_config_dict(vae) == as_saved(make_vae(size))
    assert VAEConfig.from_diffusers(saving.vae_config_dict(vae)) == vae


def test_full_size_configs_rebuild_the_same_module_trees():
    """SD1.5 + PIA shapes on meta: diffusers built from our config.json has our tensors' names and shapes."""
    for convention in ("original", "diffusers"):
        config = replace(PIA_UNET, convention=convention)
        assert UNetConfig.from_diffusers(saving.unet_config_dict(config), convention=convention) == motion_unet(config)
    assert MotionConfig.from_diffusers(saving.motion_config_dict(PIA_MOTION)) == PIA_MOTION
    assert VAEConfig.from_diffusers(saving.vae_config_dict(SD_VAE)) == SD_VAE

    with torch.device("meta"):
        theirs = [
            diffusers.UNetMotionModel.from_config(saving.unet_config_dict(PIA_UNET)),
            diffusers.MotionAdapter.from_config(saving.motion_config_dict(PIA_MOTION)),
            diffusers.AutoencoderKL.from_config(saving.vae_config_dict(SD_VAE)),
        ]
        unet, vae = UNet(PIA_UNET), AutoencoderKL(SD_VAE)
    ours_unet = unet_sd(unet)
    ours_adapter = {k: t for k, t in ours_unet.items() if ".motion_modules." in k or k.startswith("conv_in.")}
    for ours, model in zip([ours_unet, ours_adapter, diffusers_names(vae.state_dict())], theirs):
        assert {k: t.shape for k, t in ours.items()} == {k: t.shape for k, t in model.state_dict().items()}
    assert len(ours_unet) == 1226 and len(ours_adapter) == 542  # spec/checkpoints.md §2: 542 adapter keys


# ------------------------------------------------------------------------------------------ models


def test_adapter_round_trip(folders, tmp_path):
    adapter = MotionAdapter.from_pretrained(folders["adapter"])
    saving.save_adapter(adapter, tmp_path / "saved")
    original = diffusers.MotionAdapter.from_pretrained(folders["adapter"])
    saved = diffusers.MotionAdapter.from_pretrained(tmp_path / "saved")
    assert as_saved(saved) == as_saved(original)
    assert_same_tensors(saved.state_dict(), original.state_dict())
    weights = "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "saved" / weights).read_bytes() == (folders["adapter"] / weights).read_bytes()
    back = MotionAdapter.from_pretrained(tmp_path / "saved")
    assert back.config == adapter.config
    assert_same_tensors(back.state_dict, adapter.state_dict)

    # without its pos_embed.pe tables (pia_torch never needs them) the saved folder has them again
    lean = MotionAdapter(adapter.config, {k: t for k, t in adapter.state_dict.items() if "pos_embed" not in k})
    saving.save_adapter(lean, tmp_path / "lean")
    assert_same_tensors(diffusers.MotionAdapter.from_pretrained(tmp_path / "lean").state_dict(), original.state_dict())


def test_save_model_shared_storage_and_metadata(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"a": base, "b": base, "c": base[1:], "d": base.t()}  # one storage; d is not contiguous
    saving.save_model(tmp_path / "m", {"_class_name": "X"}, sd)
    with safe_open(tmp_path / "m" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(k), t) for k, t in sd.items())
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == {"_class_name": "X"}


def test_save_model_never_leaves_a_partial_file(tmp_path, monkeypatch):
    def fail(tensors, path, metadata=None):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    saving.save_model(tmp_path / "m", {"v": 1}, {"w": torch.zeros(2)})
    old = (tmp_path / "m" / "diffusion_pytorch_model.safetensors").read_bytes()
    monkeypatch.setattr(saving, "save_file", fail)
    for folder in (tmp_path / "m", tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            saving.save_model(folder, {"v": 2}, {"w": torch.ones(2)})
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").read_bytes() == old
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no new folder, no temporary sibling


# ------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def saved(ours_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pia"
    saving.save_pipeline(ours_session, folder)
    return folder


def test_saved_pipeline_loads_in_diffusers(pipes, saved):
    reference, ours = pipes
    theirs = diffusers.PIAPipeline.from_pretrained(saved)
    theirs.set_progress_bar_config(disable=True)
    assert isinstance(theirs.unet, diffusers.UNetMotionModel) and isinstance(theirs.scheduler, diffusers.DDIMScheduler)
    assert_same_tensors(unet_sd(ours.unet), theirs.unet.state_dict())
    assert_same_tensors(diffusers_names(ours.vae.state_dict()), theirs.vae.state_dict())
    assert_same_tensors(ours.text_encoder.state_dict(), theirs.text_encoder.state_dict())
    adapter = theirs.motion_adapter.state_dict()
    assert_same_tensors(adapter, {k: t for k, t in theirs.unet.state_dict().items() if k in adapter})
    assert_same_tensors(adapter, reference.motion_adapter.state_dict())  # diffusers' own PIAPipeline: the same
    assert as_saved(theirs.scheduler) == as_saved(reference.scheduler)

    frames = run(theirs)
    assert np.abs(frames - run(ours)).max() <= FRAMES_ATOL
    expected = run(reference)  # the same diffusers ops on the same weights: rounding apart (memory layout)
    np.testing.assert_allclose(frames, expected, **tol(expected, pipeline_depth(reference, 3)))


def test_saved_pipeline_loads_in_pia_torch(pipes, saved):
    _, ours = pipes
    back = PIAPipeline.from_pretrained(saved, convention="diffusers")  # finds motion_adapter/ (unused: unet/ has it)
    assert back.unet.config == motion_unet(ours.unet.config)
    for a, b in [(back.unet, ours.unet), (back.vae, ours.vae), (back.text_encoder, ours.text_encoder)]:
        assert_same_tensors(a.state_dict(), b.state_dict())
    assert type(back.scheduler) is type(ours.scheduler)
    back.set_progress_bar_config(disable=True)
    expected = run(ours)
    np.testing.assert_allclose(run(back), expected, **tol(expected, pipeline_depth(ours, 3)))


def test_float16_pipeline_saves_float16(folders, tmp_path, one_thread):
    adapter = MotionAdapter.from_pretrained(folders["adapter"])
    pipe = PIAPipeline.from_pretrained(
        folders["base"], motion_adapter=adapter, torch_dtype=torch.float16, convention="diffusers"
    )
    saving.save_pipeline(pipe, tmp_path)  # an existing (empty) folder is filled
    for name in (
        "unet/diffusion_pytorch_model",
        "motion_adapter/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
        "text_encoder/model",
    ):
        assert {t.dtype for t in load_file(tmp_path / f"{name}.safetensors").values()} == {torch.float16}, name
    theirs = diffusers.PIAPipeline.from_pretrained(tmp_path, dtype=torch.float16)
    assert_same_tensors(unet_sd(pipe.unet), theirs.unet.state_dict())
    assert_same_tensors(diffusers_names(pipe.vae.state_dict()), theirs.vae.state_dict())


def test_unfused_lora_is_refused(tmp_path):
    pipe = SimpleNamespace(_lora=SimpleNamespace(weights={"style": 1.0}, originals={}))
    with pytest.raises(ValueError, match="fuse_lora"):
        saving.save_pipeline(pipe, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_save_pretrained_methods(ours_session, saved, folders, tmp_path):
    ours_session.save_pretrained(tmp_path / "pipe")
    MotionAdapter.from_pretrained(folders["adapter"]).save_pretrained(tmp_path / "adapter")
    for path in saved.rglob("*.safetensors"):
        assert (tmp_path / "pipe" / path.relative_to(saved)).read_bytes() == path.read_bytes()
    assert (tmp_path / "adapter" / "config.json").is_file()
