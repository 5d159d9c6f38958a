"""PIAPipeline: image + prompt -> video, a drop-in for diffusers 0.42.1 `PIAPipeline`.

The pipeline is a thin shell over plain functions you can call yourself:

    pixels = preprocess_image(image, H, W)                               (n, 3, H, W) in [-1, 1]
    text   = encode_text(text_encoder, tokenize(tokenizer, prompts))     (b, l, d)  [models/text.py]
    cond   = encode_condition(vae, pixels, generator, b)                 (b, 4, h, w) × scaling_factor
    plan, images = keyframe_plan(f, [Keyframe(0, pixels)], MOTION_PRESETS[m], ...)   [long_video.py]
    mask, cond, _ = plan.inputs(cond[None], range(f))                     (b, 1|4, f, h, w)
    denoise = make_denoiser(unet, text, mask, cond, guidance_scale)      (or make_windowed_denoiser)
    x0 = free_init(run_pass, start, noise, scheduler, steps, strength)   [freeinit.py: passes of sample()]
    video = decode_latents(vae, x0)                                      (b, 3, f, H, W)

Numbers match diffusers 0.42.1 (diffusers/pipelines/pia/pipeline_pia.py: RNG order and dtypes included)
wherever diffusers works. Where it does not, pia_torch does what the argument promises: an image whose
size differs from (height, width) is resized to cover it and center-cropped (diffusers nearest-resizes
its latent); `num_videos_per_prompt` is honoured; with strength < 1 each video starts from its own
image; clip_skip works under transformers 5.x and applies to the negative prompt too; FreeInit keeps
the strength and works with Euler (freeinit.py).

Beyond diffusers (long_video.py): videos longer than the adapter's frame table through condition-anchored
windows over the whole UNet call, closed loops of any length, and keyframes (image A at frame 0, B at the end).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from pia_torch.freeinit import free_init
from pia_torch.loading import MotionAdapter, load_pipeline_components
from pia_torch.long_video import (
    ANCHORS,
    LOOP_MODES,
    MOTION_PRESETS,
    NOISE_TYPES,
    ContextOptions,
    Keyframe,
    check_motion_scale,
    freenoise,
    is_loop_preset,
    keyframe_plan,
    loop_period,
    loop_profile,
    make_windowed_denoiser,
)
from pia_torch.lora import LoraAdapters
from pia_torch.models.text import encode_text, tokenize
from pia_torch.models.unet import UNet
from pia_torch.models.vae import AutoencoderKL
from pia_torch.sampling import GeneratorArg, randn_tensor, sample, step_sigmas
from pia_torch.saving import save_pipeline
from pia_torch.schedulers import SchedulerBase
from pia_torch.single_file import load_single_file_components

logger = logging.getLogger("pia_torch")

ImageInput = PIL.Image.Image | np.ndarray | Tensor | Sequence[PIL.Image.Image | np.ndarray | Tensor]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_CONTEXT_LENGTH = 16  # the length PIA was trained on
DECODE_PIXELS = 2**20  # default VAE decode chunk: frames of up to this many pixels at a time (4 at 512x512)
CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds")


# --------------------------------------------------------------------------------------------- functions


def _to_tensor(image: ImageInput) -> Tensor:
    """PIL / numpy (H, W, C) or (n, H, W, C) / torch (C, H, W) or (n, C, H, W), or lists of them ->
    (n, 3, H, W) floats in [0, 1] (or in [-1, 1] for signed float input, as diffusers accepts)."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("no image given")
    if all(isinstance(i, PIL.Image.Image) for i in items):  # diffusers: np.array(img) / 255 in float32
        arrays = [np.array(i.convert("RGB")).astype(np.float32) / 255.0 for i in items]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if all(isinstance(i, np.ndarray) for i in items):
        x = np.concatenate([i[None] if i.ndim == 3 else i for i in items])  # (n, H, W, C)
        x = torch.from_numpy(x).permute(0, 3, 1, 2)
    elif all(isinstance(i, Tensor) for i in items):
        x = torch.cat([i[None] if i.ndim == 3 else i for i in items])  # (n, C, H, W)
    else:
        raise ValueError(f"image must be PIL images, numpy arrays or torch tensors, got {type(items[0]).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images (H, W, 3) / (3, H, W) (batched or not), got shape {tuple(x.shape)}")
    return x.float() / 255 if x.dtype == torch.uint8 else x  # diffusers would not rescale uint8


