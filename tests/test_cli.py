"""The `pia-torch` command (pia_torch/cli.py; scripts/sample.py wraps it): the demo end to end, the sidecar,
the original defaults, and one clean error line (exit 2, no traceback, no file left behind, no weights
loaded) for every kind of bad input."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pia_torch import cli
from pia_torch.pipeline import PIAPipeline
from pia_torch.schedulers import DDIMScheduler, EulerDiscreteScheduler

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sample.py"

FAST = ["--frames", "2", "--steps", "1"]


def run_ok(argv: list[str], capsys) -> tuple[dict, str]:
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    out = Path(argv[argv.index("--out") + 1])
    assert out.is_file() and out.stat().st_size > 0
    return json.loads(out.with_suffix(".json").read_text()), err


@pytest.fixture(autouse=True)
def no_loading(monkeypatch, request):
    """Record every weight load: `fails` checks that a rejected command loaded nothing."""
    import pia_torch.demo

    loads: list[str] = []
    for owner, name in [
        (pia_torch.demo, "tiny_pipeline"),
        (cli.MotionAdapter, "from_pretrained"),
        (cli.PIAPipeline, "from_pretrained"),
    ]:
        original = getattr(owner, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            loads.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    return loads


def fails(argv: list[str], capsys, folder: Path, match: str, loads: list[str] | None = None) -> None:
    """Exit status 2, exactly one `error: ...` line on stderr, no traceback, nothing written in folder;
    with `loads` (the no_loading fixture): no weights were loaded before the error."""
    before = set(folder.rglob("*"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    assert set(folder.rglob("*")) == before
    if loads is not None:
        assert loads == [], f"weights loaded before the error: {loads}"


def frame_sizes(path: Path) -> tuple[int, tuple[int, int]]:
    with Image.open(path) as im:
        return im.n_frames, im.size


# --------------------------------------------------------------------------------------------- demo


@pytest.mark.parametrize("convention, ext", [("original", ".webp"), ("diffusers", ".mp4")])
def test_demo(tmp_path, capsys, convention, ext):
    """The original convention runs with the demo defaults, the diffusers one with 2 frames and 1 step."""
    out = tmp_path / "sub" / f"x{ext}"
    fast = FAST if convention == "diffusers" else []
    info, err = run_ok(["--demo", *fast, "--convention", convention, "--out", str(out)], capsys)
    assert "noise" in err  # says the demo output is not a real animation
    assert "it/s" in err or "s/it" in err  # the progress bar ran
    p = info["params"]
    assert p["demo"] and p["convention"] == convention and p["out"] == str(out)
    frames, steps = (2, 1) if fast else (16, 25)  # --demo keeps the real defaults: only weights and image change
    assert (p["frames"], p["steps"], p["seed"], p["guidance"], p["strength"]) == (frames, steps, 0, 7.5, 1.0)
    assert (p["width"], p["height"]) == (64, 64)  # the bundled image's size
    assert p["negative_prompt"] == cli.NEGATIVE_PROMPT
    assert info["seed"] == 0 and "demo" in info["models"]
    assert set(info["versions"]) >= {"pia_torch", "torch", "transformers", "python"}
    assert info["scheduler"]["_class_name"] == "DDIMScheduler"
    assert sorted(f.name for f in out.parent.iterdir()) == sorted([out.name, "x.json"])  # no temp files


def test_demo_options_apply(tmp_path, capsys):
    out = tmp_path / "x.gif"
    image = tmp_path / "wide.png"
    Image.new("RGB", (100, 60), (200, 30, 60)).save(image)
    info, err = run_ok(
        [
            "--demo",
            "--image",
            str(image),
            "--frames",
            "3",
            "--steps",
            "2",
            "--seed",
            "7",
            "--scheduler",
            "euler",
            "--free-init",
            "gaussian",
            "--motion-scale",
            "2",
            "--strength",
            "0.5",
            "--negative-prompt",
            "",
            "--prompt",
            "waves",
            "--out",
            str(out),
        ],
        capsys,
    )
    p = info["params"]
    assert (p["frames"], p["steps"], p["seed"], p["prompt"], p["negative_prompt"]) == (3, 2, 7, "waves", "")
    assert (p["scheduler"], p["free_init"], p["motion_scale"], p["strength"]) == ("euler", "gaussian", 2, 0.5)
    assert info["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    assert info["image"]["path"] == str(image.resolve())
    assert frame_sizes(out) == (3, (64, 32))  # the demo working size: 100x60 -> 64x38 -> 64x32
    assert err.count("| 0/1 [") == 3  # FreeInit: a progress bar per pass (3 passes; strength 0.5: 1 step)


def test_script_subprocess(tmp_path):
    """The file runs as a script, offline, from any working directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--demo", *FAST, "--out", "tmp/x.gif"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert frame_sizes(tmp_path / "tmp" / "x.gif") == (2, (64, 64))
    info = json.loads((tmp_path / "tmp" / "x.json").read_text())
    assert info["params"]["frames"] == 2 and info["command"].endswith("--out tmp/x.gif")


