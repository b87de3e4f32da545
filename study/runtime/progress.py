"""Progress on stderr: a bar on a terminal, one line per step otherwise (logs, CI)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into one line per update (log files, CI, Ray
    job logs), so a bar read later shows its history instead of one overwritten line."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str) -> tqdm:
    """A rows bar on stderr; where stderr is not a terminal, a line every few seconds instead."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="row", disable=False, dynamic_ncols=tty, mininterval=0.2 if tty else 5.0,
                file=sys.stderr if tty else _Lines(sys.stderr), ascii=None if tty else True)
