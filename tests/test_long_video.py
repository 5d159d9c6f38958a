"""Long videos, closed loops and keyframes (pia_torch/long_video.py): the invariants that need no ground truth.

I1 one window = the plain path, bit for bit; I2 partition of unity; I3 transparency with a per-frame mock;
I4 conditioning bookkeeping with an echo mock; I5 determinism; I6 CFG linearity; I7 FreeNoise = diffusers;
loop symmetry and rotation equivariance; keyframes.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import fan_in, tol
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

from pia_torch import Keyframe
from pia_torch.demo import demo_image, tiny_pipeline
from pia_torch.long_video import (
    FUSE_METHODS,
    MOTION_PRESETS,
    Conditioning,
    ContextOptions,
    context_windows,
    freenoise,
    fusion_weights,
    keyframe_plan,
    loop_profile,
    make_windowed_denoiser,
    mask_coefficients,
    van_der_corput,
)
from pia_torch.pipeline import make_denoiser
from pia_torch.sampling import sample
from pia_torch.schedulers import DDIMScheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: much faster on one thread


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(0)
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, num_frames=6, seed=0, steps=2, **kwargs):
    """Latents and the generator's state afterwards."""
    g = torch.Generator().manual_seed(seed)
    kwargs.setdefault("guidance_scale", 7.5)
    kwargs.setdefault("height", 16)
    kwargs.setdefault("width", 16)  # 8x8 latents
    out = pipe(
        demo_image(),
        "a prompt",
        num_frames=num_frames,
        num_inference_steps=steps,
        generator=g,
        output_type="latent",
        **kwargs,
    )
    return out.frames, g.get_state(), out


# --------------------------------------------------------------------------------------------- I2: windows


def check_schedule(F: int, options: ContextOptions, step: int) -> None:
    windows = context_windows(F, options, step)
    weights = fusion_weights(windows, F, options)
    total, seen = torch.zeros(F, dtype=torch.float64), torch.zeros(F, dtype=torch.int64)
    for W, w in zip(windows, weights):
        assert len(W) == len(set(W)) == len(w) and (w >= 0).all()
        assert len(W) == (min(F, options.length) if options.schedule != "looped" or F > options.length else F)
        total.index_add_(0, torch.tensor(W), w.double())
        seen.index_add_(0, torch.tensor(W), torch.ones(len(W), dtype=torch.int64))
    assert (seen >= 1).all(), (F, options, step)
    assert (total - 1).abs().max() <= 1e-6, (F, options, step)
    if options.schedule == "looped":  # every neighbouring pair, the seam (F-1, 0) included, inside one window
        pairs = {(W[p], W[p + 1]) for W in windows for p in range(len(W) - 1)}
        assert all((f, (f + 1) % F) in pairs for f in range(F)), (F, options, step)
    else:
        starts = sorted(W[0] for W in windows)
        assert starts[0] == 0 and windows[-1][-1] == F - 1 or F <= options.length
        for a, b in zip(starts, starts[1:]):
            assert a + options.length - b >= options.overlap, (F, options, step)  # adjacent windows share >= O


