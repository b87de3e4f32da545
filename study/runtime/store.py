"""Result storage: Parquet datasets on disk, written atomically per run, plus run identity helpers.

Layout of an output folder OUT:

    OUT/<table>/<model_slug>/<part>.parquet   one file per (table, model, experiment); a rerun replaces it
    OUT/shards/<shard_id>.arrow        completed shards, written atomically as they finish (resume = skip)
    OUT/manifest.json                  the latest committed run's manifest
    OUT/manifests/<run_id>.json        every committed run's manifest (earlier runs stay readable)
    OUT/.staging-<run_id>/...          a run's tables in progress (removed on commit or failure)

Model folders are plain names, not hive `model=` partitions: every file holds its own `model` column, and a
hive key of the same name would make pandas, pyarrow and DuckDB read it back as a second, conflicting column.
A run's table files are staged and only moved into place (os.replace, same filesystem) when the `RunWriter`
block ends cleanly, the manifest last; so an interrupted or failed run never leaves a half file in OUT, and a
run whose manifest exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import secrets
import shutil
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from study.core.errors import UsageError
from study.core.files import atomic_path
from study.runtime.runfolder import STAGING_PREFIX, commit
from study.runtime.schema import TABLES, declared_form

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
MANIFESTS_DIR = "manifests"
ACROSS_MODELS = "@all"  # the folder of a table whose rows span models (no `model` column)
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def model_slug(model: str) -> str:
    """A filesystem-safe, stable folder name for a model id.

    An HF id or alias keeps its name with `/` as `--` (`HuggingFaceTB/SmolLM2-135M` ->
    `HuggingFaceTB--SmolLM2-135M`; HF forbids `--` in names, so this is unambiguous). Anything else is a
    local path: its last component plus 8 hex of the hash of the normalised path, so two checkpoints both
    called `final/` do not share a folder.
    """
    if not model or not model.strip():
        raise UsageError("empty model id: expected a Hugging Face id, a local path or an alias")
    if _HF_ID.fullmatch(model) and ".." not in model:
        return model.replace("/", "--")
    norm = os.path.normpath(os.path.expanduser(model))
    last = _UNSAFE.sub("_", os.path.basename(norm)).strip("._-") or "model"
    digest = hashlib.sha256(norm.encode("utf-8")).hexdigest()[:8]
    return f"{last}-{digest}"


def new_run_id() -> str:
    """UTC timestamp (to the microsecond) plus a random suffix: unique, and sorts by start time."""
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now:%f}Z-{secrets.token_hex(3)}"


def package_versions() -> dict[str, str]:
    """Versions recorded in the manifest, read from package metadata (importing torch or ray is slow)."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "pyarrow", "ray", "headstudy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def code_version() -> dict[str, Any]:
    """The package version, the scoring code's identity (what stored shards are keyed by) and, when running
    from a git checkout, its commit and whether it has changes."""
    from study import __version__
    from study.runtime.identity import scoring_identity

    out: dict[str, Any] = {"version": __version__, "scoring": scoring_identity()}
    root = Path(__file__).resolve().parents[2]  # the checkout holding study/
    if (root / ".git").exists():
        import subprocess

        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()

        try:
            out["commit"] = git("rev-parse", "HEAD") or None
            out["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def config_hash(cfg: dict[str, Any]) -> str:
    """First 16 hex of sha256 over canonical JSON (sorted keys, no spaces): equal configs, equal hash."""
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _schema_of(name: str) -> pa.Schema:
    try:
        return TABLES[name]
    except KeyError:
        raise UsageError(f"unknown table {name!r}: known tables are {', '.join(TABLES)}") from None


class RunWriter:
    """Stages one run's tables and commits them into OUT on a clean exit, or leaves OUT untouched.

    with RunWriter(out_dir, run_id) as w:
        w.write("ships", table)          # validated against schema.TABLES["ships"]
        w.set_manifest({...})
    """

    def __init__(self, out_dir: str | os.PathLike[str], run_id: str) -> None:
        if not _RUN_ID.fullmatch(run_id):
            raise UsageError(f"bad run id {run_id!r}: use letters, digits, '.', '_' and '-' (see new_run_id())")
        self.out_dir = Path(out_dir)
        self.run_id = run_id
        self.staging = self.out_dir / f"{STAGING_PREFIX}{run_id}"
        self._manifest: dict[str, Any] = {}
        self._parts: dict[str, int] = {}  # table -> next part number
        self._staged: list[Path] = []  # relative to staging
        self._tables: set[str] = set()
        self._created_root: Path | None = None  # highest folder this writer will have created
        self._open = False

    def __enter__(self) -> "RunWriter":
        if self._open:
            raise RuntimeError("RunWriter is already open")
        root = None
        p = self.out_dir.absolute()
        while not p.exists():
            root, p = p, p.parent
        self._created_root = root
        self._open = True
        return self

    def write(self, name: str, table: pa.Table, part: str | None = None) -> None:
        """Stage `table` as part(s) of table `name`, one file per model folder.

        `part` names the file (`<part>.parquet`, replacing a file of that name on commit: a rerun of an
        experiment replaces its rows); None gives a new, unique `part-<run_id>-<n>`.

        ValueError unless its schema equals the declared one exactly (names, order, types, nullability), or its
        compact form (`study.runtime.schema.compact_schema`).
        """
        if not self._open:
            raise RuntimeError("RunWriter.write outside its `with` block")
        schema = _schema_of(name)
        try:
            table = declared_form(table, schema)  # the file holds plain strings (Parquet dictionary-encodes them)
        except ValueError as e:
            raise ValueError(f"table {name!r} does not match its declared schema (build it with "
                             f"study.runtime.schema.make_table):\n{e}") from None
        for field in schema:
            if not field.nullable and table[field.name].null_count:
                raise ValueError(f"table {name!r}: nulls in non-nullable column {field.name!r}")
        n = self._parts.get(name, 0)
        self._parts[name] = n + 1
        if part is not None and not _RUN_ID.fullmatch(part):
            raise ValueError(f"bad part name {part!r}: use letters, digits, '.', '_' and '-'")
        stem = part or f"part-{self.run_id}-{n:05d}"
        self._tables.add(name)
        (self.staging / name).mkdir(parents=True, exist_ok=True)
        by_slug: dict[str, list[str]] = {}
        if "model" not in schema.names:  # a table across models (overlap): one folder for all of it
            by_slug[ACROSS_MODELS] = []
        for m in pc.unique(table["model"]).to_pylist() if "model" in schema.names else []:
            by_slug.setdefault(model_slug(m), []).append(m)
        for slug, models in sorted(by_slug.items()):
            part = table if len(by_slug) == 1 else table.filter(pc.is_in(table["model"], pa.array(models)))
            rel = Path(name) / slug / f"{stem}.parquet"
            dest = self.staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest, durable=True) as tmp:  # durable before the manifest names it
                pq.write_table(part, tmp)
            self._staged.append(rel)
            log.debug("staged %s (%d rows)", rel, part.num_rows)

    def set_manifest(self, manifest: dict[str, Any]) -> None:
        """The run's manifest (resolved config, its hash, versions, timings); `run_id` and `files` are added
        (to the `files` it already lists, so a second commit of one run extends its manifest)."""
        self._manifest = dict(manifest)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._open = False
        if exc_type is None:
            self._commit()
        else:
            self._rollback()
        return False

    def _commit(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(self._tables):
            (self.out_dir / name).mkdir(exist_ok=True)  # an empty table still exists
        files: dict[str, list[str]] = {k: list(v) for k, v in self._manifest.get("files", {}).items()}
        for rel in self._staged:
            files.setdefault(rel.parts[0], []).append(rel.as_posix())
        manifest = {**self._manifest, "run_id": self.run_id, "files": files}
        self.staging.mkdir(parents=True, exist_ok=True)
        # all or nothing: a journal first, then the files, the manifest last (its presence marks a complete run)
        commit(self.out_dir, self.staging, [rel.as_posix() for rel in self._staged], manifest,
               [f"{MANIFESTS_DIR}/{self.run_id}.json", MANIFEST], self.run_id)
        log.info("run %s: wrote %d file(s) to %s", self.run_id, len(self._staged), self.out_dir)

    def _rollback(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._created_root is not None:
            # Remove the folders this writer created, innermost first; rmdir refuses if anyone else wrote there.
            p = self.out_dir.absolute()
            while True:
                try:
                    p.rmdir()
                except OSError:
                    break
                if p == self._created_root:
                    break
                p = p.parent
        log.info("run %s failed: staged files removed, %s left as it was", self.run_id, self.out_dir)


def _tables_in(out_dir: Path) -> list[str]:
    return [n for n in TABLES if (out_dir / n).is_dir()]


def read_table(out_dir: str | os.PathLike[str], name: str, model: str | None = None,
               run_id: str | None = None) -> pa.Table:
    """All committed parts of table `name` in OUT, with the declared schema; optionally one model's rows
    and one run's rows. UsageError if the table (or the model's folder) is not there.
    """
    out = Path(out_dir)
    schema = _schema_of(name)
    tdir = out / name
    if not tdir.is_dir():
        present = ", ".join(_tables_in(out)) or "none"
        raise UsageError(f"no table {name!r} in {out}: tables present: {present}")
    if model is not None:
        from study.models.builtin import model_id

        model = model_id(model)  # an alias selects the model it stands for
    if model is None:
        pdirs = sorted(p for p in tdir.iterdir() if p.is_dir())
    else:
        pdir = tdir / model_slug(model)
        if not pdir.is_dir():
            present = ", ".join(p.name for p in sorted(tdir.iterdir()) if p.is_dir()) or "none"
            raise UsageError(f"no rows for model {model!r} in table {name!r} of {out}: models present: {present}")
        pdirs = [pdir]
    files = [str(f) for d in pdirs for f in sorted(d.glob("*.parquet"))]
    if not files:
        return schema.empty_table()
    table = ds.dataset(files, schema=schema, format="parquet").to_table()
    if model is not None and "model" in schema.names:
        table = table.filter(pc.equal(table["model"], model))
    if run_id is not None:
        table = table.filter(pc.equal(table["run_id"], run_id))
    return table


def read_manifests(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every committed run's manifest in OUT, oldest first (a folder studies were added to over time)."""
    folder = Path(out_dir) / MANIFESTS_DIR
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def read_manifest(out_dir: str | os.PathLike[str], run_id: str | None = None) -> dict[str, Any]:
    """The latest committed run's manifest, or a given run's; UsageError if there is none."""
    out = Path(out_dir)
    path = out / MANIFEST if run_id is None else out / MANIFESTS_DIR / f"{run_id}.json"
    if not path.is_file():
        raise UsageError(f"no manifest at {path}: not a completed run folder")
    return json.loads(path.read_text(encoding="utf-8"))


class ShardStore:
    """Completed shards of a run folder, one Arrow IPC file per shard id, each written atomically and synced.

    A shard is content-addressed (`study.runtime.shards.Shard.id`): whatever wrote it, a later run that needs the same
    work reads it back instead of computing it.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.root = Path(out_dir) / SHARDS_DIR

    def _path(self, shard_id: str) -> Path:
        if not _RUN_ID.fullmatch(shard_id):
            raise ValueError(f"bad shard id {shard_id!r}")
        return self.root / f"{shard_id}.arrow"

    def has(self, shard_id: str) -> bool:
        return self._path(shard_id).is_file()

    def get(self, shard_id: str) -> pa.Table:
        with pa.OSFile(str(self._path(shard_id)), "rb") as source:  # read into memory: no mapping outlives it
            return pa.ipc.open_file(source).read_all()

    def put(self, shard_id: str, batch: pa.RecordBatch | pa.Table) -> None:
        path = self._path(shard_id)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, durable=True) as tmp:  # a crash leaves no torn shard that resume would trust
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
                writer.write(batch)

    def ids(self) -> set[str]:
        return {p.stem for p in self.root.glob("*.arrow")} if self.root.is_dir() else set()

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
