"""diffusers-compatible scheduler classes over the step functions of sampling.py, and their registry.

Each class keeps diffusers 0.42.1's API (config dicts, `from_config`, `set_timesteps`, `step`,
`scale_model_input`, `add_noise`) so the PIA documentation examples run unchanged, and holds the state
a run needs (the schedule, Euler's step index, DPM-Solver's previous x0). The model call does not
touch them: `sampling.sample` scales the model input itself from `step_sigmas`.

Adding a sampler: its step as a pure function in sampling.py, a class here (diffusers' config
defaults, `set_timesteps`, `step_with_x0`; set `sigma_space` if its latents are x0 + σ·ε), and one
line in SAMPLERS. The pipeline, FreeInit and the CLI's `--scheduler` pick it up from there.
"""

import copy
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pia_torch.sampling import (
    GeneratorArg,
    alphas_cumprod,
    ddim_step,
    ddim_timesteps,
    dpm_sigmas,
    dpm_timesteps,
    dpmpp_2m_step,
    euler_sigmas,
    euler_step,
    euler_timesteps,
    make_betas,
    q_sample,
    randn_tensor,
    rescale_zero_terminal_snr,
    train_sigmas,
    vp_alpha_sigma,
)

BETAS: Mapping[str, Any] = MappingProxyType(
    dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
    )
)
DDIM_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(
        **BETAS,
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0,
        sample_max_value=1.0,
        timestep_spacing="leading",
        rescale_betas_zero_snr=False,
    )
)
EULER_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(
        **BETAS,
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        timestep_spacing="linspace",
        timestep_type="discrete",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    )
)
DPM_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(
        **BETAS,
        solver_order=2,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        final_sigmas_type="zero",
        lambda_min_clipped=-math.inf,
        variance_type=None,
        timestep_spacing="linspace",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        use_dynamic_shifting=False,
        time_shift_type="exponential",
    )
)


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


