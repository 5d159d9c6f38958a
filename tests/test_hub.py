"""Hub resolution with the network off: a hand-made Hugging Face cache (models--owner--name/snapshots/<sha>,
refs/main) in tmp_path stands in for earlier downloads."""

from __future__ import annotations

import shutil

import pytest
import torch
from huggingface_hub import constants

from pia_torch import hub
from pia_torch.loading import MotionAdapter, read_state_dict

SHA = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(cache, repo_id: str, files: dict) -> object:
    """Lay out `files` ({path in repo: source file or text}) as a cached snapshot of repo_id."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / SHA
    for name, src in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, str):
            (snapshot / name).write_text(src)
        else:
            shutil.copy(src, snapshot / name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SHA)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_local_folder_is_returned_as_is(tmp_path):
    assert hub.resolve(tmp_path, ["*.json"]) == tmp_path
    assert hub.resolve(str(tmp_path), ["*.json"]) == tmp_path


def test_resolve_from_cache_offline(tmp_path, offline):
    snapshot = fake_cache(tmp_path, "owner/name", {"unet/config.json": "{}"})
    assert hub.resolve("owner/name", ["unet/config.json"], cache_dir=tmp_path) == snapshot


def test_resolve_local_files_only_and_cache_env(tmp_path, monkeypatch):
    snapshot = fake_cache(tmp_path, "owner/name", {"config.json": "{}"})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert hub.resolve("owner/name", ["config.json"], local_files_only=True) == snapshot


def test_resolve_falls_back_to_cache_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    snapshot = fake_cache(tmp_path, "owner/name", {"config.json": "{}"})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # connection refused at once
    assert hub.resolve("owner/name", ["config.json"], cache_dir=tmp_path) == snapshot


def test_not_found_offline_is_one_clear_line(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="weights not found offline") as e:
        hub.resolve("owner/missing", ["config.json"], cache_dir=tmp_path)
    assert "owner/missing" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="weights not found offline"):
        MotionAdapter.from_pretrained("owner/missing", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hub.resolve(str(tmp_path / "nope"), ["config.json"])


def test_weight_patterns():
    assert hub.weight_candidates("fp16")[0][1:3] == (
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors.index.fp16.json",
    )
    assert list(hub.weight_candidates(None)[1][1:]) == [
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.bin.index.json",
        "diffusion_pytorch_model-*-of-*.bin",
    ]


def test_fetch_picks_variant_then_plain(tmp_path, checkpoints, offline):
    unet = checkpoints("tiny")["unet"]
    weights = unet / "diffusion_pytorch_model.safetensors"
    snapshot = fake_cache(
        tmp_path,
        "owner/pipe",
        {"unet/config.json": str(unet / "config.json"), "unet/diffusion_pytorch_model.safetensors": weights},
    )
    for variant in (None, "fp16"):  # no fp16 files cached: the plain ones are used
        assert hub.fetch("owner/pipe", "unet", variant=variant, cache_dir=tmp_path) == snapshot / "unet"


def test_motion_adapter_from_repo_id_offline(tmp_path, checkpoints, offline):
    adapter_dir = checkpoints("tiny")["adapter"]
    fake_cache(
        tmp_path,
        "owner/adapter",
        {name: adapter_dir / name for name in ("config.json", "diffusion_pytorch_model.safetensors")},
    )
    adapter = MotionAdapter.from_pretrained("owner/adapter", cache_dir=tmp_path)
    local = MotionAdapter.from_pretrained(adapter_dir, torch_dtype=torch.float16)
    expected = read_state_dict(adapter_dir)
    assert adapter.config == local.config and adapter.config.conv_in_channels == 9
    assert adapter.state_dict.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(adapter.state_dict[key], value, rtol=0, atol=0)
        assert local.state_dict[key].dtype == torch.float16
