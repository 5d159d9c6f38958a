"""Noise schedules, DDIM and Euler steps, and the sampling loop.

Everything numeric is a plain function; `DDIMScheduler` and `EulerDiscreteScheduler` are thin
classes over them that keep diffusers' API (config dicts, `set_timesteps`, `step`, ...) so the PIA
documentation examples run unchanged. Every function computes in the same order and dtype as
diffusers 0.42.1 (`schedulers/scheduling_ddim.py`, `schedulers/scheduling_euler_discrete.py`), so
timesteps are equal and step outputs agree to ~1e-7 in fp32.

Notation: T training timesteps, ᾱ_t = alphas_cumprod[t], σ_t = √((1 − ᾱ_t)/ᾱ_t) (EDM/k-diffusion
σ-space: x_σ = x0 + σ·ε = z_t/√ᾱ_t for the variance-preserving z_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε).
"""

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

Generator = torch.Generator | Sequence[torch.Generator] | None


# ---------------------------------------------------------------------------------------------
# Randomness


def randn_tensor(shape: Sequence[int], generator: Generator = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> Tensor:
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
# Schedules (diffusers `DDIMScheduler.__init__` / `set_timesteps`, `EulerDiscreteScheduler` likewise)


def make_betas(schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int,
               trained_betas: Sequence[float] | None = None) -> Tensor:
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
        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                            dtype=torch.float32)
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