def preprocess_image(image: ImageInput, height: int, width: int) -> Tensor:
    """Images -> (n, 3, height, width) in [-1, 1], float32 (float64 stays float64).

    An image of another size is resized to cover (height, width), keeping its aspect ratio (bicubic,
    antialiased), then center-cropped. Same size: exactly diffusers' preprocessing (x -> 2x − 1).
    """
    x = _to_tensor(image)
    if x.min() >= 0:  # diffusers leaves input that is already in [-1, 1] as it is
        x = 2.0 * x - 1.0
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False).to(x.dtype)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        x = x[:, :, top : top + height, left : left + width].clamp(-1, 1)
    return x


def encode_condition(vae: AutoencoderKL, pixels: Tensor, generator: GeneratorArg, num_videos: int) -> Tensor:
    """pixels (n, 3, H, W) -> condition latents (b, c, H/s, W/s), a posterior *sample* × scaling_factor.

    Image i conditions videos [i·r, (i+1)·r), r = b/n. One generator: one encode and one draw for all n
    images (diffusers); a list of b generators: video k draws from generator k, on its own image.
    """
    n = pixels.shape[0]
    if num_videos % n:
        raise ValueError(f"{n} images cannot be spread over {num_videos} videos")
    r = num_videos // n
    if isinstance(generator, (list, tuple)) and len(generator) > 1:
        if len(generator) != num_videos:
            raise ValueError(f"got {len(generator)} generators for {num_videos} videos")
        z = torch.cat([vae.encode(pixels[k // r : k // r + 1]).sample(g) for k, g in enumerate(generator)])
    else:
        g = generator[0] if isinstance(generator, (list, tuple)) else generator
        z = vae.encode(pixels).sample(g).repeat_interleave(r, dim=0)  # (b, c, h, w)
    return z * vae.config.scaling_factor


def make_denoiser(
    unet: UNet, text: Tensor, mask: Tensor, cond: Tensor, guidance_scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """The model closure for `sampling.sample`: the model input x (b, 4, f, h, w) (already scaled by the
    loop), t -> the model output (ε, or v / x0 by the UNet's training) (b, 4, f, h, w).

    mask (b, 1, f, h, w) and cond (b, 4, f, h, w) follow x as channels 4..8 of the UNet's input. With
    classifier-free guidance (guidance_scale > 1) text holds 2b rows [uncond; cond], the input is run
    twice and the output is out_u + g·(out_c − out_u). Text states are (b', l, d), shared by every frame
    of a video. The `text` attribute of the returned function may be replaced between steps.

    The input is one buffer per video, (k·b, f, 9, h, w) in memory, with mask and condition written once:
    a step copies x into channels 0..3 and hands the UNet the (k·b, 9, f, h, w) view, which it flattens to
    ((k·b f), 9, h, w) without a copy. The buffer is overwritten at every step.
    """
    guided = guidance_scale > 1
    b, _, f, h, w = cond.shape
    copies = 2 if guided else 1
    buffer = cond.new_empty(copies * b, f, 4 + mask.shape[1] + cond.shape[1], h, w)
    x_in = buffer.transpose(1, 2)  # (k·b, 9, f, h, w)
    per_copy = x_in.unflatten(0, (copies, b))  # (k, b, 9, f, h, w), a view: writes broadcast over k
    per_copy[:, :, 4:] = torch.cat([mask, cond], dim=1)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        per_copy[:, :, :4] = x
        model_output = unet(x_in, t, denoise.text)
        if guided:
            out_u, out_c = model_output.chunk(2)
            model_output = out_u + guidance_scale * (out_c - out_u)
        return model_output

    denoise.text = text
    return denoise


def decode_latents(vae: AutoencoderKL, latents: Tensor, chunk_size: int | None = None) -> Tensor:
    """latents (b, c, f, h, w) -> video (b, 3, f, H, W) float32 in about [-1, 1]; `chunk_size` frames
    per decode call (None: all at once, as diffusers).

    A half-precision VAE can overflow to inf/NaN (black frames) with some SD1.5 VAEs: a chunk whose
    output is not finite is decoded again in float32, with one warning per call.
    """
    z = rearrange(1 / vae.config.scaling_factor * latents, "b c f h w -> (b f) c h w")
    dtype, redone = next(vae.parameters()).dtype, 0
    frames = []
    for chunk in z.split(chunk_size) if chunk_size else [z]:
        out = vae.decode(chunk)
        if dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(out).all():
            redone += 1
            out = vae.float().decode(chunk.float())
            vae.to(dtype)  # fp16 -> fp32 -> fp16 is exact
        frames.append(out.float())
    if redone:
        logger.warning(
            "the %s VAE decoder overflowed on %d of %d chunks: decoded them again in float32 "
            "(a VAE that does this every time is faster in float32 from the start)",
            dtype,
            redone,
            len(frames),
        )
    return rearrange(torch.cat(frames), "(b f) c h w -> b c f h w", b=latents.shape[0])


def postprocess(video: Tensor, output_type: str = "pil") -> Any:
    """video (b, 3, f, H, W) in [-1, 1] -> "pt": (b, f, 3, H, W) in [0, 1]; "np": (b, f, H, W, 3);
    "pil": b lists of f RGB images (x·255 rounded)."""
    video = (video * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return rearrange(video, "b c f h w -> b f c h w")
    frames = rearrange(video, "b c f h w -> b f h w c").cpu().float().numpy()
    if output_type == "np":
        return frames
    if output_type == "pil":
        return [[PIL.Image.fromarray(f) for f in (v * 255).round().astype("uint8")] for v in frames]
    raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; elsewhere none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_native_dtypes(flags: set[str] | None = None) -> set[torch.dtype]:
    """The half-precision dtypes the CPU computes natively: bfloat16 with AMX or AVX512-BF16, float16 with
    AMX-FP16 or AVX512-FP16. Without them PyTorch emulates the dtype, many times slower than float32."""
    flags = cpu_flags() if flags is None else flags
    native = set()
    if flags & {"amx_bf16", "avx512_bf16"}:
        native.add(torch.bfloat16)
    if flags & {"amx_fp16", "avx512_fp16"}:
        native.add(torch.float16)
    return native


def auto_dtype(device: str | torch.device, flags: set[str] | None = None) -> torch.dtype:
    """The fastest dtype that keeps PIA's quality: float16 on CUDA; on a CPU bfloat16 where it has AMX (about
    6x float32 there), else float32 (AVX512-BF16 alone gains little; emulated bfloat16 is far slower)."""
    if torch.device(device).type == "cuda":
        return torch.float16
    return torch.bfloat16 if "amx_bf16" in (cpu_flags() if flags is None else flags) else torch.float32


# --------------------------------------------------------------------------------------------- pipeline


@dataclass
class PIAPipelineOutput:
    """frames: (b, f, H, W, 3) np / (b, f, 3, H, W) pt / b lists of f PIL images / latents (b, 4, f, h, w).
    loop_period: how many frames play as a seamless loop (frames[:, :loop_period]); None if not a loop.
    context: the windows that ran (long_video.ContextOptions), None for the plain path."""

    frames: Any
    loop_period: int | None = None
    context: ContextOptions | None = None

    def __getitem__(self, i: int) -> Any:
        return (self.frames,)[i]


class PIAPipeline:
    """PIA: animate an image with a text prompt. Components are plain modules: `unet`, `vae`,
    `text_encoder` (transformers CLIPTextModel), `tokenizer` (CLIPTokenizer) and `scheduler`."""

    def __init__(
        self, vae: AutoencoderKL, text_encoder: nn.Module, tokenizer: Any, unet: UNet, scheduler: SchedulerBase
    ) -> None:
        self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler = (
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._free_init: dict[str, Any] | None = None
        self._offload_device: torch.device | None = None
        self._checked_scheduler: Any = None
        self._checked_dtype: tuple[torch.device, torch.dtype] | None = None
        self._progress = True
        self._lora = LoraAdapters(unet, text_encoder)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | Path,
        motion_adapter: MotionAdapter | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        convention: str = "original",
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        vae: str | Path | AutoencoderKL | None = None,
        conv_in: str = "base",
    ) -> PIAPipeline:
        """A diffusers Stable Diffusion 1.5 folder or Hub repo (model_index.json, unet/, vae/, text_encoder/,
        tokenizer/, scheduler/) + a PIA motion adapter. Only those files are fetched. `convention`
        selects the UNet's GroupNorm convention: "original" (as PIA was trained) or "diffusers". vae: a
        separate VAE (file, folder or model). conv_in: "base" (diffusers' rule) or "adapter" (the original
        PIA's on the plain SD1.5 base: all of conv_in from the adapter); see loading.assemble_unet."""
        return cls(
            **load_pipeline_components(
                repo_id_or_dir,
                motion_adapter,
                torch_dtype,
                variant,
                convention,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                revision=revision,
                vae=vae,
                conv_in=conv_in,
            )
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        motion_adapter: MotionAdapter,
        config: str | Path | None = None,
        vae: str | Path | AutoencoderKL | None = None,
        torch_dtype: torch.dtype | None = None,
        convention: str = "original",
        conv_in: str = "base",
    ) -> PIAPipeline:
        """A personalised SD1.5 model as one file in the original LDM layout (civitai-style .safetensors;
        .ckpt/.pt/.pth only through torch.load(weights_only=True)) + a PIA motion adapter. Configs: SD1.5's,
        shipped with pia_torch, or `config` (a diffusers folder or Hub id). vae: a separate VAE file or
        folder. The tokenizer comes from `config`, else from the Hub cache (openai/clip-vit-large-patch14)."""
        return cls(**load_single_file_components(path, motion_adapter, config, vae, torch_dtype, convention, conv_in))

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write a diffusers PIAPipeline folder (saving.save_pipeline) that diffusers 0.42.1 and pia_torch load,
        e.g. to convert a single file once. The GroupNorm convention is not saved: pass convention= when
        loading it back."""
        save_pipeline(self, save_directory)

    # ----------------------------------------------------------------------------------- devices
    def to(self, *args: Any, **kwargs: Any) -> PIAPipeline:
        """Move / cast every model, like nn.Module.to (a device, a dtype, or both)."""
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:
                module.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep the models on the CPU and move each to the accelerator only while it runs. Without an
        accelerator this logs and does nothing (diffusers 0.42.1 raises)."""
        if device is None and not torch.cuda.is_available():
            logger.info(
                "enable_model_cpu_offload(): no accelerator found, nothing to offload; running on %s", self.device
            )
            return
        self._offload_device = torch.device(device or f"cuda:{gpu_id or 0}")
        self.to("cpu")

    @contextmanager
    def _on_device(self, module: nn.Module | None) -> Iterator[None]:
        """With CPU offload: `module` sits on the accelerator for the duration of the block only."""
        if self._offload_device is None or module is None:
            yield
            return
        module.to(self._offload_device)
        try:
            yield
        finally:
            module.to("cpu")

    # ----------------------------------------------------------------------------------- switches
    def enable_free_init(
        self,
        num_iters: int = 3,
        use_fast_sampling: bool = False,
        method: str = "butterworth",
        order: int = 4,
        spatial_stop_frequency: float = 0.25,
        temporal_stop_frequency: float = 0.25,
    ) -> None:
        """FreeInit (Wu et al. 2023): re-run sampling `num_iters` times from noise whose low frequencies
        come from the previous result (freeinit.py)."""
        self._free_init = dict(
            num_iters=num_iters,
            use_fast_sampling=use_fast_sampling,
            method=method,
            order=order,
            spatial_stop_frequency=spatial_stop_frequency,
            temporal_stop_frequency=temporal_stop_frequency,
        )

    def disable_free_init(self) -> None:
        self._free_init = None

    @property
    def free_init_enabled(self) -> bool:
        return self._free_init is not None

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2023) on the UNet's decoder: skip features × s, backbone features × b."""
        self.unet.enable_freeu(s1, s2, b1, b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()

    def enable_vae_slicing(self) -> None:
        """Decode one frame at a time (less memory, same video up to ~1e-7)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Encode and decode large frames in overlapping tiles."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def compile(self, mode: str | None = None, backend: str = "inductor", freeze: bool = False) -> PIAPipeline:
        """torch.compile the UNet (whole graph: it has no graph breaks) and the VAE decoder, in place (the
        weights keep their names, so LoRA and saving work as before). The first call compiles (a minute or more
        on a CPU); later steps, timesteps, FreeInit passes and windows of one length reuse the graph. On a GPU
        mode="max-autotune" also captures CUDA graphs.

        freeze: inductor's `freezing` (CPU), which treats the weights as constants and pre-packs them in
        oneDNN's layouts instead of reordering them at every call. On a 2-core EPYC it made the small bench
        model's UNet step 1.2x faster than compiling without it, and the SD1.5-shaped one at 4x16x16 latents
        slower than eager: measure before using it. The graph still follows in-place weight changes such as
        fuse_lora (tested). torch.compile takes `mode` or options, not both."""
        if freeze and (mode is not None or backend != "inductor"):
            raise ValueError("compile(freeze=True) needs backend='inductor' and no mode")
        options = {"freezing": True} if freeze else None
        self.unet.compile(fullgraph=True, dynamic=False, mode=mode, backend=backend, options=options)
        self.vae.decoder.compile(dynamic=False, mode=mode, backend=backend, options=options)
        return self

    def set_progress_bar_config(self, disable: bool = False, **_: Any) -> None:
        self._progress = not disable

    # ----------------------------------------------------------------------------------- LoRA (lora.py)
    def load_lora_weights(self, path: str | Path | dict[str, Tensor], adapter_name: str | None = None) -> str:
        """A kohya/A1111 or diffusers/PEFT LoRA (.safetensors, .pt/.bin/.ckpt or a state dict) on the UNet and
        the text encoder, applied at forward time; it becomes the only active adapter (weight 1). Returns its name."""
        return self._lora.load(path, adapter_name)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Activate exactly these adapters with these weights; their updates add up."""
        self._lora.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Merge the active adapters into the weights: W + lora_scale · Σ w·(α/r)·up @ down, in float32."""
        self._lora.fuse(lora_scale)

    def unfuse_lora(self) -> None:
        """Restore the weights from before fuse_lora, bit for bit."""
        self._lora.unfuse()

    def unload_lora_weights(self) -> None:
        """Drop every adapter. Fused weights stay fused, as in diffusers (call unfuse_lora first to undo)."""
        self._lora.unload()

    # ----------------------------------------------------------------------------------- steps
    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Prompts -> (positive (b·r, l, d), negative (b·r, l, d) or None without guidance), r =
        num_images_per_prompt, each row repeated r times in place (video k of prompt i is row i·r + k), in
        the text encoder's dtype. diffusers' signature and layout: feeding the result back as
        `pipe(prompt_embeds=..., negative_prompt_embeds=...)` reproduces the prompt run. clip_skip applies to
        both sides; "" is the default negative prompt. `lora_scale` is accepted for compatibility; no text
        encoder LoRA is loaded, so it has no effect (as in diffusers without LoRA)."""
        device = device or self._execution_device
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.dtype
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")

        def encode(texts: list[str], length: int | None = None) -> Tensor:
            with self._on_device(self.text_encoder):
                ids = tokenize(self.tokenizer, texts, length).to(self.text_encoder.device)
                return encode_text(self.text_encoder, ids, clip_skip).to(device, dtype)

        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt or prompt_embeds")
            prompt_embeds = encode([prompt] if isinstance(prompt, str) else list(prompt))
        prompt_embeds = prompt_embeds.to(device, dtype)
        b = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is not None and not isinstance(negative_prompt, (str, list, tuple)):
                raise ValueError(
                    f"negative_prompt must be a str or a list of str, got {type(negative_prompt).__name__}"
                )
            single = negative_prompt is None or isinstance(negative_prompt, str)
            negatives = [negative_prompt or ""] * b if single else list(negative_prompt)
            if len(negatives) != b:
                raise ValueError(f"{len(negatives)} negative prompts for {b} prompts")
            negative_prompt_embeds = encode(negatives, prompt_embeds.shape[1])
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype)
            if do_classifier_free_guidance:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0), negative_prompt_embeds

    @property
    def _execution_device(self) -> torch.device:
        return self._offload_device or self.device

    def _check_dtype(self) -> None:
        """Warn once per device and dtype when the CPU only emulates the pipeline's half-precision dtype."""
        device, dtype = self._execution_device, self.dtype
        if self._checked_dtype == (device, dtype):
            return
        self._checked_dtype = (device, dtype)
        if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and dtype not in cpu_native_dtypes():
            logger.warning(
                "this CPU has no native %s (AMX / AVX512 %s): PyTorch emulates it, many times slower than "
                "float32; use torch_dtype=torch.float32",
                dtype,
                "BF16" if dtype == torch.bfloat16 else "FP16",
            )

    def _check_scheduler(self) -> None:
        """Log once per scheduler when its config is known to hurt PIA (the diffusers PIA docs' tip: linear betas)."""
        if self._checked_scheduler is self.scheduler:
            return
        self._checked_scheduler = self.scheduler
        config = self.scheduler.config
        if config.get("beta_schedule") != "linear" or config.get("clip_sample", False):
            logger.warning(
                "scheduler has beta_schedule=%r, clip_sample=%r: PIA was trained with "
                "beta_schedule='linear' and works best without clip_sample",
                config.get("beta_schedule"),
                config.get("clip_sample", False),
            )

    # ----------------------------------------------------------------------------------- call
    def _context_options(
        self,
        num_frames: int,
        closed: bool,
        length: int | None,
        overlap: int,
        schedule: str | None,
        fuse: str,
        windows_per_batch: int,
    ) -> ContextOptions | None:
        """The windows of this call, or None for the plain path (one UNet call over all frames): windows are
        on when a context length is given, for a closed loop, or when the frames exceed the adapter's table."""
        limit = self.unet.config.motion.max_seq_length if self.unet.config.motion else None
        if length is None and not closed and (limit is None or num_frames <= limit):
            return None
        if length is None:
            length = min(DEFAULT_CONTEXT_LENGTH, limit or DEFAULT_CONTEXT_LENGTH)
            if not closed:
                logger.info(
                    "%d frames are more than the adapter's %d: sliding windows of %d frames, overlap %d, %s schedule "
                    "(set context_length to choose)",
                    num_frames,
                    limit,
                    length,
                    overlap,
                    schedule or "uniform",
                )
        if limit is not None and isinstance(length, int) and length > limit:
            raise ValueError(f"context_length must be <= {limit} (the adapter's motion_max_seq_length), got {length}")
        schedule = schedule or ("looped" if closed else "uniform")
        if (schedule == "looped") != closed:
            raise ValueError("context_schedule 'looped' goes with loop='closed', and a closed loop needs it")
        options = ContextOptions(length, overlap, schedule, fuse, windows_per_batch=windows_per_batch)
        if closed and num_frames > length and overlap < 1:
            raise ValueError("a closed loop longer than its windows needs context_overlap >= 1")
        return options

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | None,
        prompt: str | list[str] | None = None,
        strength: float = 1.0,
        num_frames: int = 16,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        motion_scale: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        decode_chunk_size: int | None = None,
        cond_frame: int = 0,
        keyframes: Sequence[Keyframe] | None = None,
        loop: bool | str | None = None,
        context_length: int | None = None,
        context_overlap: int = 4,
        context_schedule: str | None = None,
        context_fuse: str = "pyramid",
        windows_per_batch: int = 1,
        anchor: str = "shifted",
        anchor_gap: int = 0,
        noise: str = "freenoise",
        noise_block: int = 4,
        window_hook: Callable[[int, list[int], list[float]], Any] | None = None,
    ) -> PIAPipelineOutput | tuple:
        """Animate `image` guided by `prompt`; returns `.frames` and `.loop_period` (see PIAPipelineOutput).

        height/width default to unet.config.sample_size × vae_scale_factor; strength < 1 starts from the
        partially noised image (img2img); motion_scale picks a MOTION_PRESETS row; guidance_scale > 1 turns
        classifier-free guidance on; callback_on_step_end(pipe, i, t, {name: tensor}) is called once per step
        on the whole video and may return replacements for "latents" / "prompt_embeds"; decode_chunk_size
        frames go through the VAE at a time (default: 2**20 pixels' worth, 4 frames at 512×512).

        Beyond diffusers (long_video.py):
        - cond_frame: the frame that shows `image` (negative: from the end; default 0). keyframes: several,
          [Keyframe(frame, image, strength, profile)], e.g. image A at 0 and B at −1 (an image of None is
          `image`); frame i takes the keyframe with the largest strength·profile(distance) (mask and latent).
        - loop: None (presets 3-5 as diffusers: a loop at 16 frames, with frame 0 repeated at the end),
          "legacy" (the same, asked for), True / "closed" (a seamless loop of any length >= 2: circular
          affinity, windows that wrap around; loop_period = num_frames).
        - context_length L: run the UNet on windows of L frames (on by itself above the adapter's frame
          limit, with L = 16, and for closed loops), context_overlap O, context_schedule "uniform" /
          "static" / "looped" (closed loops; the default for them), context_fuse "pyramid" / "flat" /
          "overlap-linear", windows_per_batch windows per UNet call (see long_video.ContextOptions).
          With L >= num_frames (not a loop) the one window is the plain path, bit for bit.
        - anchor: "shifted" (every window has a frame at its nearest keyframe's full affinity) or "global"
          (the full-length curve sliced); anchor_gap G >= 0 softens "shifted" (the nearest frame reads h(G)).
        - noise: "freenoise" (the initial noise repeats with period L, shuffled in blocks of noise_block
          frames; also FreeInit's fresh noise) or "random"; only with windows over more than L frames;
          `latents` given by the caller are used as they are.
        - window_hook(step, window, affinity): called for each window of each step (windowed runs).
        """
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height} and {width}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not set(callback_on_step_end_tensor_inputs) <= set(CALLBACK_TENSORS):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {CALLBACK_TENSORS}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be an int >= 1, got {num_videos_per_prompt!r}")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        check_motion_scale(motion_scale)
        loop = {True: "closed", False: None}.get(loop, loop) if isinstance(loop, bool) else loop
        if loop is not None and loop not in LOOP_MODES:
            raise ValueError(f"loop must be None, True or one of {LOOP_MODES}, got {loop!r}")
        closed, legacy = loop == "closed", is_loop_preset(motion_scale)
        if loop == "legacy" and not legacy:
            raise ValueError(f"loop='legacy' needs a loop preset (motion_scale 3, 4 or 5), got {motion_scale}")
        if closed and num_frames < 2:
            raise ValueError("a closed loop needs num_frames >= 2")
        if not closed and legacy and num_frames != 16:
            logger.warning(
                "motion_scale %d is a loop preset made for 16 frames: %d frames do not close a loop "
                "(loop=True closes one at any length)",
                motion_scale,
                num_frames,
            )
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        if not isinstance(anchor_gap, int) or anchor_gap < 0:
            raise ValueError(f"anchor_gap must be an int >= 0, got {anchor_gap!r}")
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")
        context = self._context_options(
            num_frames, closed, context_length, context_overlap, context_schedule, context_fuse, windows_per_batch
        )
        if context is not None and not 1 <= noise_block <= context.length:
            raise ValueError(f"noise_block must be in [1, context_length={context.length}], got {noise_block!r}")
        if keyframes is not None and cond_frame != 0:
            raise ValueError("pass cond_frame or keyframes, not both (a keyframe has its own frame)")
        if not isinstance(cond_frame, int) or not -num_frames <= cond_frame < num_frames:
            raise ValueError(f"cond_frame must be an int in [{-num_frames}, {num_frames}), got {cond_frame!r}")
        keys = list(keyframes) if keyframes is not None else [Keyframe(cond_frame)]
        if any(getattr(key, "image", None) is None for key in keys) and image is None:
            raise ValueError("no image: pass image, or an image with every keyframe")
        self._check_scheduler()
        self._check_dtype()
        device, do_cfg = self._execution_device, guidance_scale > 1

        # 1. text states (b, l, d): one row per video, [negative; positive] with guidance
        text, negative = self.encode_prompt(
            prompt,
            device,
            num_videos_per_prompt,
            do_cfg,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
        )
        num_videos = text.shape[0]
        num_prompts = num_videos // num_videos_per_prompt
        if do_cfg:
            text = torch.cat([negative, text])  # (2b, l, d)

        # 2. the draws in diffusers' order: x_T, the image posterior (one per distinct keyframe image, by
        # frame), the strength noise; then FreeNoise's permutations of whichever noise starts the run
        shape = (num_videos, 4, num_frames, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, (list, tuple)) and len(generator) != num_videos:
            raise ValueError(f"got {len(generator)} generators for {num_videos} videos")
        if latents is None:
            start_noise = randn_tensor(shape, generator, device, text.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            start_noise = latents.to(device)
        with self._on_device(self.vae):
            vae_dtype = next(self.vae.parameters()).dtype
            keys = [
                replace(key, image=preprocess_image(image if key.image is None else key.image, height, width))
                for key in keys
            ]
            for key in keys:
                if key.image.shape[0] not in (1, num_prompts, num_videos):
                    raise ValueError(f"{key.image.shape[0]} images for {num_prompts} prompts")
            profile = loop_profile(motion_scale) if closed else MOTION_PRESETS[motion_scale]
            plan, images = keyframe_plan(
                num_frames, keys, profile, closed, lambda a, b: a.shape == b.shape and torch.equal(a, b)
            )
            cond = torch.stack(  # (K', b, 4, h, w)
                [encode_condition(self.vae, px.to(device, vae_dtype), generator, num_videos) for px in images]
            ).to(device, self.dtype)
        if strength < 1:
            start_noise = randn_tensor(shape, generator, device, start_noise.dtype)
        reschedule = None
        if context is not None and noise == "freenoise" and num_frames > context.length:
            reschedule = partial(freenoise, length=context.length, block=noise_block, generator=generator)
            if latents is None or strength < 1:
                reschedule(start_noise)

        def start(timesteps: Tensor) -> Tensor:
            """The first pass's latents at its first timestep (FreeInit's fast sampling shortens that pass)."""
            if strength == 1:
                return start_noise * self.scheduler.init_noise_sigma
            x0 = plan.inputs(cond, range(num_frames))[1]  # frame i starts from its own keyframe's image
            return self.scheduler.add_noise(x0, start_noise, timesteps[:1].repeat(num_videos))

        # 3. denoise: FreeInit's passes, or one pass when it is off
        if context is None:
            mask, cond_frames, _ = plan.inputs(cond, range(num_frames))  # (b, 1|4, f, h, w)
            denoise = make_denoiser(self.unet, text, mask, cond_frames, guidance_scale)
        else:
            denoise = make_windowed_denoiser(
                self.unet, text, plan, cond, guidance_scale, context, anchor, anchor_gap, window_hook
            )
        step = partial(self.scheduler.step_with_x0, eta=eta, generator=generator)

        def on_step(state: dict[str, Any]) -> dict[str, Tensor] | None:
            values = {"latents": state["x"], "prompt_embeds": denoise.text, "negative_prompt_embeds": negative}
            out = (
                callback_on_step_end(
                    self, state["i"], state["t"], {k: values[k] for k in callback_on_step_end_tensor_inputs}
                )
                or {}
            )
            denoise.text = out.get("prompt_embeds", denoise.text)
            return {"x": out["latents"]} if "latents" in out else None

        def run_pass(x: Tensor, ts: Tensor) -> Tensor:
            if context is not None:
                denoise.step = 0  # the window schedule starts again with each pass
            return sample(
                denoise,
                x,
                ts,
                step,
                on_step if callback_on_step_end else None,
                self._progress,
                sigmas=step_sigmas(self.scheduler, ts),
            )

        with self._on_device(self.unet):
            latents = free_init(
                run_pass,
                start,
                start_noise,
                self.scheduler,
                num_inference_steps,
                strength,
                generator=generator,
                device=device,
                reschedule=reschedule,
                **(self._free_init or {"num_iters": 1}),
            )

        # 4. decode
        if decode_chunk_size is None:  # the decoder's activations dominate the peak memory at 512x512
            decode_chunk_size = max(1, DECODE_PIXELS // (height * width))
        if output_type == "latent":
            frames = latents
        else:
            with self._on_device(self.vae):
                frames = postprocess(decode_latents(self.vae, latents, decode_chunk_size), output_type)
        period = loop_period(num_frames, motion_scale, loop)
        return PIAPipelineOutput(frames, period, context) if return_dict else (frames,)
