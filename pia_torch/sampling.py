"""Noise schedules, sampler steps and the sampling loop: the math, as plain functions.

The diffusers-compatible scheduler classes that hold a schedule and call these steps live in
schedulers.py. Every function computes in the same order and dtype as diffusers 0.42.1
(`diffusers/schedulers/scheduling_ddim.py`, `scheduling_euler_discrete.py`,
`scheduling_dpmsolver_multistep.py`), so timesteps are equal and step outputs agree to ~1e-7 in fp32.

Notation: T training timesteps, ᾱ_t = alphas_cumprod[t], σ_t = √((1 − ᾱ_t)/ᾱ_t) (EDM/k-diffusion
σ-space: x_σ = x0 + σ·ε = z_t/√ᾱ_t for the variance-preserving z_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε).
A sampler works either on VP latents z_t (DDIM, DPM-Solver++) or on σ-space latents x_σ (Euler).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

if TYPE_CHECKING:
    from pia_torch.schedulers import SchedulerBase

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None  # one, one per batch row, or none


# ---------------------------------------------------------------------------------------------
# Randomness


def randn_tensor(
    shape: Sequence[int],
    generator: GeneratorArg = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise drawn exactly like diffusers' `utils/torch_utils.py::randn_tensor`.

    A CPU generator draws on the CPU and the result is moved to `device`; a list of generators draws
    row b of the batch with generator b (a list of one is a single generator). The draw happens in
    `dtype`: on the CPU an fp16 draw equals a cast fp32 draw but advances the generator differently.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    rand_device = device
    if gens[0] is not None and gens[0].device.type != device.type:
        if gens[0].device.type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a {gens[0].device.type} generator")
        rand_device = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(tuple(shape), generator=gens[0], device=rand_device, dtype=dtype).to(device)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in gens]
    return torch.cat(rows).to(device)


# ---------------------------------------------------------------------------------------------
# Schedules (the `__init__` / `set_timesteps` of diffusers' DDIM, Euler and DPM-Solver schedulers)


def make_betas(
    schedule: str,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas: Sequence[float] | None = None,
) -> Tensor:
    """Training β_t, float32 (T,). "linear": torch linspace; "scaled_linear": linspace of √β, squared
    (LDM's "linear"); "squaredcos_cap_v2": Nichol & Dhariwal 2021 eq. 17, capped at 0.999."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float32
        )
    raise ValueError(f"unknown beta_schedule {schedule!r}: use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so that ᾱ_{T−1} = 0 while ᾱ_0 is kept."""
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * (s0 / (s0 - s_last))
    alpha_bar = s**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s), a float32 cumprod (a float64 one differs by ~1e-6 relative)."""
    return torch.cumprod(1.0 - betas, dim=0)


def _spaced_timesteps(n: int, T: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Descending float64 timesteps; "linspace" values are left unrounded (Euler keeps them)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":  # steps_offset only applies here, as in diffusers
        return (np.arange(n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}: use 'leading', 'trailing' or 'linspace'")


def ddim_timesteps(n: int, T: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """int64 timesteps of `DDIMScheduler.set_timesteps` (Lin et al. 2023, table 2 spacings)."""
    return torch.from_numpy(_spaced_timesteps(n, T, spacing, steps_offset)).round().long()


def euler_timesteps(n: int, T: int, spacing: str = "linspace", steps_offset: int = 0) -> Tensor:
    """float32 timesteps of `EulerDiscreteScheduler.set_timesteps` (linspace ones are fractional)."""
    return torch.from_numpy(_spaced_timesteps(n, T, spacing, steps_offset)).float()


def dpm_timesteps(n: int, T: int, spacing: str = "linspace", steps_offset: int = 0) -> Tensor:
    """int64 timesteps of `DPMSolverMultistepScheduler.set_timesteps`: "linspace" and "leading" space
    n + 1 points and drop the last (t = 0 or steps_offset); "trailing" is DDIM's."""
    if spacing == "trailing":
        return ddim_timesteps(n, T, spacing, steps_offset)
    return torch.from_numpy(_spaced_timesteps(n + 1, T, spacing, steps_offset)[:-1]).round().long()


