"""Writing files so that a reader never sees half of one: a temp file in the same folder, then a rename.

One routine for every caller; each says at the call how durable the write must be (`durable=True` fsyncs the
file and its folder, for what must survive a power cut: manifests, adapters, cache markers).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def staging_dir(parent: Path, prefix: str) -> Path:
    """A fresh hidden folder in `parent` to build something in before an atomic rename into place, with the
    user's usual permissions (mkdtemp's 0700 would make a shared checkpoint or cache unreadable to colleagues)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


@contextmanager
def atomic_path(path: Path, *, durable: bool) -> Iterator[Path]:
    """A temp path beside `path` for the caller to write; renamed over `path` when the block ends cleanly and
    removed when it does not. `durable` fsyncs the file before the rename and the folder after it, so what a
    reader sees also survives a crash of the machine (shards, manifests); without it, a crash of the process
    still never leaves half a file (reports, figures, caches that are rebuilt when missing)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, *, durable: bool) -> None:
    """`text` written to `path` through `atomic_path`: a reader sees the old file or the new one, whole."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: Any, *, durable: bool) -> None:
    """JSON (sorted keys, indented) written through `atomic_path`."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", durable=durable)
