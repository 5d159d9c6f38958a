#!/usr/bin/env bash
# pia_torch vs diffusers 0.42.1 on one CUDA GPU (written for an H100 / H200): the numbers of README's
# "Performance" section in about 7 minutes, each step under its own time limit and all of them under one
# deadline (BENCH_BUDGET_S), so the script ends in time whatever hangs.
#
#   bash scripts/bench_gpu.sh                                     # everything, results in ./bench_gpu_out
#   OUT=/some/dir BENCH_BUDGET_S=600 bash scripts/bench_gpu.sh
#   BENCH_ONLY="weights compiled" BENCH_BUDGET_S=330 bash scripts/bench_gpu.sh    # a second try at one step
#
# Needs python3 with torch (CUDA), the project's dependencies, and diffusers==0.42.1 + accelerate (the `test`
# extra, or wheels in .whl/: see below). pia_torch runs from this checkout (PYTHONPATH), not installed.
#
# Steps, the cheapest and surest first. Each writes its files in $OUT as soon as it ends; on its time limit
# bench.py still writes what it has measured (a report marked STOPPED EARLY), so a late failure keeps what
# came before:
#   env       env.txt: GPU, driver, versions, and that pia_torch and diffusers' PIAPipeline import (else stop)
#   weights   random SD1.5 + PIA weights in $BENCH_WEIGHTS (~5 GB, made in fp32 on the CPU; reused if there)
#   eager     eager.json/.md: 16 frames at 512x512, 25 DDIM steps, CFG, fp16: per-component timings, FLOP rates,
#             CUDA memory; and the scaling table (8..64 frames x 256/512 pixels, 1 step per call)
#   offload   offload.json/.md: each library alone on the GPU, the peak max_memory_allocated and time of a
#             16x512x512 call (2 steps: the peak is that of any count), plain and with enable_model_cpu_offload();
#             and one UNet call / a 4-frame VAE decode with the weights in contiguous vs channels_last format,
#             and the decode of the 16 frames with 1, 2, 4, 8, 16 frames per call (time, peak)
#   compiled  compiled.json/.md: eager's run with --compile (torch.compile, default mode). Compiling takes
#             minutes, so it runs last and gets what is left of the budget
# log.txt holds every step's output: 8 files at most in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench_gpu_out}"
WEIGHTS="${BENCH_WEIGHTS:-/tmp/w}"
BUDGET="${BENCH_BUDGET_S:-420}"  # seconds for the whole script
ONLY=" ${BENCH_ONLY:-weights eager offload compiled} "  # env always runs
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

note() { echo "[bench_gpu $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: COMMAND under `timeout` with LIMIT_S, or what is left before the deadline if
# that is less (skipped under 30 s). SIGTERM at the limit, on which bench.py writes what it has measured;
# SIGKILL 30 s later. Output appended to log.txt and shown. Returns COMMAND's status (124: stopped at the limit,
# 137: killed), or 0 when NAME is not in BENCH_ONLY.
step() {
    local name=$1 limit=$2 start=$SECONDS left=$((BUDGET - SECONDS)) rc cmd
    shift 2
    [[ $name == env || $ONLY == *" $name "* ]] || return 0
    ((left < limit)) && limit=$left
    if ((limit < 30)); then
        note "$name: skipped, ${left} s left of BENCH_BUDGET_S=$BUDGET"
        return 124
    fi
    cmd="$*"
    cmd="${cmd//$'\n'/ }"
    note "$name: start (limit ${limit} s): ${cmd:0:300}"
    timeout -k 30 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=$?
    note "$name: rc=$rc after $((SECONDS - start)) s"
    return "$rc"
}

# Wheels carried in .whl/ (diffusers 0.42.1, where the machine lacks it), fetched beforehand on a machine with
# network: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# They are installed into /tmp/site, put first on the path. `--no-deps`: their requirements must already be
# there (the GPU image has them).
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

# env: stops the script if either library does not import or the GPU does not answer
{
    date -u
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
    echo "cpus: $(nproc)"
    free -g | head -2
    df -h /tmp | tail -1
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
    echo "PYTHONPATH=$PYTHONPATH"
} >"$OUT/env.txt" 2>&1
step env 90 python3 -c '
import sys, torch, transformers, huggingface_hub, accelerate, diffusers, pia_torch
from diffusers import PIAPipeline
from pia_torch import PIAPipeline as Ours
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "| transformers", transformers.__version__,
      "| huggingface_hub", huggingface_hub.__version__, "| accelerate", accelerate.__version__)
print("diffusers", diffusers.__version__, diffusers.__file__)
print("pia_torch", pia_torch.__version__, pia_torch.__file__)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
      "| tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "conv", torch.backends.cudnn.allow_tf32,
      "| sdpa flash", torch.backends.cuda.flash_sdp_enabled(), "mem_efficient",
      torch.backends.cuda.mem_efficient_sdp_enabled(), "cudnn", torch.backends.cuda.cudnn_sdp_enabled())
x = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
print("cuda matmul ok:", bool(torch.isfinite(x @ x).all()))
' >>"$OUT/env.txt"
rc=$?
cat "$OUT/env.txt"
((rc == 0)) || { note "the environment is not usable: stopping"; exit 1; }

# weights, once, in a step of their own (bench.py would make them too, but inside the eager step's limit)
step weights 150 python3 -c "
import sys; sys.path.insert(0, 'scripts')
from pathlib import Path
import bench
bench.build_weights('sd15', Path('$WEIGHTS'))
" || { note "no weights: stopping"; exit 1; }

RUN=(python3 scripts/bench.py --size sd15 --device cuda --dtype fp16 --frames 16 --resolution 512
    --weights-dir "$WEIGHTS")

# eager, with the scaling table (eager only: compiled, each shape would compile again)
step eager 270 "${RUN[@]}" --steps 25 --warmup 1 --repeats 3 --scaling --scaling-repeats 1 \
    --json "$OUT/eager.json" --markdown "$OUT/eager.md"
# beside the weights too: a later call on the same (still warm) machine has a fresh $OUT
[[ -f $OUT/eager.json ]] && cp "$OUT/eager.json" "$WEIGHTS/eager.json"

# memory of each library alone on the GPU, plain and with model CPU offload; layouts; decode chunk sizes
step offload 120 "${RUN[@]}" --steps 2 --warmup 1 --repeats 1 --offload --layout --decode-chunks \
    --json "$OUT/offload.json" --markdown "$OUT/offload.md"

# compiled: the rest of the budget. The first warm-up call of each library compiles (pia_torch first). The
# FLOP counts and the frames-agree check are eager ones: taken from eager.json where it has them.
step compiled "$BUDGET" "${RUN[@]}" --steps 25 --compile --warmup 1 --repeats 3 \
    --check-from "$WEIGHTS/eager.json" --json "$OUT/compiled.json" --markdown "$OUT/compiled.md"

note "done: $(ls "$OUT" | tr '\n' ' ')"
for f in offload.md eager.md compiled.md; do
    [[ -f $OUT/$f ]] && { echo "----- $f"; cat "$OUT/$f"; }
done
exit 0
