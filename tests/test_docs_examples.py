"""The two example programs of the diffusers PIA documentation
(https://huggingface.co/docs/diffusers/api/pipelines/pia) run unchanged except for their imports.

They run offline against a local Hugging Face cache (HF_HUB_OFFLINE=1, HF_HUB_CACHE=tmp) that holds tiny
checkpoints under the real repo ids; the image URL is served by a test-only stand-in for the network
call that `pia_torch.utils.load_image` makes (urllib.request.urlopen). The programs pass no size, frame
or step arguments, so the run is shrunk by the checkpoint itself: the tiny UNet's sample_size 8 × the
tiny VAE's factor 2 makes the default video 16×16 (the 512×512 image is resized to cover it); the
defaults of 16 frames and 50 steps stay.
"""

from __future__ import annotations

import io
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import SD15_PNDM, make_adapter, save_base

from pia_torch.demo import demo_image

ADAPTER_ID = "openmmlab/PIA-condition-adapter"
BASE_ID = "SG161222/Realistic_Vision_V6.0_B1_noVAE"
IMAGE_URL = (
    "https://huggingface.co/datasets/hf-internal-testing/diffusers-images/resolve/main/pix2pix/cat_6.png?download=true"
)
IMPORTS = (
    "from pia_torch import MotionAdapter, PIAPipeline, DDIMScheduler, EulerDiscreteScheduler\n"
    "from pia_torch.utils import load_image, export_to_gif\n"
)

# "Usage example" of the docs page, verbatim below the imports.
EXAMPLE_USAGE = (
    IMPORTS
    + """import torch

adapter = MotionAdapter.from_pretrained("openmmlab/PIA-condition-adapter")
pipe = PIAPipeline.from_pretrained("SG161222/Realistic_Vision_V6.0_B1_noVAE", motion_adapter=adapter, torch_dtype=torch.float16)

pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.enable_model_cpu_offload()
pipe.enable_vae_slicing()

image = load_image(
    "https://huggingface.co/datasets/hf-internal-testing/diffusers-images/resolve/main/pix2pix/cat_6.png?download=true"
)
image = image.resize((512, 512))
prompt = "cat in a field"
negative_prompt = "wrong white balance, dark, sketches,worst quality,low quality"

generator = torch.Generator("cpu").manual_seed(0)
output = pipe(image=image, prompt=prompt, generator=generator)
frames = output.frames[0]
export_to_gif(frames, "pia-animation.gif")
"""
)

# "Using FreeInit" of the docs page, verbatim below the imports.
EXAMPLE_FREE_INIT = (
    IMPORTS
    + """import torch

adapter = MotionAdapter.from_pretrained("openmmlab/PIA-condition-adapter")
pipe = PIAPipeline.from_pretrained("SG161222/Realistic_Vision_V6.0_B1_noVAE", motion_adapter=adapter)

# enable FreeInit
# Refer to the enable_free_init documentation for a full list of configurable parameters
pipe.enable_free_init(method="butterworth", use_fast_sampling=True)

# Memory saving options
pipe.enable_model_cpu_offload()
pipe.enable_vae_slicing()

pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
image = load_image(
    "https://huggingface.co/datasets/hf-internal-testing/diffusers-images/resolve/main/pix2pix/cat_6.png?download=true"
)
image = image.resize((512, 512))
prompt = "cat in a field"
negative_prompt = "wrong white balance, dark, sketches,worst quality,low quality"

generator = torch.Generator("cpu").manual_seed(0)

output = pipe(image=image, prompt=prompt, generator=generator)
frames = output.frames[0]
export_to_gif(frames, "pia-freeinit-animation.gif")
"""
)


def add_snapshot(cache: Path, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """An HF-cache repo entry: models--owner--name/{refs/main, snapshots/<commit>/}; returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    make_adapter("tiny").save_pretrained(add_snapshot(cache, ADAPTER_ID))
    save_base(add_snapshot(cache, BASE_ID), SD15_PNDM)
    return cache


@pytest.fixture
def offline(hf_cache, tmp_path, monkeypatch) -> Path:
    """Network off (sockets refuse to connect), HF offline on the tiny cache, the image URL served locally."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))

    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    png = io.BytesIO()
    demo_image().resize((96, 80)).save(png, format="PNG")

    def urlopen(url, *args, **kwargs):
        if url != IMAGE_URL:
            raise OSError(f"unexpected URL {url}")
        return io.BytesIO(png.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "program, gif",
    [(EXAMPLE_USAGE, "pia-animation.gif"), (EXAMPLE_FREE_INIT, "pia-freeinit-animation.gif")],
    ids=["usage", "free_init"],
)
def test_docs_example(offline, program, gif):
    namespace: dict = {}
    exec(compile(program, gif, "exec"), namespace)
    frames = namespace["frames"]
    assert len(frames) == 16 and frames[0].size == (16, 16)
    assert (offline / gif).stat().st_size > 0
    assert namespace["pipe"].scheduler.__class__.__name__ in ("EulerDiscreteScheduler", "DDIMScheduler")


def test_from_pretrained_repo_id_offline(offline):
    """`from_pretrained("owner/name")` reads a pre-populated cache with the network off."""
    from pia_torch import MotionAdapter, PIAPipeline

    adapter = MotionAdapter.from_pretrained(ADAPTER_ID)
    pipe = PIAPipeline.from_pretrained(BASE_ID, motion_adapter=adapter, torch_dtype=torch.float16)
    assert pipe.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    assert pipe.unet.config.convention == "original"
    with pytest.raises(FileNotFoundError):
        PIAPipeline.from_pretrained("someone/not-cached", motion_adapter=adapter)
