"""pia_torch.sampling against diffusers 0.42.1 DDIMScheduler / EulerDiscreteScheduler.

Tolerances (DESIGN.md §5): timesteps exactly equal; sigmas, step outputs, add_noise and scaled
inputs within 1e-6 + 1e-6·|value| (fp32, ≈ 8 ulps of each value: a step is a handful of elementwise
roundings of ≤ ½ ulp). Every reference value comes from a diffusers object built in the test.
"""

import itertools

import pytest
import torch
from conftest import SD15_PNDM, STEP_TOL, tol
from diffusers import DDIMScheduler as RefDDIM
from diffusers import EulerDiscreteScheduler as RefEuler
from torch.testing import assert_close

from pia_torch.sampling import euler_step, prepare_timesteps, randn_tensor, sample
from pia_torch.schedulers import DDIMScheduler, EulerDiscreteScheduler

TOL = STEP_TOL  # DESIGN.md §5: 1e-6 + 1e-6·|value|
SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 3, 6, 6)  # (b, c, f, h, w)
# diffusers' Euler calls np.array on a tensor (numpy 2 copy-keyword DeprecationWarning): not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def fake_outputs(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------------ timesteps


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("n", [1, 4, 25, 50])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_timesteps_and_alphas(schedule, spacing, offset, n, rescale):
    cfg = dict(beta_schedule=schedule, timestep_spacing=spacing, steps_offset=offset, rescale_betas_zero_snr=rescale)
    ours, ref = DDIMScheduler(**cfg), RefDDIM(**cfg)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, ref.timesteps)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("n", [1, 4, 25, 50])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_euler_timesteps_sigmas(schedule, spacing, offset, n, rescale):
    cfg = dict(beta_schedule=schedule, timestep_spacing=spacing, steps_offset=offset, rescale_betas_zero_snr=rescale)
    ours, ref = EulerDiscreteScheduler(**cfg), RefEuler(**cfg)
    assert_close(ours.sigmas, ref.sigmas, **TOL)  # before set_timesteps
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert ours.timesteps.dtype == torch.float32
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_close(ours.sigmas, ref.sigmas, **TOL)
    assert_close(ours.init_noise_sigma, ref.init_noise_sigma, **TOL)


SIGMA_VARIANTS = {
    "karras": dict(use_karras_sigmas=True),
    "karras_log_linear": dict(use_karras_sigmas=True, interpolation_type="log_linear"),
    "log_linear": dict(interpolation_type="log_linear"),
    "exponential": dict(use_exponential_sigmas=True),
    "karras_range_sigma_min_final": dict(
        use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min"
    ),
    "sigma_min_final": dict(final_sigmas_type="sigma_min"),
}


