"""Hugging Face Hub access: a local folder is used as is, a repo id becomes a cached snapshot of only the
files a model needs (the standard HF cache, shared with diffusers). Offline, only the cache is read."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

DIFFUSERS = ("diffusion_pytorch_model", "diffusion_pytorch_model")  # weight file stems: (safetensors, .bin)
TRANSFORMERS = ("model", "pytorch_model")  # text_encoder/ is a transformers model
Candidate = tuple[str | None, str, str, str]  # (variant or None, single file, shard index, shard glob)


def weight_candidates(variant: str | None = None, stems: tuple[str, str] = DIFFUSERS) -> list[Candidate]:
    """The weight files to look for, best first: safetensors before .bin, and for each the variant before
    the plain files (as diffusers and transformers do), e.g. ("fp16", diffusion_pytorch_model.fp16.safetensors,
    diffusion_pytorch_model.safetensors.index.fp16.json, diffusion_pytorch_model.fp16-*-of-*.safetensors)."""
    candidates = []
    for stem, ext in zip(stems, ("safetensors", "bin")):
        for v in dict.fromkeys((variant, None)):
            dot = f".{v}" if v else ""
            candidates.append((v, f"{stem}{dot}.{ext}", f"{stem}.{ext}.index{dot}.json", f"{stem}{dot}-*-of-*.{ext}"))
    return candidates


def find_weights(folder: Path, variant: str | None = None, stems: tuple[str, str] = DIFFUSERS) -> Candidate:
    """The first of weight_candidates present in folder (its single file or its shard index)."""
    candidates = weight_candidates(variant, stems)
    for candidate in candidates:
        if (folder / candidate[1]).is_file() or (folder / candidate[2]).is_file():
            return candidate
    tried = ", ".join(name for _, single, index, _ in candidates for name in (single, index))
    raise FileNotFoundError(f"{folder}: no weights found (looked for {tried})")


def is_offline(local_files_only: bool | None = None) -> bool:
    """local_files_only=True, or HF_HUB_OFFLINE set (read now, not only when huggingface_hub was imported)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(local_files_only) or env or constants.HF_HUB_OFFLINE


def resolve(
    repo_id_or_path: str | Path,
    allow_patterns: list[str],
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> Path:
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
        return Path(
            snapshot_download(
                name,
                allow_patterns=list(allow_patterns),
                cache_dir=cache_dir,
                revision=revision,
                local_files_only=is_offline(local_files_only),
            )
        )
    except LocalEntryNotFoundError as e:
        cache = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{name}: weights not found offline (no complete copy in the Hugging Face cache "
            f"{cache}); download them once with network access or pass a local folder"
        ) from e


def fetch(
    repo_id_or_path: str | Path,
    subfolder: str = "",
    *,
    variant: str | None = None,
    stems: tuple[str, str] = DIFFUSERS,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> Path:
    """Folder of one model (config.json + weights), fetching only one set of weights: the first of
    weight_candidates(variant, stems) that the repo has."""
    prefix, folder, error = f"{subfolder}/" if subfolder else "", None, None
    for _, single, index, shards in weight_candidates(variant, stems):
        try:
            folder = (
                resolve(
                    repo_id_or_path,
                    [prefix + p for p in ("config.json", single, index, shards)],
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    revision=revision,
                )
                / subfolder
            )
        except FileNotFoundError as e:  # e.g. offline and only another variant is cached: try the next
            error = e
            continue
        if (folder / single).is_file() or (folder / index).is_file():
            return folder
    if folder is None:
        raise error
    return folder  # no weights: the reader says what it looked for
