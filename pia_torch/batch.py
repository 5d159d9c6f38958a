"""`pia-torch batch`: many videos, the models loaded once; resumable; on one process, or on many GPUs and
machines with torch.distributed (launched by torchrun).

    pia-torch batch jobs.jsonl --out-dir out                    # one job per line, e.g.
        {"image": "cat.png", "prompt": "a cat walking", "seed": 7, "frames": 24}
    pia-torch batch photos/ --prompt "a portrait, smiling" --out-dir out   # one job per image (sorted names)
    torchrun --nproc_per_node=8 -m pia_torch batch jobs.jsonl --out-dir out

A job sets any video option of `pia-torch` by its name without the dashes (`negative_prompt` is
`--negative-prompt`; `true` is a bare flag, `false` or `null` leaves it unset, a list repeats the flag), and
`out`: its output's name in --out-dir (default `<line>-<image stem>.<--format>`). The command takes every
option of `pia-torch` too: the model options (--base, --adapter, --lora, --demo, --device, ...) for all jobs,
and the video options as defaults for the jobs that do not set them. A job without a seed (and no --seed on
the command) gets one derived from its line, so no video depends on which process made it.

Every job is checked before any weights load; all errors are reported at once, one line each, with their line
numbers (exit status 2). A job whose output and sidecar exist with the same parameters is skipped, so a run
that was stopped is simply started again. A job that fails when it runs (an unreadable image, say) is recorded
and the others go on; the exit status is 1 then. DIR/summary.json lists every job's status, seconds and output.

Under torchrun (WORLD_SIZE > 1) the process group comes up from torchrun's environment (NCCL on CUDA, gloo on
CPU), rank r runs on cuda:LOCAL_RANK, the jobs are split across ranks by their cost, and the results meet on
rank 0 for the one summary.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from pia_torch import cli
from pia_torch.cli import CLIError
from pia_torch.pipeline import PIAPipeline
from pia_torch.utils import atomic_path

MODEL_OPTIONS = (*cli.MODEL_OPTIONS, "threads")  # the same for every job: given to the batch command only
RUN_OPTIONS = ("device", "threads")  # how a video is made, not what it is: left out of the resume check
FORMATS = tuple(suffix.lstrip(".") for suffix in cli.WRITERS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SUMMARY = "summary.json"
# The longest a rank waits for the others at a collective: at the end, for the slowest rank's last jobs.
TIMEOUT = timedelta(hours=24)


@dataclass
class Job:
    line: int  # the manifest's line (1-based), or the image's position in the folder
    label: str  # "line 3" or the image's name, for messages
    options: dict[str, Any]  # as written in the manifest
    args: argparse.Namespace  # the video's options, parsed and checked
    params: dict[str, Any]  # cli.params(args) before the image sets the size: what the resume check compares

    @property
    def out(self) -> Path:
        return Path(self.args.out)


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's: rank, world size, local rank (0, 1, 0 without torchrun)."""

    rank: int
    size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def build_parser() -> argparse.ArgumentParser:
    """`pia-torch`'s parser plus JOBS, --out-dir and --format; --seed, --out and --num-videos default to None
    so that the command can tell whether they were given."""
    p = cli.build_parser(
        prog="pia-torch batch",
        description="Animate many images: one video per job of JOBS, the models loaded once. A job sets video "
        "options by name (prompt, negative_prompt, seed, frames, steps, ..., and out, its output's name in DIR). The "
        "options below apply too: the model options (--base, --adapter, --config, --vae, --lora, --conv-in, --dtype, "
        "--device, --convention, --threads, --demo) to every job, the video options as defaults for the jobs that "
        "do not set them. A job whose output and sidecar exist with the same parameters is skipped: run the same "
        "command again to resume. Under torchrun the jobs are split across the processes.",
    )
    p.add_argument(
        "jobs",
        metavar="JOBS",
        help="a .jsonl file, one job (a JSON object of pia-torch options) per line, or a folder of images "
        "(one job each, with --prompt)",
    )
    p.add_argument("--out-dir", required=True, metavar="DIR", help="where the videos, sidecars and summary.json go")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="gif",
        help="the output format of jobs that do not name their output (default gif)",
    )
    p.set_defaults(seed=None, out=None, num_videos=None)
    return p


def read_manifest(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]]]:
    """(line, job) for each non-blank line of a .jsonl file, and (line, error) for the lines that are not jobs."""
    jobs, errors = [], []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no error
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {path}: {e}") from e
    for line, row in enumerate(text.splitlines(), start=1):
        if not row.strip():
            continue
        try:
            job = json.loads(row)
        except json.JSONDecodeError as e:
            errors.append((line, f"line {line}: not JSON: {e.msg} (column {e.colno})"))
            continue
        if not isinstance(job, dict):
            errors.append((line, f"line {line}: a job is a JSON object of options, got {type(job).__name__}"))
            continue
        jobs.append((line, job))
    return jobs, errors


