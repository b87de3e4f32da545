"""One writer per run folder, and a folder that is always whole: the lock, the commit journal that makes a
run's commit all or nothing, and the clean-up of what an interrupted run left behind.

The lock is an exclusive `flock` on `OUT/.headstudy.lock`, which names the holder (host, pid); the kernel
releases it when the holder dies, so a stale lock is taken over without asking. A commit first writes a
journal (every staged file and where it goes, and the manifest) durably, then moves the files, then the
manifest, then drops the journal: a commit cut off anywhere is rolled forward by the next writer, so the
folder is as it was (no journal yet) or as it should be (the journal finished), never new tables beside an
old manifest.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from study.core.errors import UsageError
from study.core.files import fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

LOCK_FILE = ".headstudy.lock"
JOURNAL_PREFIX = ".commit-"
STAGING_PREFIX = ".staging-"


class FolderLock:
    """`with FolderLock(out):` holds the run folder for this process, or raises one `UsageError` line naming the
    process that holds it."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this lock made, innermost first (removed again if left empty)

    def __enter__(self) -> "FolderLock":
        p = self.path.parent.absolute()
        while not p.exists():
            self._created.append(p)
            p = p.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise UsageError(f"{self.path.parent} is being written by another headstudy run ({holder}): wait "
                                 f"for it to finish or write to another --out folder") from None
            try:  # the file we locked is still the lock file (a finishing holder unlinks it)
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then re-checks the inode
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        for folder in self._created:  # a run that wrote nothing leaves no folder behind
            try:
                folder.rmdir()
            except OSError:
                break


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"
    except (OSError, ValueError):
        return "a process that has not said who it is yet"


def journal_path(out_dir: Path, run_id: str) -> Path:
    return Path(out_dir) / f"{JOURNAL_PREFIX}{run_id}.json"


def commit(out_dir: Path, staging: Path, moves: list[str], manifest: dict[str, Any], manifest_names: list[str],
           run_id: str) -> None:
    """Move every staged file (`moves`, relative paths) into place and write the manifest under each of
    `manifest_names`, through a journal that the next writer rolls forward if this is cut off."""
    journal = journal_path(out_dir, run_id)
    write_json_atomic(journal, {"staging": staging.name, "moves": moves, "manifest": manifest,
                                "manifest_names": manifest_names}, durable=True)
    _apply(out_dir, journal)


def _apply(out_dir: Path, journal: Path) -> None:
    data = json.loads(journal.read_text(encoding="utf-8"))
    staging = out_dir / data["staging"]
    for rel in data["moves"]:
        src, dst = staging / rel, out_dir / rel
        if src.exists():  # moved already when a commit is rolled forward
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    for folder in {(out_dir / rel).parent for rel in data["moves"]}:
        fsync_dir(folder)
    for name in data["manifest_names"]:
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(target, data["manifest"], durable=True)  # the last name marks a complete run
    shutil.rmtree(staging, ignore_errors=True)
    journal.unlink()
    fsync_dir(out_dir)


def recover(out_dir: Path) -> list[str]:
    """Finish every commit a killed run left half done, and remove staging folders and temp files that no
    commit will use; call it holding the folder's lock. Returns what was done, one line each."""
    out_dir = Path(out_dir)
    done: list[str] = []
    if not out_dir.is_dir():
        return done
    for journal in sorted(out_dir.glob(f"{JOURNAL_PREFIX}*.json")):
        try:
            _apply(out_dir, journal)
            done.append(f"finished the interrupted commit of run {journal.stem[len(JOURNAL_PREFIX):]}")
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"{journal} (an interrupted commit) could not be finished: {err}; move it away to "
                             f"keep the folder as its manifest describes it") from None
    for staging in sorted(out_dir.glob(f"{STAGING_PREFIX}*")):
        shutil.rmtree(staging, ignore_errors=True)
        done.append(f"removed {staging.name} (a run stopped before its commit)")
    temps = [p for p in out_dir.rglob(".*.tmp-*") if p.is_file()]
    for tmp in temps:
        tmp.unlink(missing_ok=True)
    if temps:
        done.append(f"removed {len(temps)} temp file(s) of interrupted writes")
    for line in done:
        log.info("%s: %s", out_dir, line)
    return done
