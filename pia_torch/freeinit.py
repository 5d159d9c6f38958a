"""FreeInit (Wu et al. 2023): re-run sampling from noise whose low frequencies come from the last result.

An outer loop around `sampling.sample`, mirroring diffusers 0.42.1 `pipelines/free_init_utils.py`
(`FreeInitMixin`), with three deliberate fixes: the strength is kept in every pass, the
re-diffusion uses the training noise schedule (diffusers' Euler `add_noise` raises IndexError
there), and the re-initialised latents are put on the sampler's own input scale (Euler's σ-space).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pia_torch.sampling import GeneratorArg, prepare_timesteps, q_sample, randn_tensor, step_sigmas
from pia_torch.schedulers import SchedulerBase

METHODS = ("butterworth", "gaussian", "ideal", "box")


def low_pass_filter(
    shape: Sequence[int],
    method: str = "butterworth",
    *,
    order: int = 4,
    spatial_stop_frequency: float = 0.25,
    temporal_stop_frequency: float = 0.25,
) -> Tensor:
    """Low-pass filter over the last three axes (f, h, w) of `shape`, float32 (f, h, w), laid out like an
    fftshift-ed spectrum (index n//2 is frequency 0); it broadcasts against (b, c, f, h, w).

    Normalised frequency of index i on an axis of n: 2i/n − 1, in [−1, 1). With d_s, d_t the spatial
    and temporal stop frequencies and d² = (d_s/d_t · ν_f)² + ν_h² + ν_w²
    (diffusers' `_get_free_init_freq_filter`):
      butterworth  1 / (1 + (d²/d_s²)^order)
      gaussian     exp(−d² / (2 d_s²))
      ideal        1 if d² ≤ 2·d_s else 0   (diffusers compares d² with 2·d_s, not d_s²; kept to match)
      box          1 if |ν_f| ≤ d_t, |ν_h| ≤ d_s and |ν_w| ≤ d_s else 0   (separable; not in diffusers)
    A stop frequency of 0 gives the all-zero filter (everything from the fresh noise), as in diffusers.
    """
    if method not in METHODS:
        raise ValueError(f"unknown FreeInit method {method!r}: use one of {METHODS}")
    if order < 1:
        raise ValueError(f"FreeInit filter order must be >= 1, got {order!r}")
    for name, value in (("spatial", spatial_stop_frequency), ("temporal", temporal_stop_frequency)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}_stop_frequency must be in [0, 1], got {value!r}")
    f, h, w = shape[-3:]
    d_s, d_t = spatial_stop_frequency, temporal_stop_frequency
    if d_s == 0 or d_t == 0:
        return torch.zeros(f, h, w)

    def freq(n: int) -> Tensor:  # float64, like diffusers' Python floats
        return 2 * torch.arange(n, dtype=torch.float64) / n - 1

    nu_f, nu_h, nu_w = freq(f)[:, None, None], freq(h)[None, :, None], freq(w)[None, None, :]
    if method == "box":
        mask = (nu_f.abs() <= d_t) & (nu_h.abs() <= d_s) & (nu_w.abs() <= d_s)
        return mask.float()
    d2 = (d_s / d_t * nu_f) ** 2 + nu_h**2 + nu_w**2  # (f, h, w)
    if method == "butterworth":
        mask = 1 / (1 + (d2 / d_s**2) ** order)
    elif method == "gaussian":
        mask = torch.exp(-1 / (2 * d_s**2) * d2)
    else:
        mask = (d2 <= d_s * 2).double()
    return mask.float()


def mix_frequencies(z_t: Tensor, z_rand: Tensor, lpf: Tensor) -> Tensor:
    """Low frequencies of z_t, high frequencies of z_rand: a 3-D FFT over (f, h, w) per batch row and
    channel, X·LPF + N·(1 − LPF), inverse FFT, real part (diffusers' `_apply_freq_filter`)."""
    dims = (-3, -2, -1)
    x = torch.fft.fftshift(torch.fft.fftn(z_t, dim=dims), dim=dims)
    n = torch.fft.fftshift(torch.fft.fftn(z_rand, dim=dims), dim=dims)
    mixed = x * lpf + n * (1 - lpf)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real


def fast_sampling_steps(num_inference_steps: int, num_iters: int, i: int) -> int:
    """Coarse-to-fine step count of pass i: max(1, int(N/num_iters·(i + 1))) (e.g. 3, 6, 10 for N = 10)."""
    return max(1, int(num_inference_steps / num_iters * (i + 1)))


def pass_steps(
    num_inference_steps: int, i: int, *, num_iters: int = 3, use_fast_sampling: bool = False, strength: float = 1.0
) -> int:
    """The schedule length (before the strength cut) of FreeInit pass i: N, or the fast-sampling count,
    raised where needed so that strength still keeps at least one step (int(n·strength) ≥ 1)."""
    n = fast_sampling_steps(num_inference_steps, num_iters, i) if use_fast_sampling else num_inference_steps
    while int(n * strength) < 1 and n < num_inference_steps:
        n += 1
    return n


def vp_level(scheduler: SchedulerBase, t: Tensor) -> tuple[Tensor, Tensor]:
    """(ᾱ, s) at the timestep t of the scheduler's current schedule: its latents there are s·z_t, with
    z_t = √ᾱ·x0 + √(1 − ᾱ)·ε variance-preserving. VP samplers (DDIM, DPM-Solver++): (ᾱ_t, 1). σ-space
    samplers (Euler, latents x0 + σ·ε = √(σ² + 1)·z_t): (1/(σ² + 1), √(σ² + 1)) with σ the step's level."""
    sigmas = step_sigmas(scheduler, t.reshape(1))
    if sigmas is None:
        return scheduler.alphas_cumprod[int(t)], torch.tensor(1.0)
    return 1 / (sigmas[0] ** 2 + 1), (sigmas[0] ** 2 + 1) ** 0.5


def free_init(
    run_pass: Callable[[Tensor, Tensor], Tensor],
    start: Callable[[Tensor], Tensor],
    noise: Tensor,
    scheduler: SchedulerBase,
    num_inference_steps: int,
    strength: float = 1.0,
    *,
    num_iters: int = 3,
    use_fast_sampling: bool = False,
    method: str = "butterworth",
    order: int = 4,
    spatial_stop_frequency: float = 0.25,
    temporal_stop_frequency: float = 0.25,
    generator: GeneratorArg = None,
    device: torch.device | str | None = None,
    reschedule: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The whole denoising: `num_iters` sampling passes, each after the first restarting from
    re-initialised noise (num_iters = 1 is a plain run).

    run_pass(latents, timesteps) -> denoised latents runs one whole sampling pass (it calls `sample`).
    start(timesteps) -> pass 0's starting latents (b, c, f, h, w) for pass 0's schedule, on the
      sampler's input scale: init_noise_sigma·ε at strength 1, the image noised to timesteps[0] below.
    noise: the unit-variance ε those latents are made from (the raw randn draw at strength 1, the
      strength noise at strength < 1).

    Pass i runs `prepare_timesteps(scheduler, N_i, strength)` with N_i = `pass_steps(N, i, ...)` (with
    fast sampling, fewer than N before the last pass). Pass i ≥ 1 re-initialises from x0 = the last output:
      1. level: ᾱ = ᾱ_{T−1} and s = init_noise_sigma at strength 1 (the start was pure noise;
         diffusers' choice), else (ᾱ, s) = vp_level(scheduler, t0) at the pass's first timestep t0;
         s takes a variance-preserving latent to the sampler's input scale (1 for DDIM,
         √(σ_t0² + 1) for Euler, whose latents are x0 + σ·ε = z_t/√ᾱ).
      2. z_t = √ᾱ·x0 + √(1 − ᾱ)·ε  (re-diffuse the result with the *same* ε, in latents' dtype → fp32);
      3. z_rand ~ N(0, I) from `generator` (fp32, shape of latents), then `reschedule(z_rand)` if given
         (long videos: FreeNoise's frame shuffling, long_video.freenoise);
      4. latents = s · mix_frequencies(z_t, z_rand, LPF), cast to pass 0's dtype.
    For DDIM at strength 1 this is exactly diffusers' `_apply_free_init`. Returns the last pass's output.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters!r}")
    device = noise.device if device is None else device
    T = scheduler.num_train_timesteps
    lpf = None
    if num_iters > 1:
        lpf = low_pass_filter(
            noise.shape,
            method,
            order=order,
            spatial_stop_frequency=spatial_stop_frequency,
            temporal_stop_frequency=temporal_stop_frequency,
        ).to(noise.device)
    for i in range(num_iters):
        steps = pass_steps(
            num_inference_steps, i, num_iters=num_iters, use_fast_sampling=use_fast_sampling, strength=strength
        )
        timesteps = prepare_timesteps(scheduler, steps, strength, device)
        if i == 0:
            latents = start(timesteps)
            dtype = latents.dtype
        else:
            if strength == 1:
                alpha_bar, scale = scheduler.alphas_cumprod[T - 1], scheduler.init_noise_sigma
            else:
                alpha_bar, scale = vp_level(scheduler, timesteps[0])
            z_t = q_sample(latents, noise, alpha_bar).to(torch.float32)
            z_rand = randn_tensor(latents.shape, generator, device, torch.float32)
            if reschedule is not None:
                z_rand = reschedule(z_rand)
            latents = (mix_frequencies(z_t, z_rand, lpf) * scale).to(dtype)
        latents = run_pass(latents, timesteps)
    return latents
