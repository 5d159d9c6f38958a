"""Speed and memory of pia_torch against diffusers 0.42.1: same weights, same inputs, one process.

    python scripts/bench.py                          # small SD1.5-shaped model, CPU, fp32
    python scripts/bench.py --size sd15 --device cuda --dtype fp16 --frames 16 --res 512

Times the UNet forward (a classifier-free-guidance batch of 2 videos) and the VAE decode of every
frame, and reports the median of --repeats runs, the ratio diffusers / pia_torch (> 1: pia_torch is
faster) and, on CUDA, the peak memory of each. diffusers is a test-only dependency: install the
`test` extra first. Random weights (timings do not depend on the values).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL as RefVAE
from diffusers import MotionAdapter as RefAdapter
from diffusers import UNet2DConditionModel, UNetMotionModel

from pia_torch.config import MotionConfig
from pia_torch.loading import MotionAdapter, build_unet, build_vae

SIZES = {  # (UNet block widths, cross-attention dim, VAE block widths)
    "small": ((32, 64, 128, 128), 32, (32, 64, 64, 64)),
    "sd15": ((320, 640, 1280, 1280), 768, (128, 256, 512, 512)),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reference_models(size: str) -> tuple[UNet2DConditionModel, RefAdapter, RefVAE]:
    widths, text_dim, vae_widths = SIZES[size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=widths,
        layers_per_block=2,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        sample_size=64,
    )
    adapter = RefAdapter(
        block_out_channels=widths,
        motion_layers_per_block=2,
        motion_num_attention_heads=8,
        conv_in_channels=9,
        use_motion_mid_block=False,
        motion_max_seq_length=32,
    )
    vae = RefVAE(
        block_out_channels=vae_widths,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    return unet, adapter, vae


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float | None]:
    """Median seconds of `repeats` calls after one warm-up, and the peak CUDA memory in GiB."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def report(name: str, ours: tuple[float, float | None], ref: tuple[float, float | None]) -> None:
    memory = f"   peak {ours[1]:.2f} vs {ref[1]:.2f} GiB" if ours[1] is not None else ""
    print(
        f"{name:34s} pia_torch {ours[0] * 1e3:9.1f} ms   diffusers {ref[0] * 1e3:9.1f} ms   "
        f"speed-up x{ref[0] / ours[0]:.2f}{memory}"
    )


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--res", type=int, default=256, help="pixel height = width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile both UNets")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    unet2d, ref_adapter, ref_vae = reference_models(args.size)
    adapter = MotionAdapter(MotionConfig.from_diffusers(dict(ref_adapter.config)), ref_adapter.state_dict())
    kw = dict(torch_dtype=dtype, device=device)
    ours = {
        c: build_unet(dict(unet2d.config), unet2d.state_dict(), adapter, convention=c, **kw)
        for c in ("diffusers", "original")
    }
    vae = build_vae(dict(ref_vae.config), ref_vae.state_dict(), **kw)
    ref_unet = UNetMotionModel.from_unet2d(unet2d, ref_adapter).to(device, dtype).eval()
    ref_vae = ref_vae.to(device, dtype).eval()
    del unet2d, ref_adapter
    if args.compile:
        ours = {c: torch.compile(m) for c, m in ours.items()}
        ref_unet = torch.compile(ref_unet)

    b, f, h = 2, args.frames, args.res // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 9, f, h, h, generator=g).to(device, dtype)
    text = torch.randn(b, 77, SIZES[args.size][1], generator=g).to(device, dtype)
    t = torch.tensor(501, device=device)
    z = torch.randn(f, 4, h, h, generator=g).to(device, dtype)
    print(f"{args.size} UNet, batch {b} x {f} frames at {args.res}x{args.res}, {args.dtype} on {device}")

    ref = timed(lambda: ref_unet(x, t, text.repeat_interleave(f, dim=0)).sample, args.repeats, device)
    for convention, unet in ours.items():
        report(f"UNet forward ({convention})", timed(lambda unet=unet: unet(x, t, text), args.repeats, device), ref)
    ref = timed(lambda: ref_vae.decode(z).sample, args.repeats, device)
    report(f"VAE decode ({f} frames)", timed(lambda: vae.decode(z), args.repeats, device), ref)


if __name__ == "__main__":
    main()
