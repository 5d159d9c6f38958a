"""`pia-torch app`: a web page that animates an image, in Gradio (the optional extra `pia_torch[app]`).

    pip install "pia_torch[app]"
    pia-torch app --demo                         # tiny random weights, offline: http://127.0.0.1:7860
    pia-torch app --base myModel.safetensors --lora style.safetensors:0.8
    pia-torch app --host 0.0.0.0 --port 7860     # reachable from other machines (no login: anyone can use it)

The models load once, when the app starts, so the model options (--base, --adapter, --lora, ...) are
command-line options, as in `pia-torch`; the page sets everything about one video, as `pia-torch`'s other
options do, plus the long-video, loop and keyframe options of `PIAPipeline.__call__`. One video is made at a
time (Gradio's queue, concurrency 1); a bad input gets a clear message in the page and the app keeps serving.
Next to each video goes a JSON sidecar with every setting, the seed, the images' sha256 and the models.
Gradio's telemetry is off and no share link is ever made: the page talks to this machine only.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pia_torch import cli
from pia_torch.freeinit import METHODS as FREE_INIT_METHODS
from pia_torch.long_video import LEGACY_LOOP_FRAMES, LOOP_PRESETS, MOTION_PRESETS, Keyframe
from pia_torch.pipeline import PIAPipeline
from pia_torch.schedulers import SAMPLERS
from pia_torch.utils import export_to_gif, export_to_video, export_to_webp, load_image

try:
    import gradio as gr
except ModuleNotFoundError as e:  # an optional extra: say how to get it
    raise ModuleNotFoundError('`pia-torch app` needs Gradio: pip install "pia_torch[app]"') from e

MOTION_NAMES = (
    "small motion",
    "moderate motion",
    "large motion",
    "loop, small motion",
    "loop, moderate motion",
    "loop, large motion",
    "style transfer, small",
    "style transfer, moderate",
    "style transfer, large",
)
assert len(MOTION_NAMES) == len(MOTION_PRESETS)
WRITERS = {"gif": export_to_gif, "mp4": export_to_video, "webp": export_to_webp}
FREE_INIT_CHOICES = ("off", *FREE_INIT_METHODS)
LONG_VIDEO_FACTOR = 4  # the frames slider goes up to 4x the adapter's frame limit (sliding windows beyond it)
SEED_RANGE = 2**32  # the "Random" button's seeds; a Gradio number holds them exactly
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CSS = ".bad-input { color: var(--error-text-color, #b91c1c); font-weight: 600; }"  # the status line's error
DEMO_NOTE = "**Demo weights**: a tiny random model, offline. The video is noise: a smoke test of the page."


class InputError(ValueError):
    """A bad value in the page: its message goes in the page's status line, and the app keeps serving."""


@dataclass(frozen=True)
class Request:
    """One video as the page asks for it (checked: see `read_request`). Sizes of 0 mean "from the image",
    a context length of 0 "automatic"; `keyframe_image`, when given, shows at frame `keyframe_frame`."""

    image: str  # path of the uploaded file
    image_name: str  # its name on the user's machine (for messages and the sidecar)
    prompt: str
    negative_prompt: str
    motion_scale: int
    frames: int
    steps: int
    guidance: float
    strength: float
    seed: int
    sampler: str
    free_init: str
    width: int
    height: int
    fps: int
    video_format: str
    cond_frame: int
    loop: bool
    context_length: int
    context_overlap: int
    keyframe_image: str | None
    keyframe_name: str | None
    keyframe_frame: int
    keyframe_strength: float


@dataclass(frozen=True)
class Result:
    """The written files: the video in the asked format, its sidecar, and an MP4 of it for the page's player."""

    video: Path
    sidecar: Path
    preview: Path
    status: str


# --------------------------------------------------------------------------------------------- the page's values


