"""pia_torch.schedulers: the registry, the stateless sampling loop, and DPM-Solver++(2M) against diffusers
0.42.1 `DPMSolverMultistepScheduler` (step by step and through the whole PIA pipeline).

Tolerances (conftest.py): timesteps exactly equal; sigmas and every step output within 8 float32 ulps
of the reference's largest |value| (`tol`, < 1e-6 relative: room for another rounding order of vectorised
kernels, e.g. ATEN_CPU_CAPABILITY=default or avx2); pipeline frames within FRAMES_ATOL (`assert_parity`).
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import SD15_PNDM, TINY_DDIM, assert_parity, run, tol
from diffusers import DDIMScheduler as RefDDIM
from diffusers import DPMSolverMultistepScheduler as RefDPM
from torch.testing import assert_close

import pia_torch.schedulers as pia_schedulers
from pia_torch import cli
from pia_torch.freeinit import vp_level
from pia_torch.sampling import prepare_timesteps, sample, step_sigmas
from pia_torch.schedulers import (
    SAMPLERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    scheduler_class,
)

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PIA_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
SHAPE = (2, 4, 3, 6, 6)  # (b, c, f, h, w)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' np.array(tensor) calls


def assert_near(x: torch.Tensor, ref: torch.Tensor) -> None:
    assert_close(x, ref, **tol(ref, ulps=8))  # 8 float32 ulps of the largest |value|: ≤ 1e-6 relative


def randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ DPM-Solver++(2M)

DPM_VARIANTS = {
    "default": {},
    "karras": dict(use_karras_sigmas=True),
    "heun": dict(solver_type="heun"),
    "v_prediction": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample"),
    "sigma_min_final": dict(final_sigmas_type="sigma_min"),
    "no_lower_order_final": dict(lower_order_final=False),
    "euler_at_final": dict(euler_at_final=True, final_sigmas_type="sigma_min"),
    "order_1": dict(solver_order=1),
    "thresholding": dict(thresholding=True, sample_max_value=2.0),
    "offset": dict(steps_offset=1),
    "zero_snr": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
}


@pytest.mark.parametrize("variant", list(DPM_VARIANTS))
@pytest.mark.parametrize("n", [1, 2, 5, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("betas", ["sd15", "pia"])
def test_dpm_matches_diffusers_step_by_step(betas, spacing, n, variant):
    cfg = dict(SD_BETAS if betas == "sd15" else PIA_BETAS, timestep_spacing=spacing, **DPM_VARIANTS[variant])
    ours, ref = DPMSolverMultistepScheduler(**cfg), RefDPM(**cfg)
    assert_near(ours.sigmas, ref.sigmas)  # before set_timesteps
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert ours.timesteps.dtype == torch.int64 and torch.equal(ours.timesteps, ref.timesteps)
    assert_near(ours.sigmas, ref.sigmas)
    assert ours.num_inference_steps == ref.num_inference_steps and ours.init_noise_sigma == ref.init_noise_sigma
    x = x_ref = randn(1)
    for k, t in enumerate(ours.timesteps):
        out = randn(100 + k)
        x = ours.step(out, t, x)
        x_ref = ref.step(out, t, x_ref).prev_sample
        assert_near(x, x_ref)
    assert not torch.equal(x, randn(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dpm_half_precision(dtype):
    """fp32 inside, the model output's dtype out, as diffusers."""
    ours, ref = DPMSolverMultistepScheduler(**SD_BETAS), RefDPM(**SD_BETAS)
    ours.set_timesteps(6)
    ref.set_timesteps(6)
    x = x_ref = randn(1).to(dtype)
    for k, t in enumerate(ours.timesteps):
        x = ours.step(randn(100 + k).to(dtype), t, x)
        x_ref = ref.step(randn(100 + k).to(dtype), t, x_ref).prev_sample
        assert x.dtype == dtype and torch.equal(x, x_ref)


