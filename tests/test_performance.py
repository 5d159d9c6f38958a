"""Speed features that must not change results: torch.compile (whole graph, no recompiles across steps,
FreeInit passes and windows) and half precision on a CPU (bf16 within bf16 rounding of float32; a warning
where the CPU only emulates it; `--dtype auto`)."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch._inductor.config
from conftest import fan_in, tol

from pia_torch import pipeline as pipeline_module
from pia_torch.config import tiny_unet
from pia_torch.demo import demo_image, tiny_pipeline
from pia_torch.models.unet import UNet
from pia_torch.pipeline import auto_dtype, cpu_native_dtypes

pytestmark = pytest.mark.usefixtures("one_thread")
SIMD_BITS = {"default": 1, "avx2": 256, "avx512": 512}  # ATEN_CPU_CAPABILITY -> inductor's cpp.simdlen


@pytest.fixture
def inductor_simd(monkeypatch):
    """Inductor picks its vector width from the CPU, not from ATEN_CPU_CAPABILITY: generated code and ATen's
    headers must agree on it, so follow the variable where it is set."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability in SIMD_BITS:
        monkeypatch.setattr(torch._inductor.config.cpp, "simdlen", SIMD_BITS[capability])


def unet_inputs(unet, b=2, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 9, f, 16, 16, generator=g)
    text = torch.randn(b, 7, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor(500), text


@pytest.mark.slow
def test_compiled_unet_equals_eager(inductor_simd):
    """The tiny UNet compiles as one graph (fullgraph=True: any graph break is an error) with inductor, and its
    output equals eager within float32 rounding."""
    torch.manual_seed(0)
    unet = UNet(tiny_unet()).eval()
    x, t, text = unet_inputs(unet)
    with torch.no_grad():
        eager = unet(x, t, text)
        compiled = torch.compile(unet, fullgraph=True)(x, t, text)
    torch.testing.assert_close(compiled, eager, **tol(eager, fan_in(unet)))


@pytest.mark.slow
def test_frozen_compile_equals_eager_and_follows_weight_changes(inductor_simd):
    """pipe.compile(freeze=True) (inductor pre-packs the weights for oneDNN): the UNet still equals eager, and
    still does after its weights change in place (fuse_lora after compiling)."""
    pipe = tiny_pipeline(0)
    eager = copy.deepcopy(pipe.unet)
    x, t, text = unet_inputs(eager)
    pipe.compile(freeze=True)
    with torch.no_grad():
        for change in range(2):
            if change:
                for unet in (pipe.unet, eager):
                    unet.down_blocks[0].resnets[0].conv1.weight.mul_(1.5)
                    unet.up_blocks[1].attentions[0].transformer_blocks[0].ff.proj_in.weight.mul_(-1)
                    unet.conv_out.bias.add_(1)
            want = eager(x, t, text)
            torch.testing.assert_close(pipe.unet(x, t, text), want, **tol(want, fan_in(eager)))
    with pytest.raises(ValueError, match="freeze"):
        tiny_pipeline(0).compile(mode="max-autotune", freeze=True)


def test_no_recompilation_across_steps_freeinit_and_windows():
    """pipe.compile(): one graph per input shape, whatever the step, the timestep, the FreeInit pass or the
    window; the result equals the eager pipeline's."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(tuple(i.shape) for i in example_inputs if isinstance(i, torch.Tensor))[:1])
        return gm.forward

    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_init(num_iters=2)
    kwargs = dict(num_frames=20, height=16, width=16, num_inference_steps=3, context_length=8, output_type="latent")
    eager = pipe(demo_image(), "p", generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch._dynamo.reset()
    pipe.compile(backend=counting_backend)
    try:
        compiled = pipe(demo_image(), "p", generator=torch.Generator().manual_seed(0), **kwargs).frames
    finally:
        torch._dynamo.reset()
    unet_graphs = [g for g in graphs if g and len(g[0]) == 5]
    assert len(unet_graphs) == 1, graphs  # 3 steps x 2 passes x 3 windows, one graph
    assert torch.equal(compiled, eager)
    assert list(pipe.unet.state_dict()) == list(tiny_pipeline(0).unet.state_dict())  # names unchanged


def test_bf16_on_cpu_within_bf16_rounding():
    """bf16 weights and compute on the CPU (AMX where present, emulated elsewhere): the UNet output is within
    bf16 rounding of float32's, and so is a one-step video's latent."""
    torch.manual_seed(0)
    unet = UNet(tiny_unet()).eval()
    x, t, text = unet_inputs(unet)
    with torch.no_grad():
        ref = unet(x, t, text)
        out = unet.to(torch.bfloat16)(x.bfloat16(), t, text.bfloat16()).float()
    torch.testing.assert_close(out, ref, **tol(ref, fan_in(unet), dtype=torch.bfloat16))
    kwargs = dict(num_frames=4, height=16, width=16, num_inference_steps=1, output_type="latent", guidance_scale=1)
    video32 = tiny_pipeline(0)(demo_image(), "p", generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe16 = tiny_pipeline(0, torch_dtype=torch.bfloat16)
    video16 = pipe16(demo_image(), "p", generator=torch.Generator().manual_seed(0), **kwargs).frames.float()
    depth = fan_in(pipe16.unet) + fan_in(pipe16.vae) + fan_in(pipe16.text_encoder)
    torch.testing.assert_close(video16, video32, **tol(video32, depth, dtype=torch.bfloat16))


def test_dtype_choice_and_emulation_warning(monkeypatch, caplog):
    assert auto_dtype("cuda") == torch.float16
    assert auto_dtype("cpu", {"avx2", "amx_bf16", "amx_tile"}) == torch.bfloat16
    assert auto_dtype("cpu", {"avx2", "avx512_bf16"}) == torch.float32
    assert auto_dtype("cpu", set()) == torch.float32
    assert cpu_native_dtypes({"avx512_bf16"}) == {torch.bfloat16}
    assert cpu_native_dtypes({"amx_fp16", "amx_bf16"}) == {torch.float16, torch.bfloat16}
    monkeypatch.setattr(pipeline_module, "cpu_flags", lambda: {"avx2"})
    pipe = tiny_pipeline(0, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=2, height=16, width=16, num_inference_steps=1, output_type="latent")
    with caplog.at_level(logging.WARNING, logger="pia_torch"):
        pipe(demo_image(), "p", **kwargs)
        pipe(demo_image(), "p", **kwargs)
    warnings = [r for r in caplog.records if "emulates" in r.getMessage()]
    assert len(warnings) == 1 and "no native torch.bfloat16" in warnings[0].getMessage()
    monkeypatch.setattr(pipeline_module, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    caplog.clear()
    pipe = tiny_pipeline(0, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="pia_torch"):
        pipe(demo_image(), "p", **kwargs)
    assert not [r for r in caplog.records if "emulates" in r.getMessage()]


def test_default_decode_chunks_by_pixels(monkeypatch):
    """Unless decode_chunk_size is given, the VAE decodes DECODE_PIXELS' worth of frames at a time (4 frames at
    512x512: its activations set the peak there); the video equals the all-at-once decode within rounding."""
    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=5, height=32, width=32, num_inference_steps=1, output_type="pt", guidance_scale=1)
    assert pipeline_module.DECODE_PIXELS // (512 * 512) == 4
    whole = pipe(demo_image(), "p", generator=torch.Generator().manual_seed(0), decode_chunk_size=5, **kwargs).frames
    monkeypatch.setattr(pipeline_module, "DECODE_PIXELS", 2 * 32 * 32)
    sizes = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        chunked = pipe(demo_image(), "p", generator=torch.Generator().manual_seed(0), **kwargs).frames
    finally:
        hook.remove()
    assert sizes == [2, 2, 1]
    torch.testing.assert_close(chunked, whole, **tol(whole, fan_in(pipe.vae)))