def train_sigmas(alpha_bar: Tensor) -> Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0..T−1, float32."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each σ: linear interpolation in log σ between the bracketing training
    timesteps (diffusers `EulerDiscreteScheduler._sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    above = (log_sigma - log_train_sigmas[:, None]) >= 0  # (T, n)
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n σ from sigma_max down to sigma_min, evenly spaced in σ^(1/ρ) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def euler_sigmas(
    alpha_bar: Tensor,
    timesteps: Tensor,
    *,
    interpolation: str = "linear",
    karras: bool = False,
    exponential: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
) -> tuple[Tensor, Tensor]:
    """(timesteps, sigmas) of `EulerDiscreteScheduler.set_timesteps`, float32; sigmas has the final
    σ (0, or σ_0 for "sigma_min") appended.

    "linear": σ interpolated linearly over t (np.interp, float64). "log_linear": n+1 log-spaced σ from
    σ_{T−1} to σ_0. Karras et al. 2022 eq. 5 (ρ = 7) or exponential spacing replace the σ and map them
    back to fractional timesteps.
    """
    train = train_sigmas(alpha_bar).numpy()
    ts = timesteps.numpy()
    n = len(ts)
    if interpolation == "linear":
        sigmas = np.interp(ts, np.arange(len(train)), train)
    elif interpolation == "log_linear":
        sigmas = torch.linspace(float(np.log(train[-1])), float(np.log(train[0])), n + 1).exp().numpy()
    else:
        raise ValueError(f"unknown interpolation_type {interpolation!r}: use 'linear' or 'log_linear'")
    if karras or exponential:
        lo = sigma_min if sigma_min is not None else float(sigmas[-1])
        hi = sigma_max if sigma_max is not None else float(sigmas[0])
        if karras:
            sigmas = karras_sigmas(lo, hi, n)
        else:
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
        ts = sigma_to_t(sigmas, np.log(train))
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r}: use 'zero' or 'sigma_min'")
    last = float(train[0]) if final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return torch.from_numpy(ts.astype(np.float32)), torch.from_numpy(sigmas)


def dpm_sigmas(
    alpha_bar: Tensor,
    timesteps: Tensor,
    n: int,
    *,
    karras: bool = False,
    round_timesteps: bool = True,
    final_sigmas_type: str = "zero",
) -> tuple[Tensor, Tensor]:
    """(int64 timesteps, float32 sigmas with the final σ appended) of `DPMSolverMultistepScheduler.set_timesteps`
    for n steps: σ interpolated at the timesteps, or n Karras σ over the whole training range (whatever
    the spacing) mapped back to timesteps, rounded unless `round_timesteps` is off (diffusers does so for
    squaredcos_cap_v2), then truncated to int64."""
    train = train_sigmas(alpha_bar).numpy()
    ts = timesteps.numpy()
    if karras:
        sigmas = karras_sigmas(float(train[0]), float(train[-1]), n)
        ts = sigma_to_t(sigmas, np.log(train))
        ts = ts.round() if round_timesteps else ts
    else:
        sigmas = np.interp(ts, np.arange(len(train)), train)
    last = float(train[0]) if final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return torch.from_numpy(ts.astype(np.int64)), torch.from_numpy(sigmas)


# ---------------------------------------------------------------------------------------------
# Steps: each returns (x at the next timestep, the predicted clean latent x0)


def q_sample(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Forward diffusion z_t = √ᾱ·x0 + √(1 − ᾱ)·ε (Ho et al. 2020 eq. 4), in x0's dtype.

    ᾱ is 0-d or (b,); like diffusers' `add_noise` it is flattened and padded with trailing unit
    axes up to x0's rank (so a (b,) ᾱ pairs with the leading axis of x0, whatever x0's rank).
    """
    a = alpha_bar.to(device=x0.device, dtype=x0.dtype).flatten()
    a = a.reshape(*a.shape, *([1] * (x0.ndim - 1)))
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Saharia et al. 2022 (Imagen) dynamic thresholding: per sample, s = quantile(|x0|, ratio)
    clamped to [1, max_value]; x0 → clamp(x0, −s, s)/s. Computed in fp32 for half inputs."""
    dtype, shape = x0.dtype, x0.shape
    flat = x0.reshape(shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)


def _bad_prediction_type(prediction_type: str) -> ValueError:
    return ValueError(f"unknown prediction_type {prediction_type!r}: use 'epsilon', 'sample' or 'v_prediction'")


def ddim_step(
    x: Tensor,
    model_output: Tensor,
    a_t: Tensor,
    a_prev: Tensor,
    eta: float = 0.0,
    noise: Tensor | None = None,
    *,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    threshold: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM update x_t → x_{t_prev} (Song et al. 2021 eq. 12), `DDIMScheduler.step`.

    model_output is ε, x0 ("sample") or v ("v_prediction", Salimans & Ho 2022). a_t, a_prev are ᾱ at t
    and at the previous timestep (0-d tensors). x0 is clipped to ±clip_sample_range if given, or
    dynamically thresholded with threshold = (ratio, max_value). eta > 0 adds σ_t·noise.
    """
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0 = (x - b_t**0.5 * model_output) / a_t**0.5
        eps = model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - a_t**0.5 * x0) / b_t**0.5
    elif prediction_type == "v_prediction":
        x0 = a_t**0.5 * x - b_t**0.5 * model_output
        eps = a_t**0.5 * model_output + b_t**0.5 * x
    else:
        raise _bad_prediction_type(prediction_type)
    if threshold is not None:
        x0 = dynamic_threshold(x0, *threshold)
    elif clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    # eq. 16: σ_t² = (1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev), scaled by eta
    std = eta * (((1 - a_prev) / b_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        x_prev = x_prev + std * noise
    return x_prev, x0


def euler_step(
    x: Tensor,
    model_output: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    prediction_type: str = "epsilon",
    gamma: float = 0.0,
    noise: Tensor | None = None,
    s_noise: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One Euler step of the probability-flow ODE in σ-space (Karras et al. 2022, Algorithm 2 without
    the Heun correction), `EulerDiscreteScheduler.step`.

    Computes in fp32; x_next has model_output's dtype, x0 stays fp32. gamma > 0 first raises the noise
    level to σ̂ = σ(1 + γ) with fresh `noise` ("churn"). Order as diffusers: x0 first, then
    d = (x − x0)/σ̂, then x + d·(σ_next − σ̂) (x + ε·(σ_next − σ) is equal in exact arithmetic, not in fp32).
    """
    out_dtype = model_output.dtype
    x = x.to(torch.float32)
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        if noise is None:
            raise ValueError("euler_step with gamma > 0 needs `noise`")
        x = x + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    if prediction_type in ("sample", "original_sample"):
        x0 = model_output
    elif prediction_type == "epsilon":
        x0 = x - sigma_hat * model_output
    elif prediction_type == "v_prediction":
        x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
        raise _bad_prediction_type(prediction_type)
    d = (x - x0) / sigma_hat
    return (x + d * (sigma_next - sigma_hat)).to(out_dtype), x0


def vp_alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """σ-space σ → the VP pair (α_t, σ_t) = (1/√(σ² + 1), σ/√(σ² + 1)), so that z_t = α_t·x0 + σ_t·ε."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def dpmpp_2m_step(
    x: Tensor,
    model_output: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    sigma_prev: Tensor | None = None,
    x0_prev: Tensor | None = None,
    *,
    prediction_type: str = "epsilon",
    threshold: tuple[float, float] | None = None,
    solver_type: str = "midpoint",
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) step on VP latents (Lu et al. 2022, "DPM-Solver++", Algorithm 2), as
    `DPMSolverMultistepScheduler.step` with algorithm_type="dpmsolver++".

    σ are σ-space levels of this, the next and the previous step; λ = log(α_t/σ_t), h = λ_next − λ.
    First order (= DDIM) when x0_prev is None: x_next = (σ_next/σ)·x − α_next·(e^−h − 1)·x0. Otherwise
    the multistep correction D1 = (x0 − x0_prev)·h/h_prev, weighted ½ ("midpoint") or by
    (e^−h − 1)/h + 1 ("heun"). Computes in fp32 and returns x0's dtype, as diffusers.
    """
    alpha, sigma_t = vp_alpha_sigma(sigma)
    if prediction_type == "epsilon":
        x0 = (x - sigma_t * model_output) / alpha
    elif prediction_type == "sample":
        x0 = model_output
    elif prediction_type == "v_prediction":
        x0 = alpha * x - sigma_t * model_output
    else:
        raise _bad_prediction_type(prediction_type)
    if threshold is not None:
        x0 = dynamic_threshold(x0, *threshold)
    x = x.to(torch.float32)
    alpha_next, sigma_next_t = vp_alpha_sigma(sigma_next)
    lam, lam_next = torch.log(alpha) - torch.log(sigma_t), torch.log(alpha_next) - torch.log(sigma_next_t)
    h = lam_next - lam
    x_next = (sigma_next_t / sigma_t) * x - (alpha_next * (torch.exp(-h) - 1.0)) * x0
    if x0_prev is not None:
        alpha_prev, sigma_prev_t = vp_alpha_sigma(sigma_prev)
        r = (lam - (torch.log(alpha_prev) - torch.log(sigma_prev_t))) / h
        d1 = (1.0 / r) * (x0 - x0_prev)
        if solver_type == "midpoint":
            x_next = x_next - 0.5 * (alpha_next * (torch.exp(-h) - 1.0)) * d1
        else:  # "heun"
            x_next = x_next + (alpha_next * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
    return x_next.to(x0.dtype), x0


# ---------------------------------------------------------------------------------------------
# A run: timesteps for a strength, the σ the model input is scaled by, and the loop


def prepare_timesteps(
    scheduler: "SchedulerBase",
    num_inference_steps: int,
    strength: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """The schedule of an img2img run (diffusers' `get_timesteps`): set N steps, skip the first
    N − int(N·strength) of them, and tell the scheduler where the run begins."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} leaves no step of {num_inference_steps}: raise either")
    scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def step_sigmas(scheduler: "SchedulerBase", timesteps: Tensor) -> Tensor | None:
    """σ of each of `timesteps` (consecutive steps of the scheduler's current schedule, starting at its
    begin index if set) for a σ-space sampler; None for one on VP latents (its model input is unscaled)."""
    if not scheduler.sigma_space:
        return None
    begin = scheduler.begin_index
    begin = scheduler.index_for_timestep(timesteps[0]) if begin is None else begin
    return scheduler.sigmas[begin : begin + len(timesteps)]


def sample(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    timesteps: Tensor,
    step: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
    callback: Callable[[dict[str, Any]], Mapping[str, Any] | None] | None = None,
    progress: bool = True,
    *,
    sigmas: Tensor | None = None,
) -> Tensor:
    """The sampling loop (k-diffusion style). For step i at timestep t:

        model_output = denoise(x_in, t)     x_in = x, or x/√(σ_i² + 1) for σ-space latents (EDM's c_in)
        x, x0 = step(model_output, t, x)

    `denoise` is the stateless model closure (conditioning, CFG): it gets the model's input as it is.
    `step` is e.g. `scheduler.step_with_x0`; `sigmas` comes from `step_sigmas` (None: x_in = x).
    After each step `callback({"i", "t", "x", "model_output", "x0"})` is called if given ("x" is the
    new latent, "x0" the step's predicted clean latent); if it returns a mapping with an "x" entry,
    that tensor replaces x for the following steps. Returns the final x.
    """
    for i, t in enumerate(tqdm(timesteps, disable=not progress)):
        x_in = x if sigmas is None else x / ((sigmas[i] ** 2 + 1) ** 0.5)
        model_output = denoise(x_in, t)
        x, x0 = step(model_output, t, x)
        if callback is not None:
            out = callback({"i": i, "t": t, "x": x, "model_output": model_output, "x0": x0})
            if out is not None and "x" in out:
                x = out["x"]
    return x
