"""An offline PIA pipeline with tiny random weights, for smoke runs (`scripts/sample.py --demo`) and docs.

Nothing is downloaded and diffusers is not needed: the tiny UNet and VAE come from
`config.tiny_unet()` / `config.tiny_vae()`, the text encoder is a small transformers `CLIPTextModel`,
and the tokenizer is the tiny byte-level BPE vocabulary bundled in `pia_torch/assets/tokenizer/`.
The weights are random, so the video is noise; only shapes, speed and plumbing are meaningful.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from pia_torch.config import tiny_unet, tiny_vae
from pia_torch.models.unet import UNet
from pia_torch.models.vae import AutoencoderKL
from pia_torch.pipeline import PIAPipeline
from pia_torch.schedulers import DDIMScheduler

ASSETS = Path(__file__).parent / "assets"

# DDIM as the original base.yaml builds it (open-mmlab/PIA example/config/base.yaml); euler takes the same betas.
PIA_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=True,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def tiny_pipeline(
    seed: int = 0, *, convention: str = "original", torch_dtype: torch.dtype = torch.float32
) -> PIAPipeline:
    """A complete PIAPipeline on tiny random weights (seeded; the global RNG is left untouched).

    Default output size: unet sample_size 16 × VAE factor 2 = 32×32 pixels.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(ASSETS / "tokenizer")
    unet_config = replace(tiny_unet(), convention=convention)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = UNet(unet_config), AutoencoderKL(tiny_vae())
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=unet_config.cross_attention_dim,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        for module in (unet, vae):  # no zero-initialised layer: every block contributes
            for p in module.parameters():
                if not p.detach().any():
                    p.data.normal_(0, 0.02)
    scheduler = DDIMScheduler.from_config(PIA_SCHEDULER)
    pipe = PIAPipeline(vae.eval(), text_encoder.eval(), tokenizer, unet.eval(), scheduler)
    return pipe.to(torch_dtype)


def demo_image() -> PIL.Image.Image:
    """The bundled 64×64 example image (made procedurally by the project: sky, sun, hills)."""
    with PIL.Image.open(ASSETS / "example.png") as image:
        return image.convert("RGB")