@pytest.mark.parametrize("n", [1, 4, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("variant", list(SIGMA_VARIANTS))
def test_euler_sigma_variants(variant, spacing, n):
    cfg = dict(SD_BETAS, timestep_spacing=spacing, steps_offset=1, **SIGMA_VARIANTS[variant])
    ours, ref = EulerDiscreteScheduler(**cfg), RefEuler(**cfg)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_close(ours.sigmas, ref.sigmas, **TOL)
    assert_close(ours.init_noise_sigma, ref.init_noise_sigma, **TOL)


def test_spec_examples():
    """Known values from spec schedulers.md §1.3 and §2.2, independent of diffusers."""
    ddim = DDIMScheduler(**SD_BETAS, steps_offset=1)
    ddim.set_timesteps(25)
    assert ddim.timesteps[:3].tolist() == [961, 921, 881] and ddim.timesteps[-1] == 1
    euler = EulerDiscreteScheduler(**SD_BETAS)
    euler.set_timesteps(4)
    assert euler.timesteps.tolist() == [999.0, 666.0, 333.0, 0.0]
    expected = torch.tensor([14.614647, 2.918308, 0.932358, 0.029168, 0.0])
    # six printed decimals (±5e-7), then float32 rounding of the computation (a few ulps of the largest σ)
    assert_close(euler.sigmas, expected, atol=5e-7 + tol(expected, ulps=4)["atol"], rtol=0)


# ------------------------------------------------------------------------------------------ steps

DDIM_STEP_CASES = list(
    itertools.product(["epsilon", "v_prediction", "sample"], [0.0, 0.8], [False, True], [False, True])
)


@pytest.mark.parametrize("prediction_type,eta,clip_sample,set_alpha_to_one", DDIM_STEP_CASES)
def test_ddim_step_loop(prediction_type, eta, clip_sample, set_alpha_to_one):
    cfg = dict(
        SD_BETAS,
        steps_offset=1,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_sample_range=1.5,
        set_alpha_to_one=set_alpha_to_one,
    )
    ours, ref = DDIMScheduler(**cfg), RefDDIM(**cfg)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x = x_ref = fake_outputs(1, seed=1)[0]
    for t, out in zip(ours.timesteps, fake_outputs(10)):
        x = ours.step(out, t, x, eta=eta, generator=g_ours)
        x_ref = ref.step(out, t, x_ref, eta=eta, generator=g_ref).prev_sample
        assert_close(x, x_ref, **TOL)
    assert not torch.equal(x, fake_outputs(1, seed=1)[0])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_step_thresholding_and_spacings(spacing):
    cfg = dict(timestep_spacing=spacing, thresholding=True, sample_max_value=2.0, dynamic_thresholding_ratio=0.9)
    ours, ref = DDIMScheduler(**cfg), RefDDIM(**cfg)
    ours.set_timesteps(7)
    ref.set_timesteps(7)
    x = x_ref = 3 * fake_outputs(1, seed=2)[0]
    for t, out in zip(ours.timesteps, fake_outputs(7)):
        x = ours.step(out, t, x)
        x_ref = ref.step(out, t, x_ref).prev_sample
        assert_close(x, x_ref, **TOL)


EULER_STEP_CASES = list(
    itertools.product(["epsilon", "v_prediction", "sample"], ["linspace", "leading", "trailing"], [False, True])
)


@pytest.mark.parametrize("prediction_type,spacing,karras", EULER_STEP_CASES)
def test_euler_step_loop(prediction_type, spacing, karras):
    cfg = dict(
        SD_BETAS, steps_offset=1, prediction_type=prediction_type, timestep_spacing=spacing, use_karras_sigmas=karras
    )
    ours, ref = EulerDiscreteScheduler(**cfg), RefEuler(**cfg)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = x_ref = fake_outputs(1, seed=1)[0] * ref.init_noise_sigma
    for t, out in zip(ours.timesteps, fake_outputs(10)):
        assert_close(ours.scale_model_input(x, t), ref.scale_model_input(x_ref, t), **TOL)
        x = ours.step(out, t, x)
        x_ref = ref.step(out, t, x_ref).prev_sample
        assert_close(x, x_ref, **TOL)


def test_euler_step_churn_with_generator():
    cfg = dict(SD_BETAS)
    ours, ref = EulerDiscreteScheduler(**cfg), RefEuler(**cfg)
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    g_ours, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    churn = dict(s_churn=2.0, s_tmin=0.5, s_tmax=10.0)
    x = x_ref = fake_outputs(1, seed=1)[0] * ref.init_noise_sigma
    for t, out in zip(ours.timesteps, fake_outputs(8)):
        ours.scale_model_input(x, t)
        ref.scale_model_input(x_ref, t)
        x = ours.step(out, t, x, generator=g_ours, **churn)
        x_ref = ref.step(out, t, x_ref, generator=g_ref, **churn).prev_sample
        assert_close(x, x_ref, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_euler_step_half_precision(dtype):
    """Euler computes in fp32 and returns eps's dtype, exactly as diffusers."""
    ours, ref = EulerDiscreteScheduler(**SD_BETAS), RefEuler(**SD_BETAS)
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    x = x_ref = (fake_outputs(1, seed=1)[0] * 14).to(dtype)
    for t, out in zip(ours.timesteps, fake_outputs(5)):
        x = ours.step(out.to(dtype), t, x)
        x_ref = ref.step(out.to(dtype), t, x_ref).prev_sample
        assert x.dtype == dtype
        assert torch.equal(x, x_ref)


def test_euler_step_function_is_not_the_shortcut():
    """The pure function computes x0 first (diffusers' order); x + eps·(σ' − σ) differs in fp32."""
    x = fake_outputs(1, seed=1)[0] * 14.6
    eps = fake_outputs(1, seed=2)[0]
    sigma, sigma_next = torch.tensor(14.614647), torch.tensor(11.435942)
    ref = RefEuler(**SD_BETAS)
    ref.set_timesteps(25)
    ref.set_begin_index(0)
    assert_close(
        euler_step(x, eps, ref.sigmas[0], ref.sigmas[1])[0],
        ref.step(eps, ref.timesteps[0], x).prev_sample,
        atol=0,
        rtol=0,
    )
    shortcut = x + eps * (sigma_next - sigma)
    # equal in exact arithmetic: ~5 roundings (≤ ½ ulp each) at the scale of x0 = x − σ·ε, |x| + |σ·ε|
    assert_close(euler_step(x, eps, sigma, sigma_next)[0], shortcut, **tol(x.abs() + (sigma * eps).abs(), ulps=4))
    assert not torch.equal(euler_step(x, eps, sigma, sigma_next)[0], shortcut)


@pytest.mark.parametrize("cls,ref_cls", [(DDIMScheduler, RefDDIM), (EulerDiscreteScheduler, RefEuler)])
def test_add_noise(cls, ref_cls):
    ours, ref = cls(**SD_BETAS), ref_cls(**SD_BETAS)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x0, noise = fake_outputs(2, seed=4)
    t = ours.timesteps[[2, 5]]  # one timestep per batch row
    assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), **TOL)
    # after prepare_timesteps the begin index decides (Euler); DDIM ignores it
    prepare_timesteps(ours, 10, 0.6)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(4)
    t = ours.timesteps[4:5].repeat(2)
    assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), **TOL)


