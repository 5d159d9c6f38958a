"""Shared test helpers: tolerances, diffusers reference models with seeded random weights (saved with
save_pretrained), the UNet parity helpers and the tiny-pipeline fixtures. Test modules import from here
(`from conftest import ...`), never from each other.

Every model factory returns a *diffusers* model (the reference). `randomize_` re-randomises every constant
tensor (norm weights = 1, norm biases = 0, anything zero-initialised), so no layer is left all zeros
or all ones and a parity test cannot pass by accident.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import pia_torch.schedulers as pia_schedulers
from pia_torch.demo import ASSETS, demo_image
from pia_torch.loading import MotionAdapter as PiaMotionAdapter
from pia_torch.loading import load_unet
from pia_torch.models.unet import UNet
from pia_torch.pipeline import PIAPipeline

# ------------------------------------------------------------------------------------------ tolerances
#
# Tests compare float32 results. Two programs that compute one value in a different order -- diffusers'
# op order, a kernel picked for another batch size (slicing, chunking, a batch of videos), another CPU's
# vector width (AVX-512, AVX2, none) or thread count -- differ by rounding only, and rounding scales with
# the dtype's eps and the magnitude of the numbers. Tolerances are derived from those two (`tol`), never
# from what one machine happened to print. Bit-identity (atol=0, torch.equal) is asserted only where both
# sides run literally the same ops on the same shapes (the same function twice, or diffusers' own
# elementwise formula on identical inputs).
#
# DESIGN.md §5 fixes upper bounds (the contract) for pia_torch vs diffusers; a test may assert a tighter
# bound derived from rounding, never a looser one.
MODEL_ATOL = 1e-4  # blocks, UNet, VAE encode/decode (outputs of scale ~1)
STEP_TOL = dict(atol=1e-6, rtol=1e-6)  # scheduler steps, FreeInit filters: ≈ 8 float32 ulps of each value
FRAMES_ATOL = 1e-3  # the whole pipeline, output_type="np" (frames in [0, 1])


def fan_in(module: torch.nn.Module) -> int:
    """Σ over the module's conv and linear layers of the terms one output of each sums (in/groups·kh·kw):
    the accumulation depth of a forward pass, counted as if every layer were on the longest chain. The
    short sums of norms and attention (group statistics, head dim, tokens) are left to `tol`'s head-room."""
    return sum(m.weight[0].numel() for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def tol(
    reference: torch.Tensor | np.ndarray, depth: int = 1, *, ulps: float = 2, dtype: torch.dtype = torch.float32
) -> dict:
    """assert_close(**tol(...)) / assert_allclose(**tol(...)) for a result that may differ from `reference`
    by rounding only:

        atol = ulps · eps(dtype) · max|reference| · √depth,   rtol = 0.

    Each op rounds to within ½ ulp (eps/2 relative). A sum of `depth` terms taken in another order differs
    by a random walk of those roundings, ~ eps·√depth relative to the sum's scale (the worst case eps·depth
    is never approached); layers chained one after another add their depths (`fan_in`). For ~10⁵ outputs
    of one such sum the largest difference is about 0.3·eps·√depth·max|reference|, so the default ulps = 2
    leaves a factor ~6 for the gain of later layers and the short sums `fan_in` leaves out. Elementwise
    formulas (depth 1) pass as `ulps` a bound on the roundings they chain (½ ulp each). Absolute, from the
    largest magnitude: a near-zero element carries the error of the large intermediates it was computed
    from (an rtol would demand ~0 error of it).
    """
    scale = float(torch.as_tensor(reference).detach().abs().max())
    return dict(atol=ulps * torch.finfo(dtype).eps * scale * math.sqrt(depth), rtol=0)


# Model sizes. "tiny": the old diffusers PIA fast test (spec/unet_motion.md §1.4; has a motion mid
# block). "small": the SD1.5 block layout (4 levels, 3 cross-attention levels, 32 groups, no motion
# mid block, max_seq_length 32) at 1/10 of the width.
UNET2D = {
    "tiny": dict(
        block_out_channels=(8, 8),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    ),
    "small": dict(
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        norm_num_groups=32,
        attention_head_dim=8,
    ),
}
ADAPTER = {
    "tiny": dict(
        block_out_channels=(8, 8),
        motion_layers_per_block=2,
        motion_norm_num_groups=2,
        motion_num_attention_heads=4,
        conv_in_channels=9,
    ),
    "small": dict(
        block_out_channels=(32, 64, 128, 128),
        motion_layers_per_block=2,
        motion_norm_num_groups=32,
        motion_num_attention_heads=8,
        conv_in_channels=9,
        use_motion_mid_block=False,
        motion_max_seq_length=32,
    ),
}
VAE = {
    "tiny": dict(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=16,
    ),
    "small": dict(
        block_out_channels=(32, 64, 64, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        layers_per_block=2,
        sample_size=64,
    ),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every constant parameter (norm weights/biases, zero inits) with seeded noise."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        flat = p.detach().flatten()
        if bool((flat == flat[0]).all()):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    assert_no_constant_layers(model)
    return model


def assert_no_constant_layers(model: torch.nn.Module) -> None:
    """Fail if any parameter is all zeros (or constant): parity against it would prove nothing."""
    bad = [n for n, p in model.named_parameters() if p.numel() > 1 and bool((p == p.flatten()[0]).all())]
    assert not bad, f"constant parameters: {bad[:5]}"


def make_unet2d(size: str = "tiny", seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**UNET2D[size]).eval(), seed + 1)


def make_adapter(size: str = "tiny", seed: int = 10) -> MotionAdapter:
    torch.manual_seed(seed)
    return randomize_(MotionAdapter(**ADAPTER[size]).eval(), seed + 1)


def make_vae(size: str = "tiny", seed: int = 20) -> AutoencoderKL:
    torch.manual_seed(seed)
    return randomize_(AutoencoderKL(**VAE[size]).eval(), seed + 1)


@pytest.fixture(scope="session", params=["tiny", "small"])
def size(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Factory: `checkpoints(size)` -> dict of folders {"unet", "adapter", "vae"} saved by diffusers.

    Saved once per size and session. The reference models themselves are rebuilt from the same
    seeds by the make_* factories when a test needs them.
    """
    cache: dict[str, dict] = {}

    def build(size: str = "tiny") -> dict:
        if size not in cache:
            root = tmp_path_factory.mktemp(f"ckpt_{size}")
            make_unet2d(size).save_pretrained(root / "unet")
            make_adapter(size).save_pretrained(root / "adapter")
            make_vae(size).save_pretrained(root / "vae")
            cache[size] = {"root": root, "unet": root / "unet", "adapter": root / "adapter", "vae": root / "vae"}
        return cache[size]

    return build


# ------------------------------------------------------------------------------------------ blocks

# CONTRACT renames, matched on whole components (a standalone FeedForward's keys start at `net.`).
BLOCK_RENAMES = [
    (".to_out.0.", ".to_out."),
    (".net.0.proj.", ".proj_in."),
    (".net.2.", ".proj_out."),
    (".downsamplers.0.", ".downsample."),
    (".upsamplers.0.", ".upsample."),
]


def copy_from_diffusers(module: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    """Load ref's weights into module with the CONTRACT renames; `pos_embed.pe` is recomputed, not loaded."""
    sd = {}
    for key, value in ref.state_dict().items():
        if key.endswith("pos_embed.pe"):
            continue
        key = "." + key
        for old, new in BLOCK_RENAMES:
            key = key.replace(old, new)
        sd[key[1:]] = value
    module.load_state_dict(sd, strict=True)
    return module.eval()


# ------------------------------------------------------------------------------------------ UNet


@functools.cache
def reference_unet(size: str) -> UNetMotionModel:
    """diffusers' motion UNet from the same seeded models the `checkpoints` fixture saved."""
    return UNetMotionModel.from_unet2d(make_unet2d(size), make_adapter(size)).eval()


def load_pia(checkpoints, size: str, convention: str = "diffusers") -> UNet:
    folders = checkpoints(size)
    return load_unet(folders["unet"], PiaMotionAdapter.from_pretrained(folders["adapter"]), convention=convention)


def inputs(size: str, b: int, f: int, hw: tuple[int, int] = (8, 8), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, 9, f, h, w) and text (b, l, d) shared by the frames of each video."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 9, f, *hw, generator=g)
    text = torch.randn(b, 7, UNET2D[size]["cross_attention_dim"], generator=g)
    return x, text


# ------------------------------------------------------------------------------------------ pipeline

# spec/unet_motion.md §1.4: the tiny DDIM of diffusers' PIA fast test
TINY_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
# A runwayml-era SD1.5 scheduler_config.json (spec/schedulers.md §3.1)
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def make_text_encoder(seed: int = 30) -> CLIPTextModel:
    """spec/unet_motion.md §1.4's tiny CLIP text tower (hidden 8 = the tiny UNet's cross_attention_dim)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=8,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
        layer_norm_eps=1e-5,
        bos_token_id=527,
        eos_token_id=528,
        pad_token_id=528,
    )
    return randomize_(CLIPTextModel(config).eval(), seed + 1)


def save_base(root: Path, scheduler_config: dict | None = None) -> Path:
    """A hub-shaped SD1.5-style folder of tiny components; returns root."""
    make_unet2d("tiny").save_pretrained(root / "unet")
    make_vae("tiny").save_pretrained(root / "vae")
    make_text_encoder().save_pretrained(root / "text_encoder")
    shutil.copytree(ASSETS / "tokenizer", root / "tokenizer")
    if scheduler_config is None:
        diffusers.DDIMScheduler(**TINY_DDIM).save_pretrained(root / "scheduler")
    else:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    scheduler_class = json.loads((root / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture
def one_thread():
    """Tiny models run ~10x faster on one thread than on two shared, contended cores.

    Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`; `pipes` uses it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pia_tiny")
    make_adapter("tiny").save_pretrained(root / "adapter")
    return {"base": save_base(root / "base"), "adapter": root / "adapter"}


@pytest.fixture(scope="session")
def reference(folders) -> diffusers.PIAPipeline:
    """diffusers' PIAPipeline on the same weights."""
    pipe = diffusers.PIAPipeline(
        vae=make_vae("tiny"),
        text_encoder=make_text_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(ASSETS / "tokenizer"),
        unet=make_unet2d("tiny"),
        motion_adapter=diffusers.MotionAdapter.from_pretrained(folders["adapter"]),
        scheduler=diffusers.DDIMScheduler(**TINY_DDIM),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ours_session(folders) -> PIAPipeline:
    adapter = PiaMotionAdapter.from_pretrained(folders["adapter"])
    pipe = PIAPipeline.from_pretrained(folders["base"], motion_adapter=adapter, convention="diffusers")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipes(reference, ours_session, one_thread):
    """(diffusers, pia_torch), each with a fresh tiny DDIM and FreeInit / FreeU off."""
    for pipe, module in ((reference, diffusers), (ours_session, pia_schedulers)):
        pipe.scheduler = module.DDIMScheduler(**TINY_DDIM)
        pipe.disable_free_init()
        pipe.disable_freeu()
    yield reference, ours_session


def image(width: int = 16, height: int = 16):
    return demo_image().resize((width, height))


def run(pipe, seed: int = 0, **kwargs):
    args = dict(image=image(), prompt="a cat in a field", num_frames=4, num_inference_steps=3, output_type="np")
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).frames


def pipeline_depth(pipe, steps: int) -> int:
    """Accumulation depth of a pipeline run (see `tol`): the text encoder, the VAE (the image is encoded,
    the latents decoded) and `steps` UNet evaluations, chained one after another."""
    return fan_in(pipe.text_encoder) + fan_in(pipe.vae) + steps * fan_in(pipe.unet)


def assert_parity(pipes, **kwargs) -> float:
    """Frames of diffusers and pia_torch for the same arguments agree to FRAMES_ATOL (DESIGN.md §5)."""
    ref, ours = (run(p, **kwargs) for p in pipes)
    assert ref.shape == ours.shape and ours.dtype == np.float32
    err = float(np.abs(ref - ours).max())
    assert err <= FRAMES_ATOL, err
    return err
