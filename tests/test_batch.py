"""`pia-torch batch` (pia_torch/batch.py): a manifest of jobs on the demo weights, in one process and in two
processes started by torchrun (gloo on CPU); the same bytes either way, failures recorded, resume after a kill,
and every validation error with its line before any weights load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import pia_torch.demo
from pia_torch import batch

ROOT = Path(__file__).resolve().parents[1]
# One thread: the same arithmetic in every process, and no oversubscribed cores when machines are busy.
FAST = ["--demo", "--device", "cpu", "--threads", "1", "--frames", "2", "--steps", "1", "--format", "npy"]


def write_manifest(path: Path, rows: list[dict | str]) -> Path:
    """One row per line: a dict as JSON, a string as it is (a blank or broken line)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def summary(out_dir: Path) -> dict[int, dict]:
    """summary.json's entries by line."""
    return {entry["line"]: entry for entry in json.loads((out_dir / "summary.json").read_text())["jobs"]}


def subprocess_env() -> dict[str, str]:
    """This checkout first on the path, one thread per process, offline."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Record every load of the (demo) weights."""
    calls: list[str] = []
    tiny = pia_torch.demo.tiny_pipeline

    def spy(*args, **kwargs):
        calls.append("tiny_pipeline")
        return tiny(*args, **kwargs)

    monkeypatch.setattr(pia_torch.demo, "tiny_pipeline", spy)
    return calls