def train_sigmas(alpha_bar: Tensor) -> Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0..T−1, float32."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each σ: linear interpolation in log σ between the bracketing training
    timesteps (diffusers `EulerDiscreteScheduler._sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    above = (log_sigma - log_train_sigmas[:, None]) >= 0                 # (T, n)
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def euler_sigmas(alpha_bar: Tensor, timesteps: Tensor, *, interpolation: str = "linear", karras: bool = False,
                 exponential: bool = False, sigma_min: float | None = None, sigma_max: float | None = None,
                 final_sigmas_type: str = "zero") -> tuple[Tensor, Tensor]:
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
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        else:
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
        ts = sigma_to_t(sigmas, np.log(train))
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r}: use 'zero' or 'sigma_min'")
    last = float(train[0]) if final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return torch.from_numpy(ts.astype(np.float32)), torch.from_numpy(sigmas)


# ---------------------------------------------------------------------------------------------
# Steps


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


def ddim_step(x: Tensor, eps: Tensor, a_t: Tensor, a_prev: Tensor, eta: float = 0.0, noise: Tensor | None = None, *,
              prediction_type: str = "epsilon", clip_sample_range: float | None = None,
              threshold: tuple[float, float] | None = None) -> Tensor:
    """One DDIM update x_t → x_{t_prev} (Song et al. 2021 eq. 12), `DDIMScheduler.step`.

    eps is the model output: ε, x0 ("sample") or v ("v_prediction", Salimans & Ho 2022). a_t, a_prev are
    ᾱ at t and at the previous timestep (0-d tensors). x0 is clipped to ±clip_sample_range if given,
    or dynamically thresholded with threshold = (ratio, max_value). eta > 0 adds σ_t·noise.
    """
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0 = (x - b_t**0.5 * eps) / a_t**0.5
        eps_hat = eps
    elif prediction_type == "sample":
        x0 = eps
        eps_hat = (x - a_t**0.5 * x0) / b_t**0.5
    elif prediction_type == "v_prediction":
        x0 = a_t**0.5 * x - b_t**0.5 * eps
        eps_hat = a_t**0.5 * eps + b_t**0.5 * x
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'epsilon', 'sample' or 'v_prediction'")
    if threshold is not None:
        x0 = dynamic_threshold(x0, *threshold)
    elif clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    # eq. 16: σ_t² = (1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev), scaled by eta
    std = eta * (((1 - a_prev) / b_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps_hat
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        x_prev = x_prev + std * noise
    return x_prev


def euler_step(x: Tensor, eps: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, *,
               prediction_type: str = "epsilon", gamma: float = 0.0, noise: Tensor | None = None,
               s_noise: float = 1.0) -> Tensor:
    """One Euler step of the probability-flow ODE in σ-space (Karras et al. 2022, Algorithm 2 without
    the Heun correction), `EulerDiscreteScheduler.step`.

    Computes in fp32 and returns eps's dtype. gamma > 0 first raises the noise level to
    σ̂ = σ(1 + γ) with fresh `noise` ("churn"). Order as diffusers: x0 first, then d = (x − x0)/σ̂,
    then x + d·(σ_next − σ̂) (x + ε·(σ_next − σ) is equal in exact arithmetic, not in fp32).
    """
    out_dtype = eps.dtype
    x = x.to(torch.float32)
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        if noise is None:
            raise ValueError("euler_step with gamma > 0 needs `noise`")
        x = x + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    if prediction_type in ("sample", "original_sample"):
        x0 = eps
    elif prediction_type == "epsilon":
        x0 = x - sigma_hat * eps
    elif prediction_type == "v_prediction":
        x0 = eps * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'epsilon', 'sample' or 'v_prediction'")
    d = (x - x0) / sigma_hat
    return (x + d * (sigma_next - sigma_hat)).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# diffusers-style scheduler classes


DDIM_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
    rescale_betas_zero_snr=False,
))

EULER_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
    steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero",
))


def _make_config(class_name: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The config dict: every option, plus diffusers' `_use_default_values` (the options not given).

    Keeping "absent" apart from "given with the default value" matters: `from_config` lets the
    target class's own default win for absent options (e.g. Euler's "linspace" spacing).
    """
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"{class_name} got unknown options {unknown}")
    config = {"_class_name": class_name, **defaults, **kwargs}
    if config["trained_betas"] is not None:
        config["trained_betas"] = [float(b) for b in config["trained_betas"]]
    absent = sorted(set(defaults) - set(kwargs))
    if absent:
        config["_use_default_values"] = absent
    return config


def _init_kwargs(defaults: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The options of `config` a class takes: diffusers' `ConfigMixin.extract_init_dict` keeps the keys
    the class accepts, except those listed in `_use_default_values`; all others are ignored."""
    dropped = set(config.get("_use_default_values", ()))
    return {k: v for k, v in config.items() if k in defaults and k not in dropped}


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {choices}")


def _check_steps(n: int, T: int) -> None:
    if not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")


def _at(table: Tensor, t: Tensor) -> Tensor:
    """table[t] for a 0-d index tensor without a host sync (plain indexing calls .item())."""
    return table[t.reshape(1)].reshape(())


class _Options:
    """What both schedulers share: diffusers' config handling (`.config`, `from_config`) and the
    training noise schedule (`num_train_timesteps`, float32 `alphas_cumprod`)."""

    defaults: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, **kwargs: Any) -> None:
        self._config = c = _make_config(type(self).__name__, self.defaults, kwargs)
        betas = make_betas(c["beta_schedule"], c["beta_start"], c["beta_end"], c["num_train_timesteps"],
                           c["trained_betas"])
        if c["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        self.num_train_timesteps: int = c["num_train_timesteps"]
        self.alphas_cumprod = alphas_cumprod(betas)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> Any:
        """Build from any diffusers scheduler config (PNDM, DDIM, Euler, ...); unused keys are ignored."""
        return cls(**{**_init_kwargs(cls.defaults, config), **overrides})

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the options as a plain dict (feed it to either class's `from_config`)."""
        return copy.deepcopy(self._config)


class DDIMScheduler(_Options):
    """DDIM (Song et al. 2021) with diffusers' `DDIMScheduler` interface and options (DDIM_DEFAULTS).

    Not supported: `use_clipped_model_output` and `variance_noise` of diffusers' `step`.
    """

    defaults = DDIM_DEFAULTS
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c = self._config
        _check_choice("prediction_type", c["prediction_type"], ("epsilon", "sample", "v_prediction"))
        _check_choice("timestep_spacing", c["timestep_spacing"], ("leading", "trailing", "linspace"))
        # ᾱ used after the last step: 1 (a clean sample) or ᾱ_0
        self.final_alpha_cumprod = torch.tensor(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)
        self._alphas, self._final = self.alphas_cumprod, self.final_alpha_cumprod

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        c = self._config
        _check_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = ddim_timesteps(num_inference_steps, self.num_train_timesteps, c["timestep_spacing"],
                                        c["steps_offset"]).to(device=device)
        self._alphas = self.alphas_cumprod.to(device=device)  # step() looks ᾱ up on the timesteps' device
        self._final = self.final_alpha_cumprod.to(device=device)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Accepted for API symmetry with Euler; DDIM finds ᾱ from t itself."""

    def scale_model_input(self, x: Tensor, t: Tensor | int | None = None) -> Tensor:
        return x

    def vp_level(self, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """(ᾱ_t, 1): DDIM latents are variance-preserving, so the input scale is 1 (see freeinit.py)."""
        return self.alphas_cumprod[int(t)], torch.tensor(1.0)

    def step(self, eps: Tensor, t: Tensor | int, x: Tensor, *, eta: float = 0.0,
             generator: Generator = None) -> Tensor:
        """x_t → x_{t−T//N}. As in diffusers the previous timestep is t − T//N for every spacing, with N
        the count given to `set_timesteps`; ᾱ_prev is final_alpha_cumprod below 0."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        c = self._config
        t = torch.as_tensor(t, device=self._alphas.device)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = _at(self._alphas, t)
        a_prev = torch.where(prev_t >= 0, _at(self._alphas, prev_t.clamp(min=0)), self._final)
        noise = randn_tensor(eps.shape, generator, eps.device, eps.dtype) if eta > 0 else None
        return ddim_step(
            x, eps, a_t, a_prev, eta, noise, prediction_type=c["prediction_type"],
            clip_sample_range=c["clip_sample_range"] if c["clip_sample"] else None,
            threshold=(c["dynamic_thresholding_ratio"], c["sample_max_value"]) if c["thresholding"] else None,
        )

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """√ᾱ_t·x0 + √(1 − ᾱ_t)·noise, t of shape () or (b,) (diffusers' broadcasting, see q_sample)."""
        alpha_bar = self.alphas_cumprod.to(x0.device)[torch.as_tensor(t, device=x0.device)]
        return q_sample(x0, noise, alpha_bar)


class EulerDiscreteScheduler(_Options):
    """Euler ODE sampler in σ-space (Karras et al. 2022) with diffusers' `EulerDiscreteScheduler`
    interface and options (EULER_DEFAULTS).

    Not supported (ValueError): use_beta_sigmas, timestep_type "continuous" with v_prediction.
    Like diffusers it keeps a step index: `scale_model_input` and `step` use sigmas[index], the index
    starts at the begin index (or at t's position in `timesteps`) and `step` advances it.
    """

    defaults = EULER_DEFAULTS
    order = 1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c = self._config
        _check_choice("prediction_type", c["prediction_type"], ("epsilon", "sample", "original_sample", "v_prediction"))
        _check_choice("timestep_spacing", c["timestep_spacing"], ("linspace", "leading", "trailing"))
        _check_choice("interpolation_type", c["interpolation_type"], ("linear", "log_linear"))
        _check_choice("final_sigmas_type", c["final_sigmas_type"], ("zero", "sigma_min"))
        if c["use_beta_sigmas"]:
            raise ValueError("use_beta_sigmas=True is unsupported")
        if c["use_karras_sigmas"] and c["use_exponential_sigmas"]:
            raise ValueError("use at most one of use_karras_sigmas and use_exponential_sigmas")
        if c["timestep_type"] == "continuous" and c["prediction_type"] == "v_prediction":
            raise ValueError("timestep_type='continuous' with v_prediction is unsupported")
        if c["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24  # keep σ_{T−1} finite
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1).float()
        self.sigmas = torch.cat([train_sigmas(self.alphas_cumprod).flip(0), torch.zeros(1)])
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def init_noise_sigma(self) -> Tensor:
        """Scale of pure-noise starting latents: σ_max, or √(σ_max² + 1) with "leading" spacing."""
        max_sigma = self.sigmas.max()
        if self._config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Sets timesteps (float32, on `device`) and sigmas (float32, kept on the CPU); clears the indices."""
        c = self._config
        _check_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps = euler_timesteps(num_inference_steps, self.num_train_timesteps, c["timestep_spacing"],
                                    c["steps_offset"])
        timesteps, self.sigmas = euler_sigmas(
            self.alphas_cumprod, timesteps, interpolation=c["interpolation_type"], karras=c["use_karras_sigmas"],
            exponential=c["use_exponential_sigmas"], sigma_min=c["sigma_min"], sigma_max=c["sigma_max"],
            final_sigmas_type=c["final_sigmas_type"])
        self.timesteps = timesteps.to(device=device)
        self._step_index = self._begin_index = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, t: Tensor | float) -> int:
        """Position of t in `timesteps` (the second one if t occurs twice, as diffusers). Host sync."""
        hits = (self.timesteps == torch.as_tensor(t).to(self.timesteps.device)).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {t} is not in the current schedule")
        return int(hits[1 if len(hits) > 1 else 0])

    def _index(self, t: Tensor | float) -> int:
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(t)
        return self._step_index

    def scale_model_input(self, x: Tensor, t: Tensor | float) -> Tensor:
        """x/√(σ² + 1): the σ-space latent back to unit variance for the UNet (EDM's c_in)."""
        sigma = self.sigmas[self._index(t)]
        return x / ((sigma**2 + 1) ** 0.5)

    def vp_level(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(ᾱ, √(σ² + 1)) at the schedule's timestep t, with σ = sigmas[index of t] and ᾱ = 1/(σ² + 1):
        Euler's latent at that level is x0 + σ·ε = √(σ² + 1)·z_t (see freeinit.py)."""
        sigma = self.sigmas[self.index_for_timestep(t)]
        return 1 / (sigma**2 + 1), (sigma**2 + 1) ** 0.5

    def step(self, eps: Tensor, t: Tensor | float, x: Tensor, *, eta: float = 0.0, generator: Generator = None,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
             s_noise: float = 1.0) -> Tensor:
        """x at sigmas[i] → sigmas[i+1]. `eta` is accepted for a uniform call and ignored (diffusers' Euler
        has none); `generator` is used only for churn (s_churn > 0)."""
        if isinstance(t, int) or (torch.is_tensor(t) and not torch.is_floating_point(t)):
            raise ValueError(f"Euler step needs a float timestep from `timesteps`, got {t!r}")
        i = self._index(t)
        sigma = self.sigmas[i]
        gamma = 0.0
        if s_churn > 0 and s_tmin <= sigma <= s_tmax:  # host sync, only with churn
            gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1)
        noise = randn_tensor(eps.shape, generator, eps.device, eps.dtype) if gamma > 0 else None
        x_prev = euler_step(x, eps, sigma, self.sigmas[i + 1], prediction_type=self._config["prediction_type"],
                            gamma=gamma, noise=noise, s_noise=s_noise)
        self._step_index = i + 1
        return x_prev

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x0 + σ·noise (σ-space, no √ᾱ factor). σ comes from the step index if set, else the begin index,
        else each t's position in `timesteps` (diffusers' order of precedence)."""
        t = torch.as_tensor(t).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(s) for s in t]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(t)
        sigma = self.sigmas.to(device=x0.device, dtype=x0.dtype)[idx]
        return x0 + noise * sigma.reshape(-1, *([1] * (x0.ndim - 1)))


Scheduler = DDIMScheduler | EulerDiscreteScheduler


# ---------------------------------------------------------------------------------------------
# Timesteps for a strength and the sampling loop


def prepare_timesteps(scheduler: Scheduler, num_inference_steps: int, strength: float = 1.0,
                      device: torch.device | str | None = None) -> Tensor:
    """The schedule of an img2img run (diffusers' `get_timesteps`): set N steps, skip the first
    N − int(N·strength) of them, and tell the scheduler where the run begins."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} leaves no step of {num_inference_steps}: raise either")
    scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def sample(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, timesteps: Tensor,
           step: Callable[[Tensor, Tensor, Tensor], Tensor],
           callback: Callable[[dict[str, Any]], Mapping[str, Any] | None] | None = None,
           progress: bool = True) -> Tensor:
    """The sampling loop (k-diffusion style): for each t, eps = denoise(x, t); x = step(eps, t, x).

    `denoise` is the model closure (input scaling, conditioning, CFG); `step` is e.g. `scheduler.step`.
    After each step `callback({"i": i, "t": t, "x": x})` is called if given; if it returns a mapping
    with an "x" entry, that tensor replaces x for the following steps. Returns the final x.
    """
    for i, t in enumerate(tqdm(timesteps, disable=not progress)):
        x = step(denoise(x, t), t, x)
        if callback is not None:
            out = callback({"i": i, "t": t, "x": x})
            if out is not None and "x" in out:
                x = out["x"]
    return x