def number(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{label}: enter a number")
    return float(value)


def whole(value: Any, label: str) -> int:
    x = number(value, label)
    if not x.is_integer():
        raise InputError(f"{label} must be a whole number, got {x:g}")
    return int(x)


def upload(value: Any, label: str) -> tuple[str | None, str | None]:
    """A Gradio file payload ({"path", "orig_name", ...}, or None when empty) -> (path, the user's file name)."""
    if value is None:
        return None, None
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise InputError(f"{label}: not an uploaded file")
    return value["path"], value.get("orig_name") or Path(value["path"]).name


def read_request(values: dict[str, Any], max_frames: int) -> Request:
    """The page's raw values (by control name) -> a checked Request; raises InputError with a message that
    names the control. Every check that needs no model is here, so a bad input costs no denoising."""
    image, image_name = upload(values["image"], "Image")
    if image is None:
        raise InputError("No image: upload the image to animate")
    keyframe_image, keyframe_name = upload(values["keyframe_image"], "Second keyframe")
    text = {name: values[name] for name in ("prompt", "negative_prompt")}
    for name, value in text.items():
        if not isinstance(value, str):
            raise InputError(f"{name.replace('_', ' ').capitalize()}: expected text")
    choices = {
        "sampler": tuple(SAMPLERS),
        "free_init": FREE_INIT_CHOICES,
        "video_format": tuple(WRITERS),
    }
    for name, allowed in choices.items():
        if values[name] not in allowed:
            raise InputError(f"{name.replace('_', ' ').capitalize()} must be one of {', '.join(allowed)}")
    request = Request(
        image=image,
        image_name=image_name,
        **text,
        motion_scale=whole(values["motion_scale"], "Motion"),
        frames=whole(values["frames"], "Frames"),
        steps=whole(values["steps"], "Steps"),
        guidance=number(values["guidance"], "Guidance"),
        strength=number(values["strength"], "Strength"),
        seed=whole(values["seed"], "Seed"),
        sampler=values["sampler"],
        free_init=values["free_init"],
        width=whole(values["width"], "Width"),
        height=whole(values["height"], "Height"),
        fps=whole(values["fps"], "Frames per second"),
        video_format=values["video_format"],
        cond_frame=whole(values["cond_frame"], "Image at frame"),
        loop=bool(values["loop"]),
        context_length=whole(values["context_length"], "Window length"),
        context_overlap=whole(values["context_overlap"], "Window overlap"),
        keyframe_image=keyframe_image,
        keyframe_name=keyframe_name,
        keyframe_frame=whole(values["keyframe_frame"], "Second keyframe at frame"),
        keyframe_strength=number(values["keyframe_strength"], "Second keyframe strength"),
    )
    check(request, max_frames)
    return request


def check(r: Request, max_frames: int) -> None:
    """The checks of `pia-torch`'s options, worded for the page."""
    if not 0 <= r.motion_scale < len(MOTION_PRESETS):
        raise InputError(f"Motion must be a preset 0..{len(MOTION_PRESETS) - 1}, got {r.motion_scale}")
    if not 1 <= r.frames <= max_frames:
        raise InputError(f"Frames must be in 1..{max_frames}, got {r.frames}")
    for label, value in (("Steps", r.steps), ("Frames per second", r.fps)):
        if value < 1:
            raise InputError(f"{label} must be at least 1, got {value}")
    if r.guidance < 0:
        raise InputError(f"Guidance must be >= 0, got {r.guidance:g}")
    if not 0 < r.strength <= 1:
        raise InputError(f"Strength must be in (0, 1], got {r.strength:g}")
    if int(r.steps * r.strength) < 1:  # the pipeline keeps int(steps * strength) steps
        raise InputError(f"Strength {r.strength:g} with {r.steps} steps leaves no denoising step: raise either")
    if r.seed < 0:
        raise InputError(f"Seed must be >= 0, got {r.seed}")
    if (r.width == 0) != (r.height == 0) or min(r.width, r.height) < 0 or r.width % 8 or r.height % 8:
        raise InputError(
            f"Width and height must both be multiples of 8 (or both 0: the image's size), got {r.width} x {r.height}"
        )
    if not -r.frames <= r.cond_frame < r.frames or not -r.frames <= r.keyframe_frame < r.frames:
        raise InputError(f"A keyframe's frame must be in {-r.frames}..{r.frames - 1} (negative: from the end)")
    if r.keyframe_image is not None and r.keyframe_frame % r.frames == r.cond_frame % r.frames:
        raise InputError("The image and the second keyframe need different frames")
    if not 0 < r.keyframe_strength <= 1:
        raise InputError(f"Second keyframe strength must be in (0, 1], got {r.keyframe_strength:g}")
    if r.context_length < 0 or r.context_overlap < 0:
        raise InputError("Window length and overlap must be >= 0")


def read_image(path: str, name: str) -> Image.Image:
    try:
        return load_image(path)
    except (OSError, ValueError) as e:
        raise InputError(f"Cannot read the image {name!r}: it is not an image file (PNG, JPEG, WebP, ...)") from e


# --------------------------------------------------------------------------------------------- the app


class App:
    """The loaded pipeline and what the page runs on it: `make` renders one Request into files."""

    def __init__(self, pipe: PIAPipeline, models: dict[str, Any], out_dir: Path, demo: bool) -> None:
        self.pipe, self.models, self.out_dir, self.demo = pipe, models, out_dir, demo
        self.frame_limit = pipe.unet.config.motion.max_seq_length  # beyond it, sliding windows
        self.max_frames = LONG_VIDEO_FACTOR * self.frame_limit

    def pipeline_kwargs(self, r: Request) -> tuple[Image.Image, dict[str, Any]]:
        """The image (resized by `pia-torch`'s rule when the size comes from it) and every other argument of
        PIAPipeline.__call__ that the page sets."""
        image = read_image(r.image, r.image_name)
        width, height = r.width, r.height
        if width == 0:  # as `pia-torch` without --width/--height: long edge <= 512 (64 with --demo), multiples of 8
            (w1, h1), (width, height) = cli.image_size(*image.size, cli.DEMO_MAX_SIZE if self.demo else cli.MAX_SIZE)
            if width == 0 or height == 0:
                raise InputError(f"The image is {image.size[0]} x {image.size[1]}: each side must be >= 8 pixels")
            image = image.resize((w1, h1), Image.BICUBIC).resize((width, height), Image.BICUBIC)
        kwargs: dict[str, Any] = dict(
            prompt=r.prompt,
            negative_prompt=r.negative_prompt,
            num_frames=r.frames,
            height=height,
            width=width,
            num_inference_steps=r.steps,
            guidance_scale=r.guidance,
            motion_scale=r.motion_scale,
            strength=r.strength,
            loop=True if r.loop else None,
            context_length=r.context_length or None,
            context_overlap=r.context_overlap,
        )
        if r.keyframe_image is None:
            kwargs["cond_frame"] = r.cond_frame
        else:
            second = read_image(r.keyframe_image, r.keyframe_name or "")
            kwargs["keyframes"] = [Keyframe(r.cond_frame), Keyframe(r.keyframe_frame, second, r.keyframe_strength)]
        return image, kwargs

    def make(self, r: Request, progress: Callable[[float, str], None]) -> Result:
        """Render `r` and write the video, its sidecar and the page's MP4; `progress(fraction, text)` is
        called before the denoising loop and once per step of it. Raises InputError."""
        start = time.perf_counter()
        image, kwargs = self.pipeline_kwargs(r)
        free_init = None if r.free_init == "off" else r.free_init
        cli.configure(self.pipe, r.sampler, free_init)  # as `pia-torch --scheduler ... --free-init ...`
        passes = cli.FREE_INIT_PASSES if free_init else 1
        total = passes * int(r.steps * r.strength)
        done = 0

        def on_step(pipe: PIAPipeline, i: int, t: Any, tensors: dict[str, Any]) -> None:
            nonlocal done
            done += 1
            progress(min(done / total, 1.0), f"denoising: step {done} of {total}")

        progress(0.0, "encoding the image and the prompt")
        torch.manual_seed(r.seed)  # as `pia-torch --seed`: the global RNG too, and a CPU generator
        generator = torch.Generator("cpu").manual_seed(r.seed)
        try:
            output = self.pipe(image, generator=generator, output_type="np", callback_on_step_end=on_step, **kwargs)
        except ValueError as e:  # the pipeline's own checks (e.g. a window longer than the adapter's frames)
            raise InputError(cli.one_line(e)) from e
        frames = output.frames[0]

        folder = Path(tempfile.mkdtemp(dir=self.out_dir))
        video = folder / f"pia-{r.seed}.{r.video_format}"
        WRITERS[r.video_format](frames, video, fps=r.fps)
        preview = video.with_suffix(".mp4")  # what the page's player shows (every browser plays H.264 MP4)
        if preview != video:
            export_to_video(frames, preview, fps=r.fps)
        seconds = time.perf_counter() - start
        sidecar = video.with_suffix(".json")
        sidecar.write_text(json.dumps(self.sidecar(r, kwargs, seconds), indent=2) + "\n")
        size = f"{kwargs['width']} x {kwargs['height']}"
        status = f"{len(frames)} frames, {size}, seed {r.seed}, {r.sampler}, {seconds:.1f} s"
        if r.motion_scale in LOOP_PRESETS and r.frames != LEGACY_LOOP_FRAMES and not r.loop:
            status += (
                f"\n\nMotion {r.motion_scale} is a loop preset made for {LEGACY_LOOP_FRAMES} frames: {r.frames} "
                "frames do not close a loop (tick Closed loop for a loop of any length)"
            )
        return Result(video, sidecar, preview, status)

    def sidecar(self, r: Request, kwargs: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Everything needed to reproduce the video: the page's settings, the pipeline's arguments, the seed,
        the images (sha256), the models, the scheduler and the library versions."""
        images = [{"name": r.image_name, "sha256": cli.file_record(r.image)["sha256"]}]
        if r.keyframe_image is not None:
            images.append({"name": r.keyframe_name, "sha256": cli.file_record(r.keyframe_image)["sha256"]})
        pipeline = {k: v for k, v in kwargs.items() if k != "keyframes"}
        if "keyframes" in kwargs:
            pipeline["keyframes"] = [
                {"frame": k.frame, "image": name, "strength": k.strength}
                for k, name in zip(kwargs["keyframes"], (r.image_name, r.keyframe_name))
            ]
        settings = dataclasses.asdict(r)
        for key in ("image", "keyframe_image"):  # upload paths on the server: the names and hashes say more
            settings.pop(key)
        return {
            "app": "pia-torch app",
            "settings": settings,
            "pipeline": pipeline,
            "seed": r.seed,
            "images": images,
            "models": self.models,
            "scheduler": dict(self.pipe.scheduler.config),
            "fps": r.fps,
            "seconds": round(seconds, 2),
            "versions": {**cli.versions(), "gradio": metadata.version("gradio")},
        }


# --------------------------------------------------------------------------------------------- the page


def random_seed() -> int:
    return random.randrange(SEED_RANGE)


def build_page(app: App, title: str) -> gr.Blocks:
    """The page: the controls on the left, the video, its downloads and a status line on the right."""
    controls: dict[str, gr.components.Component] = {}
    # delete_cache: Gradio's copies of the uploads and videos go after a day, and all of them when the app stops
    with gr.Blocks(title="PIA: animate an image", analytics_enabled=False, delete_cache=(3600, 86400)) as page:
        gr.Markdown(f"# PIA: animate an image\n{title}")
        with gr.Row():
            with gr.Column():
                controls["image"] = gr.Image(
                    label="Image", type="filepath", sources=["upload", "clipboard"], height=240
                )
                controls["prompt"] = gr.Textbox(
                    label="Prompt", lines=2, value=cli.DEMO_DEFAULTS["prompt"] if app.demo else ""
                )
                controls["negative_prompt"] = gr.Textbox(
                    label="Negative prompt", lines=2, max_lines=4, value=cli.NEGATIVE_PROMPT, info="the original PIA's"
                )
                controls["motion_scale"] = gr.Dropdown(
                    [(f"{i}: {name}", i) for i, name in enumerate(MOTION_NAMES)], value=0, label="Motion"
                )
                with gr.Row():
                    controls["frames"] = gr.Slider(
                        1, app.max_frames, value=16, step=1, label="Frames", info=f"above {app.frame_limit}: windows"
                    )
                    controls["steps"] = gr.Slider(1, 100, value=25, step=1, label="Steps")
                with gr.Row():
                    controls["guidance"] = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", info="<= 1: off")
                    controls["strength"] = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Strength")
                with gr.Row(equal_height=True):
                    controls["seed"] = gr.Number(value=0, precision=0, minimum=0, label="Seed", scale=3)
                    random_button = gr.Button("Random", scale=1, elem_id="random-seed")
                with gr.Row():
                    controls["sampler"] = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler")
                    controls["free_init"] = gr.Dropdown(list(FREE_INIT_CHOICES), value="off", label="FreeInit")
                with gr.Row():
                    controls["width"] = gr.Number(value=0, precision=0, label="Width", info="0: from the image")
                    controls["height"] = gr.Number(value=0, precision=0, label="Height", info="0: from the image")
                    controls["fps"] = gr.Number(value=8, precision=0, minimum=1, label="Frames per second")
                controls["video_format"] = gr.Radio(list(WRITERS), value="gif", label="Output format")
                with gr.Accordion("Long videos, loops and keyframes", open=False):
                    controls["loop"] = gr.Checkbox(label="Closed loop: the last frame leads back to the first")
                    with gr.Row():
                        controls["context_length"] = gr.Slider(
                            0, app.frame_limit, value=0, step=1, label="Window length", info="0: automatic"
                        )
                        controls["context_overlap"] = gr.Slider(
                            0, app.frame_limit - 1, value=4, step=1, label="Window overlap"
                        )
                    controls["cond_frame"] = gr.Number(
                        value=0, precision=0, label="Image at frame", info="negative: from the end"
                    )
                    controls["keyframe_image"] = gr.Image(
                        label="Second keyframe (optional)", type="filepath", sources=["upload", "clipboard"], height=240
                    )
                    with gr.Row():
                        controls["keyframe_frame"] = gr.Number(value=-1, precision=0, label="Second keyframe at frame")
                        controls["keyframe_strength"] = gr.Slider(
                            0.05, 1, value=1.0, step=0.05, label="Second keyframe strength"
                        )
            with gr.Column():
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
                video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False, elem_id="video")
                files = gr.File(label="Download: the video and its JSON sidecar", interactive=False, elem_id="files")
        for name, control in controls.items():
            control.elem_id = control.elem_id or name

        names = {control: name for name, control in controls.items()}

        def generate(
            values: dict[gr.components.Component, Any],
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio passes its tracker in place of this default)
        ) -> tuple:
            try:
                request = read_request({names[c]: v for c, v in values.items()}, app.max_frames)
                result = app.make(request, lambda fraction, text: progress(fraction, desc=text))
            except InputError as e:  # said in the status line, under the button (a toast would cover the button)
                return gr.skip(), gr.skip(), f'<span class="bad-input">Not made. {html.escape(str(e))}</span>'
            return str(result.preview), [str(result.video), str(result.sidecar)], result.status

        # preprocess=False: the handler reads the uploads itself, so that an unreadable file gets a clear
        # message (Gradio's own Image preprocessing would fail on it with an internal error)
        generate_button.click(
            generate,
            inputs=set(controls.values()),
            outputs=[video, files, status],
            preprocess=False,
            api_name="generate",
            concurrency_limit=1,  # one video at a time; the others wait in the queue
        )
        random_button.click(random_seed, outputs=controls["seed"], queue=False)
    return page


# --------------------------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="pia-torch app",
        description="A web page that animates an image with PIA. The models load once, at start: the model "
        "options are the same as pia-torch's; the page sets everything else.",
        epilog='Needs the app extra: pip install "pia_torch[app]". The page is served on 127.0.0.1 (this machine '
        "only) unless --host says otherwise; --host 0.0.0.0 serves it to every machine that can reach this one, "
        "with no login.",
    )
    p.add_argument("--base", help=f"base SD1.5 model: a diffusers folder, a hub id or one file (default {cli.BASE})")
    p.add_argument("--adapter", help=f"PIA motion adapter: a folder, a hub id or pia.ckpt (default {cli.ADAPTER})")
    p.add_argument("--config", help="with a single-file --base: the component configs (default SD1.5's)")
    p.add_argument("--vae", help="a separate VAE: one file or a diffusers folder")
    p.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:WEIGHT]", help="a LoRA file with its weight (repeat)"
    )
    p.add_argument("--conv-in", choices=("base", "adapter"), default="base", help="where conv_in comes from")
    p.add_argument(
        "--dtype", choices=("auto", *cli.DTYPES), default="auto", help="weights and compute dtype (as pia-torch's)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--convention", choices=("original", "diffusers"), default="original", help="UNet normalisation")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--demo", action="store_true", help="tiny random weights, offline (the videos are noise)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    return p


def model_args(args: argparse.Namespace) -> argparse.Namespace:
    """`pia-torch`'s options for loading the models (cli.load_pipeline), from the app's."""
    if args.demo and (args.base or args.adapter or args.vae or args.config):
        raise cli.CLIError("--demo brings its own tiny weights: drop --base, --adapter, --config and --vae")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise cli.CLIError("--device cuda: CUDA is not available on this machine")
    if args.threads is not None and args.threads < 1:
        raise cli.CLIError(f"--threads must be >= 1, got {args.threads}")
    out = cli.build_parser().parse_args([])  # every other option at its default
    for name in cli.MODEL_OPTIONS:
        setattr(out, name, getattr(args, name))
    out.base, out.adapter = args.base or cli.BASE, args.adapter or cli.ADAPTER
    out.lora = [cli.lora_arg(text) for text in args.lora]
    out.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return out


def models_record(args: argparse.Namespace) -> dict[str, Any]:
    """The models as the sidecar records them (local files with their sha256, hub ids with their revision)."""

    def source(name: str) -> str | dict[str, str]:
        return cli.file_record(name) if cli.is_file(name) else cli.model_source(name)

    if args.demo:
        models: dict[str, Any] = {"demo": "pia_torch.demo.tiny_pipeline(0) (random weights)"}
    else:
        models = {"base": source(args.base), "adapter": source(args.adapter)}
        for name in ("config", "vae"):
            if getattr(args, name):
                models[name] = source(getattr(args, name))
    if args.lora:
        models["lora"] = [{**cli.file_record(path), "weight": weight} for path, weight in args.lora]
    return {**models, "conv_in": args.conv_in, "convention": args.convention, "dtype": args.dtype}


def exposure_warning(host: str, port: int) -> str | None:
    """What serving on `host` means when it is not this machine's loopback address."""
    if host in LOOPBACK:
        return None
    return (
        f"--host {host} serves the page to every machine that can reach this one on port {port}, with no "
        "login: anyone who reaches it can upload images and run the models"
    )


def stop(signum: int, frame: Any) -> None:
    """SIGTERM (a service manager's stop) as Ctrl+C: Gradio closes, and the videos' folder is removed."""
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    """`pia-torch app ...`: load the models, then serve the page until interrupted."""
    try:
        args = build_parser().parse_args(argv)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        models = model_args(args)
        print("loading the models ...", file=sys.stderr)
        pipe = cli.load_pipeline(models)
        record = models_record(models)
    except cli.CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)  # the page has the progress bar
    warning = exposure_warning(args.host, args.port)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    title = DEMO_NOTE if args.demo else f"Models: `{models.base}` with `{models.adapter}`."
    with tempfile.TemporaryDirectory(prefix="pia-torch-app-") as out_dir:
        app = App(pipe, record, Path(out_dir), args.demo)
        page = build_page(app, title)
        try:
            _, url, _ = page.launch(
                server_name=args.host,
                server_port=args.port,
                share=False,
                allowed_paths=[out_dir],
                quiet=True,
                prevent_thread_lock=True,
                css=CSS,
            )
        except OSError:  # Gradio's message names its own settings, not this command's options
            print(
                f"error: cannot serve on {args.host}:{args.port}: the port is taken or the address is not this "
                "machine's (choose others with --port / --host)",
                file=sys.stderr,
            )
            return 2
        reach = "" if warning else "this machine only; --host 0.0.0.0 serves other machines too; "
        print(f"serving the page on {url} ({reach}Ctrl+C stops it)", file=sys.stderr)
        signal.signal(signal.SIGTERM, stop)
        page.block_thread()
    return 0