@pytest.mark.parametrize("strength", [0.5, 0.6, 1.0])
def test_dpm_strength_and_add_noise(strength):
    """img2img: the truncated schedule, the begin index, add_noise at the first step, then the steps."""
    ours, ref = DPMSolverMultistepScheduler.from_config(SD15_PNDM), RefDPM.from_config(SD15_PNDM)
    timesteps = prepare_timesteps(ours, 10, strength)
    ref.set_timesteps(10)
    t_start = 10 - int(10 * strength)
    ref.set_begin_index(t_start)
    assert torch.equal(timesteps, ref.timesteps[t_start:])
    x0, noise = randn(4), randn(5)
    x = ours.add_noise(x0, noise, timesteps[:1].repeat(2))
    x_ref = ref.add_noise(x0, noise, timesteps[:1].repeat(2))
    assert_near(x, x_ref)
    for k, t in enumerate(timesteps):
        x = ours.step(randn(100 + k), t, x)
        x_ref = ref.step(randn(100 + k), t, x_ref).prev_sample
        assert_near(x, x_ref)
    fresh, ref_fresh = DPMSolverMultistepScheduler(**SD_BETAS), RefDPM(**SD_BETAS)  # no begin index: t looked up
    fresh.set_timesteps(10)
    ref_fresh.set_timesteps(10)
    t = fresh.timesteps[[2, 5]]
    assert_near(fresh.add_noise(x0, noise, t), ref_fresh.add_noise(x0, noise, t))


def test_dpm_config_matches_diffusers():
    """Same options and defaults as diffusers' class; from_config of PIA's and SD1.5's configs agrees."""
    ours, ref = DPMSolverMultistepScheduler(), RefDPM()
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k: ours.config[k] for k in public} == public and set(ours.defaults) == set(public)
    for source in (SD15_PNDM, dict(RefDDIM(**TINY_DDIM).config), cli.SCHEDULER_CONFIG):
        ours, ref = DPMSolverMultistepScheduler.from_config(source), RefDPM.from_config(source)
        for key in ("timestep_spacing", "steps_offset", "beta_schedule", "prediction_type"):
            assert ours.config[key] == ref.config[key], key
        ours.set_timesteps(25)
        ref.set_timesteps(25)
        assert torch.equal(ours.timesteps, ref.timesteps)
    assert DPMSolverMultistepScheduler.from_config(ours.config).config == ours.config
    deis = DPMSolverMultistepScheduler(algorithm_type="deis", solver_type="bh2")  # diffusers maps these
    assert (deis.config["algorithm_type"], deis.config["solver_type"]) == ("dpmsolver++", "midpoint")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(algorithm_type="sde-dpmsolver++"),
        dict(algorithm_type="dpmsolver"),
        dict(solver_order=3),
        dict(use_lu_lambdas=True),
        dict(use_exponential_sigmas=True),
        dict(variance_type="learned_range"),
        dict(lambda_min_clipped=-5.1),
        dict(prediction_type="flow_prediction"),
        dict(timestep_spacing="uniform"),
    ],
)
def test_dpm_unsupported_options(kwargs):
    with pytest.raises(ValueError):
        DPMSolverMultistepScheduler(**kwargs)


def test_dpm_step_needs_set_timesteps():
    with pytest.raises(ValueError, match="set_timesteps"):
        DPMSolverMultistepScheduler().step(randn(0), torch.tensor(999), randn(0))


# ------------------------------------------------------------------------------------------ registry, loop


