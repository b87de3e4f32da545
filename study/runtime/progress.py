"""Progress on stderr: a bar on a terminal, one line per step otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import Sequence

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


def progress_bar(total: int, desc: str, unit: str = "row") -> tqdm:
    """A bar on stderr; where stderr is not a terminal, a line every few seconds instead."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=False, dynamic_ncols=tty, mininterval=0.2 if tty else 5.0,
                file=sys.stderr if tty else _Lines(sys.stderr), ascii=None if tty else True)


class _Count:
    """One model's progress in one unit, for the line mode."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.started = total, 0, time.monotonic()

    def eta(self) -> str:
        spent = time.monotonic() - self.started
        if not self.n or self.n >= self.total:
            return ""
        left = spent / self.n * (self.total - self.n)
        return f", ETA {_duration(left)}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class StudyProgress:
    """Progress of a study, per model: its scan rows and its generated texts counted apart (so each ETA is in
    one unit), named by the rounds the model has open. A total grows as the model's next rounds are submitted;
    an ETA covers the work submitted so far. On a terminal, a bar per model and unit; elsewhere (logs, CI,
    Ray job logs), a line per model with work in progress every `every` seconds."""

    UNITS = {"generate": "text", "joint": "step"}  # a shard measure -> its unit (every scoring measure counts rows)

    def __init__(self, tty: bool | None = None, every: float = 15.0) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every = every
        self.bars: dict[tuple[str, str], tqdm] = {}
        self.counts: dict[tuple[str, str], _Count] = {}
        self.labels: dict[str, list[str]] = {}
        self._dirty = False
        self._shown = time.monotonic()
        self._t0 = time.monotonic()

    @staticmethod
    def _short(model: str) -> str:
        name, _, recipe = model.partition(" [")
        return name.rstrip("/").rsplit("/", 1)[-1] + (f" [{recipe}" if recipe else "")

    def _rounds(self, model: str) -> str:
        rounds = self.labels.get(model.partition(" [")[0], []) + self.labels.get(model, [])
        return " | ".join(dict.fromkeys(rounds)) or "done"

    def opened(self, model: str, label: str, todo: Sequence) -> None:
        """A round of `model` was opened; `todo` are its shards that will be computed (not read back)."""
        self.labels.setdefault(model, []).append(label)
        rows: dict[tuple[str, str], int] = {}
        for shard in todo:
            key = (shard.model.label, self.UNITS.get(shard.measure, "row"))
            rows[key] = rows.get(key, 0) + shard.rows
        for key, n in rows.items():
            if key in self.counts:
                self.counts[key].total += n
            else:
                self.counts[key] = _Count(n)
            if self.tty:
                if key in self.bars:
                    self.bars[key].total += n
                else:
                    self.bars[key] = progress_bar(n, f"{self._short(key[0])}: {label}", unit=key[1])
        self._dirty = True

    def advanced(self, shard) -> None:
        key = (shard.model.label, self.UNITS.get(shard.measure, "row"))
        self.counts[key].n += shard.rows
        if self.tty:
            self.bars[key].update(shard.rows)

    def closed(self, model: str, label: str) -> None:
        labels = self.labels.get(model, [])
        if label in labels:
            labels.remove(label)
        self._dirty = True

    def refresh(self, final: bool = False) -> None:
        if self.tty:
            if self._dirty or final:
                for (model, _), bar in self.bars.items():
                    bar.set_description_str(f"{self._short(model)}: {self._rounds(model)}", refresh=False)
                    bar.refresh()
        elif final or time.monotonic() - self._shown >= self.every:
            self._shown = time.monotonic()
            for line in self.lines(final):
                sys.stderr.write(line + "\n")
            sys.stderr.flush()
        self._dirty = False

    def lines(self, final: bool = False) -> list[str]:
        """One line per model with work in progress (every model, `final`)."""
        models: dict[str, list[str]] = {}
        for (model, unit), c in self.counts.items():
            if final or c.n < c.total:
                models.setdefault(model, []).append(f"{c.n}/{c.total} {unit}s{c.eta()}")
        stamp = _duration(time.monotonic() - self._t0)
        return [f"[{stamp}] {self._short(m)}: {self._rounds(m)}: {', '.join(parts)}" for m, parts in models.items()]

    def close(self) -> None:
        self.refresh(final=True)
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
