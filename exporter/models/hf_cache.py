"""Offline look-ups in the Hugging Face hub cache, laid out as `huggingface_hub` leaves it.

`<cache>/models--<org>--<name>/{blobs/<hash>, snapshots/<revision>/<file> -> ../../blobs/<hash>,
refs/<branch>}`. huggingface_hub's own `try_to_load_from_cache` reads one revision (refs/main by
default) and fixes the cache root at import time; here the root is read from the environment at call
time (so a test or a user can point HF_HOME elsewhere), refs/main is tried first, then every other
ref and snapshot present (a user who downloaded a pinned revision has no refs/main).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def cache_root() -> Path:
    """The hub cache directory: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def repo_dir(repo_id: str) -> Path:
    return cache_root() / ("models--" + repo_id.replace("/", "--"))


def snapshots(repo_id: str) -> list[Path]:
    """Snapshot directories of `repo_id`: the one refs/main names first, then other refs, then the rest
    (newest first)."""
    root = repo_dir(repo_id)
    snap_dir = root / "snapshots"
    if not snap_dir.is_dir():
        return []
    ordered: list[Path] = []
    refs = root / "refs"
    names = sorted((p.name for p in refs.glob("*") if p.is_file()), key=lambda n: (n != "main", n)) \
        if refs.is_dir() else []
    for name in names:
        revision = (refs / name).read_text().strip()
        if (snap_dir / revision).is_dir():
            ordered.append(snap_dir / revision)
    rest = sorted((p for p in snap_dir.iterdir() if p.is_dir() and p not in ordered),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    return ordered + rest


def find_snapshot(repo_ids: Iterable[str], required: Iterable[str]) -> Path | None:
    """The first snapshot (over `repo_ids` in order) holding every path in `required` (any of a
    '|'-separated group)."""
    groups = [g.split("|") for g in required]
    for repo_id in repo_ids:
        for snap in snapshots(repo_id):
            if all(any((snap / name).exists() for name in group) for group in groups):
                return snap
    return None


def snapshot_info(path: Path) -> dict[str, str] | None:
    """{"repo", "revision"} when `path` lies inside a cache snapshot directory, else None."""
    parts = Path(path).absolute().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return {"repo": parts[i][len("models--"):].replace("--", "/"), "revision": parts[i + 2]}
    return None


def snapshot_of(path: Path) -> Path | None:
    """The snapshot directory containing `path` (a file or directory inside it), if any."""
    parts = Path(path).absolute().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return Path(*parts[: i + 3])
    return None
