"""pia_torch.freeinit against diffusers 0.42.1 `pipelines/free_init_utils.py` (FreeInitMixin).

Tolerances: filters, frequency mixing and DDIM re-initialised latents within 1e-6 (fp32; DESIGN.md §5,
and both sides run the same FFTs on the same shapes); results of longer chains within rounding
(`conftest.tol`).
Euler + FreeInit has no working diffusers reference (its add_noise raises IndexError or
mis-scales, spec schedulers.md §4.5): it is checked for determinism, finiteness and scale.
"""

import pytest
import torch
from conftest import STEP_TOL, tol
from diffusers import DDIMScheduler as RefDDIM
from diffusers.pipelines.free_init_utils import FreeInitMixin
from diffusers.utils.torch_utils import randn_tensor as ref_randn
from torch.testing import assert_close

from pia_torch.freeinit import fast_sampling_steps, free_init, low_pass_filter, mix_frequencies, pass_steps, vp_level
from pia_torch.sampling import prepare_timesteps, randn_tensor, sample
from pia_torch.schedulers import DDIMScheduler, EulerDiscreteScheduler

TOL = STEP_TOL  # DESIGN.md §5: 1e-6 + 1e-6·|value|
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
DDIM_CFG = dict(SD_BETAS, clip_sample=False, set_alpha_to_one=False)
SHAPE = (2, 4, 4, 8, 8)  # (b, c, f, h, w)


class RefPipe(FreeInitMixin):
    """The smallest object diffusers' FreeInitMixin runs on: it only needs `.scheduler`."""

    def __init__(self, scheduler):
        self.scheduler = scheduler


def ref_filter(shape, method, order, d_s, d_t):
    return FreeInitMixin._get_free_init_freq_filter(
        None,
        shape=(1, 4, *shape),
        device=torch.device("cpu"),
        filter_type=method,
        order=order,
        spatial_stop_frequency=d_s,
        temporal_stop_frequency=d_t,
    )


def model(x, t):
    """Deterministic stand-in for the UNet (an ε-prediction)."""
    return 0.3 * torch.tanh(x) + 0.05 * torch.cos(t.float() / 50)


# ------------------------------------------------------------------------------------------ filters


@pytest.mark.parametrize("freqs", [(0.25, 0.25), (0.4, 0.1), (1.0, 0.6), (0.1, 1.0)])
@pytest.mark.parametrize("shape", [(4, 8, 8), (5, 7, 9), (1, 6, 5), (16, 12, 10)])
@pytest.mark.parametrize("method,order", [("butterworth", 4), ("butterworth", 1), ("gaussian", 4), ("ideal", 4)])
def test_filter_matches_diffusers(method, order, shape, freqs):
    ref = ref_filter(shape, method, order, *freqs)
    ours = low_pass_filter(
        (2, 3, *shape), method, order=order, spatial_stop_frequency=freqs[0], temporal_stop_frequency=freqs[1]
    )
    assert ours.shape == shape and ours.dtype == torch.float32
    assert_close(ours.expand(1, 4, *shape), ref, **TOL)


@pytest.mark.parametrize("freqs", [(0.0, 0.25), (0.25, 0.0)])
def test_zero_stop_frequency_gives_zero_filter(freqs):
    ref = ref_filter((4, 8, 8), "gaussian", 4, *freqs)
    ours = low_pass_filter((4, 8, 8), "gaussian", spatial_stop_frequency=freqs[0], temporal_stop_frequency=freqs[1])
    assert torch.equal(ours.expand_as(ref), ref) and not ours.any()


