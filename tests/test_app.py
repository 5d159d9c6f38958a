"""`pia-torch app` (pia_torch/app.py): every page control reaches the pipeline and means what the CLI option
of the same name means, bad input gets a clear message, Gradio stays optional, and the page works in a real
browser: the app runs on the demo weights on a free loopback port and Debian's headless chromium (driven by
selenium and chromedriver, both installed by .ci/run) uploads an image, clicks Generate and downloads the video.

The browser tests save screenshots of the finished and of the rejected page in their tmp folder; with
PIA_TORCH_SCREENSHOTS=folder they also go there (assets/app.png in the README is the finished one).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from pia_torch import app, cli
from pia_torch.demo import demo_image, tiny_pipeline
from pia_torch.long_video import Keyframe
from pia_torch.pipeline import PIAPipeline, PIAPipelineOutput
from pia_torch.schedulers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 90  # seconds for a page event; a 6-frame, 2-step demo video takes a few seconds on 2 busy cores


def upload(path: Path) -> dict[str, str]:
    """A file as Gradio hands an upload to the handler."""
    return {"path": str(path), "orig_name": path.name}


def page_values(path: Path, **changes: Any) -> dict[str, Any]:
    """The page's defaults, the image at `path`, and `changes`."""
    values = dict(
        image=upload(path),
        prompt="clouds",
        negative_prompt=cli.NEGATIVE_PROMPT,
        motion_scale=0,
        frames=16,
        steps=25,
        guidance=7.5,
        strength=1.0,
        seed=0,
        sampler="ddim",
        free_init="off",
        width=0,
        height=0,
        fps=8,
        video_format="gif",
        cond_frame=0,
        loop=False,
        context_length=0,
        context_overlap=4,
        keyframe_image=None,
        keyframe_frame=-1,
        keyframe_strength=1.0,
    )
    assert set(changes) <= set(values)
    return {**values, **changes}


@pytest.fixture(scope="module")
def pipe() -> PIAPipeline:
    return tiny_pipeline()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = {name: folder / f"{name}.png" for name in ("hills", "wide", "red")}
    demo_image().save(paths["hills"])
    demo_image().resize((100, 60)).save(paths["wide"])
    Image.new("RGB", (64, 64), (200, 30, 30)).save(paths["red"])
    paths["broken"] = folder / "broken.png"
    paths["broken"].write_bytes(b"this is not an image")
    return paths


# --------------------------------------------------------------------------------------------- without a browser