def test_installed_wheel_entry_point(tmp_path):
    """The built wheel, installed in a fresh venv (dependencies from this environment), gives a working
    `pia-torch` command that imports pia_torch from the venv, not from the checkout."""
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path / "dist")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("pia_torch-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import pia_torch; print(pia_torch.__file__)"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(venv)), where
    r = subprocess.run(
        [venv / "bin" / "pia-torch", "--demo", *FAST, "--out", "out/x.gif"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert frame_sizes(tmp_path / "out" / "x.gif") == (2, (64, 64))
    assert json.loads((tmp_path / "out" / "x.json").read_text())["command"].startswith("pia-torch --demo")


def test_npy_output_is_the_raw_frames(tmp_path, capsys):
    """.npy: the pipeline's float32 frames as they are (for exact comparisons), with the usual sidecar."""
    info, _ = run_ok(["--demo", *FAST, "--out", str(tmp_path / "x.npy")], capsys)
    video = np.load(tmp_path / "x.npy")
    assert video.dtype == np.float32 and video.shape == (2, 64, 64, 3) and 0 <= video.min() <= video.max() <= 1
    assert info["params"]["out"] == str(tmp_path / "x.npy")


def test_parse_args_and_pipeline_kwargs(no_loading):
    """parse_args fills the defaults and checks without weights; pipeline_kwargs are PIAPipeline.__call__'s."""
    args = cli.parse_args(["--demo", "--frames", "3", "--steps", "2", "--guidance", "1"])
    assert (args.frames, args.steps, args.prompt, args.negative_prompt) == (3, 2, cli.DEMO_DEFAULTS["prompt"], None)
    assert cli.params(args)["negative_prompt"] == cli.NEGATIVE_PROMPT
    kwargs = cli.pipeline_kwargs(args)
    assert set(kwargs) <= set(inspect.signature(PIAPipeline.__call__).parameters)
    assert (kwargs["num_frames"], kwargs["num_inference_steps"], kwargs["guidance_scale"]) == (3, 2, 1.0)
    assert no_loading == []


def test_explicit_size(tmp_path, capsys):
    out = tmp_path / "x.gif"
    info, _ = run_ok(["--demo", *FAST, "--height", "48", "--width", "80", "--dtype", "bf16", "--out", str(out)], capsys)
    assert (info["params"]["height"], info["params"]["width"], info["params"]["dtype"]) == (48, 80, "bf16")
    assert frame_sizes(out) == (2, (80, 48))


# --------------------------------------------------------------------------------------------- defaults


def test_default_scheduler_is_the_original_ddim(monkeypatch):
    """Whatever scheduler the base folder holds, the CLI samples with the original PIA DDIM."""
    import pia_torch.demo

    tiny = pia_torch.demo.tiny_pipeline

    def sd15_scheduler(*args, **kwargs):  # an SD1.5-like folder: scaled_linear, set_alpha_to_one False
        pipe = tiny(*args, **kwargs)
        pipe.scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        return pipe

    monkeypatch.setattr(pia_torch.demo, "tiny_pipeline", sd15_scheduler)
    args = cli.build_parser().parse_args(["--demo"])
    args.device = "cpu"
    scheduler = cli.load_pipeline(args).scheduler
    assert isinstance(scheduler, DDIMScheduler)
    c = scheduler.config
    assert (c["beta_schedule"], c["beta_start"], c["beta_end"], c["num_train_timesteps"]) == (
        "linear",
        0.00085,
        0.012,
        1000,
    )
    assert (c["steps_offset"], c["clip_sample"], c["set_alpha_to_one"]) == (1, False, True)
    assert (c["timestep_spacing"], c["prediction_type"]) == ("leading", "epsilon")
    scheduler.set_timesteps(25)
    assert scheduler.timesteps.tolist() == list(range(961, 0, -40))  # original: 961, 921, ..., 41, 1
    assert float(scheduler.final_alpha_cumprod) == 1.0

    euler = cli.build_scheduler("euler").config
    assert (euler["beta_schedule"], euler["beta_start"], euler["beta_end"]) == ("linear", 0.00085, 0.012)


def test_help_documents_the_demo(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--demo" in text and "noise" in text and "frames" in text and "--motion-scale" in text


def sd15_folder(root: Path, checkpoints) -> Path:
    """A tiny diffusers SD1.5 pipeline folder (tiny UNet/VAE of conftest, a tiny CLIP text encoder, the
    bundled tokenizer) whose scheduler is SD1.5's PNDM with scaled_linear betas."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import pia_torch.demo

    ckpt = checkpoints("tiny")
    for name in ("unet", "vae"):
        shutil.copytree(ckpt[name], root / name)
    shutil.copytree(pia_torch.demo.ASSETS / "tokenizer", root / "tokenizer")
    vocab_size = len(CLIPTokenizer.from_pretrained(root / "tokenizer"))
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            dict(
                _class_name="PNDMScheduler",
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                num_train_timesteps=1000,
                set_alpha_to_one=False,
                skip_prk_steps=True,
                steps_offset=1,
            )
        )
    )
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def test_checkpoint_folders(tmp_path, capsys, checkpoints):
    """The non-demo path on local folders: the base's own scheduler (PNDM, scaled_linear) is replaced."""
    base = sd15_folder(tmp_path / "base", checkpoints)
    Image.new("RGB", (40, 24), (90, 10, 200)).save(tmp_path / "img.png")
    out = tmp_path / "x.gif"
    info, _ = run_ok(
        [
            "--image",
            str(tmp_path / "img.png"),
            "--prompt",
            "p",
            "--base",
            str(base),
            "--adapter",
            str(checkpoints("tiny")["adapter"]),
            *FAST,
            "--out",
            str(out),
        ],
        capsys,
    )
    assert info["models"] == {"base": str(base.resolve()), "adapter": str(checkpoints("tiny")["adapter"].resolve())}
    c = info["scheduler"]
    assert (c["_class_name"], c["beta_schedule"], c["set_alpha_to_one"]) == ("DDIMScheduler", "linear", True)
    assert info["max_frames"] == 32 and frame_sizes(out) == (2, (40, 24))


def test_parser_defaults():
    args = cli.build_parser().parse_args([])
    assert (args.guidance, args.strength, args.motion_scale, args.seed) == (7.5, 1.0, 0, 0)
    assert (args.scheduler, args.convention, args.dtype, args.free_init) == ("ddim", "original", "auto", None)
    assert (cli.DEFAULTS["frames"], cli.DEFAULTS["steps"]) == (16, 25)
    assert (cli.BASE, cli.ADAPTER) == ("SG161222/Realistic_Vision_V6.0_B1_noVAE", "openmmlab/PIA-condition-adapter")


def test_model_source(tmp_path, monkeypatch):
    """The sidecar names a local folder by its absolute path and a Hub id by the cached commit."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--owner--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model_index.json").write_text("{}")
    assert cli.model_source("owner/name") == {"id": "owner/name", "revision": "0123abcd"}
    assert cli.model_source("owner/other") == "owner/other"
    monkeypatch.chdir(tmp_path)
    assert cli.model_source("hub") == str(tmp_path / "hub")


def expected_size(w: int, h: int) -> tuple[int, int]:
    """The rule from spec/original_pia.md §3.1, written out: shrink the long edge to <= 512 keeping the
    aspect ratio (truncating, computed as int(x * (512 / long)) like the original), then floor to 8."""
    long = max(w, h)
    if long > 512:
        w, h = int(w * (512 / long)), int(h * (512 / long))
    return w - w % 8, h - h % 8


@pytest.mark.parametrize("size", [(640, 480), (300, 200), (561, 300), (700, 300), (64, 64), (1024, 2048), (9, 8)])
def test_size_from_image(size):
    w, h = expected_size(*size)
    assert cli.image_size(*size)[1] == (w, h)
    assert w % 8 == 0 and h % 8 == 0 and max(w, h) <= 512
    assert abs(w / h - size[0] / size[1]) < 0.05 * size[0] / size[1] + 8 / min(w, h)  # aspect kept to rounding
    assert expected_size(640, 480) == (512, 384) and expected_size(300, 200) == (296, 200)


def test_prepare_image_applies_the_rule(tmp_path):
    """The image is shrunk and squashed to the video size (the pipeline run itself is covered with a
    small image in test_demo_options_apply: the demo VAE's factor of 2 makes 512 px slow)."""
    Image.new("RGBA", (640, 480), (10, 200, 30, 100)).save(tmp_path / "big.png")
    args = cli.build_parser().parse_args(["--image", str(tmp_path / "big.png")])
    image = cli.prepare_image(args)
    assert image.mode == "RGB" and image.size == (512, 384) and (args.width, args.height) == (512, 384)
    args = cli.build_parser().parse_args(["--image", str(tmp_path / "big.png"), "--height", "64", "--width", "96"])
    assert cli.prepare_image(args).size == (640, 480)  # an explicit size: the pipeline resizes and crops


# --------------------------------------------------------------------------------------------- bad input

BAD = {
    "frames < 1": (["--frames", "0"], "--frames must be >= 1"),
    "steps < 1": (["--steps", "0"], "--steps must be >= 1"),
    "scheduler": (["--scheduler", "pndm"], "invalid choice: 'pndm'"),
    "free-init": (["--free-init", "fourier"], "invalid choice: 'fourier'"),
    "motion scale > 8": (["--motion-scale", "9"], "--motion-scale must be in 0..8"),
    "motion scale < 0": (["--motion-scale", "-1"], "--motion-scale must be in 0..8"),
    "strength 0": (["--strength", "0"], "--strength must be in (0, 1]"),
    "strength > 1": (["--strength", "1.5"], "--strength must be in (0, 1]"),
    "strength leaves no step": (["--steps", "2", "--strength", "0.4"], "leaves no denoising step"),
    "height not /8": (["--height", "100", "--width", "64"], "--height must be a positive multiple of 8"),
    "width not /8": (["--height", "64", "--width", "60"], "--width must be a positive multiple of 8"),
    "height alone": (["--height", "64"], "--height and --width go together"),
    "extension": (["--out", "x.avi"], "--out must end in .gif, .mp4, .webp"),
    "not a number": (["--frames", "many"], "invalid int value: 'many'"),
    "unknown option": (["--speed", "3"], "unrecognized arguments: --speed 3"),
    "negative guidance": (["--guidance", "-1"], "--guidance must be >= 0"),
    "num-videos 0": (["--num-videos", "0"], "--num-videos must be >= 1"),
    "fps 0": (["--fps", "0"], "--fps must be >= 1"),
    "threads 0": (["--threads", "0"], "--threads must be >= 1"),
    "context length 1": (["--context-length", "1"], "--context-length must be >= 2"),
    "overlap >= length": (["--context-length", "8", "--context-overlap", "8"], "--context-overlap must be in [0, 8)"),
    "noise block": (["--noise-block", "0"], "--noise-block must be in [1, 16]"),
    "anchor gap": (["--anchor-gap", "-1"], "--anchor-gap must be >= 0"),
    "looped without loop": (["--context-schedule", "looped"], "add --loop"),
    "loop with static": (["--loop", "--context-schedule", "static"], "--loop needs the looped schedule"),
    "legacy loop preset": (["--loop", "legacy"], "--loop legacy needs a loop preset"),
    "cond frame range": (["--frames", "4", "--cond-frame", "4"], "--cond-frame must be in [-4, 4)"),
    "keyframe syntax": (["--keyframe", "last:x.png"], "--keyframe must be FRAME:PATH[:STRENGTH]"),
    "keyframe missing": (["--keyframe", "3:missing.png"], "not found: missing.png"),
}


@pytest.mark.parametrize("demo", [True, False])
@pytest.mark.parametrize("case", BAD)
def test_bad_arguments(tmp_path, capsys, case, demo, no_loading):
    """Without --demo the weights do not exist: the argument error must come first (no loading)."""
    argv, match = BAD[case]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "x.gif")]
    if demo:
        source = ["--demo"]
    else:
        Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
        source = [
            "--image",
            str(tmp_path / "img.png"),
            "--prompt",
            "p",
            "--base",
            str(tmp_path / "no_base"),
            "--adapter",
            str(tmp_path / "no_adapter"),
        ]
    fails([*source, *argv, *out], capsys, tmp_path, match, no_loading)


def test_context_length_above_the_adapter_limit(tmp_path, capsys, checkpoints, no_loading):
    """The limit is read from the adapter's config.json before any weights load (demo: the tiny UNet's)."""
    from pia_torch.config import tiny_unet

    limit = tiny_unet().motion.max_seq_length
    fails(
        ["--demo", "--frames", "40", "--context-length", str(limit + 1), "--out", str(tmp_path / "x.gif")],
        capsys,
        tmp_path,
        f"--context-length must be <= {limit}",
        no_loading,
    )
    adapter = tmp_path / "adapter"
    shutil.copytree(checkpoints("tiny")["adapter"], adapter)
    config = json.loads((adapter / "config.json").read_text())
    (adapter / "config.json").write_text(json.dumps({**config, "motion_max_seq_length": 8}))
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    fails(
        [
            "--image",
            str(tmp_path / "img.png"),
            "--prompt",
            "p",
            "--adapter",
            str(adapter),
            "--base",
            str(tmp_path / "no_base"),
            "--frames",
            "40",
            "--context-length",
            "9",
            "--out",
            str(tmp_path / "x.gif"),
        ],
        capsys,
        tmp_path,
        "--context-length must be <= 8 (the adapter's motion_max_seq_length), got 9",
        no_loading,
    )


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only file system (a read-only tmpfs mount where the machine allows mounting,
    else /sys, which no process may create files in)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    yield folder if mounted else Path("/sys/kernel")
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("where", ["under a file", "read-only", "read-only, new subfolder"])
def test_unwritable_output(tmp_path, capsys, no_loading, read_only_folder, where):
    (tmp_path / "afile").write_text("x")
    out = {
        "under a file": tmp_path / "afile" / "sub" / "x.gif",
        "read-only": read_only_folder / "x.gif",
        "read-only, new subfolder": read_only_folder / "new" / "x.gif",
    }[where]
    match = "is a file, not a folder" if where == "under a file" else "is not writable"
    fails(["--demo", "--out", str(out)], capsys, tmp_path, f"cannot write {out}: ", no_loading)
    assert cli.main(["--demo", "--out", str(out)]) == 2 and match in capsys.readouterr().err
    assert not out.exists()


def test_write_failure_after_sampling(tmp_path, capsys, monkeypatch):
    """The folder disappears under the run (replaced by a file): one error line, no traceback."""
    out = tmp_path / "gone" / "x.gif"

    def vanish(*args, **kwargs):
        (tmp_path / "gone").rmdir()
        (tmp_path / "gone").write_text("now a file")
        raise NotADirectoryError(20, "Not a directory", str(out))

    monkeypatch.setitem(cli.WRITERS, ".gif", vanish)
    assert cli.main(["--demo", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {out}") and "Traceback" not in err


def test_loop_preset_warning(tmp_path, capsys):
    info, err = run_ok(
        ["--demo", "--frames", "3", "--steps", "1", "--motion-scale", "4", "--out", str(tmp_path / "x.gif")], capsys
    )
    assert "warning: --motion-scale 4 is a loop preset made for 16 frames" in err
    _, err = run_ok(
        ["--demo", "--frames", "3", "--steps", "1", "--motion-scale", "2", "--out", str(tmp_path / "y.gif")], capsys
    )
    assert "loop preset" not in err


def test_num_videos_fps_threads(tmp_path, capsys):
    """--num-videos N: one file (+ sidecar) per seed, each equal to the run with that --seed alone."""
    threads = torch.get_num_threads()
    try:
        assert (
            cli.main(
                [
                    "--demo",
                    *FAST,
                    "--seed",
                    "5",
                    "--num-videos",
                    "2",
                    "--fps",
                    "4",
                    "--threads",
                    "1",
                    "--out",
                    str(tmp_path / "many.gif"),
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["many-5.gif", "many-5.json", "many-6.gif", "many-6.json"]
    for seed in (5, 6):
        info = json.loads((tmp_path / f"many-{seed}.json").read_text())
        assert info["seed"] == seed and info["fps"] == 4 and info["params"]["num_videos"] == 2
        with Image.open(tmp_path / f"many-{seed}.gif") as im:
            assert im.info["duration"] == 250  # 4 fps
        run_ok(["--demo", *FAST, "--seed", str(seed), "--fps", "4", "--out", str(tmp_path / "one" / "x.gif")], capsys)
        assert (tmp_path / "one" / "x.gif").read_bytes() == (tmp_path / f"many-{seed}.gif").read_bytes()


def test_demo_with_a_large_image_runs_at_the_demo_size(tmp_path, capsys):
    """A user photo with --demo is shrunk to the demo's 64-pixel working size (seconds, not an hour)."""
    Image.new("RGB", (333, 217), (20, 120, 220)).save(tmp_path / "photo.png")
    info, _ = run_ok(
        ["--demo", *FAST, "--image", str(tmp_path / "photo.png"), "--out", str(tmp_path / "x.gif")], capsys
    )
    assert (info["params"]["width"], info["params"]["height"]) == (64, 40)
    assert frame_sizes(tmp_path / "x.gif") == (2, (64, 40))
    info, _ = run_ok(
        [
            "--demo",
            *FAST,
            "--image",
            str(tmp_path / "photo.png"),
            "--height",
            "32",
            "--width",
            "48",
            "--out",
            str(tmp_path / "y.gif"),
        ],
        capsys,
    )
    assert frame_sizes(tmp_path / "y.gif") == (2, (48, 32))


def test_truncation_warning_only_for_typed_text(tmp_path, capsys, caplog):
    """The demo's byte-level tokenizer cuts the built-in negative prompt: that is not the user's text."""
    run_ok(["--demo", *FAST, "--out", str(tmp_path / "x.gif")], capsys)
    assert "CLIP takes at most" not in caplog.text
    run_ok(["--demo", *FAST, "--negative-prompt", cli.NEGATIVE_PROMPT, "--out", str(tmp_path / "y.gif")], capsys)
    assert "CLIP takes at most" in caplog.text


def test_missing_and_unreadable_image(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.gif")]
    fails(["--demo", "--image", str(tmp_path / "nope.png"), *out], capsys, tmp_path, "image not found")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    fails(["--demo", "--image", str(tmp_path / "junk.png"), *out], capsys, tmp_path, "cannot read image")
    Image.new("RGB", (4, 30)).save(tmp_path / "thin.png")
    fails(["--demo", "--image", str(tmp_path / "thin.png"), *out], capsys, tmp_path, "too small")


def test_image_and_prompt_required(tmp_path, capsys):
    fails(["--out", str(tmp_path / "x.gif")], capsys, tmp_path, "--image (or --keyframe) and --prompt are required")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda(tmp_path, capsys):
    fails(["--demo", "--device", "cuda", "--out", str(tmp_path / "x.gif")], capsys, tmp_path, "CUDA is not available")


def test_weights_not_found_offline(tmp_path, tmp_path_factory, monkeypatch, capsys, checkpoints):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty_cache")))
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    common = ["--image", str(tmp_path / "img.png"), "--prompt", "p", "--out", str(tmp_path / "x.gif")]
    fails(
        [*common, "--adapter", "nobody/no-such-model"],
        capsys,
        tmp_path,
        "nobody/no-such-model: weights not found offline",
    )
    fails(
        [*common, "--adapter", str(checkpoints("tiny")["adapter"]), "--base", "nobody/no-such-base"],
        capsys,
        tmp_path,
        "nobody/no-such-base: weights not found offline",
    )


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_weights(tmp_path, capsys, checkpoints, damage):
    adapter = tmp_path / "adapter"
    shutil.copytree(checkpoints("tiny")["adapter"], adapter)
    weights = adapter / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * 64 + data[64:])
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    fails(
        [
            "--image",
            str(tmp_path / "img.png"),
            "--prompt",
            "p",
            "--adapter",
            str(adapter),
            "--base",
            str(tmp_path / "base_not_reached"),
            "--out",
            str(tmp_path / "x.gif"),
        ],
        capsys,
        tmp_path,
        f"cannot read {weights}",
    )


# --------------------------------------------------------------------------------------------- long videos


def test_long_video_loop_and_keyframes(tmp_path, capsys):
    """Above the adapter's 32 frames the windows switch on by themselves (a note says so); --loop writes its
    period; --loop-export pingpong 2F − 2 frames; keyframes are recorded with their files; bad keyframes fail
    before any weights load."""
    small = ["--demo", "--steps", "1", "--height", "16", "--width", "16"]
    info, err = run_ok([*small, "--frames", "36", "--out", str(tmp_path / "long.gif")], capsys)
    assert "note: 36 frames are more than the adapter's 32" in err
    assert info["video"]["windows"]["length"] == 16 and info["video"]["frames_written"] == 36
    assert frame_sizes(tmp_path / "long.gif")[0] == 36
    info, _ = run_ok([*small, "--frames", "6", "--loop", "--out", str(tmp_path / "loop.gif")], capsys)
    assert info["video"]["loop_period"] == 6 and info["video"]["windows"]["schedule"] == "looped"
    assert frame_sizes(tmp_path / "loop.gif")[0] == 6
    info, _ = run_ok(
        [*small, "--frames", "16", "--motion-scale", "5", "--loop", "legacy", "--out", str(tmp_path / "legacy.gif")],
        capsys,
    )
    assert info["video"]["loop_period"] == 15 and frame_sizes(tmp_path / "legacy.gif")[0] == 15
    run_ok([*small, "--frames", "5", "--loop-export", "pingpong", "--out", str(tmp_path / "pp.gif")], capsys)
    assert frame_sizes(tmp_path / "pp.gif")[0] == 8
    b = tmp_path / "b.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(b)
    info, _ = run_ok([*small, "--frames", "6", f"--keyframe=-1:{b}:0.9", "--out", str(tmp_path / "ab.npy")], capsys)
    assert info["keyframes"][0]["frame"] == -1 and info["keyframes"][0]["strength"] == 0.9
    assert len(info["keyframes"][0]["sha256"]) == 64
    plain, _ = run_ok([*small, "--frames", "6", "--out", str(tmp_path / "plain.npy")], capsys)
    assert not np.array_equal(np.load(tmp_path / "ab.npy")[-1], np.load(tmp_path / "plain.npy")[-1])
    same, _ = run_ok([*small, "--frames", "6", "--cond-frame", "0", "--out", str(tmp_path / "same.npy")], capsys)
    assert np.array_equal(np.load(tmp_path / "same.npy"), np.load(tmp_path / "plain.npy"))
    two = ["--keyframe", f"3:{b}", "--keyframe", f"3:{b}"]
    fails([*small, *two, "--out", str(tmp_path / "x.gif")], capsys, tmp_path, "same frame")


def test_keyframes_alone(tmp_path, capsys):
    """No --image: the keyframes are the images (the first gives the size)."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (48, 32), (10, 200, 30)).save(a)
    Image.new("RGB", (48, 32), (200, 30, 30)).save(b)
    pipe = cli.demo.tiny_pipeline(0)
    args = cli.parse_args(["--prompt", "p", "--keyframe", f"0:{a}", f"--keyframe=-1:{b}", "--demo", "--frames", "4"])
    args.image = None
    kwargs = cli.pipeline_kwargs(args)
    assert [k.frame for k in kwargs["keyframes"]] == [0, -1]
    out = pipe(
        None,
        "p",
        height=16,
        width=16,
        num_inference_steps=1,
        output_type="latent",
        **{k: v for k, v in kwargs.items() if k not in ("height", "width", "num_inference_steps")},
    )
    assert out.frames.shape[2] == 4