@pytest.mark.parametrize("schedule", ["static", "uniform", "looped"])
@pytest.mark.parametrize("L", [8, 16, 24, 32])
def test_partition_of_unity(schedule, L):
    """Σ ŵ = 1 and ŵ ≥ 0 for every frame, coverage, overlaps; F from L (or 2) to 300, every O, 64 steps."""
    for overlap in range(1 if schedule == "looped" else 0, L):
        stride = L - overlap
        frames = {L, L + 1, L + stride - 1, L + stride, L + stride + 1, 2 * L + 3, 127, 300}
        if schedule == "looped":
            frames |= {2, 3, L // 2 + 1, L - 1}
        for fuse in FUSE_METHODS:
            options = ContextOptions(L, overlap, schedule, fuse)
            for F in sorted(frames):
                for s in (0, 1, 2, 3, 6, 11, 40, 63) if F < 100 else (0, 5, 63):
                    check_schedule(F, options, s)


def test_diffusers_tail_window_case():
    """The case diffusers' FreeNoise gets wrong ((F − L) mod stride ∈ {2, 3}, pyramid): our last frames
    keep weight one in total."""
    for F in (26, 27):
        check_schedule(F, ContextOptions(16, 12, "static", "pyramid"), 0)


def test_schedules_by_hand():
    assert [van_der_corput(s) for s in range(5)] == [0, 0.5, 0.25, 0.75, 0.125]
    static = ContextOptions(16, 4, "static")
    assert [W[0] for W in context_windows(40, static)] == [0, 12, 24]
    assert [W[0] for W in context_windows(64, static)] == [0, 12, 24, 36, 48]  # 1 + ⌈48/12⌉ = 5 (spec §2.7)
    uniform = ContextOptions(16, 4, "uniform")
    assert [W[0] for W in context_windows(40, uniform, 1)] == [0, 6, 18, 24]  # o = 6
    looped = ContextOptions(8, 2, "looped")
    assert context_windows(12, looped, 0) == [[(s + p) % 12 for p in range(8)] for s in (0, 6)]
    assert context_windows(6, looped, 0) == [[0, 1, 2, 3, 4, 5], [3, 4, 5, 0, 1, 2]]  # two rotations
    assert context_windows(5, ContextOptions(8, 2, "uniform")) == [[0, 1, 2, 3, 4]]
    w = fusion_weights([[0, 1, 2, 3]], 4, ContextOptions(8, 2, "uniform", "overlap-linear"))[0]
    assert torch.equal(w, torch.ones(4))  # a single window: exactly one


# --------------------------------------------------------------------------------------------- mocks


class EchoUNet(torch.nn.Module):
    """Per frame: out = tanh(x) + 0.1·mask·Σ cond + 0.01·mean(text) (depends on that frame's own inputs and
    the video's text only); records the inputs of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def forward(self, x, t, text):
        assert text.shape[0] == x.shape[0]
        self.calls.append(x.clone())
        latent, mask, cond = x[:, :4], x[:, 4:5], x[:, 5:]
        bias = text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return torch.tanh(latent) + 0.1 * mask * cond.sum(1, keepdim=True) + 0.01 * bias


def run_mock(denoise, x, steps=3):
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(steps)
    if hasattr(denoise, "step"):
        denoise.step = 0
    return sample(denoise, x, scheduler.timesteps, scheduler.step_with_x0, progress=False)


def mock_setup(F, K=1, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, F, 3, 3, generator=g)
    latents = torch.randn(K, b, 4, 3, 3, generator=g)
    text = torch.randn(2 * b, 5, 6, generator=g)
    return x, latents, text


@pytest.mark.parametrize("schedule", ["static", "uniform", "looped"])
@pytest.mark.parametrize("fuse", FUSE_METHODS)
@pytest.mark.parametrize("F", [7, 20, 33])
def test_transparency(schedule, fuse, F):
    """I3: a denoiser whose output for a frame depends only on that frame's inputs makes the windowed sampler
    equal the plain one (global anchoring), with CFG; any schedule, fuse method and F."""
    x, latents, text = mock_setup(F, K=2)
    closed = schedule == "looped"
    plan, _ = keyframe_plan(F, [Keyframe(1, "a"), Keyframe(-2, "b", 0.9)], MOTION_PRESETS[2], closed, str.__eq__)
    mask, cond, _ = plan.inputs(latents, range(F))
    plain = run_mock(make_denoiser(EchoUNet(), text, mask, cond, 7.5), x)
    options = ContextOptions(8, 3, schedule, fuse, windows_per_batch=2)
    windowed = run_mock(make_windowed_denoiser(EchoUNet(), text, plan, latents, 7.5, options, "global"), x)
    torch.testing.assert_close(windowed, plain, **tol(plain, ulps=16))


def test_cfg_linearity():
    """I6: guide-then-fuse (what runs) equals fuse-then-guide."""
    F, g = 21, 7.5
    x, latents, text = mock_setup(F, b=2)
    plan, _ = keyframe_plan(F, [Keyframe(0, "a")], MOTION_PRESETS[0], False, str.__eq__)
    options = ContextOptions(8, 3, "uniform", "pyramid")
    t = torch.tensor(500)

    def fused(text, guidance):
        return make_windowed_denoiser(_Sine(), text, plan, latents, guidance, options)(x, t)

    negative, positive = text.chunk(2)
    u, c = fused(negative, 1.0), fused(positive, 1.0)
    guided = fused(text, g)
    torch.testing.assert_close(guided, u + g * (c - u), **tol(guided, ulps=16))


class _Sine(EchoUNet):
    """A mock whose frames interact (each frame sees its window's mean), so fusion order matters."""

    def forward(self, x, t, text):
        out = super().forward(x, t, text)
        return out + torch.sin(x[:, :4].mean(2, keepdim=True)) * text.std(dim=(1, 2)).view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("anchor,gap", [("global", 0), ("shifted", 0), ("shifted", 2)])
def test_conditioning_bookkeeping(anchor, gap):
    """I4: each window's mask is the formula of spec §2.4, each frame's condition latent its keyframe's;
    shifted with G = 0 puts exactly one frame of each window at the keyframe's full affinity."""
    F, c, row = 40, 5, MOTION_PRESETS[0]
    x, latents, text = mock_setup(F)
    plan, _ = keyframe_plan(F, [Keyframe(c, "a")], row, False, str.__eq__)
    unet, windows = EchoUNet(), []
    options = ContextOptions(8, 2, "static")
    denoise = make_windowed_denoiser(
        unet, text[:1], plan, latents, 1.0, options, anchor, gap, lambda s, W, a: windows.append((list(W), a))
    )
    denoise(x, torch.tensor(10))
    assert [W for W, _ in windows] == context_windows(F, options, 0)
    for (W, affinity), call in zip(windows, unet.calls):
        shift = max(0, min(abs(i - c) for i in W) - gap) if anchor == "shifted" else 0
        expected = [row[min(abs(i - c) - shift, len(row) - 1)] for i in W]
        assert affinity == expected
        assert torch.equal(call[0, 4, :, 0, 0], torch.tensor(expected))
        assert torch.equal(call[:, 5:], latents[0][:, :, None].expand(-1, -1, len(W), -1, -1))
        if anchor == "shifted" and gap == 0:
            assert affinity.count(1.0) == 1


def test_shifted_moves_only_the_nearest_keyframe():
    """Two keyframes: a window between them pins only the nearer one (spec §4.2)."""
    plan, _ = keyframe_plan(64, [Keyframe(0, "a"), Keyframe(63, "b")], MOTION_PRESETS[0], False, str.__eq__)
    masks, which = plan.affinity(range(20, 28), "shifted")
    assert masks[0] == 1.0 and masks.count(1.0) == 1 and which == [0] * 8


# --------------------------------------------------------------------------------------------- keyframes


def test_keyframe_affinity_rules():
    row = MOTION_PRESETS[1]
    F = 16
    plan, images = keyframe_plan(F, [Keyframe(-1, "b", 0.9), Keyframe(0, "a")], row, False, str.__eq__)
    assert images == ["a", "b"]  # in frame order
    masks, which = plan.affinity(range(F))
    h = [row[min(d, len(row) - 1)] for d in range(F)]
    expected = [max((h[i], -i, 0), (0.9 * h[F - 1 - i], -(F - 1 - i), 1)) for i in range(F)]
    assert masks == [m for m, _, _ in expected] and which == [k for _, _, k in expected]
    assert masks[0] == 1.0 and masks[-1] == 0.9 and which[0] == 0 and which[-1] == 1
    # equal strengths: the switch at the midpoint, a tie going to the earlier keyframe
    plan, _ = keyframe_plan(9, [Keyframe(0, "a"), Keyframe(8, "b")], row, False, str.__eq__)
    assert plan.affinity(range(9))[1] == [0] * 5 + [1] * 4
    # the same image twice: one latent, the mirrored curve
    plan, images = keyframe_plan(F, [Keyframe(0, "a"), Keyframe(F - 1, "a")], row, False, str.__eq__)
    assert images == ["a"] and plan.affinity(range(F)) == ([h[min(i, F - 1 - i)] for i in range(F)], [0] * F)


@pytest.mark.parametrize("frames", [[0, 0], [3, -13], [16], [-17]])
def test_keyframe_errors(frames):
    with pytest.raises(ValueError, match="keyframe"):
        keyframe_plan(16, [Keyframe(f, "a") for f in frames], MOTION_PRESETS[0], False, str.__eq__)


def test_keyframe_errors_in_pipeline(pipe):
    with pytest.raises(ValueError, match="cond_frame or keyframes"):
        generate(pipe, cond_frame=2, keyframes=[Keyframe(0)])
    with pytest.raises(ValueError, match="strength"):
        generate(pipe, keyframes=[Keyframe(0, strength=1.5)])
    with pytest.raises(ValueError, match="no image"):
        pipe(None, "p", num_frames=4, keyframes=[Keyframe(0)])


@pytest.mark.parametrize("c", [0, 5, -1])
def test_one_keyframe_is_cond_frame(pipe, c):
    """K = 1 at c: the same video as cond_frame = c, whose mask is the original formula around c."""
    F = 8
    plain, state, _ = generate(pipe, F, cond_frame=c)
    keyed, state_k, _ = generate(pipe, F, keyframes=[Keyframe(c, demo_image())])
    assert torch.equal(plain, keyed) and torch.equal(state, state_k)
    plan, _ = keyframe_plan(F, [Keyframe(c)], MOTION_PRESETS[0], False, lambda a, b: True)
    assert plan.affinity(range(F))[0] == mask_coefficients(F, 0, c % F)


def test_keyframes_order_and_draws(pipe):
    """Permuting the keyframes changes nothing; one posterior draw per distinct image; two images differ."""
    a, b = demo_image(), demo_image().rotate(90)
    first, state, _ = generate(pipe, 8, keyframes=[Keyframe(0, a), Keyframe(-1, b, 0.9)])
    again, state2, _ = generate(pipe, 8, keyframes=[Keyframe(-1, b, 0.9), Keyframe(0, a)])
    assert torch.equal(first, again) and torch.equal(state, state2)
    _, plain_state, _ = generate(pipe, 8)
    _, same_state, _ = generate(pipe, 8, keyframes=[Keyframe(0, a), Keyframe(-1, a)])
    assert torch.equal(same_state, plain_state)  # the same image twice: one draw
    assert not torch.equal(state, plain_state)
    only_a, _, _ = generate(pipe, 8, keyframes=[Keyframe(0, a), Keyframe(-1, a)])
    assert not torch.equal(first[:, :, -1], only_a[:, :, -1])


def test_strength_starts_each_frame_from_its_keyframe(pipe, monkeypatch):
    """strength < 1: frame i is noised from its own keyframe's latent."""
    seen = {}
    original = pipe.scheduler.add_noise

    def spy(x0, noise, t):
        seen["x0"] = x0.clone()
        return original(x0, noise, t)

    monkeypatch.setattr(pipe.scheduler, "add_noise", spy)
    a, b = demo_image(), demo_image().rotate(90)
    generate(pipe, 8, steps=4, strength=0.5, keyframes=[Keyframe(0, a), Keyframe(7, b)])
    x0 = seen["x0"]
    assert torch.equal(x0[:, :, 0], x0[:, :, 3]) and torch.equal(x0[:, :, 4], x0[:, :, 7])
    assert not torch.equal(x0[:, :, 3], x0[:, :, 4])


# --------------------------------------------------------------------------------------------- I1, I5: pipeline


@pytest.mark.parametrize(
    "options",
    [
        dict(context_length=8),
        dict(context_length=6, context_fuse="overlap-linear", anchor="global", noise="random"),
        dict(context_length=16, context_schedule="static", anchor_gap=3, windows_per_batch=4),
    ],
)
def test_single_window_is_the_plain_path(pipe, options):
    """I1: F ≤ L (not a loop): the video and the generator state afterwards are bit-identical."""
    plain, state, _ = generate(pipe, 6)
    windowed, state_w, _ = generate(pipe, 6, **options)
    assert torch.equal(plain, windowed) and torch.equal(state, state_w)


def test_single_window_with_freeinit_and_euler(pipe):
    from pia_torch.schedulers import EulerDiscreteScheduler

    scheduler = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
    pipe.enable_free_init(num_iters=2)
    try:
        plain, state, _ = generate(pipe, 5, strength=0.8, steps=3)
        windowed, state_w, _ = generate(pipe, 5, strength=0.8, steps=3, context_length=8)
    finally:
        pipe.disable_free_init()
        pipe.scheduler = scheduler
    assert torch.equal(plain, windowed) and torch.equal(state, state_w)


def test_long_video_runs_and_is_deterministic(pipe):
    """I5: 40 frames (beyond the tiny adapter's 32) with FreeInit, Euler and strength < 1: windows switch on
    by themselves; the same seed gives the same video; windows per batch 1 vs all agree within rounding;
    the UNet never sees more than L frames."""
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    try:
        one, _, out = generate(pipe, 40, steps=2)
    finally:
        hook.remove()
    assert max(shape[2] for shape in calls) == 16 and torch.isfinite(one).all() and out.loop_period is None
    assert torch.equal(one, generate(pipe, 40, steps=2)[0])
    batched, _, _ = generate(pipe, 40, steps=2, windows_per_batch=8)
    torch.testing.assert_close(batched, one, **tol(one, 2 * fan_in(pipe.unet)))  # batched kernels round differently
    pipe.enable_free_init(num_iters=2)
    try:
        video, _, _ = generate(pipe, 20, steps=4, strength=0.6, context_length=8, context_overlap=3)
    finally:
        pipe.disable_free_init()
    assert video.shape[2] == 20 and torch.isfinite(video).all()


def test_windowed_memory_does_not_grow_with_frames(pipe):
    """Text states go to the UNet per window (b', l, d), never per frame; windows hold L frames."""
    shapes = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: shapes.append((args[0].shape, args[2].shape)))
    try:
        generate(pipe, 48, steps=1, context_length=8)
    finally:
        hook.remove()
    assert all(x[2] == 8 and text[0] == x[0] == 2 for x, text in shapes)


def test_bad_context_options(pipe):
    for kwargs, match in [
        (dict(context_length=40), "<= 32"),
        (dict(context_length=8, context_overlap=8), "context_overlap"),
        (dict(context_length=8, context_schedule="looped"), "looped"),
        (dict(context_length=8, context_fuse="gauss"), "context_fuse"),
        (dict(anchor="reference"), "anchor"),
        (dict(noise="pink"), "noise"),
        (dict(context_length=8, noise_block=9), "noise_block"),
        (dict(loop="open"), "loop"),
        (dict(loop="legacy"), "loop preset"),
        (dict(loop=True, num_frames=1), "num_frames >= 2"),
        (dict(loop=True, context_length=8, context_overlap=0, num_frames=12), "context_overlap >= 1"),
    ]:
        kwargs.setdefault("num_frames", 40 if "context_length" not in kwargs else 12)
        with pytest.raises(ValueError, match=match):
            pipe(demo_image(), "p", num_inference_steps=1, output_type="latent", **kwargs)


# --------------------------------------------------------------------------------------------- I7: noise


class _FreeNoise(AnimateDiffFreeNoiseMixin):
    vae_scale_factor = 1

    def __init__(self, length, stride):
        self._free_noise_context_length, self._free_noise_context_stride = length, stride
        self._free_noise_noise_type = "shuffle_context"


@pytest.mark.parametrize("F,L,S", [(40, 16, 4), (27, 16, 4), (64, 16, 3), (33, 8, 8), (16, 16, 4)])
def test_freenoise_equals_diffusers(F, L, S):
    """I7: our rescheduling is diffusers' _prepare_latents_free_noise ("shuffle_context"), bit for bit, and
    takes the same draws; the first L frames are the plain draw, each later block a permutation of its source."""
    g_ours, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = freenoise(torch.randn(2, 4, F, 5, 5, generator=g_ours), L, S, g_ours)
    ref = _FreeNoise(L, S)._prepare_latents_free_noise(2, 4, F, 5, 5, torch.float32, "cpu", g_ref)
    assert torch.equal(ours, ref) and torch.equal(g_ours.get_state(), g_ref.get_state())
    plain = torch.randn(2, 4, F, 5, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours[:, :, :L], plain[:, :, :L])
    for start in range(L, F, S):
        n = min(S, F - start)
        block = ours[0, 0, start : start + n, 0, 0]
        assert set(block.tolist()) <= set(ours[0, 0, start - L : start - L + S, 0, 0].tolist())


def test_freenoise_per_video_generators():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    x = torch.randn(2, 1, 24, 1, 1)
    rows = [freenoise(x[r : r + 1].clone(), 8, 4, torch.Generator().manual_seed(s)) for r, s in enumerate((1, 2))]
    assert torch.equal(freenoise(x.clone(), 8, 4, gens), torch.cat(rows))


# --------------------------------------------------------------------------------------------- loops


@pytest.mark.parametrize("F", [2, 3, 15, 16, 17, 64])
@pytest.mark.parametrize("m", [0, 3, 5])
def test_closed_loop_curve(F, m):
    """a(i) = h_loop(circular distance to c); symmetric about c; no duplicated image at the seam."""
    h = loop_profile(m)
    for c in (0, F // 3):
        plan, _ = keyframe_plan(F, [Keyframe(c, "a")], h, True, str.__eq__)
        a = plan.affinity(range(F))[0]
        assert a == [h[min(min(abs(i - c), F - abs(i - c)), len(h) - 1)] for i in range(F)]
        assert all(a[(c + j) % F] == a[(c - j) % F] for j in range(F))
        assert a.count(1.0) == 1


def test_loop_profiles_and_legacy_period(pipe):
    assert loop_profile(5) == MOTION_PRESETS[5][:8] == (1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5)
    assert loop_profile(1) == MOTION_PRESETS[1]
    # the legacy 16-frame loop is a period-15 closed loop plus a copy of frame 0 (row 5 exactly)
    assert [loop_profile(5)[min(i, 15 - i)] for i in range(16)] == list(MOTION_PRESETS[5])
    _, _, out = generate(pipe, 16, steps=1, motion_scale=5)
    assert out.loop_period == 15
    _, _, out = generate(pipe, 16, steps=1, motion_scale=5, loop="legacy")
    assert out.loop_period == 15
    _, _, out = generate(pipe, 12, steps=1, motion_scale=1, loop=True)
    assert out.loop_period == 12
    _, _, out = generate(pipe, 12, steps=1, motion_scale=1)
    assert out.loop_period is None


@pytest.mark.parametrize("F,L,overlap,r", [(12, 8, 2, 6), (6, 8, 2, 3), (24, 8, 4, 4)])
def test_loop_rotation_equivariance(pipe, F, L, overlap, r):
    """Rolling the noise by r (a window stride, or F/R) and moving the condition frame by r rolls the video."""
    shape = (1, 4, F, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    common = dict(loop=True, context_length=L, context_overlap=overlap, steps=2)
    base, _, _ = generate(pipe, F, latents=noise, cond_frame=1, **common)
    rolled, _, _ = generate(pipe, F, latents=noise.roll(r, 2), cond_frame=1 + r, **common)
    torch.testing.assert_close(rolled, base.roll(r, 2), **tol(base, 2 * fan_in(pipe.unet)))  # fusion order differs
    assert not torch.equal(rolled, base)


def test_unet_sees_the_seam_in_short_loops(pipe):
    """F ≤ L: two rotations, so the seam (F−1, 0) sits inside a window."""
    seen = []
    generate(pipe, 6, steps=1, loop=True, context_length=8, window_hook=lambda s, W, a: seen.append(W))
    assert len(seen) == 2 and any(W.index(0) > 0 for W in seen)


def test_window_hook_and_callback(pipe):
    """window_hook once per window per step; the step callback once per step, on all frames."""
    hooks, steps = [], []

    def callback(p, i, t, tensors):
        steps.append(tensors["latents"].shape[2])
        return {}

    generate(
        pipe, 20, steps=3, context_length=8, window_hook=lambda s, W, a: hooks.append(s), callback_on_step_end=callback
    )
    assert steps == [20] * 3 and sorted(set(hooks)) == [0, 1, 2]
    assert all(hooks.count(s) == len(context_windows(20, ContextOptions(8, 4), s)) for s in range(3))


def test_partial_freenoise_keyword():
    """The pipeline's reschedule is freenoise with the run's L, S and generator (FreeInit uses it too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.arange(24.0).view(1, 1, 24, 1, 1)
    out = partial(freenoise, length=8, block=4, generator=g)(x.clone())
    assert torch.equal(out[:, :, :8], x[:, :, :8]) and not torch.equal(out, x)
    assert math.isclose(out[0, 0, 8:12].sum().item(), x[0, 0, 0:4].sum().item())


def test_conditioning_is_compact():
    """The window inputs are built from K' latents, never from per-frame copies."""
    plan = Conditioning(10, [0], [1.0], [MOTION_PRESETS[0]], [0])
    latents = torch.randn(1, 2, 4, 3, 3)
    mask, cond, affinity = plan.inputs(latents, [3, 4, 5])
    assert mask.shape == (2, 1, 3, 3, 3) and cond.shape == (2, 4, 3, 3, 3) and affinity == [0.85, 0.85, 0.8]