@pytest.fixture(autouse=True)
def threads():
    """`--threads` sets torch's thread count for the whole process: restore it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 24), (90, 10, 200)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (9, 100, 20)).save(folder / "b.png")
    return folder


# The four jobs of the torchrun test, and a fifth whose image does not exist.
JOBS = [
    {"image": "images/a.png", "prompt": "first", "out": "a.npy"},  # a derived seed
    {"image": "images/b.png", "prompt": "second", "seed": 5, "steps": 2, "scheduler": "euler", "out": "b.npy"},
    {"prompt": "third", "frames": 3, "free_init": "butterworth", "out": "c.npy"},  # the demo image
    {"image": "images/a.png", "prompt": "", "negative_prompt": "", "strength": 0.5, "steps": 2, "out": "d.npy"},
    {"image": "images/missing.png", "prompt": "fifth", "out": "e.npy"},
]


def check_run(out_dir: Path, world_size: int) -> dict[int, dict]:
    """Jobs 1-4 done once each, job 5 failed with its line and error; nothing else written."""
    entries = summary(out_dir)
    assert sorted(entries) == [1, 2, 3, 4, 5]
    assert [entries[line]["status"] for line in (1, 2, 3, 4)] == ["done"] * 4
    assert entries[5]["status"] == "failed" and "image not found" in entries[5]["error"]
    assert {entries[line]["rank"] for line in entries} == set(range(world_size))  # every rank had work
    written = ["a", "b", "c", "d"]
    expected = sorted([f"{name}.{ext}" for name in written for ext in ("npy", "json")] + ["summary.json"])
    assert sorted(p.name for p in out_dir.iterdir()) == expected  # no temporary files, no output for job 5
    return entries


def test_torchrun_two_processes_equal_one_process(tmp_path, images):
    """torchrun --standalone --nproc_per_node=2 (gloo, loopback): each output written once, each equal byte for
    byte to the one-process run of the same manifest (both on one thread); the failing job on one rank does not
    hang the other, and the exit status says a job failed."""
    manifest = write_manifest(tmp_path / "jobs.jsonl", JOBS)
    command = ["-m", "pia_torch", "batch", str(manifest), "--out-dir", str(tmp_path / "two"), *FAST]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0, r.stderr  # job 5 failed
    assert "line 5: failed: image not found" in r.stderr, r.stderr
    two = check_run(tmp_path / "two", world_size=2)

    one_dir = tmp_path / "one"
    assert batch.main([str(manifest), "--out-dir", str(one_dir), *FAST]) == 1
    one = check_run(one_dir, world_size=1)
    assert one[1]["seed"] == two[1]["seed"] == batch.derive_seed(1, JOBS[0])  # not from the rank
    for name in ("a", "b", "c", "d"):
        video = np.load(one_dir / f"{name}.npy")
        assert video.dtype == np.float32 and video.ndim == 4 and video.shape[-1] == 3
        assert (one_dir / f"{name}.npy").read_bytes() == (tmp_path / "two" / f"{name}.npy").read_bytes(), name
    assert np.load(one_dir / "c.npy").shape == (3, 64, 64, 3)  # the job's frames over the command's


def test_kill_and_resume(tmp_path, images):
    """SIGKILL after the first job's sidecar appears; the same command again skips what was finished (whatever
    the timing) and makes the rest."""
    fast = {"image": "images/a.png", "prompt": "fast", "out": "fast.npy"}
    slow = {"prompt": "slow", "frames": 4, "steps": 8, "out": "slow.npy"}  # seconds: the kill lands before its end
    manifest = write_manifest(tmp_path / "jobs.jsonl", [fast, slow])
    out_dir = tmp_path / "out"
    argv = [str(manifest), "--out-dir", str(out_dir), *FAST]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pia_torch", "batch", *argv],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out_dir / "fast.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = {p.stem for p in out_dir.glob("*.json")}
    assert "fast" in finished, finished
    assert not (out_dir / "summary.json").exists()
    first = (out_dir / "fast.npy").read_bytes()

    assert batch.main(argv) == 0
    entries = summary(out_dir)
    assert entries[1]["status"] == "skipped" and (out_dir / "fast.npy").read_bytes() == first
    assert entries[2]["status"] == ("skipped" if "slow" in finished else "done")  # "done" unless the kill came late
    assert (out_dir / "slow.npy").is_file()


def test_skip_only_the_same_parameters(tmp_path, images, loads):
    """A second run skips every job and loads no weights; a job whose options changed is made again, the
    others keep their derived seeds."""
    rows = [{"image": "images/a.png", "prompt": "one"}, {"image": "images/b.png", "prompt": "two"}]
    manifest = write_manifest(tmp_path / "jobs.jsonl", rows)
    argv = [str(manifest), "--out-dir", str(tmp_path / "out"), *FAST]
    assert batch.main(argv) == 0
    first = summary(tmp_path / "out")
    assert [first[line]["output"] for line in (1, 2)] == [str(tmp_path / "out" / n) for n in ("1-a.npy", "2-b.npy")]
    assert loads == ["tiny_pipeline"]

    assert batch.main(argv) == 0
    assert [entry["status"] for entry in summary(tmp_path / "out").values()] == ["skipped", "skipped"]
    assert loads == ["tiny_pipeline"]  # nothing to do: no weights loaded

    write_manifest(manifest, [rows[0], {**rows[1], "prompt": "changed"}])
    assert batch.main(argv) == 0
    again = summary(tmp_path / "out")
    assert [again[line]["status"] for line in (1, 2)] == ["skipped", "done"]
    assert again[1]["seed"] == first[1]["seed"] and again[2]["seed"] != first[2]["seed"]
    sidecar = json.loads((tmp_path / "out" / "2-b.json").read_text())
    assert sidecar["params"]["prompt"] == "changed" and sidecar["batch"]["line"] == 2


def test_validation_errors_list_line_numbers(tmp_path, capsys, loads):
    """Every bad job is reported at once, one `error: line N: ...` line each, in line order; nothing is written
    and no weights load."""
    rows = [
        {"prompt": "fine"},
        "{not json",
        "",  # a blank line is no job, but counts
        "[1, 2]",
        {"prompt": "p", "frames": 0},
        {"prompt": "p", "speed": 3},
        {"prompt": "p", "base": "some/model"},
        {"prompt": "p", "steps": "many"},
        {"prompt": "p", "out": "1-demo.npy"},  # line 1's default name
        {"prompt": "p", "out": "x.avi"},
        {"prompt": "p", "num_videos": 2},
        {"prompt": "p", "guidance": {"a": 1}},
        {"prompt": "p", "frames": False},
        {"prompt": "p", "out": "summary.gif"},
        {"prompt": "fine too", "negative_prompt": "-starts with a dash"},
    ]
    manifest = write_manifest(tmp_path / "jobs.jsonl", rows)
    assert batch.main([str(manifest), "--out-dir", str(tmp_path / "out"), *FAST]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = {
        2: "not JSON",
        4: "a job is a JSON object of options, got list",
        5: "--frames must be >= 1, got 0",
        6: "unknown option 'speed'; a job may set: ",
        7: "base is a model option, the same for every job: give --base to the command",
        8: "argument --steps: invalid int value: 'many'",
        9: "would share its sidecar 1-demo.json with line 1's output",
        10: "--out must end in .gif, .mp4, .webp, .npy",
        11: "num_videos: one video per job",
        12: "guidance: expected a string, a number, true/false or a list of them",
        13: "frames: expected",
        14: "would share its sidecar summary.json with the summary",
    }
    assert len(lines) == len(expected), lines
    for text, (line, match) in zip(lines, expected.items()):
        assert text.startswith(f"error: line {line}: ") and match in text, (line, text)
    valid = lines[3].split("a job may set: ")[1].split(", ")
    assert {"frames", "negative_prompt", "free_init", "out"} <= set(valid) and not {"base", "demo"} & set(valid)
    assert not (tmp_path / "out").exists() and loads == []


def test_folder_of_images_and_command_defaults(tmp_path, images, capsys):
    """A folder makes one job per image (sorted names, other files ignored) with --prompt; a folder without a
    prompt is refused."""
    (images / "notes.txt").write_text("not an image")
    Image.new("RGB", (32, 32)).save(images / "0.jpg")
    out_dir = tmp_path / "out"
    assert batch.main([str(images), "--prompt", "waves", "--out-dir", str(out_dir), *FAST]) == 0
    entries = summary(out_dir)
    assert [Path(entries[line]["output"]).name for line in (1, 2, 3)] == ["1-0.npy", "2-a.npy", "3-b.npy"]
    assert len({entry["seed"] for entry in entries.values()}) == 3
    assert json.loads((out_dir / "2-a.json").read_text())["params"]["prompt"] == "waves"
    capsys.readouterr()
    assert batch.main([str(images), "--out-dir", str(out_dir), "--base", "x", "--adapter", "y"]) == 2
    assert "is a folder of images: give their --prompt" in capsys.readouterr().err


def test_job_options_replace_the_commands(tmp_path, images):
    """The command's video options are the jobs' defaults; a job's own option wins (the seed too)."""
    rows = [{"steps": 2}, {"prompt": "own", "seed": 4, "image": "images/b.png"}]
    manifest = write_manifest(tmp_path / "jobs.jsonl", rows)
    command = [str(manifest), "--out-dir", str(tmp_path / "out"), *FAST, "--seed", "9", "--prompt", "shared"]
    assert batch.main([*command, "--image", str(images / "a.png")]) == 0
    one = json.loads((tmp_path / "out" / "1-a.json").read_text())["params"]
    two = json.loads((tmp_path / "out" / "2-b.json").read_text())["params"]
    assert (one["steps"], one["frames"], one["seed"], one["prompt"]) == (2, 2, 9, "shared")
    assert (two["steps"], two["seed"], two["prompt"], two["image"]) == (1, 4, "own", str(images / "b.png"))