def test_ddim_add_noise_pia_batch_broadcast():
    """diffusers' PIA passes a 4-D condition latent with (B,) timesteps: coefficients pair with its
    first (channel) axis. The same broadcasting must come out (B = 4 runs, spec pipeline.md §3.8)."""
    ours, ref = DDIMScheduler(**SD_BETAS), RefDDIM(**SD_BETAS)
    x0 = fake_outputs(1, seed=5)[0][0]  # (4, f, h, w)
    noise = fake_outputs(1, seed=6)[0][:1].repeat(4, 1, 1, 1, 1)  # (4, 4, f, h, w)
    t = torch.tensor([500, 400, 300, 200])
    out = ours.add_noise(x0, noise, t)
    assert out.shape == noise.shape
    assert_close(out, ref.add_noise(x0, noise, t), **TOL)


def test_ddim_scale_and_init_noise_sigma():
    s = DDIMScheduler()
    x = fake_outputs(1)[0]
    assert s.scale_model_input(x, 5) is x and s.init_noise_sigma == RefDDIM().init_noise_sigma == 1.0
    assert s.order == RefDDIM.order == 1 and EulerDiscreteScheduler.order == RefEuler.order


# ------------------------------------------------------------------------------------------ configs


def _live_ddim_config() -> dict:
    return dict(RefDDIM(**SD_BETAS, steps_offset=1, clip_sample=False).config)


def _resaved_ddim_config() -> dict:
    """What save_pretrained writes: every option, no `_use_default_values`."""
    cfg = {k: v for k, v in _live_ddim_config().items() if k != "_use_default_values"}
    return {"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1", **cfg}


CONFIGS = {
    "sd15_pndm": lambda: dict(SD15_PNDM),
    "ddim_live": _live_ddim_config,
    "ddim_resaved": _resaved_ddim_config,
    "ddim_from_pndm": lambda: dict(RefDDIM.from_config(SD15_PNDM).config),
    "euler_from_pndm": lambda: dict(RefEuler.from_config(SD15_PNDM).config),
}