def test_box_filter():
    """Box (not in diffusers): 1 where |2i/n − 1| ≤ d on every axis (d_t on frames, d_s on h, w)."""
    f, h, w, d_s, d_t = 4, 8, 6, 0.25, 0.5
    expected = torch.zeros(f, h, w)
    for i in range(f):
        for j in range(h):
            for k in range(w):
                inside = abs(2 * i / f - 1) <= d_t and abs(2 * j / h - 1) <= d_s and abs(2 * k / w - 1) <= d_s
                expected[i, j, k] = float(inside)
    ours = low_pass_filter((f, h, w), "box", spatial_stop_frequency=d_s, temporal_stop_frequency=d_t)
    assert torch.equal(ours, expected)
    assert ours[f // 2, h // 2, w // 2] == 1 and ours.sum() == 3 * 3 * 1  # frames 1..3, rows 3..5, column 3


def test_mix_frequencies_matches_diffusers():
    g = torch.Generator().manual_seed(0)
    z_t, z_rand = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    lpf = low_pass_filter(SHAPE, "butterworth")
    ref = FreeInitMixin._apply_freq_filter(None, z_t, z_rand, ref_filter(SHAPE[-3:], "butterworth", 4, 0.25, 0.25))
    mixed = mix_frequencies(z_t, z_rand, lpf)
    assert_close(mixed, ref, **TOL)
    # all-pass keeps z_t, up to the rounding of an FFT and its inverse (each output sums f·h·w values)
    all_pass = mix_frequencies(z_t, z_rand, torch.ones_like(lpf))
    assert_close(all_pass, z_t, **tol(z_t, 2 * lpf.numel()))


# ------------------------------------------------------------------------------------------ DDIM parity


def run_reference(method: str, eta: float, fast: bool, n: int = 10, num_iters: int = 3):
    """diffusers' PIA denoising with FreeInit (pipeline_pia.py's outer loop), recording each pass."""
    ref = RefPipe(RefDDIM(**DDIM_CFG))
    ref.enable_free_init(num_iters=num_iters, use_fast_sampling=fast, method=method)
    g = torch.Generator().manual_seed(0)
    latents = ref_randn(SHAPE, g, torch.device("cpu"), torch.float32) * ref.scheduler.init_noise_sigma
    starts, schedules = [], []
    for it in range(num_iters):
        latents, timesteps = ref._apply_free_init(latents, it, n, torch.device("cpu"), torch.float32, g)
        starts.append(latents.clone())
        schedules.append(timesteps)
        for t in timesteps:
            latents = ref.scheduler.step(model(latents, t), t, latents, eta=eta, generator=g).prev_sample
    return latents, starts, schedules


def run_ours(scheduler, method="butterworth", eta=0.0, fast=False, n=10, num_iters=3, strength=1.0, shape=SHAPE):
    g = torch.Generator().manual_seed(0)
    noise = randn_tensor(shape, g, "cpu", torch.float32)
    starts, schedules = [], []

    def denoise(x, t):
        return model(scheduler.scale_model_input(x, t), t)

    def step(eps, t, x):
        return scheduler.step_with_x0(eps, t, x, eta=eta, generator=g)

    def run_pass(x, timesteps):
        starts.append(x.clone())
        schedules.append(timesteps)
        return sample(denoise, x, timesteps, step, progress=False)

    scheduler.set_timesteps(n)  # init_noise_sigma depends on the schedule (Euler "leading")
    latents = noise * scheduler.init_noise_sigma
    out = free_init(
        run_pass,
        lambda ts: latents,
        noise,
        scheduler,
        n,
        strength,
        num_iters=num_iters,
        use_fast_sampling=fast,
        method=method,
        generator=g,
    )
    return out, starts, schedules


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("method", ["butterworth", "gaussian", "ideal"])
def test_ddim_free_init_matches_diffusers(method, eta, fast):
    """Same generator for everything: the re-initialised latents of each pass, the schedules and the
    final latents equal diffusers' (so the RNG order, z_rand before a pass's step noise, is the same)."""
    ref_out, ref_starts, ref_schedules = run_reference(method, eta, fast)
    out, starts, schedules = run_ours(DDIMScheduler(**DDIM_CFG), method, eta, fast)
    assert [len(s) for s in schedules] == ([3, 6, 10] if fast else [10, 10, 10])
    for ts, ts_ref in zip(schedules, ref_schedules, strict=True):
        assert torch.equal(ts, ts_ref)
    for x, x_ref in zip(starts, ref_starts, strict=True):
        assert_close(x, x_ref, **TOL)
    # every step of every pass (a few elementwise roundings each) and two re-initialisations (FFT + inverse)
    depth = sum(len(s) for s in schedules) + 2 * 2 * SHAPE[-3] * SHAPE[-2] * SHAPE[-1]
    assert_close(out, ref_out, **tol(ref_out, depth))
    assert not torch.equal(starts[1], starts[0])


def test_fast_sampling_steps_match_diffusers_formula():
    assert [fast_sampling_steps(10, 3, i) for i in range(3)] == [3, 6, 10]
    assert [fast_sampling_steps(25, 4, i) for i in range(4)] == [6, 12, 18, 25]
    assert fast_sampling_steps(2, 5, 0) == 1


def test_pass_steps_keep_a_step_under_strength():
    """Fast counts 3, 6, 10 (N = 10); strength 0.2 keeps int(n * 0.2) steps: 3 and 4 keep none, so the
    first pass grows to 5 (one step); later passes and non-fast runs are unchanged."""
    fast = dict(num_iters=3, use_fast_sampling=True)
    assert [pass_steps(10, i, strength=0.2, **fast) for i in range(3)] == [5, 6, 10]
    assert [pass_steps(10, i, strength=1.0, **fast) for i in range(3)] == [3, 6, 10]
    assert pass_steps(10, 0, strength=0.2) == 10


# ------------------------------------------------------------------------------------------ our fixes


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize(
    "make", [lambda: DDIMScheduler(**DDIM_CFG), lambda: EulerDiscreteScheduler(**SD_BETAS)], ids=["ddim", "euler"]
)
def test_one_iteration_is_a_plain_run(make, strength):
    scheduler = make()
    g = torch.Generator().manual_seed(1)
    start = randn_tensor(SHAPE, g) * 3
    timesteps = prepare_timesteps(scheduler, 10, strength)

    def denoise(x, t):
        return model(scheduler.scale_model_input(x, t), t)

    plain = sample(denoise, start, timesteps, scheduler.step_with_x0, progress=False)
    passes = []
    out = free_init(
        lambda x, ts: passes.append(ts) or sample(denoise, x, ts, scheduler.step_with_x0, progress=False),
        lambda ts: start,
        start / 3,
        scheduler,
        10,
        strength,
        num_iters=1,
    )
    assert len(passes) == 1 and torch.equal(passes[0], timesteps)
    assert torch.equal(out, plain)


def test_strength_is_kept_in_every_pass():
    """diffusers replaces the truncated schedule by a fresh full one of N − t_start steps
    ([800, 600, ...]); pia_torch keeps [400, 300, 200, 100, 0] in every pass."""
    _, _, schedules = run_ours(DDIMScheduler(), strength=0.5)
    assert [s.tolist() for s in schedules] == [[400, 300, 200, 100, 0]] * 3


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_free_init_runs_deterministic_and_scaled(spacing):
    """Re-initialised latents have the std of Euler's own start, init_noise_sigma·randn (14.6 with
    "linspace", 6.0 with "leading" at 6 steps), not the unit std diffusers leaves them at."""
    scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing=spacing)
    shape = (1, 4, 8, 16, 16)
    out_a, starts_a, _ = run_ours(scheduler, n=6, shape=shape)
    out_b, starts_b, _ = run_ours(EulerDiscreteScheduler(**SD_BETAS, timestep_spacing=spacing), n=6, shape=shape)
    assert torch.equal(out_a, out_b) and torch.isfinite(out_a).all()
    assert not torch.equal(starts_a[1], starts_a[0])
    start_std = float(scheduler.init_noise_sigma)  # population std of Euler's start
    for x in starts_a:
        assert abs(float(x.std()) / start_std - 1) < 0.05