def test_job_argv():
    options = {"negative_prompt": "-dark", "frames": 3, "guidance": 1.5, "loop": True, "off": False}
    options["keyframe"] = ["0:a.png", "-1:b.png"]
    assert batch.job_argv(options, frozenset({"off"})) == [
        "--negative-prompt=-dark",
        "--frames=3",
        "--guidance=1.5",
        "--loop",
        "--keyframe=0:a.png",
        "--keyframe=-1:b.png",
    ]


def test_split_balances_cost_deterministically():
    """Longest processing time first: every job in exactly one part, parts in line order, loads close."""
    jobs = [SimpleNamespace(line=line) for line in range(1, 8)]
    costs = {1: 5, 2: 9, 3: 1, 4: 9, 5: 3, 6: 2, 7: 7}
    parts = batch.split(jobs, costs, 3)
    # by (cost desc, line): 2, 4, 7 one each; 1 -> the 7 (load 12), 5 -> the first 9 (12), 6 and 3 -> the other 9
    assert [[job.line for job in part] for part in parts] == [[2, 5], [3, 4, 6], [1, 7]]
    assert [sum(costs[job.line] for job in part) for part in parts] == [12, 12, 12]
    assert parts == batch.split(list(reversed(jobs)), costs, 3)
    assert batch.split(jobs, costs, 1) == [jobs]
    assert batch.split(jobs[:1], costs, 2)[1] == []
