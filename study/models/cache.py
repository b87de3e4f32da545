"""Model folders this project builds into the user's cache (the converted GGUF base, merged fine-tunes).

An entry is built in a staging folder and renamed into place, so a reader never sees half of one. A marker
file records each file's size and sha256; an entry whose marker is missing or whose files no longer match it
(a crash before the marker, a truncated or edited weight file) is detected and rebuilt. A file whose size and
mtime still match the marker is trusted without re-hashing, so a load stays about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MARKER = "headstudy-cache.json"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _entry(path: Path, digest: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def write_marker(folder: Path, key: str) -> None:
    """Record every file of `folder` (and what the entry was built from: `key`) in its marker, last."""
    files = {f.name: _entry(f, _sha256(f)) for f in sorted(folder.iterdir()) if f.is_file() and f.name != MARKER}
    (folder / MARKER).write_text(json.dumps({"key": key, "files": files}, indent=1), encoding="utf-8")


def problem(folder: Path, key: str) -> str | None:
    """Why `folder` is not a complete, intact entry built from `key`; None when it is."""
    marker = folder / MARKER
    if not folder.is_dir():
        return "not built yet"
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        files = recorded["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MARKER} (an interrupted or older build)"
    if recorded.get("key") != key:
        return f"built from {recorded.get('key')!r}, not {key!r}"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        st = path.stat()
        if st.st_size != want["size"]:
            return f"{name} has {st.st_size} bytes, {want['size']} were written"
        if st.st_mtime_ns != want["mtime_ns"] and _sha256(path) != want["sha256"]:
            return f"{name} changed since it was written (sha256 differs)"
    return None


def ensure(target: Path, key: str, build: Callable[[Path], None], what: str) -> Path:
    """`target` as an intact entry for `key`: kept when it is one, else (re)built by `build(staging)`."""
    why = problem(target, key)
    if why is None:
        return target
    from study.core.files import staging_dir

    if target.exists():
        log.warning("cache entry %s is damaged (%s): rebuilding it", target, why)
    log.info("building %s (one time) into %s", what, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target.parent, f".{target.name}-")
    try:
        build(staging)
        write_marker(staging, key)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:  # a concurrent build (another actor) finished first: keep theirs if it is whole
            if problem(target, key) is not None:
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target



def cache_dir() -> Path:
    """`$HEADSTUDY_CACHE`, else `$XDG_CACHE_HOME/headstudy`, else `~/.cache/headstudy`."""
    if os.environ.get("HEADSTUDY_CACHE"):
        return Path(os.environ["HEADSTUDY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "headstudy"
