"""Attention, the GEGLU feed-forward and the transformer block shared by the spatial and motion layers.

To read or replace the attention of any layer, set a processor `(attn, q, k, v) -> out` on its
`Attention` (`set_attention_processor`); `AttentionRecorder` is one that keeps the softmax weights.
Weight shapes (N, nh, n, m), queries n, keys m: spatial attn1 ((b f), nh, h·w, h·w); spatial attn2
with per-frame text ((b f), nh, h·w, l), with shared text (b, nh, f·h·w, l), frames folded into the
queries (see `TransformerBlock`); motion attn1/attn2 ((b h w), nh, f, f); VAE mid (N, 1, h·w, h·w).

Mirrors diffusers 0.42.1 `models/attention_processor.py` (`Attention` + `AttnProcessor2_0`),
`models/attention.py` (`BasicTransformerBlock`, `FeedForward`) and `models/activations.py` (`GEGLU`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head scaled dot-product attention, scale d^-1/2, no mask.

    q (N, n, nh*d), k and v (N, m, nh*d) -> (N, n, nh*d).
    """
    q, k, v = (rearrange(x, "N n (nh d) -> N nh n d", nh=heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # (N, nh, n, d)
    return rearrange(out, "N nh n d -> N n (nh d)")


def attention_weights(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) in float32: q (N, n, nh*d), k (N, m, nh*d) -> (N, nh, n, m), rows sum to 1."""
    q, k = (rearrange(x, "N n (nh d) -> N nh n d", nh=heads).float() for x in (q, k))
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)


def manual_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """`attention` in eager float32 that also returns the weights: -> out (N, n, nh*d) in v's dtype, (N, nh, n, m)."""
    weights = attention_weights(q, k, heads)
    out = weights @ rearrange(v, "N m (nh d) -> N nh m d", nh=heads).float()  # (N, nh, n, d)
    return rearrange(out, "N nh n d -> N n (nh d)").to(v.dtype), weights


class Attention(nn.Module):
    """q from x, k/v from `context` (cross-attention) or from x (self-attention); then `to_out`.

    `processor`: None runs `attention` (SDPA); a callable `(self, q, k, v) -> out` replaces it, with
    q (N, n, nh*d), k and v (N, m, nh*d) after to_q/to_k/to_v, out (N, n, nh*d) before to_out.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim, bias=out_bias)  # diffusers: to_out.0
        self.processor: Processor | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x (N, n, c), context (N, m, c_ctx) or None -> (N, n, c)."""
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = attention(q, k, v, self.heads) if self.processor is None else self.processor(self, q, k, v)
        return self.to_out(out)


Processor = Callable[[Attention, Tensor, Tensor, Tensor], Tensor]


def set_attention_processor(
    model: nn.Module, processor: Processor | None, where: Callable[[str], bool] | None = None
) -> list[str]:
    """Set `processor` on every `Attention` in `model` whose name passes `where` (all if None); None
    restores SDPA. Returns the names set; raises ValueError if none matches."""
    names = [name for name, m in model.named_modules() if isinstance(m, Attention) and (where is None or where(name))]
    if not names:
        raise ValueError("no Attention in the model matches `where`")
    for name in names:
        model.get_submodule(name).processor = processor
    return names


class AttentionRecorder:
    """A processor that runs `manual_attention` and keeps each layer's weights of its last call:
    maps[name] (N, nh, n, m) float32, named as in `model.named_modules()` (shapes: module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: name for name, m in model.named_modules() if isinstance(m, Attention)}
        self.maps: dict[str, Tensor] = {}

    def __call__(self, attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, self.maps[self.names[attn]] = manual_attention(q, k, v, attn.heads)
        return out


class FeedForward(nn.Module):
    """GEGLU feed-forward: proj_out(a * gelu(g)) with [a | g] = proj_in(x) (exact erf GELU)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)  # diffusers: ff.net.0.proj
        self.proj_out = nn.Linear(mult * dim, dim)  # diffusers: ff.net.2

    def forward(self, x: Tensor) -> Tensor:
        """x (..., c) -> (..., c)."""
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, a second attention, GEGLU feed-forward (`BasicTransformerBlock`).

    Spatial layers: attn2 is cross-attention to the text (`context_dim` set). Motion layers: attn2 is a
    second self-attention (`context_dim=None`) and `pos` (the frame embedding) is added to the
    normalised input of both attentions, so it reaches q, k and v but never the residual stream.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim // heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """x (N, n, c); context (N, l, d) per row, or (b, l, d) shared by the N = b*f rows; pos (1, n, c).

        Returns (N, n, c). With shared context the frames are folded into the query sequence, so the
        text keys/values are computed once per video (same result as repeating the text per frame),
        and attn2's weights are (b, nh, f·n, l) rather than ((b f), nh, n, l).
        """
        # Residual sums put the branch first, as diffusers does: a sum takes the memory layout of its first
        # operand, and x from SpatialTransformer is a strided (N, c, h·w) view. Branch first, the first sum
        # is contiguous and so is everything after it; x first, every sum and LayerNorm of the block works
        # on strided memory (on a GPU two more copies and two slow strided adds per block).
        h = self.norm1(x)
        x = self.attn1(h if pos is None else h + pos) + x
        h = self.norm2(x)
        h = h if pos is None else h + pos
        if context is not None and context.shape[0] != x.shape[0]:
            h = rearrange(h, "(b f) n c -> b (f n) c", b=context.shape[0])  # queries of all frames
            x = rearrange(self.attn2(h, context), "b (f n) c -> (b f) n c", n=x.shape[1]) + x
        else:
            x = self.attn2(h, context) + x
        return self.ff(self.norm3(x)) + x
