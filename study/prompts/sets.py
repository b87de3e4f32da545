"""Prompt sets: the built-in ones, files, and the known benchmark names resolved from a data folder; every
prompt gets a stable id (a hash of its text).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.core.errors import UsageError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

DATA_ENV = "HEADSTUDY_DATA"
BUILTIN_SETS = ("harmful", "benign", "text")  # text: benign paragraphs for perplexity (utility)
FILE_EXTENSIONS = (".csv", ".json", ".jsonl", ".txt")
# Tried in this order when a file's column is not given; exactly one of them must be present.
USUAL_COLUMNS = ("prompt", "goal", "Goal", "Behavior", "forbidden_prompt", "text", "query", "instruction")


def prompt_id(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


@dataclass(frozen=True)
class PromptSet:
    """An ordered, duplicate-free list of prompts; `name` is the normalised spec it was loaded from."""

    name: str
    prompts: tuple[Prompt, ...]
    source_sha256: str | None = None  # sha256 of the file's bytes (the builtin's text) before dedupe and limit

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def digest(self) -> str:
        """sha256 of the prompt ids in order: exactly which texts a run used, after dedupe and limit."""
        return hashlib.sha256("\n".join(p.id for p in self.prompts).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class KnownSet:
    """Where a public benchmark lives inside a data directory, and which rows/column hold its prompts."""

    path: str  # relative to the data directory
    column: str | None  # None for .txt files
    where: tuple[str, str] | None = None  # keep only rows whose column equals the value
    note: str = ""


KNOWN_SETS: dict[str, KnownSet] = {
    "advbench": KnownSet("advbench/harmful_behaviors.csv", "goal", note="520 harmful behaviours"),
    "jailbreakbench": KnownSet("jailbreakbench/jbb_behaviors_harmful.csv", "Goal", note="100 JBB harmful goals"),
    "maliciousinstruct": KnownSet("maliciousinstruct/MaliciousInstruct.txt", None, note="100 prompts"),
    # HarmBench: only the "standard" behaviours are plain refusal prompts (contextual ones need their
    # ContextString, copyright ones are not refusal-type).
    "harmbench": KnownSet(
        "harmbench/harmbench_behaviors_text_all.csv", "Behavior", ("FunctionalCategory", "standard"), "200 standard"
    ),
    "harmbench:test": KnownSet(
        "harmbench/harmbench_behaviors_text_test.csv", "Behavior", ("FunctionalCategory", "standard"), "159 standard"
    ),
    "harmbench:val": KnownSet(
        "harmbench/harmbench_behaviors_text_val.csv", "Behavior", ("FunctionalCategory", "standard"), "41 standard"
    ),
    "strongreject": KnownSet("strongreject/strongreject.csv", "forbidden_prompt", note="313 forbidden prompts"),
    "xstest": KnownSet("xstest/xstest_prompts.csv", "prompt", note="450 prompts, safe and unsafe"),
    "xstest:safe": KnownSet("xstest/xstest_prompts.csv", "prompt", ("label", "safe"), "250 safe-but-scary"),
    "xstest:unsafe": KnownSet("xstest/xstest_prompts.csv", "prompt", ("label", "unsafe"), "200 unsafe contrasts"),
}

_VALID_SPECS = (
    "builtin:harmful, builtin:benign, a .csv/.json/.jsonl/.txt file (optionally path:column), "
    f"or a known name ({', '.join(KNOWN_SETS)})"
)


def _one_line(text: object) -> str:
    """Collapse an embedded message (an OSError, a JSON or template error) onto one line."""
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------- loading


def load_prompts(
    spec: str | os.PathLike[str], data_dir: str | Path | None = None, limit: int | None = None
) -> PromptSet:
    """Load a prompt set from a builtin name, a file (`path[:column]`) or a known benchmark name.

    Known names are looked up in `data_dir`, else in `$HEADSTUDY_DATA`. `limit` keeps the first N prompts
    (after dropping blanks and duplicates).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"bad prompt limit {limit!r}: expected an integer >= 1 or none")
    raw = os.fspath(spec).strip()
    if not raw:
        raise UsageError(f"empty prompt set spec: expected {_VALID_SPECS}")

    name, texts, source = _resolve(raw, data_dir)
    prompts = _dedupe(name, texts)
    if limit is not None:
        prompts = prompts[:limit]
    log.info("prompt set %s: %d prompts", name, len(prompts))
    return PromptSet(name, tuple(prompts), hashlib.sha256(source).hexdigest())