@pytest.mark.parametrize("n", [4, 25])
@pytest.mark.parametrize("source", list(CONFIGS))
@pytest.mark.parametrize("cls,ref_cls", [(DDIMScheduler, RefDDIM), (EulerDiscreteScheduler, RefEuler)])
def test_from_config(cls, ref_cls, source, n):
    cfg = CONFIGS[source]()
    ours, ref = cls.from_config(cfg), ref_cls.from_config(cfg)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    for key in ("timestep_spacing", "steps_offset", "prediction_type", "beta_schedule"):
        assert ours.config[key] == ref.config[key], key
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_close(ours.init_noise_sigma, ref.init_noise_sigma, **TOL)
    if cls is DDIMScheduler:
        assert_close(ours.final_alpha_cumprod, ref.final_alpha_cumprod, atol=0, rtol=0)


def test_resaved_config_trap():
    """Absent keys take the target's default; keys present with DDIM's default value are kept."""
    live = EulerDiscreteScheduler.from_config(_live_ddim_config())
    resaved = EulerDiscreteScheduler.from_config(_resaved_ddim_config())
    assert live.config["timestep_spacing"] == "linspace" and resaved.config["timestep_spacing"] == "leading"


def test_from_config_overrides_and_round_trip():
    s = DDIMScheduler.from_config(SD15_PNDM, timestep_spacing="trailing")
    assert s.config["timestep_spacing"] == "trailing" and s.config["_class_name"] == "DDIMScheduler"
    assert "skip_prk_steps" not in s.config
    s.config["timestep_spacing"] = "linspace"  # .config is a copy: the scheduler is unchanged
    assert s.config["timestep_spacing"] == "trailing"
    for obj in (
        s,
        EulerDiscreteScheduler.from_config(s.config),
        DDIMScheduler(),
        EulerDiscreteScheduler(),
        EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True),
    ):
        cls = type(obj)
        assert cls.from_config(obj.config).config == obj.config
    # our config fed to diffusers (the documented cross-class use) gives diffusers' own result
    ref = RefEuler.from_config(s.config)
    ref.set_timesteps(25)
    ours = EulerDiscreteScheduler.from_config(s.config)
    ours.set_timesteps(25)
    assert torch.equal(ours.timesteps, ref.timesteps)


# ------------------------------------------------------------------------------------------ strength


def ref_get_timesteps(ref, n: int, strength: float) -> torch.Tensor:
    """diffusers' img2img get_timesteps, written out against a diffusers scheduler."""
    ref.set_timesteps(n)
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    timesteps = ref.timesteps[t_start * ref.order :]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    return timesteps


@pytest.mark.parametrize("n", [4, 10, 25])
@pytest.mark.parametrize("strength", [0.5, 0.6, 1.0])
@pytest.mark.parametrize("cls,ref_cls", [(DDIMScheduler, RefDDIM), (EulerDiscreteScheduler, RefEuler)])
def test_prepare_timesteps(cls, ref_cls, strength, n):
    ours, ref = cls.from_config(SD15_PNDM), ref_cls.from_config(SD15_PNDM)
    ts, ts_ref = prepare_timesteps(ours, n, strength), ref_get_timesteps(ref, n, strength)
    assert torch.equal(ts, ts_ref)
    # the steps start at the begin index (Euler) / the full-N step offset (DDIM)
    x = x_ref = fake_outputs(1, seed=1)[0] * 3
    for t, out in zip(ts, fake_outputs(len(ts))):
        assert_close(ours.scale_model_input(x, t), ref.scale_model_input(x_ref, t), **TOL)
        x = ours.step(out, t, x)
        x_ref = ref.step(out, t, x_ref).prev_sample
    assert_close(x, x_ref, **TOL)


def test_prepare_timesteps_spec_example():
    s = DDIMScheduler()
    assert prepare_timesteps(s, 10, 0.5).tolist() == [400, 300, 200, 100, 0]


# ------------------------------------------------------------------------------------------ loop


