"""Stage artifacts: atomic output directories and the versioned export manifest.

Every stage builds its output in a temporary directory beside the target and renames it into place at
the end, so an interrupted or failed run leaves nothing behind and a reader never sees half a directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from exporter.errors import InputError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `target`; on success it replaces `target`."""
    target = Path(target).absolute()
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as exc:
        raise InputError(f"cannot write output {target}: {exc.strerror or exc}") from None
    if target.exists() and not target.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"output {target} exists and is not a directory")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; an export directory is meant to be shared
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            target.rename(old / target.name)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (same suffix); renamed onto `target` on success."""
    target = Path(target).absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent)
    except OSError as exc:
        raise InputError(f"cannot write output {target}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def link_or_copy(src: str, dst: str) -> None:
    """A `copytree` copy function: hard-link where the file system allows, else copy. Stage artifacts are
    written once and replaced by rename (above), never edited in place, so a link cannot change under the
    directory that holds it. An export's calibration copy is 1.6 GB at full size; a copy per export doubles
    the disk it needs."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    manifest = {"schema_version": MANIFEST_SCHEMA, **manifest}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: Path) -> dict[str, Any]:
    """The export manifest, checked for schema version and for the files it lists."""
    from calibration.artifact import ArtifactError, read_versioned_json

    try:
        manifest = read_versioned_json(Path(directory) / MANIFEST, MANIFEST_SCHEMA, "a quadit export")
    except ArtifactError as exc:
        raise InputError(str(exc)) from None
    for graph in manifest.get("graphs", {}).values():
        for name in graph.get("files", []):
            if not (Path(directory) / name).is_file():
                raise InputError(f"export {directory} is incomplete: {name} is missing")
    return manifest
