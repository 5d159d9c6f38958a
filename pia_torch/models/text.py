"""Prompt -> CLIP text states, as Stable Diffusion pipelines compute them.

The text encoder is transformers' `CLIPTextModel` and the tokenizer its `CLIPTokenizer`; this file only
holds the few lines around them (diffusers 0.42.1 `StableDiffusionPipeline.encode_prompt`). It works with
transformers 4.x (`model.text_model.final_layer_norm`) and 5.x, where the model is flattened and
diffusers' `clip_skip` path raises AttributeError.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)  # pia_torch.models.text: the CLI silences it for its built-in text


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> Tensor:
    """prompts (n,) -> token ids (n, l), l = max_length or tokenizer.model_max_length (77 for SD):
    [BOS, tokens..., EOS, EOS padding...], truncated to l (logging what was cut)."""
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    longest = tokenizer(prompts, padding="longest", return_tensors="pt", verbose=False).input_ids.shape[-1]
    if longest > max_length:
        logger.warning(
            "CLIP takes at most %d tokens: the last %d tokens of the longest prompt were cut",
            max_length,
            longest - max_length,
        )
    return ids


@torch.no_grad()
def encode_text(text_encoder: nn.Module, ids: Tensor, clip_skip: int | None = None) -> Tensor:
    """Token ids (n, l) -> text states (n, l, d) in the encoder's dtype, on the ids' device.

    clip_skip = k takes the output of the (k+1)-th last layer instead of the last one, then the final
    LayerNorm (k = 1 is A1111's "CLIP skip 2"): final_layer_norm(hidden_states[−(k+1)]). No attention
    mask: SD's CLIP only uses its causal mask.
    """
    if clip_skip is None:
        return text_encoder(ids)[0]
    if not isinstance(clip_skip, int) or clip_skip < 0:
        raise ValueError(f"clip_skip must be an int >= 0, got {clip_skip!r}")
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states  # 1 + layers entries, no final LN
    if clip_skip + 1 > len(hidden):
        raise ValueError(f"clip_skip={clip_skip} but the text encoder has {len(hidden) - 1} layers")
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4.x / 5.x
    return final_norm(hidden[-(clip_skip + 1)])