def test_every_control_reaches_the_pipeline(pipe, images, tmp_path, monkeypatch):
    """Each control, set away from its default, arrives in PIAPipeline.__call__ (or in the pipeline's sampler
    settings, or in the written file) as what it says; a control that the handler dropped fails here."""
    calls: list[dict[str, Any]] = []

    def spy(self: PIAPipeline, image: Image.Image, **kwargs: Any) -> PIAPipelineOutput:
        calls.append(dict(kwargs, image=image, scheduler=self.scheduler, free_init=self._free_init))
        frames = np.random.default_rng(0).random((1, kwargs["num_frames"], kwargs["height"], kwargs["width"], 3))
        return PIAPipelineOutput(frames=frames)

    monkeypatch.setattr(PIAPipeline, "__call__", spy)
    page = app.App(pipe, {"demo": "tiny"}, tmp_path, demo=True)
    changes = dict(
        prompt="a red fox",
        negative_prompt="blurry",
        motion_scale=7,
        frames=9,
        steps=5,
        guidance=3.5,
        strength=0.8,
        seed=1234,
        sampler="euler",
        free_init="gaussian",
        width=48,
        height=40,
        fps=12,
        video_format="webp",
        cond_frame=2,
        loop=True,
        context_length=6,
        context_overlap=2,
        keyframe_image=upload(images["red"]),
        keyframe_frame=-2,
        keyframe_strength=0.6,
    )
    request = app.read_request(page_values(images["hills"], **changes), page.max_frames)
    result = page.make(request, lambda fraction, text: None)
    (call,) = calls
    video = Image.open(result.video)
    video.load()  # a WebP's frame duration is read with the frame
    checked = {
        "image": np.array_equal(np.asarray(call["image"]), np.asarray(demo_image())),
        "prompt": call["prompt"] == "a red fox",
        "negative_prompt": call["negative_prompt"] == "blurry",
        "motion_scale": call["motion_scale"] == 7,
        "frames": call["num_frames"] == 9,
        "steps": call["num_inference_steps"] == 5,
        "guidance": call["guidance_scale"] == 3.5,
        "strength": call["strength"] == 0.8,
        "seed": call["generator"].initial_seed() == 1234,
        "sampler": type(call["scheduler"]) is SAMPLERS["euler"],
        "free_init": call["free_init"]["method"] == "gaussian",
        "width": call["width"] == 48,
        "height": call["height"] == 40,
        "fps": video.info["duration"] == round(1000 / 12),
        "video_format": result.video.suffix == ".webp" and video.format == "WEBP",
        "loop": call["loop"] is True,
        "context_length": call["context_length"] == 6,
        "context_overlap": call["context_overlap"] == 2,
        "cond_frame": call["keyframes"][0] == Keyframe(2),
        "keyframe_image": np.array_equal(np.asarray(call["keyframes"][1].image), np.asarray(Image.open(images["red"]))),
        "keyframe_frame": call["keyframes"][1].frame == -2,
        "keyframe_strength": call["keyframes"][1].strength == 0.6,
    }
    assert {name for name, ok in checked.items() if not ok} == set()
    assert set(checked) == {f.name for f in fields(app.Request)} - {"image_name", "keyframe_name"}
    assert "cond_frame" not in call  # with keyframes the first one carries it

    # the defaults where they mean "off" or "automatic", and the image's own size (the CLI's rule); a loop
    # preset at a length it does not loop at gets a note
    calls.clear()
    request = app.read_request(page_values(images["wide"], frames=4, cond_frame=3, motion_scale=4), page.max_frames)
    result = page.make(request, lambda fraction, text: None)
    assert "Motion 4 is a loop preset made for 16 frames: 4 frames do not close a loop" in result.status
    (call,) = calls
    assert (call["width"], call["height"]) == (64, 32) == call["image"].size  # 100x60 -> long edge 64 (--demo)
    assert call["cond_frame"] == 3 and "keyframes" not in call
    assert call["loop"] is None and call["context_length"] is None and call["free_init"] is None
    assert type(call["scheduler"]) is SAMPLERS["ddim"]
    assert Image.open(result.video).n_frames == 4 and result.preview.suffix == ".mp4"
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["seed"] == 0 and sidecar["settings"]["frames"] == 4 and sidecar["images"][0]["name"] == "wide.png"


def test_the_page_makes_the_cli_video(pipe, images, tmp_path):
    """The same settings in the page and on the command line give the same video (the size from the image by
    the same rule), and the progress bar moves once per denoising step (FreeInit: 3 passes of int(steps *
    strength) steps)."""
    page = app.App(pipe, {"demo": "tiny"}, tmp_path, demo=True)
    values = page_values(
        images["wide"],
        prompt="a cat",
        negative_prompt="blurry",
        motion_scale=1,
        frames=2,
        steps=2,
        guidance=5.0,
        strength=0.5,
        seed=11,
        sampler="euler",
        free_init="gaussian",
    )
    progress: list[float] = []
    result = page.make(app.read_request(values, page.max_frames), lambda fraction, text: progress.append(fraction))
    assert progress == [0.0, 1 / 3, 2 / 3, 1.0]

    out = tmp_path / "cli.gif"
    argv = ["--demo", "--image", str(images["wide"]), "--prompt", "a cat", "--negative-prompt", "blurry"]
    argv += ["--motion-scale", "1", "--frames", "2", "--steps", "2", "--guidance", "5", "--strength", "0.5"]
    argv += ["--seed", "11", "--scheduler", "euler", "--free-init", "gaussian", "--out", str(out)]
    assert cli.main(argv) == 0
    page_video, cli_video = Image.open(result.video), Image.open(out)
    assert page_video.n_frames == cli_video.n_frames == 2 and page_video.size == cli_video.size == (64, 32)
    for i in range(2):
        page_video.seek(i)
        cli_video.seek(i)
        np.testing.assert_array_equal(np.asarray(page_video.convert("RGB")), np.asarray(cli_video.convert("RGB")))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(image=None), "No image: upload the image to animate"),
        (dict(width=60, height=64), "Width and height must both be multiples of 8"),
        (dict(width=64), "Width and height must both be multiples of 8"),
        (dict(strength=0.0), "Strength must be in (0, 1], got 0"),
        (dict(steps=3, strength=0.3), "Strength 0.3 with 3 steps leaves no denoising step"),
        (dict(frames=129), "Frames must be in 1..128, got 129"),
        (dict(seed=-1), "Seed must be >= 0, got -1"),
        (dict(seed=1.5), "Seed must be a whole number, got 1.5"),
        (dict(seed=None), "Seed: enter a number"),
        (dict(sampler="plms"), "Sampler must be one of ddim, euler, dpmpp_2m"),
        (dict(keyframe_frame=0), "The image and the second keyframe need different frames"),
        (dict(cond_frame=16), "A keyframe's frame must be in -16..15"),
    ],
)
def test_bad_values_get_a_clear_message(changes, message, images):
    values = page_values(images["hills"], **changes)
    if "keyframe_frame" in changes:
        values["keyframe_image"] = upload(images["red"])
    with pytest.raises(app.InputError) as error:
        app.read_request(values, max_frames=128)
    assert str(error.value).startswith(message)


