"""Stopping a run from outside: SIGTERM (a scheduler's stop, `timeout`, `kill`) ends a run the way Ctrl-C does,
through the same clean-up (finished shards kept, the Ray cluster this process started shut down, the run lock
released), so a nightly job stopped by its scheduler resumes like one stopped by hand."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

__all__ = ["Terminated", "keep_sigterm", "sigterm_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be (so every handler of one handles the other)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated`; the handler before it is put back after. Only from the main
    thread and only over the default handler: a process that set its own keeps it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def keep_sigterm() -> Iterator[None]:
    """Put back the SIGTERM handler a block replaced: `ray.init` installs one that exits the process at once
    (`sys.exit`), which would skip the caller's own handling of a stop."""
    main = threading.current_thread() is threading.main_thread()
    before: Callable | int | None = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)