@pytest.mark.parametrize("karras", [False, True])
def test_euler_renoise_scale_at_strength_below_one(karras):
    """vp_level: √(σ² + 1)·(√ᾱ·x0 + √(1 − ᾱ)·ε) equals Euler's own noising x0 + σ·ε at the pass start."""
    scheduler = EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=karras)
    timesteps = prepare_timesteps(scheduler, 25, 0.6)
    g = torch.Generator().manual_seed(2)
    x0, eps = randn_tensor(SHAPE, g), randn_tensor(SHAPE, g)
    alpha_bar, scale = vp_level(scheduler, timesteps[0])
    vp = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps
    want = scheduler.add_noise(x0, eps, timesteps[:1])
    # two elementwise formulas of about a dozen roundings (≤ ½ ulp each) at the scale of |x0| + σ·|ε|
    assert_close(scale * vp, want, **tol(x0.abs() + (want - x0).abs(), ulps=8))
    assert scale > 1.5


def test_euler_free_init_strength_below_one_runs():
    out_a, starts, schedules = run_ours(EulerDiscreteScheduler(**SD_BETAS), strength=0.6, n=10)
    out_b, _, _ = run_ours(EulerDiscreteScheduler(**SD_BETAS), strength=0.6, n=10)
    assert torch.equal(out_a, out_b) and torch.isfinite(out_a).all()
    assert [len(s) for s in schedules] == [6, 6, 6]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(method="lowpass"), "lowpass"),
        (dict(order=0), "order"),
        (dict(spatial_stop_frequency=1.5), "1.5"),
        (dict(temporal_stop_frequency=-0.1), "-0.1"),
    ],
)
def test_bad_filter_arguments(kwargs, named):
    with pytest.raises(ValueError, match=named):
        low_pass_filter((4, 8, 8), **kwargs)


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(num_iters=0), "num_iters"),
        (dict(strength=0.0), "strength"),
        (dict(strength=1.5), "strength"),
        (dict(method="box2"), "box2"),
    ],
)
def test_bad_free_init_arguments(kwargs, named):
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=named):
        free_init(lambda x, ts: x, lambda ts: x, x, DDIMScheduler(), 10, **kwargs)