def _resolve(spec: str, data_dir: str | Path | None) -> tuple[str, list[str | None], bytes]:
    """Decide what kind of spec this is and read its raw texts; returns (normalised name, texts, source bytes)."""
    lowered = spec.lower()
    if lowered.startswith("builtin:"):
        which = lowered.split(":", 1)[1]
        if which not in BUILTIN_SETS:
            raise UsageError(
                f"unknown builtin prompt set {spec!r}: valid builtins are "
                + ", ".join(f"builtin:{b}" for b in BUILTIN_SETS)
            )
        text = _builtin_text(which)
        return f"builtin:{which}", text.splitlines(), text.encode("utf-8")
    if lowered in KNOWN_SETS:
        path, texts = _read_known(lowered, data_dir)
        return lowered, texts, path.read_bytes()
    split = _split_file_spec(spec)
    if split is None:
        raise UsageError(f"unknown prompt set {spec!r}: expected {_VALID_SPECS}")
    path, column = split
    used_column, texts = _read_file(path, column)
    name = path.name if used_column is None else f"{path.name}:{used_column}"
    return name, texts, path.read_bytes()


def _builtin_text(which: str) -> str:
    return importlib.resources.files("study").joinpath("data", f"{which}.txt").read_text(encoding="utf-8")


def _split_file_spec(spec: str) -> tuple[Path, str | None] | None:
    """`path` or `path:column` -> (path, column); None when the spec does not look like a file at all.

    The LAST colon splits off a column only if what precedes it is an existing file or ends with a supported
    extension; an existing file whose own name contains a colon is taken whole.
    """
    whole = Path(spec).expanduser()
    if whole.is_file():
        return whole, None
    if ":" in spec:
        head, column = spec.rsplit(":", 1)
        head_path = Path(head).expanduser()
        if head and (head_path.is_file() or head.lower().endswith(FILE_EXTENSIONS)):
            if not column.strip():
                raise UsageError(
                    f"empty column name in prompt set spec {spec!r}: expected path:column, e.g. x.csv:goal"
                )
            return head_path, column.strip()
    if spec.lower().endswith(FILE_EXTENSIONS) or whole.exists():
        return whole, None
    return None


def _read_known(name: str, data_dir: str | Path | None) -> tuple[Path, list[str | None]]:
    known = KNOWN_SETS[name]
    root: str | Path | None = data_dir
    if root is None or str(root) == "":
        root = os.environ.get(DATA_ENV) or None
    if root is None:
        raise UsageError(
            f"known prompt set {name!r} needs a data directory holding {known.path}: "
            f"pass --data-dir or set {DATA_ENV}"
        )
    root = Path(root).expanduser()
    path = root / known.path
    if not path.is_file():
        raise UsageError(
            f"known prompt set {name!r}: expected file {str(path)!r} not found; "
            f"pass --data-dir or set {DATA_ENV} to a folder holding {known.path}"
        )
    if known.column is None:
        return path, _read_file(path, None)[1]
    rows = _read_rows(path)
    columns = _columns(rows)
    for needed in (known.column,) + ((known.where[0],) if known.where else ()):
        if needed not in columns:
            raise UsageError(
                f"column {needed!r} missing from {str(path)!r} (known set {name!r}): found columns {_list(columns)}"
            )
    if known.where is not None:
        key, value = known.where
        rows = [r for r in rows if isinstance(r, Mapping) and r.get(key) == value]
    return path, _column_values(path, rows, known.column)