def test_registry_reaches_loading_and_cli():
    """Every SAMPLERS entry: found by its diffusers `_class_name` (a folder's scheduler_config.json), offered
    by `--scheduler` and built by the CLI with PIA's betas."""
    assert list(SAMPLERS) == ["ddim", "euler", "dpmpp_2m"]
    help_text = " ".join(cli.build_parser().format_help().split())
    for name, cls in SAMPLERS.items():
        assert scheduler_class(cls.__name__) is cls and hasattr(diffusers, cls.__name__)
        assert cli.build_parser().parse_args(["--demo", "--scheduler", name]).scheduler == name and name in help_text
        built = cli.build_scheduler(name)
        assert type(built) is cls and built.config["beta_schedule"] == "linear"
    assert scheduler_class("PNDMScheduler") is None and scheduler_class(None) is None


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_loop_is_stateless_and_reports_x0(name):
    """The loop scales the model input itself (from step_sigmas, as scale_model_input would) and its
    callback carries the model output and each step's x0 (diffusers' pred_original_sample)."""
    cls = SAMPLERS[name]
    ref_cls = getattr(diffusers, cls.__name__)
    ours, ref = cls(**SD_BETAS), ref_cls(**SD_BETAS)
    timesteps = prepare_timesteps(ours, 5, 0.8)
    ref.set_timesteps(5)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(1)
    start = randn(1) * 3
    seen, states = [], []

    def model(x, t):  # a deterministic stand-in for the UNet, recording its input
        seen.append(x)
        return torch.tanh(x) * 0.5 + torch.cos(t.float() / 100)

    x = sample(
        model,
        start,
        timesteps,
        ours.step_with_x0,
        callback=states.append,
        progress=False,
        sigmas=step_sigmas(ours, timesteps),
    )
    x_ref = start
    for k, t in enumerate(timesteps):
        x_in = ref.scale_model_input(x_ref, t)
        assert_near(seen[k], x_in)
        out = ref.step(model(x_in, t), t, x_ref)
        x_ref = out.prev_sample
        assert list(states[k]) == ["i", "t", "x", "model_output", "x0"] and states[k]["i"] == k
        assert_near(states[k]["x"], x_ref)
        if hasattr(out, "pred_original_sample"):  # diffusers' DPM-Solver does not report x0
            assert_near(states[k]["x0"], out.pred_original_sample)
    assert_near(x, x_ref)
    assert (step_sigmas(ours, timesteps) is None) == (not ours.sigma_space)


def test_vp_level():
    """VP samplers: (ᾱ_t, 1); σ-space ones: (1/(σ² + 1), √(σ² + 1))."""
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler):
        s = cls(**SD_BETAS)
        timesteps = prepare_timesteps(s, 10, 0.6)
        alpha_bar, scale = vp_level(s, timesteps[0])
        assert alpha_bar == s.alphas_cumprod[int(timesteps[0])] and scale == 1
    euler = EulerDiscreteScheduler(**SD_BETAS)
    timesteps = prepare_timesteps(euler, 10, 0.6)
    sigma = euler.sigmas[4]
    assert vp_level(euler, timesteps[0]) == (1 / (sigma**2 + 1), (sigma**2 + 1) ** 0.5)


# ------------------------------------------------------------------------------------------ pipeline


def use_dpm(pipes, **kwargs) -> None:
    for pipe, module in zip(pipes, (diffusers, pia_schedulers)):
        pipe.scheduler = module.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **kwargs)


@pytest.mark.parametrize("case", ["plain", "strength", "karras_6_steps"])
def test_dpm_pipeline_matches_diffusers(pipes, case):
    """diffusers' PIAPipeline with DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)."""
    use_dpm(pipes, **(dict(use_karras_sigmas=True) if case == "karras_6_steps" else {}))
    args = {
        "plain": {},
        "strength": dict(strength=0.6, num_inference_steps=5),
        "karras_6_steps": dict(num_inference_steps=6),
    }[case]
    assert_parity(pipes, **args)


def test_dpm_pipeline_free_init(pipes):
    """FreeInit with DPM-Solver++ at strength 1 equals diffusers' (the re-noising level 999 is the first
    timestep of its "linspace" schedule); at strength < 1 it runs, deterministically, and one iteration
    is the plain run."""
    use_dpm(pipes)
    for pipe in pipes:
        pipe.enable_free_init(num_iters=2, use_fast_sampling=True)
    assert_parity(pipes, num_inference_steps=4)
    ours = pipes[1]
    a, b = run(ours, strength=0.6, num_inference_steps=5), run(ours, strength=0.6, num_inference_steps=5)
    assert np.isfinite(a).all() and np.array_equal(a, b)
    ours.disable_free_init()
    plain = run(ours, strength=0.6, num_inference_steps=5)
    ours.enable_free_init(num_iters=1)
    np.testing.assert_allclose(run(ours, strength=0.6, num_inference_steps=5), plain, atol=1e-6, rtol=0)


def test_pipeline_takes_any_registry_sampler(pipes):
    _, ours = pipes
    for name, cls in SAMPLERS.items():
        ours.scheduler = cls.from_config(ours.scheduler.config)
        steps = []
        frames = run(
            ours, num_inference_steps=3, callback_on_step_end=lambda p, i, t, kw, steps=steps: steps.append(i) or {}
        )
        assert np.isfinite(frames).all() and steps == [0, 1, 2], name