def test_an_unreadable_image_and_the_pipeline_checks_get_a_clear_message(pipe, images, tmp_path):
    page = app.App(pipe, {"demo": "tiny"}, tmp_path, demo=True)
    broken = app.read_request(page_values(images["broken"]), page.max_frames)
    with pytest.raises(app.InputError, match=r"Cannot read the image 'broken.png': it is not an image file"):
        page.make(broken, lambda fraction, text: None)
    overlapping = app.read_request(page_values(images["hills"], context_length=4, context_overlap=4), page.max_frames)
    with pytest.raises(app.InputError, match="overlap"):  # the pipeline's own check, passed on as it words it
        page.make(overlapping, lambda fraction, text: None)
    assert not any(tmp_path.iterdir())  # nothing written for a rejected request


def test_one_video_at_a_time_and_the_seed_button(pipe, tmp_path):
    """Generate is queued with concurrency 1, telemetry is off, and the Random button draws seeds."""
    page = app.build_page(app.App(pipe, {"demo": "tiny"}, tmp_path, demo=True), "")
    generate = next(fn for fn in page.fns.values() if fn.api_name == "generate")
    assert generate.queue and generate.concurrency_limit == 1
    assert not page.analytics_enabled
    assert len({app.random_seed() for _ in range(8)}) > 1