class SchedulerBase:
    """What every scheduler shares: diffusers' config handling (`.config`, `from_config`), the training
    noise schedule (`num_train_timesteps`, float32 `alphas_cumprod`) and the step / begin index."""

    defaults: Mapping[str, Any] = MappingProxyType({})
    order = 1
    init_noise_sigma: Any = 1.0
    sigma_space = False  # latents are x0 + σ·ε (model input x/√(σ² + 1)), not VP √ᾱ·x0 + √(1 − ᾱ)·ε
    sigmas: Tensor

    def __init__(self, **kwargs: Any) -> None:
        self._config = c = _make_config(type(self).__name__, self.defaults, kwargs)
        betas = make_betas(
            c["beta_schedule"], c["beta_start"], c["beta_end"], c["num_train_timesteps"], c["trained_betas"]
        )
        if c["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        self.num_train_timesteps: int = c["num_train_timesteps"]
        self.alphas_cumprod = alphas_cumprod(betas)
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> Any:
        """Build from any diffusers scheduler config (PNDM, DDIM, Euler, ...); unused keys are ignored."""
        return cls(**{**_init_kwargs(cls.defaults, config), **overrides})

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the options as a plain dict (feed it to any class's `from_config`)."""
        return copy.deepcopy(self._config)

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where a truncated (img2img) run starts in `timesteps`; DDIM finds ᾱ from t itself and ignores it."""
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

    def _noise_sigma(self, t: Tensor, x0: Tensor) -> Tensor:
        """σ for `add_noise`, one per t shaped to broadcast with x0: from the step index if set, else the
        begin index, else each t's position in `timesteps` (diffusers' order of precedence)."""
        t = torch.as_tensor(t).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(s) for s in t]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(t)
        return self.sigmas.to(device=x0.device, dtype=x0.dtype)[idx].reshape(-1, *([1] * (x0.ndim - 1)))

    def scale_model_input(self, x: Tensor, t: Tensor | float | None = None) -> Tensor:
        """diffusers' model-input scaling: the identity on VP latents (`sampling.sample` does it statelessly)."""
        return x

    def step_with_x0(self, model_output: Tensor, t: Tensor, x: Tensor, **options: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def step(self, model_output: Tensor, t: Tensor | float, x: Tensor, **options: Any) -> Tensor:
        """diffusers' `step`, returning the next latent only (its `prev_sample`); options as `step_with_x0`."""
        return self.step_with_x0(model_output, t, x, **options)[0]


class DDIMScheduler(SchedulerBase):
    """DDIM (Song et al. 2021) with diffusers' `DDIMScheduler` interface and options (DDIM_DEFAULTS).

    Not supported: `use_clipped_model_output` and `variance_noise` of diffusers' `step`.
    """

    defaults = DDIM_DEFAULTS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c = self._config
        _check_choice("prediction_type", c["prediction_type"], ("epsilon", "sample", "v_prediction"))
        _check_choice("timestep_spacing", c["timestep_spacing"], ("leading", "trailing", "linspace"))
        # ᾱ used after the last step: 1 (a clean sample) or ᾱ_0
        self.final_alpha_cumprod = torch.tensor(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)
        self._alphas, self._final = self.alphas_cumprod, self.final_alpha_cumprod

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        c = self._config
        _check_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = ddim_timesteps(
            num_inference_steps, self.num_train_timesteps, c["timestep_spacing"], c["steps_offset"]
        ).to(device=device)
        self._alphas = self.alphas_cumprod.to(device=device)  # step() looks ᾱ up on the timesteps' device
        self._final = self.final_alpha_cumprod.to(device=device)

    def step_with_x0(
        self, model_output: Tensor, t: Tensor | int, x: Tensor, *, eta: float = 0.0, generator: GeneratorArg = None
    ) -> tuple[Tensor, Tensor]:
        """x_t → (x_{t−T//N}, x0). As in diffusers the previous timestep is t − T//N for every spacing,
        with N the count given to `set_timesteps`; ᾱ_prev is final_alpha_cumprod below 0."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        c = self._config
        t = torch.as_tensor(t, device=self._alphas.device)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = _at(self._alphas, t)
        a_prev = torch.where(prev_t >= 0, _at(self._alphas, prev_t.clamp(min=0)), self._final)
        shape, device, dtype = model_output.shape, model_output.device, model_output.dtype
        noise = randn_tensor(shape, generator, device, dtype) if eta > 0 else None
        return ddim_step(
            x,
            model_output,
            a_t,
            a_prev,
            eta,
            noise,
            prediction_type=c["prediction_type"],
            clip_sample_range=c["clip_sample_range"] if c["clip_sample"] else None,
            threshold=(c["dynamic_thresholding_ratio"], c["sample_max_value"]) if c["thresholding"] else None,
        )

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """√ᾱ_t·x0 + √(1 − ᾱ_t)·noise, t of shape () or (b,) (diffusers' broadcasting, see q_sample)."""
        alpha_bar = self.alphas_cumprod.to(x0.device)[torch.as_tensor(t, device=x0.device)]
        return q_sample(x0, noise, alpha_bar)


class EulerDiscreteScheduler(SchedulerBase):
    """Euler ODE sampler in σ-space (Karras et al. 2022) with diffusers' `EulerDiscreteScheduler`
    interface and options (EULER_DEFAULTS).

    Not supported (ValueError): use_beta_sigmas, timestep_type "continuous" with v_prediction.
    Like diffusers it keeps a step index: `scale_model_input` and `step` use sigmas[index], the index
    starts at the begin index (or at t's position in `timesteps`) and `step` advances it.
    """

    defaults = EULER_DEFAULTS
    sigma_space = True

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
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1).float()
        self.sigmas = torch.cat([train_sigmas(self.alphas_cumprod).flip(0), torch.zeros(1)])

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
        timesteps = euler_timesteps(
            num_inference_steps, self.num_train_timesteps, c["timestep_spacing"], c["steps_offset"]
        )
        timesteps, self.sigmas = euler_sigmas(
            self.alphas_cumprod,
            timesteps,
            interpolation=c["interpolation_type"],
            karras=c["use_karras_sigmas"],
            exponential=c["use_exponential_sigmas"],
            sigma_min=c["sigma_min"],
            sigma_max=c["sigma_max"],
            final_sigmas_type=c["final_sigmas_type"],
        )
        self.timesteps = timesteps.to(device=device)
        self._step_index = self._begin_index = None

    def scale_model_input(self, x: Tensor, t: Tensor | float | None = None) -> Tensor:
        """x/√(σ² + 1): the σ-space latent back to unit variance for the UNet (EDM's c_in)."""
        sigma = self.sigmas[self._index(t)]
        return x / ((sigma**2 + 1) ** 0.5)

    def step_with_x0(
        self,
        model_output: Tensor,
        t: Tensor | float,
        x: Tensor,
        *,
        eta: float = 0.0,
        generator: GeneratorArg = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """x at sigmas[i] → (x at sigmas[i+1], x0). `eta` is accepted for a uniform call and ignored
        (diffusers' Euler has none); `generator` is used only for churn (s_churn > 0)."""
        if isinstance(t, int) or (torch.is_tensor(t) and not torch.is_floating_point(t)):
            raise ValueError(f"Euler step needs a float timestep from `timesteps`, got {t!r}")
        i = self._index(t)
        sigma = self.sigmas[i]
        gamma = 0.0
        if s_churn > 0 and s_tmin <= sigma <= s_tmax:  # host sync, only with churn
            gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1)
        shape, device, dtype = model_output.shape, model_output.device, model_output.dtype
        noise = randn_tensor(shape, generator, device, dtype) if gamma > 0 else None
        out = euler_step(
            x,
            model_output,
            sigma,
            self.sigmas[i + 1],
            prediction_type=self._config["prediction_type"],
            gamma=gamma,
            noise=noise,
            s_noise=s_noise,
        )
        self._step_index = i + 1
        return out

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x0 + σ·noise (σ-space, no √ᾱ factor), σ as `_noise_sigma` picks it."""
        return x0 + noise * self._noise_sigma(t, x0)


class DPMSolverMultistepScheduler(SchedulerBase):
    """DPM-Solver++(2M) (Lu et al. 2022) with diffusers' `DPMSolverMultistepScheduler` interface and
    options (DPM_DEFAULTS): VP latents, integer timesteps, σ interpolated at them or Karras σ.

    Multistep: each step reuses the previous step's x0; the first step, and the last one with
    final_sigmas_type "zero" (or lower_order_final under 15 steps, or euler_at_final), are first order.
    Supported: algorithm_type "dpmsolver++" (DEIS's "deis" maps to it, UniPC's solver types to
    "midpoint", as in diffusers), solver_order 1 or 2, solver_type "midpoint" or "heun". Not supported
    (ValueError): the SDE and noise-prediction variants, order 3, lu/exponential/beta/flow sigmas, dynamic
    shifting, variance_type, a finite lambda_min_clipped. A t not in `timesteps` raises ValueError
    (diffusers falls back to the last index).
    """

    defaults = DPM_DEFAULTS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c = self._config
        if c["algorithm_type"] == "deis":
            c["algorithm_type"] = "dpmsolver++"
        if c["solver_type"] in ("logrho", "bh1", "bh2"):
            c["solver_type"] = "midpoint"
        _check_choice("algorithm_type", c["algorithm_type"], ("dpmsolver++",))
        _check_choice("solver_type", c["solver_type"], ("midpoint", "heun"))
        _check_choice("prediction_type", c["prediction_type"], ("epsilon", "sample", "v_prediction"))
        _check_choice("timestep_spacing", c["timestep_spacing"], ("linspace", "leading", "trailing"))
        _check_choice("final_sigmas_type", c["final_sigmas_type"], ("zero", "sigma_min"))
        unsupported = [
            k
            for k in (
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "use_flow_sigmas",
                "use_dynamic_shifting",
                "variance_type",
            )
            if c[k]
        ]
        if c["solver_order"] not in (1, 2) or c["lambda_min_clipped"] != -math.inf or unsupported:
            raise ValueError(
                f"unsupported DPMSolverMultistepScheduler options: solver_order={c['solver_order']}, "
                f"lambda_min_clipped={c['lambda_min_clipped']}, {unsupported}"
            )
        if c["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24  # keep σ_{T−1} finite
        self.timesteps = torch.from_numpy(
            np.linspace(0, self.num_train_timesteps - 1, self.num_train_timesteps, dtype=np.float32)[::-1].copy()
        )
        self.sigmas = train_sigmas(self.alphas_cumprod)
        self._x0_prev: Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Sets timesteps (int64, on `device`) and sigmas (float32, CPU); clears the indices and the history."""
        c = self._config
        _check_steps(num_inference_steps, self.num_train_timesteps)
        timesteps = dpm_timesteps(
            num_inference_steps, self.num_train_timesteps, c["timestep_spacing"], c["steps_offset"]
        )
        timesteps, self.sigmas = dpm_sigmas(
            self.alphas_cumprod,
            timesteps,
            num_inference_steps,
            karras=c["use_karras_sigmas"],
            round_timesteps=c["beta_schedule"] != "squaredcos_cap_v2",
            final_sigmas_type=c["final_sigmas_type"],
        )
        self.timesteps = timesteps.to(device=device)
        self.num_inference_steps = len(timesteps)
        self._step_index = self._begin_index = self._x0_prev = None

    def step_with_x0(
        self, model_output: Tensor, t: Tensor | int, x: Tensor, *, eta: float = 0.0, generator: GeneratorArg = None
    ) -> tuple[Tensor, Tensor]:
        """x at sigmas[i] → (x at sigmas[i+1], x0). Deterministic: `eta` and `generator` are accepted for
        a uniform call and ignored."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        c = self._config
        i, n = self._index(t), len(self.timesteps)
        last_first_order = i == n - 1 and (
            c["euler_at_final"] or (c["lower_order_final"] and n < 15) or c["final_sigmas_type"] == "zero"
        )
        second = c["solver_order"] == 2 and self._x0_prev is not None and not last_first_order
        x_next, x0 = dpmpp_2m_step(
            x,
            model_output,
            self.sigmas[i],
            self.sigmas[i + 1],
            self.sigmas[i - 1] if second else None,
            self._x0_prev if second else None,
            prediction_type=c["prediction_type"],
            solver_type=c["solver_type"],
            threshold=(c["dynamic_thresholding_ratio"], c["sample_max_value"]) if c["thresholding"] else None,
        )
        self._x0_prev, self._step_index = x0, i + 1
        return x_next, x0

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """α_t·x0 + σ_t·noise with (α_t, σ_t) from the σ-space σ that `_noise_sigma` picks."""
        alpha, sigma = vp_alpha_sigma(self._noise_sigma(t, x0))
        return alpha * x0 + sigma * noise


# The samplers the pipeline, FreeInit and the CLI (`--scheduler NAME`) offer; one line per sampler.
SAMPLERS: dict[str, type[SchedulerBase]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def scheduler_class(class_name: str | None) -> type[SchedulerBase] | None:
    """The SAMPLERS class with this diffusers `_class_name` (as in a scheduler_config.json), or None."""
    return {cls.__name__: cls for cls in SAMPLERS.values()}.get(class_name)
