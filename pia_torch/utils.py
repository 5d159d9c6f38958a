"""Image in, video out: `load_image` and the `export_to_*` writers (drop-ins for diffusers.utils).

Frames are a list of PIL images, or an array (f, h, w, 3) of floats in [0, 1] or uint8 (a pipeline's
`output_type="np"` result for one video, `frames[0]`). Every writer goes through a temporary file in
the target folder and `os.replace`, so an interrupted or failed write never leaves a partial file.
"""

from __future__ import annotations

import io
import os
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

Frames = Sequence[Image.Image] | np.ndarray


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """A local path, an http(s) URL or a PIL image -> a fully loaded RGB PIL image (EXIF-rotated)."""
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    source = str(image)
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                data: io.BytesIO | Path = io.BytesIO(response.read())
        except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
            raise OSError(f"cannot download image {source}: {e}") from e
    else:
        data = Path(source).expanduser()
        if not data.is_file():
            raise FileNotFoundError(f"image not found: {source}")
    try:
        with Image.open(data) as img:
            img.load()  # decode now: a truncated file fails here, not later in the pipeline
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports corrupt files with all three
        raise ValueError(f"cannot read image {source}: {e}") from e


LOOP_EXPORTS = ("trim", "pingpong")


def loop_frames(frames: Frames, period: int | None, mode: str = "trim") -> Frames:
    """The frames of a seamless loop. "trim": frames[:period] (a loop's period frames; all of them when
    period is None); "pingpong": any clip played forward then back, frames 0 … F−1, F−2 … 1 (2F − 2
    frames, no doubled turning frame)."""
    if mode not in LOOP_EXPORTS:
        raise ValueError(f"loop export must be one of {LOOP_EXPORTS}, got {mode!r}")
    if mode == "trim":
        return frames[:period] if period is not None else frames
    back = frames[-2:0:-1]
    return np.concatenate([frames, back]) if isinstance(frames, np.ndarray) else [*frames, *back]


def _uint8_frames(frames: Frames) -> list[np.ndarray]:
    """List of PIL images or (f, h, w, 3) floats in [0, 1] / uint8 -> list of (h, w, 3) uint8 arrays."""
    if len(frames) == 0:
        raise ValueError("no frames to write")
    if isinstance(frames[0], Image.Image):
        return [np.asarray(f.convert("RGB")) for f in frames]
    video = np.asarray(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (f, h, w, 3), got {video.shape}")
    if video.dtype != np.uint8:
        video = (np.clip(video.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return list(video)


def _target(path: str | Path | None, suffix: str) -> Path:
    """The output path; None -> a new file in the system temp folder (as diffusers does)."""
    if path is None:
        fd, name = tempfile.mkstemp(suffix=suffix)
        os.close(fd)
        return Path(name)
    return Path(path)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to `target` (same extension); move it onto `target` on success.

    On an exception the temporary file is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_to_gif(frames: Frames, path: str | Path | None = None, fps: int = 8) -> str:
    """Write an endlessly looping GIF (adaptive palette per frame); returns the path."""
    images = [Image.fromarray(f) for f in _uint8_frames(frames)]
    target = _target(path, ".gif")
    with atomic_path(target) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return str(target)


def export_to_video(frames: Frames, path: str | Path | None = None, fps: int = 8) -> str:
    """Write an H.264 MP4 (yuv420p) through imageio's ffmpeg plugin; returns the path.

    Sides are kept as they are when even (macro_block_size=2); imageio pads odd sides by one pixel.
    """
    import imageio.v2 as imageio  # the ffmpeg binary comes from imageio-ffmpeg

    video = _uint8_frames(frames)
    target = _target(path, ".mp4")
    with atomic_path(target) as tmp:
        with imageio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", macro_block_size=2, ffmpeg_log_level="error"
        ) as writer:
            for frame in video:
                writer.append_data(frame)
    return str(target)


def export_to_webp(frames: Frames, path: str | Path | None = None, fps: int = 8) -> str:
    """Write an endlessly looping animated WebP (pillow, quality 90); returns the path."""
    images = [Image.fromarray(f) for f in _uint8_frames(frames)]
    target = _target(path, ".webp")
    with atomic_path(target) as tmp:
        images[0].save(
            tmp, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, quality=90
        )
    return str(target)