def test_command_line(capsys, server):
    """Loopback by default; errors are one line and exit status 2 (a taken port among them)."""
    assert app.build_parser().parse_args([]).host == "127.0.0.1"
    assert app.exposure_warning("127.0.0.1", 7860) is None
    assert "with no login" in app.exposure_warning("0.0.0.0", 7860)
    assert cli.main(["app", "--demo", "--base", "model.safetensors"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --demo brings its own tiny weights: drop --base, --adapter, --config and --vae"
    )
    assert app.main(["--port", "seven"]) == 2
    assert "error: argument --port: invalid int value: 'seven'" in capsys.readouterr().err
    port = int(server.rsplit(":", 1)[1].strip("/"))
    assert app.main(["--demo", "--port", str(port)]) == 2
    assert f"error: cannot serve on 127.0.0.1:{port}: the port is taken" in capsys.readouterr().err


def test_gradio_stays_optional():
    """`import pia_torch` and the CLI never import Gradio; without it, `pia_torch.app` says how to get it."""
    code = (
        "import sys\n"
        "import pia_torch, pia_torch.cli\n"
        "pia_torch.cli.build_parser().parse_args(['--demo'])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'gradio'], 'gradio imported'\n"
        "sys.modules['gradio'] = None  # as if it were not installed\n"
        "try:\n"
        "    import pia_torch.app\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '`pia-torch app` needs Gradio: pip install "pia_torch[app]"'


# --------------------------------------------------------------------------------------------- in a browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """`pia-torch app --demo` on a free loopback port, in its own process; its URL."""
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio")}
    command = [sys.executable, "-m", "pia_torch", "app", "--demo", "--port", str(port)]
    with open(folder / "log.txt", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while not serving(url):
            assert process.poll() is None, f"the app exited: {(folder / 'log.txt').read_text()}"
            assert time.monotonic() < deadline, f"the app did not serve in 120 s: {(folder / 'log.txt').read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads) -> Iterator[WebDriver]:
    """Debian's chromium, headless, downloading into `downloads` without asking."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).is_file(), f"{path} is missing: apt-get install chromium chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a given driver: no download
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str, timeout: float = WAIT) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException as e:
        page = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"waited {timeout} s for {what}; the page says: {page}") from e


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: d.find_element(By.ID, "generate").is_enabled(), "the page")


def choose_file(driver: WebDriver, control: str, path: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#{control} input[type=file]").send_keys(str(path))
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#{control} img"), f"the {control} preview")


def set_number(driver: WebDriver, control: str, value: float) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"#{control} input[type=number]")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def says(driver: WebDriver, text: str) -> None:
    """The status line under the Generate button says `text`."""
    wait(driver, lambda d: text in d.find_element(By.ID, "status").text, f"the status line to say {text!r}")


def video_duration(driver: WebDriver) -> float:
    """The page's player once it has loaded the video: its duration in seconds."""
    return wait(
        driver,
        lambda d: d.execute_script(
            "const v = document.querySelector('#video video'); return v && v.readyState >= 1 ? v.duration : null"
        ),
        "the video player",
    )


def screenshot(driver: WebDriver, path: Path) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    if os.environ.get("PIA_TORCH_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["PIA_TORCH_SCREENSHOTS"]) / path.name)


def test_generate_in_the_browser(server, browser, downloads, images, tmp_path):
    """Upload, a random seed, 6 frames, Generate: the player shows the video; the GIF and the sidecar download."""
    open_page(browser, server)
    choose_file(browser, "image", images["hills"])
    browser.find_element(By.ID, "random-seed").click()
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#seed input").get_attribute("value") != "0", "a seed")
    seed = int(browser.find_element(By.CSS_SELECTOR, "#seed input").get_attribute("value"))
    set_number(browser, "frames", 6)
    set_number(browser, "steps", 2)
    browser.find_element(By.ID, "generate").click()
    assert video_duration(browser) == pytest.approx(6 / 8, abs=0.05)  # 6 frames at 8 fps
    says(browser, "6 frames, 64 x 64")
    screenshot(browser, tmp_path / "app.png")

    links = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#files a"), "the download links")
    assert sorted(link.get_attribute("download") for link in links) == sorted([f"pia-{seed}.gif", f"pia-{seed}.json"])
    for link in links:
        link.click()
    gif, sidecar = downloads / f"pia-{seed}.gif", downloads / f"pia-{seed}.json"
    wait(browser, lambda d: gif.is_file() and sidecar.is_file(), "the downloads", timeout=30)
    with Image.open(gif) as video:
        assert video.n_frames == 6 and video.size == (64, 64)
    info = json.loads(sidecar.read_text())
    assert info["seed"] == seed and info["settings"]["steps"] == 2 and info["images"][0]["name"] == "hills.png"


def test_bad_input_in_the_browser(server, browser, images, tmp_path):
    """No image, an unreadable file, a size that is not a multiple of 8: each gets its message in the page,
    and the app then makes a video for the corrected request."""
    open_page(browser, server)
    browser.find_element(By.ID, "generate").click()
    says(browser, "Not made. No image: upload the image to animate")

    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(images["broken"]))
    browser.find_element(By.ID, "generate").click()
    says(browser, "Not made. Cannot read the image 'broken.png': it is not an image file")

    open_page(browser, server)
    choose_file(browser, "image", images["hills"])
    set_number(browser, "frames", 2)
    set_number(browser, "steps", 1)
    set_number(browser, "width", 60)
    set_number(browser, "height", 64)
    browser.find_element(By.ID, "generate").click()
    says(browser, "Not made. Width and height must both be multiples of 8 (or both 0: the image's size), got 60 x 64")
    screenshot(browser, tmp_path / "app-bad-input.png")

    set_number(browser, "width", 64)
    browser.find_element(By.ID, "generate").click()
    assert video_duration(browser) == pytest.approx(2 / 8, abs=0.05)
