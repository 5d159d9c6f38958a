"""scripts/bench.py as a smoke run: `--quick` (tiny model, one timed run of each library) in a subprocess
writes its JSON with every row, the FLOP counts and the machine rates, and the two libraries computed the
same frames. No timing is asserted (DESIGN: timings go in scripts/bench.py, never in assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"
ROWS = ["text encode", "vae encode", "unet step 1", "unet, all steps", "vae decode", "end to end"]


def test_quick_smoke(tmp_path):
    out = tmp_path / "bench.json"
    # the checkout's pia_torch, whatever is installed; one thread: tiny models on shared cores (conftest)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out), "--markdown", "bench.md"],
        cwd=tmp_path,
        env=env | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["agreement"]["passed"], report["agreement"]
    assert report["agreement"]["frames_max_abs_diff"] <= 1e-3
    assert report["config"]["size"] == "tiny" and report["config"]["repeats"] == 1

    rows = {row["name"]: row for row in report["rows"]}
    for name in ROWS:
        for lib in ("pia_torch", "diffusers"):
            assert rows[name][lib]["min"] > 0 and rows[name][lib]["median"] >= rows[name][lib]["min"], (name, lib)
        assert rows[name]["speedup_min"] > 0
    steps = report["config"]["steps"]
    assert all(len(run["unet steps"]) == steps for lib in report["runs"] for run in report["runs"][lib])

    for lib in ("pia_torch", "diffusers"):
        flops = report["flops"][lib]
        assert 0 < flops["unet step"] and flops["unet, all steps"] <= flops["end to end"]
        assert report["flops_achieved"][lib]["unet, all steps"]["gflop_per_s"] > 0
    assert report["rates"]["fp32"]["matmul"] > 0 and report["rates"]["fp32"]["conv"] > 0
    assert report["machine"]["torch"] == __import__("torch").__version__

    text = (tmp_path / "bench.md").read_text()
    assert "| end to end |" in text and "PASSED" in text
    assert text.strip() in r.stdout


def test_layout_probe_and_gpu_script(tmp_path):
    """The parts of the GPU run that a CPU can check: `--layout`'s probe times both libraries' UNet and VAE
    decode in both memory formats and leaves the weights contiguous, `--decode-chunks` times the decode at
    each chunk size, and scripts/bench_gpu.sh parses."""
    import argparse
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root = bench.build_weights("tiny", tmp_path / "w")
    opts = argparse.Namespace(height=32, width=32, frames=4)
    report = {}
    for lib in bench.LIBS:
        pipe = bench.load_pipeline(lib, root, torch.float32, torch.device("cpu"))
        report[lib] = {"layout": bench.measure_layout(lib, pipe, opts, torch.float32, torch.device("cpu"))}
        assert set(report[lib]["layout"]) == {"contiguous_format", "channels_last"}
        assert all(v > 0 for t in report[lib]["layout"].values() for v in t.values())
        conv = pipe.unet.conv_in.weight
        assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
        six = argparse.Namespace(height=32, width=32, frames=6)
        chunks = report[lib]["decode chunks"] = bench.measure_decode_chunks(
            lib, pipe, six, torch.float32, torch.device("cpu")
        )
        assert list(chunks) == ([1, 2, 4, 6] if lib == "pia_torch" else [6])  # diffusers: all frames at once
        assert all(t["seconds"] > 0 and t["peak"] is None for t in chunks.values())  # peak: CUDA only
    text = bench.offload_table(report)
    assert "| diffusers | channels_last |" in text and "| pia_torch | 2 |" in text
    r = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "bench_gpu.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
