"""Where the model's weights are: a configured directory, or the local Hugging Face cache.

Nothing is ever downloaded (docs/architecture.md, "Model facts"): ``locate_weights`` finds a
complete copy, ``missing_weights_message`` tells an operator what was searched and how to
provide one, ``model_revision`` names the copy in every report.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from config.settings import ModelSettings

WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin")


def _hub_cache_dir() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub rules)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def cache_repo_dir(model_id: str, cache_dir: Path | None = None) -> Path:
    """Where the Hugging Face cache keeps a model: ``models--{org}--{name}``."""
    return (cache_dir or _hub_cache_dir()) / ("models--" + model_id.replace("/", "--"))


def has_weights(directory: Path) -> bool:
    """A loadable model directory: config.json plus at least one readable weight file."""
    if not (directory / "config.json").is_file():
        return False
    return any(p.exists() for pattern in WEIGHT_FILE_PATTERNS for p in directory.glob(pattern))


def _snapshot_in_cache(repo_dir: Path) -> Path | None:
    """The snapshot ``refs/main`` points at, else the newest complete one."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if has_weights(snapshot):
            return snapshot
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    complete = [p for p in snapshots.iterdir() if p.is_dir() and has_weights(p)]
    return max(complete, key=lambda p: p.stat().st_mtime) if complete else None


def searched_weight_paths(settings: ModelSettings) -> list[Path]:
    """Where ``locate_weights`` looks, in order."""
    if settings.model_path is not None:
        return [settings.model_path]
    return [cache_repo_dir(settings.model_id)]


def locate_weights(settings: ModelSettings) -> Path | None:
    """The directory to load the model from, or None when no complete copy is present.

    ``model.model_path`` may be a plain model directory (config.json + safetensors) or a
    Hugging Face cache folder ``models--org--name``; without it the local Hugging Face cache
    is searched for ``model.model_id``.
    """
    for candidate in searched_weight_paths(settings):
        if has_weights(candidate):
            return candidate
        if candidate.is_dir() and (snapshot := _snapshot_in_cache(candidate)) is not None:
            return snapshot
    return None


def missing_weights_message(settings: ModelSettings) -> str:
    """What an operator reads in status and logs when no weights were found."""
    searched = ", ".join(str(p) for p in searched_weight_paths(settings))
    return (
        f"Model weights for {settings.model_id} not found (searched: {searched}). "
        "The node keeps receiving and storing studies and holds their jobs until weights are "
        "present; it never downloads anything. To provide MedGemma weights either set "
        "model.model_path to a local directory containing config.json and the *.safetensors "
        "files, or on a machine with internet access accept the licence at "
        f"https://huggingface.co/{settings.model_id} and run "
        f"`huggingface-cli download {settings.model_id}`, then copy the cache folder "
        f"{cache_repo_dir(settings.model_id).name} into {_hub_cache_dir()} on this machine "
        "(or point HF_HUB_CACHE at it)."
    )


def model_revision(weights_dir: Path) -> str:
    """The commit hash of a cache snapshot, else a short sha256 of the model's index/config."""
    if weights_dir.parent.name == "snapshots":
        return weights_dir.name
    digest = hashlib.sha256()
    for name in ("model.safetensors.index.json", "config.json"):
        path = weights_dir / name
        if path.is_file():
            digest.update(path.read_bytes())
    for weight in sorted(weights_dir.glob("*.safetensors")):
        digest.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return "sha256:" + digest.hexdigest()[:12]