@pytest.mark.parametrize("cls,ref_cls", [(DDIMScheduler, RefDDIM), (EulerDiscreteScheduler, RefEuler)])
def test_sample_loop_matches_diffusers_loop(cls, ref_cls):
    ours, ref = cls(**SD_BETAS), ref_cls(**SD_BETAS)
    start = fake_outputs(1, seed=1)[0] * ref_cls(**SD_BETAS).init_noise_sigma

    def model(x, t):  # a deterministic stand-in for the UNet
        return torch.tanh(x) * 0.5 + torch.cos(t.float() / 100)

    timesteps = prepare_timesteps(ours, 6)
    seen = []

    def callback(d):
        seen.append((d["i"], d["t"]))

    x = sample(
        lambda x, t: model(ours.scale_model_input(x, t), t),
        start,
        timesteps,
        ours.step_with_x0,
        callback=callback,
        progress=False,
    )
    ref_ts = ref_get_timesteps(ref, 6, 1.0)
    x_ref = start
    for t in ref_ts:
        eps = model(ref.scale_model_input(x_ref, t), t)
        x_ref = ref.step(eps, t, x_ref).prev_sample
    assert_close(x, x_ref, **TOL)
    assert [i for i, _ in seen] == list(range(6)) and torch.equal(torch.stack([t for _, t in seen]), ref_ts)


def test_sample_callback_can_replace_x():
    s = DDIMScheduler()
    timesteps = prepare_timesteps(s, 4)
    start = fake_outputs(1)[0]
    plain = sample(lambda x, t: 0.1 * x, start, timesteps, s.step_with_x0, progress=False)
    zeroed = sample(
        lambda x, t: 0.1 * x,
        start,
        timesteps,
        s.step_with_x0,
        progress=False,
        callback=lambda d: {"x": torch.zeros_like(d["x"])} if d["i"] == 3 else None,
    )
    assert torch.equal(zeroed, torch.zeros_like(start)) and not torch.equal(plain, zeroed)


def test_randn_tensor_matches_diffusers():
    from diffusers.utils.torch_utils import randn_tensor as ref_randn

    for gen in ([torch.Generator().manual_seed(1)], [torch.Generator().manual_seed(i) for i in range(3)]):
        seeds = [g.initial_seed() for g in gen]
        ours = randn_tensor((len(gen) if len(gen) > 1 else 3, 4, 2), gen, "cpu", torch.float16)
        ref_gen = [torch.Generator().manual_seed(s) for s in seeds]
        ref = ref_randn((len(gen) if len(gen) > 1 else 3, 4, 2), ref_gen, torch.device("cpu"), torch.float16)
        assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(beta_schedule="cosine"), "cosine"),
        (dict(timestep_spacing="uniform"), "uniform"),
        (dict(prediction_type="x0"), "x0"),
        (dict(not_an_option=1), "not_an_option"),
    ],
)
def test_bad_options(cls, kwargs, named):
    with pytest.raises(ValueError, match=named):
        cls(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(use_beta_sigmas=True),
        dict(interpolation_type="cubic"),
        dict(final_sigmas_type="one"),
        dict(use_karras_sigmas=True, use_exponential_sigmas=True),
    ],
)
def test_bad_euler_options(kwargs):
    with pytest.raises(ValueError):
        EulerDiscreteScheduler(**kwargs)


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("n", [0, -3, 1001])
def test_bad_step_counts(cls, n):
    with pytest.raises(ValueError, match=str(n)):
        cls().set_timesteps(n)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match=str(strength)):
        prepare_timesteps(DDIMScheduler(), 10, strength)


def test_strength_leaving_no_step():
    with pytest.raises(ValueError, match="no step"):
        prepare_timesteps(DDIMScheduler(), 4, 0.2)


def test_ddim_step_needs_set_timesteps_and_euler_float_t():
    x = fake_outputs(1)[0]
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(x, 999, x)
    e = EulerDiscreteScheduler()
    e.set_timesteps(4)
    with pytest.raises(ValueError, match="float timestep"):
        e.step(x, torch.tensor(999), x)
