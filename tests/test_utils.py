"""pia_torch.utils: images in, GIF / MP4 / WebP out, read back with PIL and imageio."""

from __future__ import annotations

import functools
import http.server
import os
import threading

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from pia_torch.utils import export_to_gif, export_to_video, export_to_webp, load_image, loop_frames

F, H, W = 5, 40, 56  # W != H catches a transposed writer


def video(dtype: str = "float") -> np.ndarray:
    """(F, H, W, 3) frames, each a different colour ramp (a GIF writer merges identical frames)."""
    ramp = np.linspace(0, 1, W)[None, None, :, None] * np.ones((F, H, W, 3))
    x = (ramp + np.arange(F)[:, None, None, None] / F) % 1.0
    return (x * 255).round().astype(np.uint8) if dtype == "uint8" else x


def as_pil(x: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(f) for f in x]


@pytest.mark.parametrize("frames", ["float", "uint8", "pil"])
def test_gif(tmp_path, frames):
    x = as_pil(video("uint8")) if frames == "pil" else video(frames)
    path = export_to_gif(x, tmp_path / "a.gif", fps=8)
    assert path == str(tmp_path / "a.gif")
    with Image.open(path) as im:
        assert (im.n_frames, im.size) == (F, (W, H))
        assert abs(im.info["duration"] - 125) <= 10  # GIF stores centiseconds: 125 ms -> 120
        assert im.info["loop"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]  # no temporary file left


@pytest.mark.parametrize("frames", ["float", "uint8", "pil"])
def test_webp(tmp_path, frames):
    x = as_pil(video("uint8")) if frames == "pil" else video(frames)
    path = export_to_webp(x, tmp_path / "a.webp", fps=10)
    with Image.open(path) as im:
        assert (im.n_frames, im.size) == (F, (W, H))
        im.seek(1)
        im.load()
        assert im.info["duration"] == 100
        assert np.abs(np.asarray(im.convert("RGB"), float) - video("uint8")[1]).mean() < 8  # lossy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.webp"]


@pytest.mark.parametrize("frames", ["float", "uint8"])
def test_mp4(tmp_path, frames):
    path = export_to_video(video(frames), tmp_path / "a.mp4", fps=12)
    with imageio.get_reader(path, format="FFMPEG") as reader:
        meta = reader.get_meta_data()
        assert meta["fps"] == 12 and meta["size"] == (W, H) and meta["codec"] == "h264"
        assert reader.count_frames() == F
        first = reader.get_data(0)
    assert first.shape == (H, W, 3)
    assert np.abs(first.astype(float) - video("uint8")[0]).mean() < 8  # lossy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def test_float_and_uint8_frames_agree(tmp_path):
    a = export_to_gif(video("float"), tmp_path / "f.gif")
    b = export_to_gif(video("uint8"), tmp_path / "u.gif")
    assert open(a, "rb").read() == open(b, "rb").read()


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "keep.gif"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        export_to_gif(np.zeros((2, 8, 8)), target)  # not (f, h, w, 3)
    with pytest.raises(ValueError):
        export_to_webp([], tmp_path / "none.webp")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.gif"]


def test_no_path_writes_a_temp_file():
    path = export_to_gif(video())
    with Image.open(path) as im:
        assert im.n_frames == F
    os.remove(path)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "RGB"])
def test_load_image_rgb(tmp_path, mode):
    img = Image.fromarray(video("uint8")[0]).convert(mode)
    img.save(tmp_path / "x.png")
    for source in (tmp_path / "x.png", str(tmp_path / "x.png"), img):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (W, H)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path)  # a folder
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "junk.png")
    Image.fromarray(video("uint8")[0]).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "cut.png")


def test_load_image_url(tmp_path):
    """http(s) URLs are downloaded (here from a local server, so the test runs offline)."""
    Image.fromarray(video("uint8")[0]).convert("LA").save(tmp_path / "x.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        image = load_image(f"{url}/x.png")
        assert image.mode == "RGB" and image.size == (W, H)
        with pytest.raises(OSError, match="cannot download image"):
            load_image(f"{url}/missing.png")
    finally:
        server.shutdown()
        server.server_close()


def test_loop_frames_counts():
    """Loop export: a closed loop writes F frames, the legacy 16-frame loop 15, ping-pong 2F − 2."""
    video = np.arange(16, dtype=np.float32)[:, None, None, None] * np.ones((16, 2, 2, 3), np.float32) / 16
    assert len(loop_frames(video, 16)) == 16 and len(loop_frames(video, 15)) == 15
    assert len(loop_frames(video, None)) == 16
    pingpong = loop_frames(video, None, "pingpong")
    assert (
        len(pingpong) == 30
        and pingpong[16, 0, 0, 0] == video[14, 0, 0, 0]
        and pingpong[-1, 0, 0, 0] == video[1, 0, 0, 0]
    )
    assert loop_frames(list("abc"), None, "pingpong") == list("abcb")
    with pytest.raises(ValueError, match="loop export"):
        loop_frames(video, 16, "reverse")
