"""Hugging Face Hub access: a local folder is used as is, a repo id becomes a cached snapshot of only the
files a model needs (the standard HF cache, shared with diffusers). Offline, only the cache is read."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

WEIGHTS = "diffusion_pytorch_model"


def weight_names(variant: str | None = None, ext: str = "safetensors") -> tuple[str, str]:
    """(single file, shard index) names of a diffusers model's weights, e.g. for variant "fp16":
    diffusion_pytorch_model.fp16.safetensors and diffusion_pytorch_model.safetensors.index.fp16.json."""
    v = f".{variant}" if variant else ""
    return f"{WEIGHTS}{v}.{ext}", f"{WEIGHTS}.{ext}.index{v}.json"


def weight_patterns(variant: str | None = None, ext: str = "safetensors") -> list[str]:
    """Glob patterns of those files, shards included (diffusion_pytorch_model.fp16-00001-of-00002...)."""
    v = f".{variant}" if variant else ""
    return [*weight_names(variant, ext), f"{WEIGHTS}{v}-*-of-*.{ext}"]


def is_offline(local_files_only: bool | None = None) -> bool:
    """local_files_only=True, or HF_HUB_OFFLINE set (read now, not only when huggingface_hub was imported)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(local_files_only) or env or constants.HF_HUB_OFFLINE


def resolve(repo_id_or_path: str | Path, allow_patterns: list[str], *, cache_dir: str | Path | None = None,
            local_files_only: bool | None = None, revision: str | None = None) -> Path:
    """A local folder as is; otherwise the snapshot folder of a Hub repo holding (at least) the files that
    match allow_patterns. Offline (or when the Hub cannot be reached) only the cache is used."""
    path = Path(repo_id_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(repo_id_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such folder (and not a Hub repo id like owner/name)")
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    try:
        # Online, snapshot_download itself falls back to the cache on a connection error.
        return Path(snapshot_download(name, allow_patterns=list(allow_patterns), cache_dir=cache_dir,
                                      revision=revision, local_files_only=is_offline(local_files_only)))
    except LocalEntryNotFoundError as e:
        cache = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(f"{name}: weights not found offline (no complete copy in the Hugging Face cache "
                                f"{cache}); download them once with network access or pass a local folder") from e


def fetch(repo_id_or_path: str | Path, subfolder: str = "", *, variant: str | None = None,
          cache_dir: str | Path | None = None, local_files_only: bool | None = None,
          revision: str | None = None) -> Path:
    """Folder of one diffusers model (config.json + weights), fetching only one set of weights: the
    variant's safetensors if the repo has them, else the plain safetensors, else .bin (variant first)."""
    prefix, folder, error = f"{subfolder}/" if subfolder else "", None, None
    for ext in ("safetensors", "bin"):
        for v in dict.fromkeys((variant, None)):
            patterns = weight_patterns(v, ext)
            try:
                folder = resolve(repo_id_or_path, [prefix + p for p in ["config.json", *patterns]],
                                 cache_dir=cache_dir, local_files_only=local_files_only, revision=revision) / subfolder
            except FileNotFoundError as e:  # e.g. offline and only another variant is cached: try the next
                error = e
                continue
            if any(any(folder.glob(p)) for p in patterns):
                return folder
    if folder is None:
        raise error
    return folder  # no weights: read_state_dict says what it looked for