def read_folder(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    """(position, {"image": name}) for each image in the folder, sorted by name."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise CLIError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [(i, {"image": name}) for i, name in enumerate(names, start=1)]


def derive_seed(line: int, options: dict[str, Any]) -> int:
    """A job's seed from its line number and its options as written: stable across runs, in [0, 2**31)."""
    text = json.dumps([line, options], sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


def job_argv(options: dict[str, Any], flags: frozenset[str]) -> list[str]:
    """A job's options as `pia-torch` arguments: {"negative_prompt": "x"} -> --negative-prompt=x, true -> the bare
    flag, false -> nothing (`flags` are the options that are flags), a list -> the flag repeated."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                argv.append(flag)
            elif item is False and key in flags:
                continue
            elif isinstance(item, (str, int, float)) and not isinstance(item, bool):
                argv.append(f"{flag}={item}")  # `=`: a value that starts with "-" stays a value
            else:
                raise CLIError(f"{key}: expected a string, a number, true/false or a list of them, got {value!r}")
    return argv


@functools.cache
def option_names() -> tuple[tuple[str, ...], frozenset[str]]:
    """The keys a job may set (every video option of `pia-torch`, and `out`) and those that are flags."""
    defaults = vars(cli.build_parser().parse_args([]))
    valid = tuple(sorted(key for key in defaults if key not in (*MODEL_OPTIONS, "num_videos")))
    return valid, frozenset(key for key in valid if defaults[key] is False)


def check_keys(options: dict[str, Any], valid: tuple[str, ...]) -> None:
    """Only the video options; the model options belong to the command."""
    for key in options:
        if key in MODEL_OPTIONS:
            flag = "--" + key.replace("_", "-")
            raise CLIError(f"{key} is a model option, the same for every job: give {flag} to the command")
        if key == "num_videos":
            raise CLIError("num_videos: one video per job (write one job per seed)")
        if key not in valid:
            raise CLIError(f"unknown option {key!r}; a job may set: {', '.join(valid)}")


def default_name(line: int, image: str | None, fmt: str) -> str:
    """`<line>-<image stem>.<fmt>`; the demo image's stem is `demo`."""
    stem = Path(urlparse(image).path).stem if image else "demo"
    return f"{line}-{stem}.{fmt}"


def parse_job(
    line: int,
    label: str,
    options: dict[str, Any],
    defaults: argparse.Namespace,
    folder: Path,
    out_dir: Path,
    fmt: str,
) -> Job:
    """One job's options over the command's (`defaults`), checked as `pia-torch` checks them; raises CLIError.
    Relative image paths are relative to `folder` (the manifest's, or the images'); `out` to `out_dir`."""
    valid, flags = option_names()
    check_keys(options, valid)
    given = {key: value for key, value in options.items() if value is not None}
    if "seed" not in given and getattr(defaults, "seed", None) is None:
        given["seed"] = derive_seed(line, options)
    image = given.get("image", defaults.image)
    given["out"] = str(out_dir / str(given.get("out") or default_name(line, image, fmt)))
    # argparse fills only what the namespace lacks: the job's options replace the command's (a list too)
    namespace = argparse.Namespace(**{k: v for k, v in vars(defaults).items() if k not in given})
    args = cli.parse_args(job_argv(given, flags), namespace)
    cli.resolve_paths(args, folder)
    return Job(line, label, options, args, cli.params(args))


def load_jobs(cmd: argparse.Namespace) -> list[Job]:
    """Every job of the command, checked; CLIError with all errors, one line each, when any job is wrong."""
    source, out_dir = Path(cmd.jobs).expanduser(), Path(cmd.out_dir).expanduser().absolute()
    if cmd.out is not None:
        raise CLIError('--out: give --out-dir, and name a job\'s output with its "out" key')
    if cmd.num_videos is not None:
        raise CLIError("--num-videos: one video per job (write one job per seed)")
    if source.is_dir():
        if cmd.prompt is None and not cmd.demo:
            raise CLIError(f"{source} is a folder of images: give their --prompt")
        entries, errors = read_folder(source), []
    elif source.is_file():
        entries, errors = read_manifest(source)
    else:
        raise CLIError(f"JOBS not found: {source}")
    if not entries and not errors:
        raise CLIError(f"no jobs in {source}")
    defaults = argparse.Namespace(**vars(cmd))
    for name in ("jobs", "out_dir", "format", "out", "num_videos"):
        delattr(defaults, name)
    if defaults.seed is None:
        del defaults.seed  # a job without a seed gets a derived one
    cli.resolve_paths(defaults, Path.cwd())
    folder = source.absolute() if source.is_dir() else source.absolute().parent
    jobs, outputs = [], {out_dir / SUMMARY: "the summary"}
    for line, options in entries:
        label = options["image"] if source.is_dir() else f"line {line}"
        try:
            job = parse_job(line, label, options, defaults, folder, out_dir, cmd.format)
        except CLIError as e:
            errors.append((line, f"{label}: {e}"))
            continue
        sidecar = job.out.with_suffix(".json")
        if sidecar in outputs:
            errors.append((line, f"{label}: {job.out} would share its sidecar {sidecar.name} with {outputs[sidecar]}"))
            continue
        outputs[sidecar] = f"{label}'s output"
        jobs.append(job)
    if errors:
        raise CLIError("\n".join(text for _, text in sorted(errors)))
    return jobs


def resume_key(job: Job) -> dict[str, Any]:
    """What the video is: its options (not how it runs) and its images' sha256, as JSON reads it back."""
    params = {key: value for key, value in job.params.items() if key not in RUN_OPTIONS}

    def sha256(path: str | None) -> str | None:
        return cli.file_record(path)["sha256"] if path is not None and cli.is_file(path) else None

    keyframes = [sha256(path) for _, path, _ in job.args.keyframe]
    return json.loads(json.dumps({"params": params, "image_sha256": sha256(job.args.image), "keyframes": keyframes}))


def is_done(job: Job) -> bool:
    """The output and its sidecar exist, and the sidecar was written for these parameters."""
    sidecar = job.out.with_suffix(".json")
    if not (job.out.is_file() and sidecar.is_file()):
        return False
    try:
        recorded = json.loads(sidecar.read_text())["batch"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == resume_key(job)


def cost(job: Job) -> int:
    """The work of a job, for balancing: frames x denoising steps (x FreeInit's passes) x pixels."""
    args = job.args
    steps = int(args.steps * args.strength) * (cli.FREE_INIT_PASSES if args.free_init else 1)
    return args.frames * steps * pixels(args)


def pixels(args: argparse.Namespace) -> int:
    """The video's size: given, or from the image's header (as prepare_image will size it)."""
    if args.height is not None:
        return args.height * args.width
    limit = cli.DEMO_MAX_SIZE if args.demo else cli.MAX_SIZE
    if args.image is None:  # the demo image
        return limit * limit
    try:
        with Image.open(args.image) as image:  # reads the header only
            (_, (width, height)) = cli.image_size(*image.size, limit)
    except (OSError, ValueError):  # unreadable, or a URL: it fails or is measured when it runs
        return limit * limit
    return width * height


def split(jobs: list[Job], costs: dict[int, int], size: int) -> list[list[Job]]:
    """The jobs in `size` parts of about equal cost, the same on every rank: longest processing time first
    (the costliest job to the least loaded part, ties to the lower part, jobs in (cost desc, line) order);
    each part in line order."""
    loads, parts = [0] * size, [[] for _ in range(size)]
    for job in sorted(jobs, key=lambda job: (-costs[job.line], job.line)):
        part = min(range(size), key=lambda r: (loads[r], r))
        parts[part].append(job)
        loads[part] += costs[job.line]
    return [sorted(part, key=lambda job: job.line) for part in parts]


def all_gather(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (all_gather_object; just [obj] without torchrun)."""
    if world.size == 1:
        return [obj]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def load_pipeline(job: Job, world: World) -> PIAPipeline:
    """The models of the command (every job holds them), on cuda:LOCAL_RANK under torchrun with CUDA."""
    args = job.args
    device = f"cuda:{world.local_rank}" if args.device == "cuda" and world.size > 1 else args.device
    pipe = cli.load_pipeline(argparse.Namespace(**{**vars(args), "device": device}))
    pipe.set_progress_bar_config(disable=True)  # one bar over the jobs instead
    return pipe


def make_video(pipe: PIAPipeline, job: Job, cmd_argv: list[str], manifest: str) -> None:
    """Render one job and write it with its sidecar, which records the job and its resume key."""
    args = job.args
    image = cli.prepare_image(args)
    batch = {"manifest": manifest, "line": job.line, "job": job.options, "key": resume_key(job)}
    cli.configure(pipe, args.scheduler, args.free_init)
    prompts = cli.encode_prompts(pipe, args)
    cli.make_video(pipe, args, image, prompts, args.seed, job.out, ["batch", *cmd_argv], {"batch": batch})


def run_jobs(jobs: list[Job], world: World, cmd_argv: list[str], manifest: str) -> list[dict[str, Any]]:
    """This rank's part of the jobs not done yet; a summary entry for each (failures caught, so every rank
    reaches the collectives), and one for each skipped job on rank 0."""
    # Which jobs are done, and what each costs: every rank looks at its stripe of the jobs, the ranks share it
    # (on a file system the ranks do not share, a job done elsewhere is then made again, never skipped wrongly).
    local = {job.line: (is_done(job), cost(job)) for job in jobs[world.rank :: world.size]}
    survey = {line: value for part in all_gather(world, local) for line, value in part.items()}
    pending = [job for job in jobs if not survey[job.line][0]]
    mine = split(pending, {line: c for line, (_, c) in survey.items()}, world.size)[world.rank]
    entries = [entry(job, "skipped", 0.0) for job in jobs if survey[job.line][0]] if world.rank == 0 else []

    pipe, load_error = None, None
    if mine:
        try:
            pipe = load_pipeline(mine[0], world)
        except Exception as e:  # every job of this rank fails with it; the others go on
            load_error = f"cannot load the models: {cli.one_line(e)}"
    bar = tqdm(
        mine,
        desc=f"rank {world.rank}" if world.size > 1 else "jobs",
        unit="video",
        position=world.local_rank if world.size > 1 else None,
        file=sys.stderr,
    )
    for job in bar:
        start = time.perf_counter()
        try:
            if load_error:
                raise CLIError(load_error)
            make_video(pipe, job, cmd_argv, manifest)
        except Exception as e:  # one bad job is recorded; the others go on
            seconds = time.perf_counter() - start
            entries.append(entry(job, "failed", seconds, world.rank, cli.one_line(e)))
            tqdm.write(f"{job.label}: failed: {cli.one_line(e)}", file=sys.stderr)
        else:
            seconds = time.perf_counter() - start
            entries.append(entry(job, "done", seconds, world.rank))
            tqdm.write(f"{job.label}: wrote {job.out} ({seconds:.1f} s)", file=sys.stdout)
    bar.close()
    return entries


def entry(job: Job, status: str, seconds: float, rank: int | None = None, error: str | None = None) -> dict:
    """A job's line in summary.json."""
    item = dict(
        line=job.line,
        status=status,
        seconds=round(seconds, 3),
        output=str(job.out),
        image=job.args.image,
        seed=job.args.seed,
        rank=rank,
    )
    return {**item, "error": error} if error is not None else item


def write_summary(path: Path, entries: list[dict[str, Any]], head: dict[str, Any]) -> dict[str, Any]:
    """DIR/summary.json, atomically: per job its entry, by line; the totals."""
    entries = sorted(entries, key=lambda item: item["line"])
    totals = {status: sum(item["status"] == status for item in entries) for status in ("done", "skipped", "failed")}
    summary = {**head, "totals": {"jobs": len(entries), **totals}, "jobs": entries}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(argv: list[str], world: World) -> int:
    started = time.perf_counter()
    cmd = build_parser().parse_args(argv)
    jobs = load_jobs(cmd)
    if world.rank == 0:
        for job in jobs:
            warning = cli.loop_warning(job.args)
            if warning:
                print(f"warning: {job.label}: {warning}", file=sys.stderr)
        if cmd.demo:
            print("demo: tiny random weights, offline; the videos will be noise, not animations", file=sys.stderr)
    if cmd.threads is not None:
        torch.set_num_threads(cmd.threads)
    cuda = jobs[0].args.device == "cuda"
    if world.size > 1:
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        manifest = str(Path(cmd.jobs).expanduser().absolute())
        entries = run_jobs(jobs, world, argv, manifest)
        entries = [item for part in all_gather(world, entries) for item in part]
        failed = sum(item["status"] == "failed" for item in entries)
        if world.rank == 0:
            out_dir = Path(cmd.out_dir).expanduser().absolute()
            seconds = round(time.perf_counter() - started, 3)
            head = dict(
                command=shlex.join(["pia-torch", "batch", *argv]),
                manifest=manifest,
                world_size=world.size,
                seconds=seconds,
            )
            summary = write_summary(out_dir / SUMMARY, entries, head)
            totals = summary["totals"]
            print(
                f"{totals['done']} done, {totals['skipped']} skipped, {totals['failed']} failed in {seconds:.1f} s; "
                f"summary: {out_dir / SUMMARY}",
                file=sys.stderr,
            )
        if world.size > 1:
            dist.barrier()
    finally:
        if world.size > 1:
            dist.destroy_process_group()
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    """`pia-torch batch ...`: 0 when every job is done or skipped, 1 when one failed, 2 for bad input."""
    world = World.from_env()
    try:
        return run(list(argv), world)
    except CLIError as e:
        if world.rank == 0:
            for line in str(e).splitlines():
                print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
