"""A model's identity is its content: what a stored result was computed from.

- a hub id: the commit its revision resolves to, asked of the hub once at plan time (else read from the local
  hub cache) and pinned, so every actor loads that commit;
- a local folder: a hash of every file in it (weights, config, tokenizer, chat template), each file's hash
  computed once and cached by path, size and modification time, so a 140 GB folder is not read on every run;
- a built-in alias: its GGUF file's hash; a family member: its adapter's hash and its base's.

A file edited in place gets a new modification time, hence a new hash. (A tool that writes new bytes and then
restores the old modification time and size would not be seen; nothing in a training loop does that.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from study.core.files import write_json_atomic
from study.models.builtin import ALIASES, FAMILY, _package_folder, check_member
from study.models.cache import MARKER, cache_dir
from study.models.loading import _hub_reachable, hub_offline

log = logging.getLogger(__name__)

DIGESTS_FILE = "file-digests.json"
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ModelIdentity:
    fingerprint: str  # "commit:<sha>", "files:<hash>", "gguf:<hash>", "adapter:<hash>+gguf:<hash>", "unknown"
    revision: str | None  # what workers load: a hub commit where one is known, else the revision as given


def _digests_path() -> Path:
    return cache_dir() / DIGESTS_FILE


def _read_digests() -> dict[str, dict]:
    try:
        data = json.loads(_digests_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path, known: dict[str, dict] | None = None) -> str:
    """The file's sha256, from the cache when its path, size and modification time are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    known = _read_digests() if known is None else known
    entry = known.get(key)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    known[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def _hash_files(files: list[Path], root: Path | None = None) -> str:
    known = _read_digests()
    before = dict(known)
    h = hashlib.sha256()
    for f in files:
        name = str(f.relative_to(root)) if root else f.name
        h.update(f"{name}:{file_sha256(f, known)}\n".encode())
    if known != before:
        try:
            _digests_path().parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(_digests_path(), known, durable=False)  # a lost cache is only rehashed
        except OSError as err:
            log.debug("file digest cache not written: %s", err)
    return h.hexdigest()[:16]


def folder_files(folder: Path) -> list[Path]:
    """Every file a model folder's content consists of (hidden files and this project's cache marker aside)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                  p.relative_to(folder).parts) and p.name != MARKER)


def hub_commit(name: str, revision: str | None) -> str | None:
    """The commit `revision` (default: main) of hub model `name` points at now: asked of the hub when it can
    be reached, else read from the local hub cache; None when neither knows."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    if not hub_offline() and _hub_reachable():
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(name, revision=revision).sha
        except Exception as err:  # gated, unknown: the config read reports it; fall back to the cache
            log.debug("hub commit of %s not resolved: %s", name, err)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:
        cached = None
    if isinstance(cached, str) and "/snapshots/" in cached:
        return cached.split("/snapshots/")[1].split("/")[0]
    return None


def model_identity(name: str, revision: str | None = None) -> ModelIdentity:
    """What `name` at `revision` is, by content, and the revision workers should load."""
    if name in FAMILY:
        base = model_identity(FAMILY[name].base)
        return ModelIdentity(f"adapter:{check_member(name)[:16]}+{base.fingerprint}", revision)
    if name in ALIASES:
        alias = ALIASES[name]
        folder = _package_folder(alias.package)
        return ModelIdentity(f"gguf:{_hash_files([folder / alias.gguf_file])}" if folder else "unknown", revision)
    path = Path(name).expanduser()
    if path.exists():
        return ModelIdentity(f"files:{_hash_files(folder_files(path), path)}", revision)
    commit = hub_commit(name, revision)
    if commit is None:
        log.warning("model %s: its commit could not be resolved (offline, not in the hub cache): results are "
                    "keyed by the name and revision only", name)
        return ModelIdentity("unknown", revision)
    return ModelIdentity(f"commit:{commit}", commit)
