"""Long videos, closed loops and keyframes: what each frame is conditioned on, and which frames the UNet
sees together.

Notation: F frames, L window (context) length, O overlap, Δ = L − O, c a keyframe frame, h(d) an
affinity profile read at frame distance d (a preset row padded with its last value), s the step.

- Affinity (`MOTION_PRESETS`, `mask_coefficients`, `Keyframe`, `Conditioning`): frame i gets, from the
  keyframe k with the largest α_k(i) = strength_k · h_k(d(i, c_k)), the mask value α_k(i) and keyframe
  k's image latent (d is |i − c|, or the circular distance in a closed loop). One keyframe at c = 0 is
  PIA's plain conditioning, bit for bit.
- Windows (`ContextOptions`, `context_windows`, `fusion_weights`): over L frames the whole UNet call is
  run window by window (PIA's frame table stops at 32, and its conditioning enters at conv_in, per
  frame). Each window's guided output is weighted per frame, with the weights of a frame normalised to
  sum to one over the windows that hold it, and summed; one scheduler step then updates the whole video.
- Anchoring (`Conditioning.affinity`): "global" slices the full-length affinity curve (far windows see
  only its plateau, never the 1.0 a training clip always had); "shifted" moves the keyframe nearest to a
  window to the window's near edge, so every window has one frame at the keyframe's full affinity.
- Noise (`freenoise`): FreeNoise's rescheduling (Qiu et al. 2023, arXiv 2310.15169): period L, each
  block of S frames beyond the first window a shuffled copy of the block L frames earlier.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from pia_torch.models.unet import UNet
from pia_torch.sampling import GeneratorArg

logger = logging.getLogger("pia_torch")

# Inter-frame affinity presets (diffusers' RANGE_list): frame i is conditioned with weight coef[i].
# 0-2: small / moderate / large motion; 3-5: loops (16 frames); 6-8: style transfer, small to large.
# (The original open-mmlab/PIA code orders rows 6 and 8 the other way round: animatediff/utils/util.py.)
MOTION_PRESETS: tuple[tuple[float, ...], ...] = (
    (1.0, 0.9, 0.85, 0.85, 0.85, 0.8),
    (1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75),
    (1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5),
    (1.0, 0.9, 0.85, 0.85, 0.85, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.85, 0.85, 0.9, 1.0),
    (1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75, 0.75, 0.75, 0.75, 0.75, 0.78, 0.79, 0.8, 0.8, 1.0),
    (1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.8, 1.0),
    (0.5, 0.4, 0.4, 0.4, 0.35, 0.3),
    (0.5, 0.4, 0.4, 0.4, 0.35, 0.35, 0.3, 0.25, 0.2),
    (0.5, 0.2),
)
LOOP_PRESETS = (3, 4, 5)  # 16-frame rows with 1.0 at both ends: a period-15 loop plus a copy of frame 0
LEGACY_LOOP_FRAMES = 16
SCHEDULES = ("uniform", "static", "looped")
FUSE_METHODS = ("pyramid", "flat", "overlap-linear")
ANCHORS = ("shifted", "global")
NOISE_TYPES = ("freenoise", "random")
LOOP_MODES = ("legacy", "closed")
RAMP_FLOOR = 1e-3  # overlap-linear's smallest weight (> 0, so a frame held only by ramps is still covered)
MIN_KEYFRAME_GAP = 4  # closer keyframes leave the model no room to move between them


# --------------------------------------------------------------------------------------------- affinity


def check_motion_scale(motion_scale: int) -> None:
    if not isinstance(motion_scale, int) or not -len(MOTION_PRESETS) <= motion_scale < len(MOTION_PRESETS):
        raise ValueError(f"motion_scale must be an int in [-9, 8], got {motion_scale!r}")


def mask_coefficients(num_frames: int, motion_scale: int = 0, cond_frame: int = 0) -> list[float]:
    """Per-frame affinity to the condition frame: preset row `motion_scale` (negative indices count from
    the end, as in diffusers), padded with its last value; frame i gets row[|i − cond_frame|]."""
    check_motion_scale(motion_scale)
    if not 0 <= cond_frame < num_frames:
        raise ValueError(f"need 0 <= cond_frame < num_frames, got {cond_frame} and {num_frames}")
    row = MOTION_PRESETS[motion_scale]
    return [row[min(abs(i - cond_frame), len(row) - 1)] for i in range(num_frames)]


def is_loop_preset(motion_scale: int) -> bool:
    """Rows 3-5 (or their negative indices): the 16-frame loop presets."""
    return motion_scale % len(MOTION_PRESETS) in LOOP_PRESETS


def loop_profile(motion_scale: int) -> tuple[float, ...]:
    """The affinity profile of a closed loop: a loop preset's first half (rows 3-5 are rows 0-2 padded to
    8 frames, then mirrored), any other row as it is."""
    check_motion_scale(motion_scale)
    row = MOTION_PRESETS[motion_scale]
    return row[: LEGACY_LOOP_FRAMES // 2] if is_loop_preset(motion_scale) else row


@dataclass(frozen=True)
class Keyframe:
    """Frame `frame` (negative: from the end) shows `image` (None: the pipeline's `image`) at affinity
    `strength` ∈ (0, 1]; its affinity falls off with frame distance along `profile` (None: the
    motion_scale preset, or its loop profile)."""

    frame: int
    image: Any = None
    strength: float = 1.0
    profile: Sequence[float] | None = None


class Conditioning:
    """K keyframes on F frames -> per-frame affinity (the mask channel) and which image latent each
    frame gets (channels 5..8), for the whole video or any window of it.

    frames: the keyframes' frame indices in [0, F), distinct; strengths, profiles: one per keyframe;
    latent_of[k]: the index of keyframe k's image among the distinct images; circular: distances wrap
    around (closed loops).
    """

    def __init__(
        self,
        num_frames: int,
        frames: Sequence[int],
        strengths: Sequence[float],
        profiles: Sequence[Sequence[float]],
        latent_of: Sequence[int],
        circular: bool = False,
    ) -> None:
        self.num_frames, self.frames, self.strengths = num_frames, list(frames), list(strengths)
        self.profiles, self.latent_of, self.circular = [tuple(p) for p in profiles], list(latent_of), circular

    def distance(self, i: int, c: int) -> int:
        d = abs(i - c)
        return min(d, self.num_frames - d) if self.circular else d

    def affinity(self, window: Sequence[int], anchor: str = "global", gap: int = 0) -> tuple[list[float], list[int]]:
        """(mask value, latent index) per frame of `window`.

        α_k(i) = strength_k · h_k(d_k(i)), the largest wins (ties: the smaller distance, then the earlier
        keyframe). "shifted": for the keyframe k̂ nearest to the window (ties: the earlier), d_k̂(i) =
        d(i, c_k̂) − max(0, dist(c_k̂, window) − gap): its nearest frame in the window is read `gap` frames
        from the keyframe. "global": true distances.
        """
        shift = [0] * len(self.frames)
        if anchor == "shifted":
            nearest = [min(self.distance(i, c) for i in window) for c in self.frames]
            k = min(range(len(self.frames)), key=lambda k: nearest[k])
            shift[k] = max(0, nearest[k] - gap)
        masks, latents = [], []
        for i in window:
            best = None
            for k, (c, s, h) in enumerate(zip(self.frames, self.strengths, self.profiles)):
                d = self.distance(i, c) - shift[k]
                key = (-s * h[min(d, len(h) - 1)], d, k)
                best = key if best is None or key < best else best
            masks.append(-best[0])
            latents.append(self.latent_of[best[2]])
        return masks, latents

    def inputs(
        self, latents: Tensor, window: Sequence[int], anchor: str = "global", gap: int = 0
    ) -> tuple[Tensor, Tensor, list[float]]:
        """latents (K', b, c, h, w), the distinct images' latents -> mask (b, 1, n, h, w), condition
        (b, c, n, h, w) for the n frames of `window` (UNet input channels 4 and 5..8), and the affinities."""
        masks, which = self.affinity(window, anchor, gap)
        _, b, _, h, w = latents.shape
        coef = torch.tensor(masks, dtype=torch.float32).to(latents)  # fp16 rounds like diffusers
        mask = coef.view(1, 1, -1, 1, 1).expand(b, 1, -1, h, w).contiguous()
        cond = rearrange(latents[torch.tensor(which, device=latents.device)], "n b c h w -> b c n h w")
        return mask, cond.contiguous(), masks


def keyframe_plan(
    num_frames: int,
    keyframes: Sequence[Keyframe],
    default_profile: Sequence[float],
    circular: bool,
    same_image: Callable[[Any, Any], bool],
) -> tuple[Conditioning, list[Any]]:
    """Keyframes -> (Conditioning, the distinct images in the order they are first used, by frame).

    Frames are resolved (negative from the end) and must be distinct and in [−F, F); strengths in (0, 1].
    `same_image(a, b)` tells equal images apart (equal pixels share one latent and one posterior draw).
    """
    if not keyframes:
        raise ValueError("keyframes is empty")
    resolved = []
    for key in keyframes:
        if not isinstance(key, Keyframe):
            raise ValueError(f"keyframes must be Keyframe(frame, image, strength, profile), got {type(key).__name__}")
        if not isinstance(key.frame, int) or not -num_frames <= key.frame < num_frames:
            raise ValueError(f"keyframe frame must be an int in [{-num_frames}, {num_frames}), got {key.frame!r}")
        if not 0 < key.strength <= 1:
            raise ValueError(f"keyframe strength must be in (0, 1], got {key.strength!r}")
        if key.profile is not None and (len(key.profile) == 0 or not all(0 <= v <= 1 for v in key.profile)):
            raise ValueError(f"a keyframe profile must be a non-empty list of values in [0, 1], got {key.profile!r}")
        resolved.append((key.frame % num_frames, key))
    resolved.sort(key=lambda item: item[0])
    frames = [f for f, _ in resolved]
    if len(set(frames)) != len(frames):
        raise ValueError(f"two keyframes on the same frame: {frames}")
    if any(b - a < MIN_KEYFRAME_GAP for a, b in zip(frames, frames[1:])):
        logger.warning(
            "keyframes %s are closer than %d frames: little room for motion between them", frames, MIN_KEYFRAME_GAP
        )
    images: list[Any] = []
    latent_of = []
    for _, key in resolved:
        index = next((j for j, image in enumerate(images) if same_image(image, key.image)), None)
        if index is None:
            images.append(key.image)
            index = len(images) - 1
        latent_of.append(index)
    profiles = [key.profile or default_profile for _, key in resolved]
    strengths = [key.strength for _, key in resolved]
    return Conditioning(num_frames, frames, strengths, profiles, latent_of, circular), images


def loop_period(num_frames: int, motion_scale: int, loop: str | None) -> int | None:
    """The number of frames that play as a seamless loop: F for a closed loop; 15 for a legacy loop preset
    at 16 frames (its last frame repeats frame 0); None when the video is not a loop."""
    if loop == "closed":
        return num_frames
    return LEGACY_LOOP_FRAMES - 1 if is_loop_preset(motion_scale) and num_frames == LEGACY_LOOP_FRAMES else None


# --------------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class ContextOptions:
    """Sliding windows over the frames. length L (2 ≤ L ≤ the adapter's frame limit); overlap O (0 ≤ O <
    L; ≥ 1 in a closed loop); schedule "uniform" (windows Δ apart, shifted every step by a van der Corput
    fraction of Δ, so no frame is always at an edge), "static" (fixed windows Δ apart, the last one pulled
    back to end at F) or "looped" (windows wrap around F: closed loops only); fuse: per-position weights
    "pyramid" min(p + 1, L − p), "flat" 1, or "overlap-linear" (1, ramping from 1e-3 over the O positions
    another window shares); rotations: windows of a closed loop of F ≤ L frames (each a rotation of the
    whole clip); windows_per_batch: windows run in one UNet call, as extra batch rows."""

    length: int = 16
    overlap: int = 4
    schedule: str = "uniform"
    fuse: str = "pyramid"
    rotations: int = 2
    windows_per_batch: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or self.length < 2:
            raise ValueError(f"context_length must be an int >= 2, got {self.length!r}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.length:
            raise ValueError(f"context_overlap must be an int in [0, context_length), got {self.overlap!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"context_schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.fuse not in FUSE_METHODS:
            raise ValueError(f"context_fuse must be one of {FUSE_METHODS}, got {self.fuse!r}")
        for name in ("rotations", "windows_per_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")

    @property
    def stride(self) -> int:
        return self.length - self.overlap


def van_der_corput(s: int) -> float:
    """φ(s): the bits of s mirrored behind the binary point: 0, 1/2, 1/4, 3/4, 1/8, ..."""
    x, scale = 0.0, 0.5
    while s:
        x, s, scale = x + scale * (s & 1), s >> 1, scale / 2
    return x


def _offset(span: int, step: int) -> int:
    return math.floor(span * van_der_corput(step) + 0.5) % span


def context_windows(num_frames: int, options: ContextOptions, step: int = 0) -> list[list[int]]:
    """The windows (lists of frame indices, in order) of denoising step `step`.

    static:  starts min(kΔ, F − L), k = 0 … ⌈(F − L)/Δ⌉.
    uniform: offset o = round(Δ·φ(s)) mod Δ; starts o + kΔ, k = −1, 0, 1, …, clamped to [0, F − L],
             up to the first equal to F − L, duplicates dropped.
    looped:  F > L: starts o + kΔ, k = 0 … ⌈F/Δ⌉ − 1, frames taken modulo F; F ≤ L: `rotations` R
             rotations of the whole clip starting at (round(F·φ(s)) + ⌊rF/R⌋) mod F.
    F ≤ L, not looped: one window, all frames.
    """
    F, L, stride = num_frames, options.length, options.stride
    if options.schedule == "looped":
        if F <= L:
            offset = _offset(F, step)
            starts = dict.fromkeys((offset + r * F // options.rotations) % F for r in range(options.rotations))
            return [[(start + p) % F for p in range(F)] for start in starts]
        offset = _offset(stride, step)
        return [[(offset + k * stride + p) % F for p in range(L)] for k in range(math.ceil(F / stride))]
    if F <= L:
        return [list(range(F))]
    if options.schedule == "static":
        starts = [min(k * stride, F - L) for k in range(1 + math.ceil((F - L) / stride))]
    else:
        offset, starts, k = _offset(stride, step), [], -1
        while not starts or starts[-1] != F - L:
            start = min(max(offset + k * stride, 0), F - L)
            if not starts or start != starts[-1]:
                starts.append(start)
            k += 1
    return [list(range(start, start + L)) for start in starts]


def position_weights(n: int, overlap: int, fuse: str, ramp_start: bool, ramp_end: bool) -> Tensor:
    """Unnormalised weights (n,) float32 of the positions of one window (see ContextOptions)."""
    if fuse == "flat":
        return torch.ones(n)
    if fuse == "pyramid":
        p = torch.arange(n, dtype=torch.float32)
        return torch.minimum(p + 1, n - p)
    w, m = torch.ones(n), min(overlap, n)
    ramp = torch.linspace(RAMP_FLOOR, 1, m)
    if ramp_start and m:
        w[:m] = ramp
    if ramp_end and m:
        w[n - m :] = torch.minimum(w[n - m :], ramp.flip(0))
    return w


def fusion_weights(windows: Sequence[Sequence[int]], num_frames: int, options: ContextOptions) -> list[Tensor]:
    """Per window, the normalised weights ŵ (n,) float32: w(p) / Σ over the windows holding the frame.
    Every frame's weights sum to one; a single window gets exactly 1.0 everywhere."""
    looped = options.schedule == "looped"
    raw = [
        position_weights(len(W), options.overlap, options.fuse, looped or W[0] != 0, looped or W[-1] != num_frames - 1)
        for W in windows
    ]
    total = torch.zeros(num_frames)
    for W, w in zip(windows, raw):
        total.index_add_(0, torch.tensor(W), w)
    return [w / total[torch.tensor(W)] for W, w in zip(windows, raw)]


def make_windowed_denoiser(
    unet: UNet,
    text: Tensor,
    conditioning: Conditioning,
    latents: Tensor,
    guidance_scale: float,
    options: ContextOptions,
    anchor: str = "shifted",
    anchor_gap: int = 0,
    window_hook: Callable[[int, list[int], list[float]], Any] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """`pipeline.make_denoiser` over windows: the model input x (b, 4, F, h, w), t -> the fused guided
    output (b, 4, F, h, w).

    Per window W: x[:, :, W] with W's mask and condition (`Conditioning.inputs` from the distinct
    images' latents (K', b, 4, h, w)), CFG as in the plain denoiser, then Σ_W ŵ_W · out_W accumulated in
    float32 from zeros and cast back. The windows follow the step counter `denoise.step` (set it to 0
    before a sampling pass; each call advances it). window_hook(step, window, affinity) is called for each
    window before its UNet call. Text states (b', l, d) are repeated per window in a batch, never per frame.
    """
    guided = guidance_scale > 1

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        step, num_frames, b = denoise.step, x.shape[2], x.shape[0]
        denoise.step += 1
        windows = context_windows(num_frames, options, step)
        weights = fusion_weights(windows, num_frames, options)
        fused = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for first in range(0, len(windows), options.windows_per_batch):
            group = windows[first : first + options.windows_per_batch]
            inputs = []
            for W in group:
                mask, cond, affinity = conditioning.inputs(latents, W, anchor, anchor_gap)
                if window_hook is not None:
                    window_hook(step, W, affinity)
                inputs.append(torch.cat([x[:, :, W], mask, cond], dim=1))  # (b, 9, n, h, w)
            x_in, n = torch.cat(inputs), len(group)
            if guided:  # rows [uncond of every window; cond of every window]
                negative, positive = denoise.text.chunk(2)
                model_output = unet(torch.cat([x_in] * 2), t, torch.cat([negative] * n + [positive] * n))
                out_u, out_c = model_output.chunk(2)
                model_output = out_u + guidance_scale * (out_c - out_u)
            else:
                model_output = unet(x_in, t, torch.cat([denoise.text] * n))
            for j, W in enumerate(group):
                w = weights[first + j].to(x.device).view(1, 1, -1, 1, 1)
                fused.index_add_(2, torch.tensor(W, device=x.device), w * model_output[j * b : (j + 1) * b].float())
        return fused.to(x.dtype)

    denoise.text, denoise.step = text, 0
    return denoise


# --------------------------------------------------------------------------------------------- noise


def freenoise(x: Tensor, length: int, block: int, generator: GeneratorArg = None) -> Tensor:
    """Reschedule noise x (b, c, F, h, w) in place (FreeNoise): for k = 0, 1, … while L + kS < F, frames
    [L + kS, L + (k+1)S) ∩ [0, F) become frames kS + π[0 …] for a random permutation π of S = `block`,
    in increasing k (so the noise repeats with period L). One π per k from a single generator, shared by
    the batch (diffusers' `_prepare_latents_free_noise`, "shuffle_context"); with a list of generators,
    row r draws its own from generator r. Nothing is drawn when F ≤ L. Returns x."""
    if not 1 <= block <= length:
        raise ValueError(f"noise_block must be in [1, context_length], got {block}")
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]

    def perm(g: torch.Generator | None) -> Tensor:
        return torch.randperm(block, generator=g, device=g.device if g is not None else "cpu").to(x.device)

    num_frames = x.shape[2]
    for start in range(length, num_frames, block):
        n, source = min(block, num_frames - start), start - length
        if len(gens) == 1:
            x[:, :, start : start + n] = x[:, :, source + perm(gens[0])[:n]]
        else:
            for r, g in enumerate(gens):
                x[r, :, start : start + n] = x[r, :, source + perm(g)[:n]]
    return x
