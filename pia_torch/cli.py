"""The `pia-torch` command: animate one image with PIA.

    pia-torch --image cat.png --prompt "a cat, best quality" --out cat.gif
    pia-torch --demo --out demo.gif    # offline smoke run on tiny random weights

(also `python -m pia_torch ...` and, from a checkout, `python scripts/sample.py ...`). Many videos from a job
manifest, on one process or under torchrun: `pia-torch batch` (batch.py), which reuses the pieces below.

The defaults are the original PIA inference settings (open-mmlab/PIA `inference.py` + `base.yaml`):
DDIM with linear betas 0.00085 -> 0.012, steps_offset 1, clip_sample False, set_alpha_to_one True,
"leading" spacing, whatever scheduler the base folder holds; 25 steps; guidance 7.5; 16 frames; the
original negative prompt; the video size taken from the image (long edge at most 512, aspect kept,
each side rounded down to a multiple of 8). Next to the video goes a JSON sidecar with everything
needed to reproduce the run (video.gif -> video.json).

Bad input gets one `error: ...` line on stderr and exit status 2, before any weights are loaded where
it can be known then; no partial file is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import platform
import shlex
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image

import pia_torch
from pia_torch import demo, hub
from pia_torch.config import PIA_MOTION, MotionConfig, tiny_unet
from pia_torch.freeinit import METHODS as FREE_INIT_METHODS
from pia_torch.loading import MotionAdapter, read_config
from pia_torch.long_video import (
    ANCHORS,
    FUSE_METHODS,
    LEGACY_LOOP_FRAMES,
    LOOP_MODES,
    LOOP_PRESETS,
    NOISE_TYPES,
    SCHEDULES,
    Keyframe,
)
from pia_torch.models.text import tokenize
from pia_torch.pipeline import PIAPipeline, auto_dtype
from pia_torch.schedulers import SAMPLERS, SchedulerBase
from pia_torch.utils import (
    LOOP_EXPORTS,
    atomic_path,
    export_to_gif,
    export_to_video,
    export_to_webp,
    load_image,
    loop_frames,
)

BASE = "SG161222/Realistic_Vision_V6.0_B1_noVAE"
ADAPTER = "openmmlab/PIA-condition-adapter"
SCHEDULER_CONFIG = demo.PIA_SCHEDULER  # the original PIA DDIM (every sampler takes its betas and spacing)
# The original's DEFAULT_N_PROMPT (open-mmlab/PIA inference.py), used when no negative prompt is given.
NEGATIVE_PROMPT = (
    "wrong white balance, dark, sketches,worst quality,low quality, deformed, distorted, disfigured, "
    "bad eyes, wrong lips,weird mouth, bad teeth, mutated hands and fingers, bad anatomy,wrong anatomy, "
    "amputation, extra limb, missing limb, floating,limbs, disconnected limbs, mutation, ugly, disgusting, "
    "bad_pictures, negative_hand-neg"
)
# The options that choose and load the models (the same for every video of a `pia-torch batch` or `app` run)
MODEL_OPTIONS = (
    "base",
    "adapter",
    "config",
    "vae",
    "lora",
    "conv_in",
    "dtype",
    "compile",
    "device",
    "convention",
    "demo",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_to_npy(frames: np.ndarray, path: str | Path, fps: int = 8) -> str:
    """The raw frames (f, h, w, 3) as float32 in [0, 1], for exact comparisons (np.load reads them; fps unused)."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(frames, dtype=np.float32))
    return str(path)


WRITERS = {".gif": export_to_gif, ".mp4": export_to_video, ".webp": export_to_webp, ".npy": export_to_npy}
MAX_SIZE = 512
DEMO_MAX_SIZE = 64  # the demo's working size: the bundled image's (the tiny VAE only halves the size)
FREE_INIT_PASSES = 3  # --free-init's iterations (enable_free_init's default)
# `pia-torch NAME ...`: NAME's module provides main(argv) -> exit status
SUBCOMMANDS = {"batch": "pia_torch.batch", "app": "pia_torch.app"}
DEFAULTS = dict(frames=16, steps=25, prompt=None)
DEMO_DEFAULTS = dict(DEFAULTS, prompt="clouds drifting over sunny hills")


