"""Speed and memory of pia_torch against diffusers 0.42.1's PIAPipeline: the project's one source of numbers.

    python scripts/bench.py --quick                      # smoke: tiny model, one run (tests/test_bench.py)
    python scripts/bench.py --size small                 # small SD1.5-shaped model, CPU fp32
    python scripts/bench.py --size sd15 --memory         # SD1.5 + PIA shapes; peak RSS per library
    python scripts/bench.py --size sd15 --device cuda --dtype fp16 --compile --scaling --json gpu.json

`--weights-dir DIR` keeps the random weights (sd15: ~5 GB, minutes to make) for later runs; `--memory-only`
measures the peak RSS alone (a 16x512x512 CPU run takes minutes per call).

Both libraries load the same random weights (diffusers models at the chosen size, randomised like the tests'
so no layer is constant, saved with save_pretrained; pia_torch loads the folder with convention="diffusers")
and run the whole pipeline on the same image, prompt, seed and scheduler (the original PIA DDIM), in one
process. A first run of each, eager and under torch.utils.flop_counter, counts the FLOPs and checks that the
two compute the same frames (a benchmark of two different computations would be meaningless). Then warm-up
runs and `--repeats` timed runs alternate between the libraries (A B B A A B ...: a slow drift of the
machine cancels); `--compile` compiles the UNet and VAE decoder of both, in place, after that first run.
Each row reports the minimum and the median, and the speed-up diffusers / pia_torch
(> 1: pia_torch is faster).

Rows: text encode, VAE encode, UNet step 1, each later UNet step, all UNet steps, VAE decode, the rest of the
call (scheduler, pre/post-processing) and end to end, timed around the components' own calls (CUDA events
on a GPU). The machine's own matmul and 3x3-conv rates are measured in the same run, for every dtype the
machine runs natively, and the achieved FLOP/s of each component is given as a fraction of them. Peak memory:
`torch.cuda.max_memory_allocated` on a GPU; on a CPU (`--memory`) each library's peak RSS in a subprocess of
its own. `--scaling` adds a table over frames (8, 16, 32; 64 where a pipeline accepts it) and sizes (256,
512). diffusers is a test-only dependency: install the `test` extra first. Never assert on these timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LIBS = ("pia_torch", "diffusers")
PROMPT = "a cat in a field"
START = time.perf_counter()

# ------------------------------------------------------------------------------------------ model sizes
# diffusers configs. tiny and small are tests/conftest.py's (tiny: diffusers' old PIA fast test; small: the
# SD1.5 block layout at 1/10 of the width); sd15: Stable Diffusion 1.5 + openmmlab/PIA-condition-adapter.
SD15_LAYOUT = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SIZES: dict[str, dict[str, dict]] = {
    "tiny": dict(
        unet=dict(
            block_out_channels=(8, 8),
            layers_per_block=2,
            sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8,
            norm_num_groups=2,
        ),
        adapter=dict(
            block_out_channels=(8, 8),
            motion_layers_per_block=2,
            motion_norm_num_groups=2,
            motion_num_attention_heads=4,
            conv_in_channels=9,
        ),
        vae=dict(
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=2,
            layers_per_block=1,
            sample_size=16,
        ),
        text=dict(hidden_size=8, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5),
    ),
    "small": dict(
        unet=dict(
            block_out_channels=(32, 64, 128, 128),
            layers_per_block=2,
            sample_size=8,
            cross_attention_dim=32,
            norm_num_groups=32,
            attention_head_dim=8,
            **SD15_LAYOUT,
        ),
        adapter=dict(
            block_out_channels=(32, 64, 128, 128),
            motion_layers_per_block=2,
            motion_norm_num_groups=32,
            motion_num_attention_heads=8,
            conv_in_channels=9,
            use_motion_mid_block=False,
            motion_max_seq_length=32,
        ),
        vae=dict(
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32,
            layers_per_block=2,
            sample_size=64,
        ),
        text=dict(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=5),
    ),
    "sd15": dict(
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            **SD15_LAYOUT,
        ),
        adapter=dict(
            block_out_channels=(320, 640, 1280, 1280),
            motion_layers_per_block=2,
            motion_norm_num_groups=32,
            motion_num_attention_heads=8,
            conv_in_channels=9,
            use_motion_mid_block=False,
            motion_max_seq_length=32,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        ),
        text=dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, vocab_size=49408
        ),
    ),
}
# (frames, height = width, steps) when not given: the shapes of issue #14's measurements; on a GPU the
# PIA documentation's 16 frames at 512x512 with 25 steps.
DEFAULT_RUN = {
    ("tiny", "cpu"): (4, 32, 3),
    ("small", "cpu"): (16, 64, 4),
    ("sd15", "cpu"): (4, 128, 2),
    ("tiny", "cuda"): (8, 64, 4),
    ("small", "cuda"): (16, 256, 10),
    ("sd15", "cuda"): (16, 512, 25),
}
# The frames-agree check: max |frames_pia - frames_diffusers| (frames in [0, 1]). fp32 on a CPU is the
# parity contract (DESIGN.md §5); on a GPU fp32 convolutions run in TF32 by default, and half precisions
# round at 1e-3 (fp16) / 1e-2 (bf16) per op: there the bound is a sanity check, not a contract.
AGREE_ATOL = {("fp32", "cpu"): 1e-3, ("fp32", "cuda"): 1e-2, "fp16": 2e-2, "bf16": 1e-1}


# ------------------------------------------------------------------------------------------ weights


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """tests/conftest.py's randomize_: perturb every constant parameter (norms, zero inits) with seeded noise."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        flat = p.detach().flatten()
        if bool((flat == flat[0]).all()):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def build_weights(size: str, root: Path) -> Path:
    """Write a hub-shaped SD1.5 folder (root/base) and a PIA adapter (root/adapter) of random weights, made
    and saved by diffusers, plus the input image; reused when root already holds this size."""
    marker = root / "bench_weights.json"
    if marker.is_file() and json.loads(marker.read_text()).get("size") == size:
        log(f"reusing the {size} weights in {root}")
        return root
    log(f"building {size} weights in {root} ...")
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pia_torch.demo import ASSETS, PIA_SCHEDULER, demo_image

    quiet()
    shutil.rmtree(root, ignore_errors=True)
    base, spec = root / "base", SIZES[size]
    makers = {  # one model at a time: sd15 is ~5 GB in fp32
        "unet": lambda: diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"]),
        "adapter": lambda: diffusers.MotionAdapter(**spec["adapter"]),
        "vae": lambda: diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"]),
    }
    for seed, (name, make) in enumerate(makers.items()):
        torch.manual_seed(10 * seed)
        model = randomize_(make().eval(), 10 * seed + 1)
        model.save_pretrained(root / "adapter" if name == "adapter" else base / name)
        del model
        gc.collect()
    shutil.copytree(ASSETS / "tokenizer", base / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text = dict(vocab_size=len(tokenizer)) | spec["text"]
    torch.manual_seed(30)
    encoder = CLIPTextModel(
        CLIPTextConfig(
            **text,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    randomize_(encoder.eval(), 31).save_pretrained(base / "text_encoder")
    diffusers.DDIMScheduler(**PIA_SCHEDULER).save_pretrained(base / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (base / "model_index.json").write_text(json.dumps(index, indent=1))
    demo_image().save(root / "image.png")
    marker.write_text(json.dumps({"size": size}))
    return root


def quiet() -> None:
    """No progress bars or notices from diffusers and transformers while they save and load."""
    import diffusers
    import transformers

    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def load_pipeline(lib: str, root: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The library's PIAPipeline from the saved folder, on `device` in `dtype`, progress bar off."""
    if lib == "pia_torch":
        from pia_torch import MotionAdapter, PIAPipeline

        adapter = MotionAdapter.from_pretrained(root / "adapter", torch_dtype=dtype)
        pipe = PIAPipeline.from_pretrained(
            root / "base", motion_adapter=adapter, torch_dtype=dtype, convention="diffusers"
        )
    else:
        import diffusers

        quiet()
        adapter = diffusers.MotionAdapter.from_pretrained(root / "adapter", dtype=dtype)
        pipe = diffusers.PIAPipeline.from_pretrained(root / "base", motion_adapter=adapter, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def compile_pipeline(lib: str, pipe: Any) -> str:
    """torch.compile in place, returning what was done: pia_torch through its own `pipe.compile()` (the UNet
    and the VAE decoder) where it has one; diffusers' UNet and VAE decoder the same way, so that each row
    compares compiled with compiled."""
    if lib == "pia_torch" and callable(getattr(pipe, "compile", None)):
        pipe.compile()
        return "pipe.compile()"
    pipe.unet.compile(dynamic=False)
    pipe.vae.decoder.compile(dynamic=False)
    return "pipe.unet.compile(dynamic=False); pipe.vae.decoder.compile(dynamic=False)"


def call_args(root: Path, frames: int, size: tuple[int, int], steps: int, guidance: float) -> dict[str, Any]:
    """pipe(**args): the same image (already at the output size, so neither library resizes it), prompt,
    shape and steps for both; the generator is added per call."""
    height, width = size
    with Image.open(root / "image.png") as image:
        image = image.convert("RGB").resize((width, height))
    return dict(
        image=image,
        prompt=PROMPT,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
    )


# ------------------------------------------------------------------------------------------ probes


PARTS = ("text encode", "vae encode", "vae decode")


class Probe:
    """Times (and, under a FlopCounterMode, counts) every call of a pipeline's components.

    `instrument` routes the text encoder, VAE encode, UNet and VAE decode calls through `wrap`, and
    `step_end`, passed as the pipeline's callback_on_step_end, marks where each denoising step ends (a step
    may call the UNet more than once: pia_torch's sliding windows for long videos). `take()` returns the
    last run's component totals and the UNet seconds / FLOPs of each step. CUDA events on a GPU: nothing is
    synchronised inside the run, so the pipeline runs as it would without the probe.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.calls: list[tuple[str, Any, Any, int]] = []
        self.step_ends: list[int] = []  # len(self.calls) at the end of each denoising step
        self.counter: Any = None  # a FlopCounterMode while counting
        self.keep_decoded = False
        # the latents the VAE decoder got in the last run, one entry per decode call (the agreement check):
        # pia_torch decodes in chunks of frames (4 at 512x512), diffusers all frames at once
        self.decoded: list[torch.Tensor] = []

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wrap(self, name: str, fn: Callable) -> Callable:
        def probed(*args: Any, **kwargs: Any) -> Any:
            flops = self.counter.get_total_flops() if self.counter is not None else 0
            start = self.now()
            out = fn(*args, **kwargs)
            end = self.now()
            if self.counter is not None:
                flops = self.counter.get_total_flops() - flops
            if name == "vae decode" and self.keep_decoded:
                self.decoded.append(args[0].detach().float().cpu())
            self.calls.append((name, start, end, flops))
            return out

        return probed

    def step_end(self, pipe: Any, i: int, t: Any, tensors: dict) -> dict:
        self.step_ends.append(len(self.calls))
        return {}

    def take(self) -> dict[str, Any]:
        """{component: (seconds, flops)} summed over the run, and "unet steps": [(seconds, flops)] per step."""
        if self.cuda:
            torch.cuda.synchronize()
        calls = [(n, s.elapsed_time(e) / 1e3 if self.cuda else e - s, f) for n, s, e, f in self.calls]
        ends = self.step_ends or [i + 1 for i, c in enumerate(calls) if c[0] == "unet"]  # no callback: a call a step
        self.calls, self.step_ends = [], []

        def total(calls: list[tuple[str, float, int]], name: str) -> tuple[float, int]:
            return sum(s for n, s, _ in calls if n == name), sum(f for n, _, f in calls if n == name)

        out: dict[str, Any] = {name: total(calls, name) for name in PARTS}
        out["unet steps"] = [total(calls[a:b], "unet") for a, b in zip([0] + ends[:-1], ends)]
        out["unet calls"] = sum(n == "unet" for n, _, _ in calls)
        return out


def instrument(pipe: Any, probe: Probe) -> Callable[[], None]:
    """Route the pipeline's component calls through the probe; returns the function that undoes it.

    Wraps the outermost callable of each model: an OptimizedModule's `forward` (torch.compile(module)),
    a module compiled in place's `_compiled_call_impl` (module.compile()), else `forward`, so a compiled
    region never contains the probe.
    """
    saved: list[tuple[Any, str, Any]] = []  # (object, attribute, its own value before us or None)

    def wrap(obj: Any, attr: str, name: str) -> None:
        saved.append((obj, attr, vars(obj).get(attr)))
        object.__setattr__(obj, attr, probe.wrap(name, getattr(obj, attr)))  # past nn.Module's __setattr__

    for module, name in ((pipe.text_encoder, "text encode"), (pipe.unet, "unet")):
        compiled_in_place = getattr(module, "_compiled_call_impl", None) is not None
        wrap(module, "_compiled_call_impl" if compiled_in_place else "forward", name)
    wrap(pipe.vae, "encode", "vae encode")
    wrap(pipe.vae, "decode", "vae decode")

    def restore() -> None:
        for obj, attr, own in reversed(saved):
            if own is None:
                object.__delattr__(obj, attr)
            else:
                object.__setattr__(obj, attr, own)

    return restore


def flop_counter() -> Any:
    """A FlopCounterMode that also counts PyTorch's CPU flash attention (not in torch's table): the same
    2·(q·kᵀ + p·v) formula as its CUDA kernels."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(q, k, v)

    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = cpu_flash
    return FlopCounterMode(display=False, custom_mapping=mapping)


# ------------------------------------------------------------------------------------------ machine


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512fp16", "amx_tile", "amx_bf16", "amx_fp16")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in wanted if f in flags]


def machine_card(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    import pia_torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    card: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "pia_torch": pia_torch.__version__,
        "pia_torch_path": str(Path(pia_torch.__file__).parent),  # the code measured: this checkout's?
        "commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_conv": torch.backends.cudnn.allow_tf32,
        }
    return card


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: torch.device, min_reps: int = 3, budget: float = 0.5) -> float:
    """Seconds of one call: the fastest of at least `min_reps` samples after a warm-up (more, up to 20, while
    the samples took under `budget` seconds). A GPU sample is 10 calls queued back to back, so launch and sync
    latency don't count."""
    inner = 10 if device.type == "cuda" else 1
    fn()
    sync(device)
    times: list[float] = []
    spent = 0.0  # wall seconds of the samples (inner calls each)
    while len(times) < min_reps or (spent < budget and len(times) < 20):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        elapsed = time.perf_counter() - start
        spent += elapsed
        times.append(elapsed / inner)
    return min(times)


@torch.inference_mode()
def machine_rates(device: torch.device, quick: bool) -> dict[str, Any]:
    """GFLOP/s of a square matmul and of 3x3 convs at the SD1.5 UNet's widths, per dtype (NCHW, the layout both
    libraries run in). A half dtype the CPU only emulates (no AMX / AVX512-BF16 / AVX512-FP16) is skipped
    when a small matmul or conv in it is over 10x slower than in fp32."""
    cuda = device.type == "cuda"
    n = (2048 if quick else 8192) if cuda else (512 if quick else 2048)
    batch = (2 if quick else 32) if cuda else (1 if quick else 2)
    convs = [(320, 64), (640, 32), (1280, 16)] if not quick else [(320, 16)]
    rates: dict[str, Any] = {}
    for name, dtype in DTYPES.items():
        reason = None if cuda or dtype == torch.float32 else emulated(dtype, device)
        if reason:
            rates[name] = {"skipped": reason}
            continue
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        matmul = 2 * n**3 / best_time(lambda a=a, b=b: a @ b, device) / 1e9
        conv = {}
        for channels, hw in convs:
            x = torch.randn(batch, channels, hw, hw, device=device, dtype=dtype)
            w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype) / (3 * channels**0.5)
            seconds = best_time(lambda x=x, w=w: conv3x3(x, w), device)
            conv[f"{batch}x{channels}x{hw}x{hw}"] = 2 * batch * channels**2 * 9 * hw * hw / seconds / 1e9
        rates[name] = {"matmul": matmul, "matmul_shape": f"{n}x{n}", "conv": max(conv.values()), "conv_shapes": conv}
    return rates


def best_rates(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Per dtype and shape, the higher of two measurements of the machine rates (taken before and after the
    pipeline runs: a machine busy with something else during one of them lowers only that one)."""
    out = {}
    for name, a in first.items():
        b = second.get(name, {})
        if "skipped" in a or "skipped" in b:
            out[name] = a if "skipped" in a else b
            continue
        conv = {k: max(v, b["conv_shapes"][k]) for k, v in a["conv_shapes"].items()}
        out[name] = a | {"matmul": max(a["matmul"], b["matmul"]), "conv": max(conv.values()), "conv_shapes": conv}
    return out


def conv3x3(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(x, w, padding=1)


def emulated(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `dtype` is hopeless on this CPU, or None: a 512² matmul or a 64-channel 3x3 conv over 10x slower
    than in fp32."""
    probes = {
        "512x512 matmul": (torch.matmul, (512, 512), (512, 512)),
        "64-channel 3x3 conv": (conv3x3, (1, 64, 32, 32), (64, 64, 3, 3)),
    }
    for label, (op, x_shape, y_shape) in probes.items():
        times = {}
        for d in (torch.float32, dtype):
            x, y = torch.randn(x_shape, dtype=d), torch.randn(y_shape, dtype=d)
            times[d] = best_time(lambda op=op, x=x, y=y: op(x, y), device, min_reps=2, budget=0.05)
        slowdown = times[dtype] / times[torch.float32]
        if slowdown > 10:
            flags = ", ".join(cpu_flags()) or "none"
            return f"emulated on this CPU: a {label} is {slowdown:.0f}x slower than fp32 (flags: {flags})"
    return None


# ------------------------------------------------------------------------------------------ measuring


def one_run(pipe: Any, args: dict[str, Any], probe: Probe, device: torch.device) -> tuple[dict[str, Any], Any]:
    """One pipeline call: (the rows' seconds, with the per-step list and the CUDA peak, the frames)."""
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    frames = pipe(generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=probe.step_end, **args).frames
    sync(device)
    total = time.perf_counter() - start
    calls = probe.take()
    steps = [s for s, _ in calls["unet steps"]]
    parts = {name: calls[name][0] for name in PARTS}
    run: dict[str, Any] = {
        **parts,
        "unet step 1": steps[0],
        "unet steps 2..n (each)": statistics.fmean(steps[1:]) if len(steps) > 1 else None,
        "unet, all steps": sum(steps),
        "other (scheduler, pre/post)": total - sum(parts.values()) - sum(steps),
        "end to end": total,
        "unet steps": steps,
        "unet calls": calls["unet calls"],
    }
    if device.type == "cuda":
        # the peak over what was allocated before the call (this library's weights, and the other library's:
        # both are loaded in this process), and the process's absolute peak (both libraries' weights in it)
        run["cuda_peak_over_resident"] = torch.cuda.max_memory_allocated(device) - resident
        run["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return run, frames


ROWS = (
    "text encode",
    "vae encode",
    "unet step 1",
    "unet steps 2..n (each)",
    "unet, all steps",
    "vae decode",
    "other (scheduler, pre/post)",
    "end to end",
)


def count_and_check(
    pipes: dict[str, Any], args: dict[str, Any], probes: dict[str, Probe], tolerance: float
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """One eager run of each library under FlopCounterMode: the FLOPs of each component, and whether the two
    compute the same thing (frames, and the latents the VAE decodes)."""
    flops, frames, latents = {}, {}, {}
    for lib, pipe in pipes.items():
        probe = probes[lib]
        probe.keep_decoded = True
        with flop_counter() as counter:
            probe.counter = counter
            generator = torch.Generator("cpu").manual_seed(0)
            frames[lib] = np.asarray(pipe(generator=generator, callback_on_step_end=probe.step_end, **args).frames)
        probe.counter, probe.keep_decoded = None, False
        calls = probe.take()
        unet = [f for _, f in calls["unet steps"]]
        flops[lib] = {name: calls[name][1] for name in PARTS}
        flops[lib] |= {"unet step": statistics.fmean(unet), "unet, all steps": sum(unet)}
        flops[lib]["end to end"] = counter.get_total_flops()
        latents[lib], probe.decoded = torch.cat(probe.decoded), []
    a, b = (frames[lib].astype(np.float64) for lib in LIBS)
    la, lb = (latents[lib].double() for lib in LIBS)
    frames_diff = float(np.abs(a - b).max())
    latents_rel = float((la - lb).abs().max() / lb.abs().max().clamp_min(1e-30))
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    agreement = {
        "frames_max_abs_diff": frames_diff,
        "latents_max_rel_diff": latents_rel,
        "tolerance": tolerance,
        "finite": finite,
        "frames_shape": list(a.shape),
        "passed": finite and frames_diff <= tolerance,
    }
    return flops, agreement


def measure(
    pipes: dict[str, Any],
    args: dict[str, Any],
    probes: dict[str, Probe],
    device: torch.device,
    warmup: int,
    repeats: int,
    label: str = "",
    result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Warm-up runs of each, then `repeats` runs of each alternating A B B A ...; every run's rows, filled into
    `result` as they end (a run stopped half-way keeps those)."""
    result = {} if result is None else result
    first = result.setdefault("first_call", {})
    runs = result.setdefault("runs", {})
    for lib in pipes:
        runs.setdefault(lib, [])
    for i in range(warmup):
        for lib, pipe in pipes.items():
            run, _ = one_run(pipe, args, probes[lib], device)
            first.setdefault(lib, run["end to end"])
            log(f"{label}warm-up {i + 1}/{warmup} {lib}: {run['end to end']:.3f} s")
    order = list(pipes)
    for r in range(repeats):
        for lib in order if r % 2 == 0 else order[::-1]:
            run, _ = one_run(pipes[lib], args, probes[lib], device)
            runs[lib].append(run)
            log(f"{label}run {r + 1}/{repeats} {lib}: {run['end to end']:.3f} s")
    return result


def stats(values: list[float | None]) -> dict[str, Any] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values)}


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows: {name, pia_torch: {min, median}, diffusers: {min, median}, speedup_min, speedup_median}."""
    rows = []
    for name in ROWS:
        row: dict[str, Any] = {"name": name}
        for lib in LIBS:
            row[lib] = stats([run[name] for run in result["runs"][lib]])
        if row["pia_torch"] and row["diffusers"]:
            for k in ("min", "median"):
                row[f"speedup_{k}"] = row["diffusers"][k] / row["pia_torch"][k]
        rows.append(row)
    return rows


def efficiency(
    flops: dict[str, dict[str, Any]], rows: list[dict[str, Any]], rates: dict[str, Any], dtype: str
) -> dict[str, Any]:
    """Achieved GFLOP/s of each counted component (its FLOPs over its minimum time) and the fraction of the
    machine's measured conv and matmul rates in the run's dtype."""
    by_name = {row["name"]: row for row in rows}
    rate = rates.get(dtype, {})
    out: dict[str, Any] = {}
    for lib in LIBS:
        out[lib] = {}
        for name in ("text encode", "vae encode", "unet, all steps", "vae decode", "end to end"):
            seconds = (by_name[name][lib] or {}).get("min")
            if not seconds:
                continue
            gflops = flops[lib][name] / seconds / 1e9
            out[lib][name] = {
                "gflop": flops[lib][name] / 1e9,
                "gflop_per_s": gflops,
                "frac_conv": gflops / rate["conv"] if "conv" in rate else None,
                "frac_matmul": gflops / rate["matmul"] if "matmul" in rate else None,
            }
    return out


# ------------------------------------------------------------------------------------------ memory


def rss_now() -> int | None:
    """Resident set size in bytes (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def child_main(opts: argparse.Namespace) -> None:
    """--_child LIB: load one library's pipeline, run it once, print its RSS as one JSON line."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device, dtype, root = torch.device(opts.device), DTYPES[opts.dtype], Path(opts.weights_dir)
    if opts.child == "pia_torch":
        import pia_torch  # noqa: F401
    else:
        import diffusers  # noqa: F401
    after_import = rss_now()
    pipe = load_pipeline(opts.child, root, dtype, device)
    if opts.compile:
        compile_pipeline(opts.child, pipe)
    after_load = rss_now()
    args = call_args(root, opts.frames, (opts.height, opts.width), opts.steps, opts.guidance)
    pipe(generator=torch.Generator("cpu").manual_seed(0), **args)
    report = {"rss_after_import": after_import, "rss_after_load": after_load, "peak_rss": peak_rss()}
    print("BENCH_CHILD " + json.dumps(report), flush=True)


def measure_rss(opts: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Each library's peak RSS over loading and one call, in a fresh subprocess of its own."""
    memory: dict[str, Any] = {}
    for lib in LIBS:
        cmd = [sys.executable, __file__, "--_child", lib, "--weights-dir", str(root)]
        cmd += ["--size", opts.size, "--frames", str(opts.frames), "--height", str(opts.height)]
        cmd += ["--width", str(opts.width), "--steps", str(opts.steps), "--guidance", str(opts.guidance)]
        cmd += ["--dtype", opts.dtype, "--device", opts.device]
        cmd += ["--threads", str(opts.threads)] if opts.threads else []
        cmd += ["--compile"] if opts.compile else []
        log(f"peak RSS: {lib} in its own process ...")
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((s for s in out.stdout.splitlines() if s.startswith("BENCH_CHILD ")), None)
        if out.returncode or line is None:
            raise RuntimeError(f"the {lib} memory subprocess failed:\n{out.stderr[-3000:]}")
        memory[lib] = json.loads(line.removeprefix("BENCH_CHILD "))
    memory["ratio_peak_rss"] = memory["pia_torch"]["peak_rss"] / memory["diffusers"]["peak_rss"]
    return memory


def weight_bytes(pipe: Any) -> int:
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


# ------------------------------------------------------------------------------------------ scaling


def max_frames(lib: str, pipe: Any) -> int:
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    if lib == "diffusers":
        return unet.config.motion_max_seq_length
    return unet.config.motion.max_seq_length if unet.config.motion else 1 << 30


def scaling(
    pipes: dict[str, Any],
    probes: dict[str, Probe],
    root: Path,
    opts: argparse.Namespace,
    device: torch.device,
    table: list[dict[str, Any]],
    loaded: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """UNet step, VAE decode and end to end over frames x sizes, `--scaling-steps` steps each, appended to
    `table` as each shape ends. 64 frames only where a library accepts them: pia_torch's pipeline is asked (its
    error says so before any work), diffusers' UNet is checked against its motion_max_seq_length. On a GPU,
    `loaded` (each library's allocated bytes after loading) gives the peak of a library alone on it."""
    for size in opts.scaling_sizes:
        for frames in opts.scaling_frames:
            args = call_args(root, frames, (size, size), opts.scaling_steps, opts.guidance)
            usable = {lib: p for lib, p in pipes.items() if lib == "pia_torch" or frames <= max_frames(lib, p)}
            entry: dict[str, Any] = {"frames": frames, "size": size, "steps": opts.scaling_steps}
            try:
                result = measure(usable, args, probes, device, 1, opts.scaling_repeats, f"[{frames}x{size}] ")
            except (ValueError, RuntimeError) as error:  # frames beyond a pipeline's limit, out of memory
                for probe in probes.values():
                    probe.take()  # drop the calls of the failed run
                log(f"[{frames}x{size}] skipped: {str(error).splitlines()[0]}")
                entry["error"] = str(error).splitlines()[0]
                result = None
                if "out of memory" in str(error) and device.type == "cuda":
                    torch.cuda.empty_cache()
            for lib in LIBS:
                runs = result["runs"].get(lib) if result else None
                if not runs:
                    entry[lib] = None
                    continue
                entry[lib] = {
                    name: stats([run[name] for run in runs]) for name in ("unet, all steps", "vae decode", "end to end")
                }
                entry[lib]["unet step"] = stats([min(run["unet steps"]) for run in runs])
                entry[lib]["unet calls per step"] = runs[0]["unet calls"] / len(runs[0]["unet steps"])
                if device.type == "cuda":
                    entry[lib]["cuda_peak_over_resident"] = max(run["cuda_peak_over_resident"] for run in runs)
                    if loaded:
                        entry[lib]["cuda_peak_alone"] = loaded[lib] + entry[lib]["cuda_peak_over_resident"]
            table.append(entry)
    return table


# ------------------------------------------------------------------------------------------ report


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: timings, FLOPs, machine rates, memory, scaling (those it has)."""
    sections = [header(report)]
    if "rows" in report:
        sections += [timings_table(report), flops_table(report)]
    if "rates" in report:
        sections.append(rates_table(report["rates"]))
    if "memory" in report:
        sections.append(memory_table(report["memory"]))
    if "offload" in report:
        sections.append(offload_table(report["offload"]))
    if report.get("scaling"):
        sections.append(scaling_table(report["scaling"], report["config"]["device"]))
    return "\n\n".join(sections) + "\n"


def header(report: dict[str, Any]) -> str:
    card, cfg, agree = report["machine"], report["config"], report.get("agreement")
    device = card.get("gpu") or f"{card['cpu']}, {card['cores']} cores ({card['torch_threads']} torch threads)"
    flags = " ".join(card["cpu_flags"]) or "none"
    lines = [
        f"## pia_torch vs diffusers {card['diffusers']}: {cfg['size']} model, {cfg['frames']} frames at "
        f"{cfg['height']}x{cfg['width']}, {plural(cfg['steps'], 'step')}, guidance {cfg['guidance']}, "
        f"{cfg['dtype']} on {cfg['device']}{', compiled' if cfg['compile'] else ''}",
        "",
        f"Machine: {device}; CPU capability {card['cpu_capability']}, flags {flags}; torch {card['torch']}, "
        f"transformers {card['transformers']}, pia_torch {card['pia_torch']} ({card['commit'] or 'no git'}).",
    ]
    if agree:
        lines.append(
            f"Same computation: frames max |Δ| = {agree['frames_max_abs_diff']:.2e} (tolerance "
            f"{agree['tolerance']:g}), decoded latents max |Δ| / max |x| = {agree['latents_max_rel_diff']:.2e}: "
            f"{'PASSED' if agree['passed'] else 'FAILED'}"
            + (f" (eager, from {agree['from']})." if agree.get("from") else ".")
        )
    if "rows" in report:
        lines.append(
            f"{cfg['warmup']} warm-up + {cfg['repeats']} timed runs of each, alternating; "
            "speed-up = diffusers / pia_torch (> 1: pia_torch is faster)."
        )
    if report.get("error"):
        lines.append(f"STOPPED EARLY ({report['error']}): the tables hold what was measured before.")
        if "rows" not in report and report.get("first_call"):  # --compile: the first calls compile
            firsts = ", ".join(f"{lib} {fmt_s(s)}" for lib, s in report["first_call"].items())
            lines.append(f"First calls (warm-up 1{', compiling' if cfg['compile'] else ''}): {firsts}.")
    return "\n".join(lines)


def timings_table(report: dict[str, Any]) -> str:
    rows = []
    for row in report["rows"]:
        p, d = row["pia_torch"] or {}, row["diffusers"] or {}
        cells = [fmt_s(p.get("min")), fmt_s(p.get("median")), fmt_s(d.get("min")), fmt_s(d.get("median"))]
        rows.append([row["name"], *cells, fmt_x(row.get("speedup_min")), fmt_x(row.get("speedup_median"))])
    first = report["first_call"]
    rows.append(
        ["first call (warm-up 1)", fmt_s(first.get("pia_torch")), "", fmt_s(first.get("diffusers")), "", "", ""]
    )
    headers = ["", "pia_torch min", "median", "diffusers min", "median", "speed-up (min)", "(median)"]
    return table(headers, rows)


def flops_table(report: dict[str, Any]) -> str:
    achieved = report["flops_achieved"]
    rows = []
    for name, p in achieved["pia_torch"].items():
        d = achieved["diffusers"].get(name, {})
        rows.append(
            [name, f"{p['gflop']:.3g}", f"{d.get('gflop', 0):.3g}"]
            + [f"{p['gflop_per_s']:.1f}", fmt_pct(p["frac_conv"]), fmt_pct(p["frac_matmul"])]
            + [f"{d.get('gflop_per_s', 0):.1f}", fmt_pct(d.get("frac_conv")), fmt_pct(d.get("frac_matmul"))]
        )
    headers = ["FLOPs (counted once)", "pia_torch GFLOP", "diffusers GFLOP", "pia_torch GFLOP/s", "of conv"]
    headers += ["of matmul", "diffusers GFLOP/s", "of conv", "of matmul"]
    note = f"Achieved = FLOPs / min time; 'of conv' / 'of matmul': the machine's {report['config']['dtype']} rates."
    return table(headers, rows) + "\n\n" + note


def rates_table(rates: dict[str, Any]) -> str:
    rows = []
    for name, rate in rates.items():
        if "skipped" in rate:
            rows.append([name, "-", "-", rate["skipped"]])
        else:
            shapes = ", ".join(f"{k}: {v:.0f}" for k, v in rate["conv_shapes"].items())
            rows.append([name, f"{rate['matmul']:.1f} ({rate['matmul_shape']})", f"{rate['conv']:.1f}", shapes])
    headers = ["machine (best of before and after)", "matmul GFLOP/s", "3x3 conv GFLOP/s (best)"]
    return table(headers + ["conv shapes (NxCxHxW: GFLOP/s)"], rows)


def memory_table(mem: dict[str, Any]) -> str:
    if "ratio_peak_rss" in mem:
        rows = [[lib] + [gib(mem[lib][k]) for k in ("rss_after_import", "rss_after_load", "peak_rss")] for lib in LIBS]
        text = table(["RSS, each library in its own process", "after import", "after load", "peak"], rows)
        return text + f"\n\npia_torch / diffusers peak RSS: {mem['ratio_peak_rss']:.2f}"
    keys = ("weights", "loaded", "cuda_peak_over_resident", "cuda_peak_alone", "cuda_peak_process")
    rows = [[lib] + [gib(mem[lib].get(k)) for k in keys] for lib in LIBS]
    headers = ["CUDA memory (max_memory_allocated)", "parameters", "allocated by loading", "peak over resident"]
    headers += ["peak alone (loading + over)", "process peak (both loaded)"]
    p, d = (mem[lib].get("cuda_peak_alone") for lib in LIBS)
    ratio = f"\n\npia_torch / diffusers peak alone: {p / d:.2f}" if p and d else ""
    return table(headers, rows) + ratio


def offload_table(off: dict[str, Any]) -> str:
    rows = []
    for lib in LIBS:
        e = off.get(lib) or {}
        gpu, cpu = e.get("gpu") or {}, e.get("cpu offload") or {}
        rows.append(
            [lib, gib(e.get("loaded")), gib(gpu.get("peak")), fmt_s(gpu.get("seconds"))]
            + [gib(e.get("loaded_offloaded")), gib(cpu.get("peak")), fmt_s(cpu.get("seconds"))]
        )
    headers = ["each library alone on the GPU", "allocated by loading", "peak", "end to end"]
    headers += ["with enable_model_cpu_offload(): allocated", "peak", "end to end"]
    note = (
        "Peak: torch.cuda.max_memory_allocated over one call, everything the library holds on the GPU counted "
        "(weights included); end to end: min of the timed calls, after a warm-up call."
    )
    text = table(headers, rows) + "\n\n" + note
    layouts = [(lib, name, t) for lib in LIBS for name, t in ((off.get(lib) or {}).get("layout") or {}).items()]
    if layouts:
        cells = [[lib, name, fmt_s(t["unet call"]), fmt_s(t["vae decode (4 frames)"])] for lib, name, t in layouts]
        text += "\n\n" + table(["memory format", "weights", "one UNet call", "VAE decode, 4 frames"], cells)
    chunks = [(lib, n, t) for lib in LIBS for n, t in ((off.get(lib) or {}).get("decode chunks") or {}).items()]
    if chunks:
        cells = [[lib, str(n), fmt_s(t["seconds"]), gib(t["peak"])] for lib, n, t in chunks]
        text += "\n\n" + table(["VAE decode of all frames", "frames per call", "time", "peak over resident"], cells)
    return text


def scaling_table(entries: list[dict[str, Any]], device: str) -> str:
    rows = []
    for e in entries:
        cells = [str(e["frames"]), str(e["size"])]
        for key in ("unet step", "vae decode", "end to end"):
            p, d = ((e.get(lib) or {}).get(key) or {} for lib in LIBS)
            ratio = d["min"] / p["min"] if p and d else None
            cells += [fmt_s(p.get("min")), fmt_s(d.get("min")), fmt_x(ratio)]
            calls = (e.get("pia_torch") or {}).get("unet calls per step", 1)
            if key == "unet step" and calls > 1:  # sliding windows
                cells[-3] += f" ({calls:g} calls)"
        if device == "cuda":
            cells += [gib((e.get(lib) or {}).get("cuda_peak_alone")) for lib in LIBS]
        rows.append(cells)
    headers = ["frames", "size", "UNet step pia", "diffusers", "x", "decode pia", "diffusers", "x"]
    headers += ["e2e pia", "diffusers", "x"]
    headers += ["peak alone pia", "peak alone diffusers"] if device == "cuda" else []
    title = f"Scaling ({plural(entries[0]['steps'], 'step')} per call, min of runs; '-': not run or not supported):"
    return title + "\n\n" + table(headers, rows)


# ------------------------------------------------------------------------------------------ main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default=None, help="model size (default small; tiny with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--frames", type=int, help="default: per size and device (see DEFAULT_RUN)")
    parser.add_argument("--resolution", type=int, help="pixel height = width")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="> 1: classifier-free guidance (batch of 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile UNet and VAE decoder")
    parser.add_argument("--repeats", type=int, help="timed runs of each library (default 5; 1 with --quick)")
    parser.add_argument("--warmup", type=int, help="warm-up runs of each (default 1, 2 with --compile)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="CPU: peak RSS of each library in its own process (CUDA: always measured, in this one)",
    )
    parser.add_argument("--memory-only", action="store_true", help="--memory, and no timings")
    parser.add_argument(
        "--offload",
        action="store_true",
        help="CUDA, and no timing table: each library alone on the GPU, its peak memory and time of a call, "
        "plain and with enable_model_cpu_offload() (use few --steps: the peak is the same at any count)",
    )
    parser.add_argument(
        "--layout", action="store_true", help="with --offload: UNet and VAE decode in contiguous vs channels_last"
    )
    parser.add_argument(
        "--decode-chunks",
        action="store_true",
        help="with --offload: VAE decode of the run's frames, 1, 2, 4, ... frames per call: time and peak",
    )
    parser.add_argument("--scaling", action="store_true", help="add the table over frames and sizes")
    parser.add_argument("--scaling-frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--scaling-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--scaling-steps", type=int, default=1)
    parser.add_argument("--scaling-repeats", type=int, default=2)
    parser.add_argument("--weights-dir", help="keep the random weights here and reuse them on later runs")
    parser.add_argument(
        "--check-from",
        metavar="JSON",
        help="take the FLOP counts and the frames-agree check from this earlier report of the same run (e.g. the "
        "eager one before a --compile run: that check runs eagerly anyway) instead of counting again",
    )
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--markdown", help="write the tables here")
    parser.add_argument("--quick", action="store_true", help="smoke: tiny model, 1 run, no scaling, small rates")
    parser.add_argument("--_child", dest="child", choices=LIBS, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.size = opts.size or ("tiny" if opts.quick else "small")
    frames, res, steps = DEFAULT_RUN[opts.size, opts.device]
    opts.frames = opts.frames or frames
    opts.height = opts.height or opts.resolution or res
    opts.width = opts.width or opts.resolution or res
    opts.steps = opts.steps or steps
    opts.repeats = opts.repeats or (1 if opts.quick else 5)
    opts.warmup = opts.warmup if opts.warmup is not None else (2 if opts.compile else 1)
    if opts.quick:
        opts.scaling = False
    opts.memory = opts.memory or opts.memory_only
    if opts.memory_only and opts.device != "cpu":
        parser.error("--memory-only is for CPUs (on a GPU the timing runs measure the peak memory)")
    if (opts.layout or opts.decode_chunks) and not opts.offload:
        parser.error("--layout and --decode-chunks are parts of --offload's run: add --offload")
    if opts.offload and opts.device != "cuda":
        parser.error("--offload needs --device cuda (CPU offload moves the models to an accelerator)")
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.child:
        child_main(opts)
        return 0
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    temporary = None if opts.weights_dir else tempfile.TemporaryDirectory(prefix="pia_bench_")
    root = Path(opts.weights_dir or temporary.name)
    report: dict[str, Any] = {"config": {k: v for k, v in vars(opts).items() if k != "child"}}
    flops: dict[str, Any] = {}
    pipes: dict[str, Any] = {}
    loaded: dict[str, int] = {}  # CUDA: the bytes loading each library allocated
    signal.signal(signal.SIGTERM, terminate)  # `timeout`: write what was measured (below), then stop
    try:
        build_weights(opts.size, root)
        report["machine"] = machine_card(device)
        if opts.memory and device.type == "cpu":  # first: the subprocesses run while this one holds no model
            report["memory"] = measure_rss(opts, root)
        if opts.memory_only:
            return finish(report, opts)
        if opts.offload:
            report["offload"] = {}
            measure_offload(opts, root, dtype, device, report["offload"])
            return finish(report, opts)
        log("machine rates ...")
        report["rates"] = machine_rates(device, opts.quick)
        if "skipped" in report["rates"][opts.dtype]:
            log(f"warning: {opts.dtype}: {report['rates'][opts.dtype]['skipped']}")

        for lib in LIBS:
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            pipes[lib] = load_pipeline(lib, root, dtype, device)
            if device.type == "cuda":  # weights, and whatever else the library keeps there (diffusers: its adapter)
                loaded[lib] = torch.cuda.memory_allocated(device) - before
        probes = {lib: Probe(device) for lib in LIBS}
        args = call_args(root, opts.frames, (opts.height, opts.width), opts.steps, opts.guidance)
        tolerance = AGREE_ATOL.get((opts.dtype, opts.device), AGREE_ATOL.get(opts.dtype))
        undo = {lib: instrument(pipe, probes[lib]) for lib, pipe in pipes.items()}
        earlier = earlier_check(opts) if opts.check_from else None
        if earlier:
            flops, report["agreement"] = earlier
        else:
            log("counting FLOPs and checking that both compute the same frames ...")
            flops, report["agreement"] = count_and_check(pipes, args, probes, tolerance)
        report["flops"] = flops
        log(f"frames max |diff| {report['agreement']['frames_max_abs_diff']:.2e} (tolerance {tolerance:g})")
        if opts.compile:
            for lib, pipe in pipes.items():
                undo[lib]()
                report.setdefault("compiled_with", {})[lib] = compile_pipeline(lib, pipe)
                instrument(pipe, probes[lib])

        report["first_call"], report["runs"] = {}, {}  # filled in as the runs end
        measure(pipes, args, probes, device, opts.warmup, opts.repeats, result=report)
        log("machine rates, again ...")
        report["rates"] = best_rates(report["rates"], machine_rates(device, opts.quick))
        tabulate(report, flops, pipes, loaded, opts)
        if opts.scaling:
            report["scaling"] = []
            scaling(pipes, probes, root, opts, device, report["scaling"], loaded)
    except BaseException as error:  # `timeout`'s SIGTERM, out of memory, Ctrl-C: keep what was measured
        if "machine" not in report:
            raise
        first = str(error).splitlines()[0] if str(error) else ""
        report["error"] = f"{type(error).__name__}: {first}"[:500]
        log(f"stopped early ({report['error']}): writing what was measured")
        if "rows" not in report:
            tabulate(report, flops, pipes, loaded, opts)
        finish(report, opts)
        raise
    finally:
        if temporary is not None:
            temporary.cleanup()

    return finish(report, opts)


CHECK_KEYS = ("size", "device", "dtype", "frames", "height", "width", "steps", "guidance")


def earlier_check(opts: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """--check-from: the FLOPs and the agreement of an earlier report of the same run (CHECK_KEYS); None (count
    them again) where the file is missing or has neither, e.g. a run stopped before its first timed run."""
    path = Path(opts.check_from)
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if "flops" not in earlier or "agreement" not in earlier:
        log(f"--check-from {path}: no FLOP counts and agreement check there, counting them again")
        return None
    for key in CHECK_KEYS:
        theirs, ours = earlier["config"].get(key), getattr(opts, key)
        if theirs != ours:
            raise SystemExit(f"--check-from {path}: its {key} is {theirs!r}, not {ours!r}")
    log(f"FLOP counts and agreement check from {path}")
    return earlier["flops"], earlier["agreement"] | {"from": str(opts.check_from)}


def terminate(signum: int, frame: Any) -> None:
    """SIGTERM (e.g. from `timeout`) as an exception, so that main writes the report of what was measured."""
    raise SystemExit(128 + signum)


def tabulate(
    report: dict[str, Any], flops: dict[str, Any], pipes: dict[str, Any], loaded: dict[str, int], opts: Any
) -> None:
    """The report's rows, FLOP rates and (CUDA) memory from its runs, once every library has a timed run."""
    runs = report.get("runs") or {}
    if not all(runs.get(lib) for lib in LIBS):
        return
    report["rows"] = summarize(report)
    if flops:
        report["flops_achieved"] = efficiency(flops, report["rows"], report["rates"], opts.dtype)
    if opts.device == "cuda":
        report["memory"] = {}
        for lib in LIBS:
            over = max(r["cuda_peak_over_resident"] for r in runs[lib])
            report["memory"][lib] = {
                "weights": weight_bytes(pipes[lib]) if lib in pipes else None,
                "loaded": loaded.get(lib),
                "cuda_peak_over_resident": over,
                "cuda_peak_alone": loaded[lib] + over if lib in loaded else None,
                "cuda_peak_process": max(r["cuda_peak"] for r in runs[lib]),
            }


@torch.no_grad()
def measure_offload(
    opts: argparse.Namespace, root: Path, dtype: torch.dtype, device: torch.device, out: dict[str, Any]
) -> dict[str, Any]:
    """Each library alone on the GPU, one after the other: what loading allocates there, and the absolute peak
    torch.cuda.max_memory_allocated of a call (weights, activations, all it holds) and its seconds, with the
    pipeline on the GPU and then with enable_model_cpu_offload(); `--warmup` calls, then `--repeats` timed
    calls of each. Filled into `out` as each ends."""
    args = call_args(root, opts.frames, (opts.height, opts.width), opts.steps, opts.guidance)
    for lib in LIBS:
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)  # the other library gone: about 0
        pipe = load_pipeline(lib, root, dtype, torch.device("cpu")).to(device)
        entry = out[lib] = {"allocated_before": base, "loaded": torch.cuda.memory_allocated(device) - base}
        if opts.layout:
            entry["layout"] = measure_layout(lib, pipe, opts, dtype, device)
        if opts.decode_chunks:
            entry["decode chunks"] = measure_decode_chunks(lib, pipe, opts, dtype, device)
        for mode in ("gpu", "cpu offload"):
            if mode == "cpu offload":
                pipe.enable_model_cpu_offload(device=device)
                gc.collect()
                torch.cuda.empty_cache()
                entry["loaded_offloaded"] = torch.cuda.memory_allocated(device) - base
            seconds, peaks = [], []
            for i in range(opts.warmup + opts.repeats):
                gc.collect()
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                pipe(generator=torch.Generator("cpu").manual_seed(0), **args)
                torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - start)
                peaks.append(torch.cuda.max_memory_allocated(device) - base)
                log(f"{lib}, {mode}, call {i + 1}: {seconds[-1]:.3f} s, peak {gib(peaks[-1])}")
            timed = seconds[opts.warmup :] or seconds
            entry[mode] = {"peak": max(peaks), "seconds": min(timed), "first_call": seconds[0], "calls": seconds}
        del pipe, entry
        gc.collect()
        torch.cuda.empty_cache()
    return out


@torch.no_grad()
def measure_layout(
    lib: str, pipe: Any, opts: argparse.Namespace, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """Does channels_last help? One UNet call (the run's CFG batch, random input) and one VAE decode of 4
    frames (`best_time`), with the models' weights in torch.contiguous_format and then in
    torch.channels_last (contiguous again after)."""
    h, w = opts.height // 8, opts.width // 8
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, pipe.unet.config.in_channels, opts.frames, h, w, generator=g).to(device, dtype)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).to(device, dtype)
    z = torch.randn(4, 4, h, w, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    if lib == "pia_torch":
        unet = lambda: pipe.unet(x, t, text)  # noqa: E731
    else:  # as its PIAPipeline calls it: text states repeated per frame
        per_frame = text.repeat_interleave(opts.frames, dim=0)
        unet = lambda: pipe.unet(x, t, encoder_hidden_states=per_frame).sample  # noqa: E731
    out: dict[str, Any] = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        for model in (pipe.unet, pipe.vae):
            model.to(memory_format=layout)
        name = str(layout).removeprefix("torch.")
        out[name] = {
            "unet call": best_time(unet, device),
            "vae decode (4 frames)": best_time(lambda: pipe.vae.decode(z), device),
        }
        log(f"{lib}, {name}: " + ", ".join(f"{k} {fmt_s(v)}" for k, v in out[name].items()))
    for model in (pipe.unet, pipe.vae):
        model.to(memory_format=torch.contiguous_format)
    return out


@torch.no_grad()
def measure_decode_chunks(
    lib: str, pipe: Any, opts: argparse.Namespace, dtype: torch.dtype, device: torch.device
) -> dict[int, dict[str, float | None]]:
    """What decoding in chunks costs and saves: the VAE decode of the run's frames (random latents) with 1, 2,
    4, ... frames per decode call, up to all of them; per chunk size the seconds (`best_time`) and, on CUDA, the
    peak memory allocated over what was allocated before. diffusers decodes all frames at once (its only way)."""
    from pia_torch.pipeline import decode_latents

    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, 4, opts.frames, opts.height // 8, opts.width // 8, generator=g).to(device, dtype)
    if lib == "pia_torch":
        sizes = sorted({2**k for k in range(opts.frames.bit_length()) if 2**k < opts.frames} | {opts.frames})
        run = lambda n: decode_latents(pipe.vae, latents, n)  # noqa: E731
    else:
        sizes, run = [opts.frames], lambda n: pipe.decode_latents(latents)  # noqa: E731
    out: dict[int, dict[str, float | None]] = {}
    for n in sizes:
        peak = None
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        seconds = best_time(lambda n=n: run(n), device, min_reps=2, budget=0.2)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        out[n] = {"seconds": seconds, "peak": peak}
        log(f"{lib}, decode {opts.frames} frames, {n} per call: {fmt_s(seconds)}, peak over resident {gib(peak)}")
    return out


def finish(report: dict[str, Any], opts: argparse.Namespace) -> int:
    """Print and write the report; exit status 1 when fp32 frames disagree (two different computations)."""
    report["wall_seconds"] = time.perf_counter() - START
    text = markdown(report)
    print(text)
    if opts.markdown:
        Path(opts.markdown).write_text(text)
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    agreement = report.get("agreement", {"passed": True})
    if not agreement["passed"]:
        log(f"WARNING: the two libraries computed different frames: {agreement}")
        return 1 if opts.dtype == "fp32" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