def _read_file(path: Path, column: str | None) -> tuple[str | None, list[str | None]]:
    """Read one prompt file; returns (the column actually used or None for .txt/plain strings, texts)."""
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_EXTENSIONS:
        raise UsageError(
            f"unsupported prompt file type {path.suffix or '(none)'!r} for {str(path)!r}: "
            f"expected {', '.join(FILE_EXTENSIONS)}"
        )
    if suffix == ".txt":
        if column is not None:
            raise UsageError(
                f"column {column!r} given for {str(path)!r}, but a .txt file is one prompt per line: drop ':{column}'"
            )
        return None, list(_read_text(path).splitlines())

    rows = _read_rows(path)
    if not rows:
        return column, []
    if all(isinstance(r, str) or r is None for r in rows):
        if column is not None:
            raise UsageError(f"column {column!r} given for {str(path)!r}, but it holds plain strings: drop ':{column}'")
        return None, list(rows)
    if not all(isinstance(r, Mapping) for r in rows):
        bad = next(r for r in rows if not isinstance(r, Mapping))
        raise UsageError(
            f"{str(path)!r} mixes objects with a {type(bad).__name__} value: expected all strings or all objects"
        )
    columns = _columns(rows)
    if column is None:
        found = [c for c in USUAL_COLUMNS if c in columns]
        if len(found) != 1:
            why = "none of the usual text columns" if not found else f"several text columns ({', '.join(found)})"
            raise UsageError(
                f"no column given for {str(path)!r} and it has {why}: "
                f"pass {path.name}:<column> with one of {_list(columns)}"
            )
        column = found[0]
        log.info("%s: using column %r", path, column)
    elif column not in columns:
        raise UsageError(f"unknown column {column!r} in {path.name}: valid columns are {_list(columns)}")
    return column, _column_values(path, rows, column)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"prompt file {str(path)!r} not found")
    if path.is_dir():
        raise UsageError(f"prompt file {str(path)!r} is a directory: expected a {'/'.join(FILE_EXTENSIONS)} file")


def _read_text(path: Path) -> str:
    _check_file(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"prompt file {str(path)!r} is not valid UTF-8 ({_one_line(exc)})") from exc
    except OSError as exc:
        raise UsageError(f"cannot read prompt file {str(path)!r}: {_one_line(exc.strerror or exc)}") from exc


def _read_rows(path: Path) -> list[Any]:
    """Rows of a .csv (dicts), .json (the top-level list) or .jsonl (one value per non-blank line)."""
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows: list[Any] = list(reader)
            if reader.fieldnames is None:
                raise UsageError(f"prompt file {str(path)!r} is empty: expected a header row and prompts")
            if not rows:
                # keep the header so a missing column is still reported by name
                rows = [{k: None for k in reader.fieldnames}]
        except csv.Error as exc:
            raise UsageError(f"prompt file {str(path)!r} is not valid CSV ({_one_line(exc)})") from exc
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"prompt file {str(path)!r} is not valid JSON ({_one_line(exc)})") from exc
        if not isinstance(data, list):
            raise UsageError(
                f"prompt file {str(path)!r} holds a JSON {type(data).__name__}: expected a list of strings or objects"
            )
        return data
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {number} of {str(path)!r} is not valid JSON ({_one_line(exc)})") from exc
    return rows


def _columns(rows: Sequence[Any]) -> list[str]:
    """Column names in first-seen order over all object rows (csv rows share one header)."""
    seen: dict[str, None] = {}
    for row in rows:
        if isinstance(row, Mapping):
            for key in row:
                if isinstance(key, str):
                    seen.setdefault(key, None)
    return list(seen)


def _list(columns: Sequence[str]) -> str:
    named = [c for c in columns if c.strip()]
    return ", ".join(named) if named else "(none)"


def _column_values(path: Path, rows: Sequence[Mapping[str, Any]], column: str) -> list[str | None]:
    values: list[str | None] = []
    for index, row in enumerate(rows):
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise UsageError(
                f"column {column!r} of {path.name} holds a non-text value {_one_line(repr(value))[:60]} "
                f"(row {index}): expected strings"
            )
        values.append(value)
    return values


def _dedupe(name: str, texts: Sequence[str | None]) -> list[Prompt]:
    """Strip, drop blanks, keep the first of each duplicate; an empty result is a usage error."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    blank = duplicate = 0
    for raw in texts:
        text = (raw or "").strip()
        if not text:
            blank += 1
        elif text in seen:
            duplicate += 1
        else:
            seen.add(text)
            prompts.append(Prompt(prompt_id(text), text))
    if blank or duplicate:
        log.info("prompt set %s: dropped %d blank and %d duplicate prompts", name, blank, duplicate)
    if not prompts:
        raise UsageError(f"prompt set {name!r} is empty after dropping blank prompts: expected at least one prompt")
    return prompts