class CLIError(Exception):
    """Bad input: printed as one `error: ...` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage too; we want one line
        raise CLIError(message)


def build_parser(prog: str = "pia-torch", description: str = "") -> argparse.ArgumentParser:
    """The options of one video; `pia-torch batch` builds on it with its own prog and description."""
    p = Parser(
        prog=prog,
        description=description or "Animate an image with PIA (Personalized Image Animator).",
        epilog="--demo runs offline in seconds on tiny random weights (pia_torch.demo.tiny_pipeline) and the "
        "bundled 64x64 example image (unless --image is given; a given image is resized to the demo's 64-pixel "
        "working size unless --height/--width are given): the video is noise, a smoke test of the whole path. "
        "Only the weights, the image size and a built-in prompt (unless --prompt is given) are swapped in; every "
        "other option keeps its default, applies and is checked as usual.",
    )
    p.add_argument("--image", help="input image: a path or an http(s) URL (required unless --demo)")
    p.add_argument("--prompt", help="text prompt (required unless --demo)")
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="negative prompt (default: the original PIA negative prompt; pass '' for none)",
    )
    p.add_argument(
        "--base",
        default=None,
        help=f"base SD1.5 model: a diffusers folder, a hub id, or one LDM-layout "
        f"file (.safetensors; .ckpt/.pt read safely), e.g. a personalised model (default {BASE})",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help=f"PIA motion adapter: a diffusers folder, a hub id, or the original pia.ckpt (default {ADAPTER})",
    )
    p.add_argument(
        "--config",
        default=None,
        help="with a single-file --base: the component configs (a diffusers "
        "folder or hub id with unet/, vae/, text_encoder/, scheduler/ configs and tokenizer/); default SD1.5's",
    )
    p.add_argument(
        "--vae",
        default=None,
        help="a separate VAE: one file (LDM layout, e.g. vae-ft-mse-840000) or "
        "a diffusers folder, replacing the base model's",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="a LoRA file (kohya/A1111, LoCon or diffusers/PEFT) with its weight (default 1.0); "
        "repeat for several, their updates add up",
    )
    p.add_argument(
        "--conv-in",
        choices=("base", "adapter"),
        default="base",
        help="where conv_in's 4 latent channels and bias come from: the base model (default; diffusers, "
        "and the original PIA with a personalised model) or the adapter (the original PIA on plain SD1.5)",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="number of frames (default 16; at most the adapter's motion_max_seq_length, 32 for PIA)",
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 25)")
    p.add_argument(
        "--guidance",
        type=float,
        default=7.5,
        help="classifier-free guidance scale >= 0 (default 7.5; <= 1 turns guidance off)",
    )
    p.add_argument(
        "--motion-scale",
        type=int,
        default=0,
        help="motion preset 0..8 (default 0): 0-2 small to large motion, 3-5 loops (made for 16 "
        "frames), 6-8 style transfer",
    )
    p.add_argument("--strength", type=float, default=1.0, help="noise strength in (0, 1] (default 1.0)")
    p.add_argument(
        "--scheduler",
        choices=tuple(SAMPLERS),
        default="ddim",
        help=f"sampler: {', '.join(SAMPLERS)} (default ddim, the original PIA DDIM; the others take "
        "its betas and timestep spacing)",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        metavar="L",
        help="run the UNet on windows of L frames (at most the adapter's motion_max_seq_length) and fuse them: "
        "videos of any length (on by itself, with L=16, when --frames exceeds the adapter's limit, and for --loop)",
    )
    p.add_argument("--context-overlap", type=int, default=4, metavar="O", help="frames two windows share (default 4)")
    p.add_argument(
        "--context-schedule",
        choices=SCHEDULES,
        default=None,
        help="uniform (windows move every step; default), static, or looped (closed loops; their default)",
    )
    p.add_argument("--context-fuse", choices=FUSE_METHODS, default="pyramid", help="window weights (default pyramid)")
    p.add_argument(
        "--anchor",
        choices=ANCHORS,
        default="shifted",
        help="windows far from the image: shifted (each gets a frame at full affinity, as in training; default) "
        "or global (the full-length affinity curve, sliced)",
    )
    p.add_argument("--anchor-gap", type=int, default=0, metavar="G", help="soften shifted anchoring (default 0)")
    p.add_argument(
        "--noise",
        choices=NOISE_TYPES,
        default="freenoise",
        help="initial noise of windowed videos: freenoise (repeats with the window length, shuffled; default) "
        "or random",
    )
    p.add_argument("--noise-block", type=int, default=4, metavar="S", help="FreeNoise's shuffle block (default 4)")
    p.add_argument(
        "--loop",
        nargs="?",
        const="closed",
        choices=LOOP_MODES,
        default=None,
        help="--loop: a seamless loop of any length (closed); --loop legacy: the 16-frame loop presets 3-5 as "
        "diffusers makes them (frame 0 repeated at the end)",
    )
    p.add_argument(
        "--loop-export",
        choices=LOOP_EXPORTS,
        default=None,
        help="trim: write the loop's period of frames (the default with --loop); pingpong: frames 0..F-1 then "
        "F-2..1, a loop made of any clip",
    )
    p.add_argument(
        "--keyframe",
        action="append",
        default=[],
        metavar="FRAME:PATH[:STRENGTH]",
        help="an image at a frame (negative: from the end), e.g. -1:b.png:0.9; repeatable; --image is keyframe 0 "
        "unless a keyframe is given at frame 0",
    )
    p.add_argument(
        "--cond-frame",
        type=int,
        default=0,
        metavar="N",
        help="the frame that shows --image (default 0; negative: from the end)",
    )
    p.add_argument(
        "--free-init",
        choices=FREE_INIT_METHODS,
        default=None,
        metavar="METHOD",
        help=f"enable FreeInit (3 iterations) with this filter: {', '.join(FREE_INIT_METHODS)}",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--num-videos",
        type=int,
        default=1,
        metavar="N",
        help="make N videos with seeds SEED, SEED+1, ... (default 1); video k is written as "
        "OUT-stem-<seed>.ext, each with its sidecar, and equals the run with --seed <seed>",
    )
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="video height, a multiple of 8; with --width (default: "
        "from the image; an explicit size resizes the image to cover it and center-crops)",
    )
    p.add_argument("--width", type=int, default=None, help="video width, a multiple of 8; with --height")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the written video (default 8)")
    p.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="weights and compute dtype (default auto: fp16 on CUDA; on a CPU bf16 where it has AMX, else fp32)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet and the VAE decoder (the first video waits for the compiler, later ones gain)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice, usually the number of cores)",
    )
    p.add_argument(
        "--convention",
        choices=("original", "diffusers"),
        default="original",
        help="UNet normalisation: as PIA was trained (original, default) or as diffusers 0.42.1",
    )
    p.add_argument(
        "--out",
        default="video.gif",
        help="output .gif, .mp4, .webp, or .npy (the raw float32 frames (f, h, w, 3) in [0, 1]) (default "
        "video.gif); the sidecar goes next to it with a .json extension",
    )
    p.add_argument("--demo", action="store_true", help="offline smoke run on tiny random weights (output is noise)")
    return p


def image_size(width: int, height: int, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """The original PIA `preprocess_img` rule: shrink the long edge to at most `max_size` (never enlarge,
    int() truncation of the float product), then round each side down to a multiple of 8.

    Returns (width, height) after each stage: ((w1, h1), (w2, h2)).
    """
    scale = max_size / max(width, height) if max(width, height) > max_size else 1.0
    w1, h1 = int(width * scale), int(height * scale)
    return (w1, h1), (w1 // 8 * 8, h1 // 8 * 8)


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no weights; raises CLIError."""
    if not args.demo and ((args.image is None and not args.keyframe) or args.prompt is None):
        raise CLIError("--image (or --keyframe) and --prompt are required (or use --demo)")
    for name in ("frames", "steps", "num_videos", "fps"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.guidance < 0:
        raise CLIError(f"--guidance must be >= 0, got {args.guidance}")
    if not 0 <= args.motion_scale <= 8:
        raise CLIError(f"--motion-scale must be in 0..8, got {args.motion_scale}")
    if not 0 < args.strength <= 1:
        raise CLIError(f"--strength must be in (0, 1], got {args.strength}")
    if int(args.steps * args.strength) < 1:  # diffusers' get_timesteps keeps int(steps * strength) steps
        raise CLIError(f"--strength {args.strength} with --steps {args.steps} leaves no denoising step")
    if (args.height is None) != (args.width is None):
        raise CLIError("--height and --width go together: give both or neither")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise CLIError(f"--{name} must be a positive multiple of 8, got {value}")
    if Path(args.out).suffix.lower() not in WRITERS:
        raise CLIError(f"--out must end in {', '.join(WRITERS)}, got {args.out!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available on this machine")
    if args.demo and (args.base or args.adapter or args.vae or args.config):
        raise CLIError("--demo brings its own tiny weights: drop --base, --adapter, --config and --vae")
    for path in [args.vae, *(path for path, _ in args.lora), *(path for _, path, _ in args.keyframe)]:
        if path is not None and not Path(path).exists():
            raise CLIError(f"not found: {path}")
    check_video_args(args)
    check_writable(Path(args.out))


def check_video_args(args: argparse.Namespace) -> None:
    """The long-video, loop and keyframe options (the pipeline's own rules, checked before any weights load)."""
    if args.context_length is not None and args.context_length < 2:
        raise CLIError(f"--context-length must be >= 2, got {args.context_length}")
    length = args.context_length or 16
    if not 0 <= args.context_overlap < length:
        raise CLIError(f"--context-overlap must be in [0, {length}), got {args.context_overlap}")
    if not 1 <= args.noise_block <= length:
        raise CLIError(f"--noise-block must be in [1, {length}], got {args.noise_block}")
    if args.anchor_gap < 0:
        raise CLIError(f"--anchor-gap must be >= 0, got {args.anchor_gap}")
    closed = args.loop == "closed"
    if args.context_schedule == "looped" and not closed:
        raise CLIError("--context-schedule looped is for closed loops: add --loop")
    if closed and args.context_schedule not in (None, "looped"):
        raise CLIError(f"--loop needs the looped schedule, got --context-schedule {args.context_schedule}")
    if closed and args.frames < 2:
        raise CLIError("--loop needs --frames >= 2")
    if args.loop == "legacy" and args.motion_scale not in LOOP_PRESETS:
        raise CLIError(f"--loop legacy needs a loop preset (--motion-scale 3, 4 or 5), got {args.motion_scale}")
    if not -args.frames <= args.cond_frame < args.frames:
        raise CLIError(f"--cond-frame must be in [{-args.frames}, {args.frames}), got {args.cond_frame}")
    if args.keyframe and args.cond_frame:
        raise CLIError("--cond-frame and --keyframe do not go together: give the image's frame with --keyframe")
    frames = [frame % args.frames for frame, _, _ in args.keyframe if -args.frames <= frame < args.frames]
    for frame, _, strength in args.keyframe:
        if not -args.frames <= frame < args.frames:
            raise CLIError(f"--keyframe frame must be in [{-args.frames}, {args.frames}), got {frame}")
        if not 0 < strength <= 1:
            raise CLIError(f"--keyframe strength must be in (0, 1], got {strength}")
    if args.image is not None and args.keyframe and 0 not in frames:
        frames.append(0)
    if len(set(frames)) != len(frames):
        raise CLIError(f"two keyframes on the same frame: {sorted(frames)} (--image is keyframe 0)")


def keyframe_arg(text: str) -> tuple[int, str, float]:
    """FRAME:PATH[:STRENGTH] -> (frame, path, strength)."""
    frame, _, rest = text.partition(":")
    path, _, strength = rest.rpartition(":")
    try:
        value = float(strength) if path else 1.0
    except ValueError:
        path, value = "", 1.0
    path = path or rest
    try:
        return int(frame), path, value
    except ValueError as e:
        raise CLIError(f"--keyframe must be FRAME:PATH[:STRENGTH], got {text!r}") from e


def lora_arg(text: str) -> tuple[str, float]:
    """PATH or PATH:WEIGHT -> (path, weight); a colon that is part of the path stays in it."""
    path, _, weight = text.rpartition(":")
    try:
        return (path, float(weight)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def is_file(name: str) -> bool:
    """A local single file (not a folder or a hub id)."""
    return Path(name).expanduser().is_file()


def check_writable(out: Path) -> None:
    """The output's folder exists or can be made, and a file can be created in it (probed with a temporary
    file in the nearest existing folder, which is removed again: nothing is left behind)."""
    folder = out.expanduser().absolute().parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"cannot write {out}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CLIError(f"cannot write {out}: {existing} is not writable ({e.strerror or e})") from e


@functools.cache  # `pia-torch batch` asks once per job
def adapter_frame_limit(adapter: str, demo: bool) -> int:
    """The adapter's motion_max_seq_length, read from its config.json alone (no weights loaded)."""
    if demo:
        return tiny_unet().motion.max_seq_length
    if is_file(adapter):
        return PIA_MOTION.max_seq_length  # pia.ckpt: the PIA adapter's config
    try:
        folder = hub.resolve(adapter, ["config.json"])
        return MotionConfig.from_diffusers(read_config(folder, "MotionAdapter")).max_seq_length
    except (OSError, ValueError) as e:
        raise CLIError(one_line(e)) from e


def parse_args(argv: list[str], namespace: argparse.Namespace | None = None) -> argparse.Namespace:
    """One video's options: `argv` parsed, defaults filled and everything checked that needs no weights
    (check_args, --frames against the adapter's limit); raises CLIError. No weights are loaded.

    Options that `namespace` holds are kept where `argv` does not set them (argparse fills only the missing
    ones): `pia-torch batch` parses each job over the command's options this way. A negative prompt that was
    not given stays None: the original's is used (`negative_prompt`).
    """
    args = build_parser().parse_args(argv, namespace)
    for key, value in (DEMO_DEFAULTS if args.demo else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.lora = [lora_arg(text) for text in args.lora]
    args.keyframe = [keyframe_arg(text) if isinstance(text, str) else tuple(text) for text in args.keyframe]
    check_args(args)
    args.base = args.base or BASE
    args.adapter = args.adapter or ADAPTER
    limit = adapter_frame_limit(args.adapter, args.demo)
    if args.context_length is not None and args.context_length > limit:
        raise CLIError(
            f"--context-length must be <= {limit} (the adapter's motion_max_seq_length), got {args.context_length}"
        )
    return args


def resolve_paths(args: argparse.Namespace, folder: Path) -> None:
    """Resolve the relative local input paths of a video's options (the image, keyframes) against `folder`."""

    def resolve(path: str) -> str:
        return path if path.startswith(("http://", "https://")) else str(folder / Path(path).expanduser())

    if args.image is not None:
        args.image = resolve(args.image)
    args.keyframe = [(frame, resolve(path), strength) for frame, path, strength in args.keyframe]


def loop_warning(args: argparse.Namespace) -> str | None:
    """A loop preset with a frame count it does not close a loop at."""
    if args.motion_scale in LOOP_PRESETS and args.frames != LEGACY_LOOP_FRAMES and args.loop != "closed":
        return (
            f"--motion-scale {args.motion_scale} is a loop preset made for {LEGACY_LOOP_FRAMES} frames; with "
            f"{args.frames} frames the video does not close a loop (--loop closes one at any length)"
        )
    return None


def negative_prompt(args: argparse.Namespace) -> str:
    """The negative prompt given, else the original PIA's."""
    return NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt


def params(args: argparse.Namespace) -> dict[str, Any]:
    """Every option of the video as the sidecar records it (the negative prompt resolved)."""
    return {**vars(args), "negative_prompt": negative_prompt(args)}


def pipeline_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The video's options as PIAPipeline.__call__ keyword arguments (all but the image, prompts and seed)."""
    return dict(
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        motion_scale=args.motion_scale,
        strength=args.strength,
        cond_frame=args.cond_frame,
        keyframes=keyframes(args),
        loop=args.loop,
        context_length=args.context_length,
        context_overlap=args.context_overlap,
        context_schedule=args.context_schedule,
        context_fuse=args.context_fuse,
        anchor=args.anchor,
        anchor_gap=args.anchor_gap,
        noise=args.noise,
        noise_block=args.noise_block,
    )


def keyframes(args: argparse.Namespace) -> list[Keyframe] | None:
    """--keyframe images (loaded), with --image (or the demo's) as keyframe 0 unless one is given there."""
    if not args.keyframe:
        return None
    try:
        keys = [Keyframe(frame, load_image(path), strength) for frame, path, strength in args.keyframe]
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from e
    has_image = args.image is not None or args.demo
    if has_image and all(key.frame % args.frames for key in keys):
        keys.insert(0, Keyframe(0))  # the image passed to the pipeline
    return keys


def prepare_image(args: argparse.Namespace) -> Image.Image:
    """Load the image and set args.height/width; the original rule resizes it (bicubic, twice). With --demo
    the long edge is at most DEMO_MAX_SIZE, so any image runs in seconds."""
    source = args.image if args.image is not None or args.demo else args.keyframe[0][1]  # keyframes alone
    if source is None:
        image = demo.demo_image()
    else:
        try:
            image = load_image(source)
        except (OSError, ValueError) as e:
            raise CLIError(str(e)) from e
    if args.height is None:
        (w1, h1), (w2, h2) = image_size(*image.size, DEMO_MAX_SIZE if args.demo else MAX_SIZE)
        if w2 == 0 or h2 == 0:
            raise CLIError(f"image {image.size[0]}x{image.size[1]} is too small: each side must be >= 8 pixels")
        image = image.resize((w1, h1), Image.BICUBIC).resize((w2, h2), Image.BICUBIC)
        args.width, args.height = w2, h2
    return image


def build_scheduler(name: str) -> SchedulerBase:
    """SAMPLERS[name] built from the original PIA DDIM config, independent of the base folder's scheduler."""
    return SAMPLERS[name].from_config(SCHEDULER_CONFIG)


def load_pipeline(args: argparse.Namespace) -> PIAPipeline:
    """The pipeline on args.device in args.dtype, with the CLI's scheduler and FreeInit set."""
    if args.dtype == "auto":  # the demo's tiny model is overhead-bound: half precision would gain nothing
        dtype = torch.float32 if args.demo else auto_dtype(args.device)
    else:
        dtype = DTYPES[args.dtype]
    try:
        if args.demo:
            pipe = demo.tiny_pipeline(0, convention=args.convention, torch_dtype=dtype)
        else:
            adapter = (MotionAdapter.from_single_file if is_file(args.adapter) else MotionAdapter.from_pretrained)(
                args.adapter, torch_dtype=dtype
            )
            options = dict(
                motion_adapter=adapter,
                torch_dtype=dtype,
                convention=args.convention,
                vae=args.vae,
                conv_in=args.conv_in,
            )
            if is_file(args.base):
                pipe = PIAPipeline.from_single_file(args.base, config=args.config, **options)
            else:
                pipe = PIAPipeline.from_pretrained(args.base, **options)
        for i, (path, _) in enumerate(args.lora):
            pipe.load_lora_weights(path, adapter_name=f"lora{i}")
        if args.lora:  # fused: exact, and no per-step cost
            pipe.set_adapters([f"lora{i}" for i in range(len(args.lora))], [w for _, w in args.lora])
            pipe.fuse_lora()
    except (OSError, ValueError) as e:  # not found (offline / unknown id), corrupt file, CheckpointError
        raise CLIError(one_line(e)) from e
    configure(pipe, args.scheduler, args.free_init)
    pipe.set_progress_bar_config(disable=False)
    pipe.to(args.device)
    return pipe.compile() if args.compile else pipe


def configure(pipe: PIAPipeline, scheduler: str, free_init: str | None) -> None:
    """The video's sampler settings on the pipeline: the scheduler (a SAMPLERS name), FreeInit's filter or None."""
    pipe.scheduler = build_scheduler(scheduler)
    if free_init is None:
        pipe.disable_free_init()
    else:
        pipe.enable_free_init(num_iters=FREE_INIT_PASSES, method=free_init)


def encode_prompts(pipe: PIAPipeline, args: argparse.Namespace) -> tuple:
    """(prompt_embeds, negative_prompt_embeds), as the pipeline would compute them from the texts. Only text
    the user typed may warn about CLIP's 77-token cut: the built-in negative prompt is encoded quietly."""
    try:
        positive, _ = pipe.encode_prompt(args.prompt, do_classifier_free_guidance=False)
        if args.guidance <= 1:  # no guidance: no negative prompt
            return positive, None
        text_logger = logging.getLogger(tokenize.__module__)
        disabled, text_logger.disabled = text_logger.disabled, args.negative_prompt is None
        try:
            _, negative = pipe.encode_prompt(None, prompt_embeds=positive, negative_prompt=negative_prompt(args))
        finally:
            text_logger.disabled = disabled
    except ValueError as e:
        raise CLIError(one_line(e)) from e
    return positive, negative


def one_line(e: BaseException) -> str:
    """An exception message on one line (hub and checkpoint errors span several)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = "; ".join(lines) or type(e).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


def versions() -> dict[str, str]:
    try:
        version = getattr(pia_torch, "__version__", None) or metadata.version("pia_torch")
    except metadata.PackageNotFoundError:  # a checkout that is not installed
        version = "unknown"
    return {
        "pia_torch": version,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def model_source(name: str) -> str | dict[str, str]:
    """A local folder as an absolute path; a Hub id with the commit of the cached snapshot it loaded."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    try:
        snapshot = hub.resolve(name, ["*.json"], local_files_only=True)
    except (OSError, ValueError):
        return name
    return {"id": name, "revision": snapshot.name}  # snapshots/<commit hash>


def file_record(path: str) -> dict[str, str]:
    return {"path": str(Path(path).resolve()), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def sidecar(args: argparse.Namespace, argv: list[str], pipe: PIAPipeline, seed: int) -> dict[str, Any]:
    """Everything needed to reproduce the video; every local file with its sha256. `argv`: the command's
    arguments after `pia-torch`."""

    def source(name: str) -> str | dict[str, str]:
        return file_record(name) if is_file(name) else model_source(name)

    models = (
        {"demo": "pia_torch.demo.tiny_pipeline(0) (random weights)"}
        if args.demo
        else {"base": source(args.base), "adapter": source(args.adapter)}
    )
    if args.vae:
        models["vae"] = source(args.vae)
    if args.lora:
        models["lora"] = [{**file_record(path), "weight": weight} for path, weight in args.lora]
    image = file_record(args.image) if args.image is not None and is_file(args.image) else None
    keys = [{"frame": frame, **file_record(path), "strength": strength} for frame, path, strength in args.keyframe]
    return {
        "command": shlex.join(["pia-torch", *argv]),
        "params": params(args),
        "seed": seed,
        "image": image or args.image or "pia_torch.demo.demo_image()",
        "keyframes": keys,
        "models": models,
        "scheduler": dict(pipe.scheduler.config),
        "max_frames": pipe.unet.config.motion.max_seq_length,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "fps": args.fps,
        "versions": versions(),
    }


def output_paths(args: argparse.Namespace) -> list[tuple[int, Path]]:
    """(seed, path) per video: OUT itself for one video, OUT-stem-<seed>.ext for several."""
    out, seeds = Path(args.out), range(args.seed, args.seed + args.num_videos)
    if args.num_videos == 1:
        return [(args.seed, out)]
    return [(s, out.with_name(f"{out.stem}-{s}{out.suffix}")) for s in seeds]


def write(frames: Any, out: Path, info: dict[str, Any], fps: int) -> None:
    """The video and its sidecar, each atomically; on failure neither is left behind."""
    try:
        WRITERS[out.suffix.lower()](frames, out, fps=fps)
        with atomic_path(out.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")
    except (OSError, ValueError) as e:
        with contextlib.suppress(OSError):
            out.unlink(missing_ok=True)
        raise CLIError(f"cannot write {out}: {one_line(e)}") from e


def make_video(
    pipe: PIAPipeline,
    args: argparse.Namespace,
    image: Image.Image,
    prompts: tuple,
    seed: int,
    out: Path,
    argv: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Render one video (`prompts` from encode_prompts, the pipeline configured for `args`) and write it to
    `out` with its sidecar, plus `extra` sidecar entries."""
    torch.manual_seed(seed)  # the original seeds the global RNG too (its strength < 1 noise uses it)
    generator = torch.Generator("cpu").manual_seed(seed)
    text, negative = prompts
    try:
        output = pipe(
            image,
            prompt_embeds=text,
            negative_prompt_embeds=negative,
            generator=generator,
            output_type="np",
            **pipeline_kwargs(args),
        )
    except ValueError as e:  # the pipeline's own input checks
        raise CLIError(one_line(e)) from e
    export = args.loop_export or ("trim" if args.loop else None)
    frames = loop_frames(output.frames[0], output.loop_period, export) if export else output.frames[0]
    video = {
        "windows": dataclasses.asdict(output.context) if output.context else None,
        "loop_period": output.loop_period,
        "loop_export": export,
        "frames_written": len(frames),
    }
    write(frames, out, {**sidecar(args, argv, pipe, seed), "video": video, **(extra or {})}, args.fps)


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    warning = loop_warning(args)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    limit = adapter_frame_limit(args.adapter, args.demo)
    if args.frames > limit and args.context_length is None and args.loop != "closed":
        print(
            f"note: {args.frames} frames are more than the adapter's {limit}: the UNet runs on windows of 16 frames, "
            f"{args.context_overlap} shared (--context-length / --context-overlap to choose)",
            file=sys.stderr,
        )
    image = prepare_image(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    pipe = load_pipeline(args)
    if args.demo:
        print("demo: tiny random weights, offline; the video will be noise, not an animation", file=sys.stderr)
    prompts = encode_prompts(pipe, args)
    for seed, out in output_paths(args):
        make_video(pipe, args, image, prompts, seed, out, argv)
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:  # imported on use: `pia-torch` alone never imports their dependencies
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    try:
        return run(argv)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
