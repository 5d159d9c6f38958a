"""The one weight-file search (hub.weight_candidates / hub.find_weights) shared by hub.fetch, read_state_dict
and the text encoder: safetensors before .bin, the variant before the plain files, single file or shard index."""

from __future__ import annotations

import pytest
import torch
from conftest import make_adapter, make_text_encoder, make_unet2d, make_vae, save_base

from pia_torch import hub
from pia_torch.loading import MotionAdapter, load_pipeline_components


@pytest.mark.parametrize(
    "stems, files, variant, expected",
    [
        (
            hub.DIFFUSERS,
            ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors"],
            "fp16",
            "diffusion_pytorch_model.fp16.safetensors",
        ),
        (
            hub.DIFFUSERS,
            ["diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.safetensors"],
            "fp16",
            "diffusion_pytorch_model.safetensors",
        ),  # safetensors first, then the variant
        (
            hub.DIFFUSERS,
            ["diffusion_pytorch_model.safetensors.index.fp16.json"],
            "fp16",
            "diffusion_pytorch_model.safetensors.index.fp16.json",
        ),
        (hub.TRANSFORMERS, ["pytorch_model.bin", "model.safetensors.index.json"], None, "model.safetensors.index.json"),
        (hub.TRANSFORMERS, ["pytorch_model.fp16.bin", "pytorch_model.bin"], "fp16", "pytorch_model.fp16.bin"),
    ],
)
def test_find_weights_order(tmp_path, stems, files, variant, expected):
    for name in files:
        (tmp_path / name).touch()
    variant_found, single, index, _ = hub.find_weights(tmp_path, variant, stems)
    assert expected in (single, index) and (tmp_path / expected).is_file()
    assert variant_found == (variant if f".{variant}" in expected else None)


def test_find_weights_lists_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="looked for model.fp16.safetensors, model.safetensors.index.fp16.json"):
        hub.find_weights(tmp_path, "fp16", hub.TRANSFORMERS)


def test_pipeline_components_take_each_folder_best_weights(tmp_path):
    """fp16 requested: the UNet has plain weights and fp16 shards, the text encoder only fp16 weights, the
    VAE only a plain .bin; each folder's best weights are read, and cast to float32."""
    root = save_base(tmp_path / "base")
    make_unet2d("tiny").half().save_pretrained(root / "unet", variant="fp16", max_shard_size="20KB")
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    make_vae("tiny").save_pretrained(root / "vae", safe_serialization=False)
    (root / "text_encoder" / "model.safetensors").unlink()
    make_text_encoder().half().save_pretrained(root / "text_encoder", variant="fp16")
    make_adapter("tiny").save_pretrained(tmp_path / "adapter")

    parts = load_pipeline_components(root, MotionAdapter.from_pretrained(tmp_path / "adapter"), variant="fp16")
    assert sorted(parts) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    expected_text = make_text_encoder().half().float().state_dict()
    for key, value in parts["text_encoder"].state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, expected_text[key]), key
    unet_conv_in = make_unet2d("tiny").half().float().state_dict()["conv_in.weight"]
    assert torch.equal(parts["unet"].state_dict()["conv_in.weight"][:, :4], unet_conv_in)
    vae_conv_in = make_vae("tiny").state_dict()["encoder.conv_in.weight"]
    assert torch.equal(parts["vae"].state_dict()["encoder.conv_in.weight"], vae_conv_in)
