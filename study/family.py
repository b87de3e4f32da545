"""The embedded model family: safety fine-tunes of the embedded SmolLM2, shipped as LoRA adapters.

Each member is a row of `FAMILY` (its base alias and its folder under `study/data/family/`). The folder holds
`adapter.safetensors` (per target module `<module>.lora_A` (r, d_in) and `<module>.lora_B` (d_out, r), with
`r`, `alpha` and `base` in the file's metadata) and `card.json` (recipe, data, seed, steps, loss, refusal
figures, and the adapter's sha256). First use merges the adapter into the base in float32 and saves a normal
Hugging Face folder in the model cache, keyed by the adapter's hash (see `study.model_cache`); transformers and
vLLM then load it like any other model. `study.family_train` makes the adapters.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.errors import UsageError

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
CARD_FILE = "card.json"
TRAIN_IDS_FILE = "train_ids.txt"  # the prompt ids a member was trained or validated on, one per line
FORMAT = "headstudy-lora/1"
BASE_FIGURES = "smollm2-*-instruct.json"  # the bases' refusal figures, measured as the cards' are


@dataclass(frozen=True)
class Member:
    """A fine-tune of a built-in base, shipped as an adapter in the package."""

    name: str
    base: str  # a GGUF alias of study.models
    folder: str  # under study/data/family/
    recipe: str  # one line: what makes it differ from its siblings

    @property
    def model_id(self) -> str:
        """What the results record for it (there is no hub id: the adapter's hash is its fingerprint)."""
        return f"headstudy/{self.name}"


MEMBERS: dict[str, Member] = {m.name: m for m in (
    Member("smollm2-135m-safe", "smollm2-135m-instruct", "safe",
           "safety LoRA on attention and MLP (q,k,v,o,gate,up,down), supervised + preference"),
    Member("smollm2-135m-safe-attn", "smollm2-135m-instruct", "safe-attn",
           "the main recipe's data and loss, LoRA on attention only (q,k,v,o)"),
    Member("smollm2-135m-safe-mlp", "smollm2-135m-instruct", "safe-mlp",
           "the main recipe's data and loss, LoRA on the MLP only (gate,up,down)"),
    Member("smollm2-135m-safe-s1", "smollm2-135m-instruct", "safe-s1",
           "the main recipe with a second seed (another validation split and data order)"),
)}


def family_root() -> Path:
    return Path(str(importlib.resources.files("study").joinpath("data", "family")))


def _shipped(member: Member) -> bool:
    folder = family_root() / member.folder
    return (folder / ADAPTER_FILE).is_file() and (folder / CARD_FILE).is_file()


# The aliases of this installation: the members whose adapter and card ship (study.family_train builds the rest).
FAMILY: dict[str, Member] = {name: m for name, m in MEMBERS.items() if _shipped(m)}


def member_folder(name: str) -> Path:
    return family_root() / MEMBERS[name].folder


def read_card(name: str) -> dict[str, Any]:
    path = member_folder(name) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"model card {path} of {name!r} is missing or damaged ({err}): reinstall headstudy or "
                         f"rebuild it with python -m study.family_train {name}") from None
    if not isinstance(card, dict) or "adapter_sha256" not in card:
        raise UsageError(f"model card {path} of {name!r} has no adapter_sha256: rebuild it with "
                         f"python -m study.family_train {name}")
    return card


def adapter_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_member(name: str) -> str:
    """Fail fast on a member whose adapter is absent or not the one its card describes; its sha256 if fine."""
    path = member_folder(name) / ADAPTER_FILE
    if not path.is_file():
        raise UsageError(f"model {name!r}: its adapter {path} is not in this installation: reinstall headstudy "
                         f"or build it with python -m study.family_train {name}")
    digest = adapter_sha256(path)
    want = read_card(name)["adapter_sha256"]
    if digest != want:
        raise UsageError(f"adapter file {path} of {name!r} is damaged: sha256 {digest[:12]}... but its card "
                         f"says {want[:12]}...: reinstall headstudy or rebuild it with "
                         f"python -m study.family_train {name}")
    return digest


def training_ids(name: str) -> frozenset[str]:
    """The prompt ids (study.prompts.prompt_id) a member was trained or validated on; empty for other models."""
    if name not in FAMILY:
        return frozenset()
    path = member_folder(name) / TRAIN_IDS_FILE
    if not path.is_file():
        return frozenset()
    return frozenset(ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())


# ------------------------------------------------------------------------------------------ adapter math


def lora_delta(a, b, scale: float):
    """The weight change a LoRA pair stands for: scale * B @ A.  a: (r, d_in), b: (d_out, r) -> (d_out, d_in)."""
    return scale * (b @ a)


def read_adapter(path: Path) -> tuple[dict[str, tuple[Any, Any]], float, dict[str, str]]:
    """{module: (A, B)} as stored, the scale alpha/r, and the file's metadata; one clear line if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        r, alpha = int(meta["r"]), float(meta["alpha"])
    except Exception as err:  # a truncated header, bad JSON, missing r/alpha
        raise UsageError(f"adapter file {path} is damaged or not a headstudy adapter: {err}") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"adapter file {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    pairs: dict[str, tuple[Any, Any]] = {}
    for key in tensors:
        module, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B"):
            raise UsageError(f"adapter file {path}: unexpected tensor {key!r} (expected <module>.lora_A/lora_B)")
        if part == "lora_A":
            a, b = tensors[key], tensors.get(f"{module}.lora_B")
            if b is None or a.shape[0] != r or b.shape[1] != r:
                raise UsageError(f"adapter file {path}: {module} has no matching rank-{r} lora_A/lora_B pair")
            pairs[module] = (a, b)
    return pairs, alpha / r, meta


def merge_adapter(state: dict[str, Any], pairs: dict[str, tuple[Any, Any]], scale: float) -> None:
    """Add each pair's delta to `<module>.weight` of a base state dict, in place, computed in float32 (float64
    for a float64 base) and stored in the base's dtype."""
    import torch

    for module, (a, b) in pairs.items():
        key = f"{module}.weight"
        if key not in state:
            raise UsageError(f"the adapter targets {module!r}, which the base model does not have")
        weight = state[key]
        if tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise UsageError(f"the adapter's {module} is {b.shape[0]}x{a.shape[1]}, the base weight is "
                             f"{tuple(weight.shape)}")
        work = torch.promote_types(weight.dtype, torch.float32)
        state[key] = (weight.to(work) + lora_delta(a.to(work), b.to(work), scale)).to(weight.dtype)


def write_merged(base: Path, adapter: Path, out: Path) -> None:
    """A Hugging Face folder in `out`: the base folder's files with the adapter merged into its weights."""
    from safetensors.torch import load_file, save_file

    from study.model_cache import MARKER

    pairs, scale, _ = read_adapter(adapter)
    out.mkdir(parents=True, exist_ok=True)
    for src in base.iterdir():
        if src.is_file() and src.suffix != ".safetensors" and src.name != MARKER:
            shutil.copy2(src, out / src.name)
    remaining = dict(pairs)
    for src in sorted(base.glob("*.safetensors")):
        state = load_file(str(src))
        mine = {m: p for m, p in remaining.items() if f"{m}.weight" in state}
        merge_adapter(state, mine, scale)
        for m in mine:
            del remaining[m]
        save_file(state, str(out / src.name), metadata={"format": "pt"})
    if remaining:
        raise UsageError(f"adapter {adapter} targets modules its base lacks: {', '.join(sorted(remaining)[:3])}")


def _cache_entry(name: str, digest: str) -> tuple[Path, str]:
    """Where a member's merged folder lives, and the key it is built from (its base and its adapter's hash)."""
    from study.models import cache_dir

    return cache_dir() / "models" / f"{name}-{digest[:12]}", f"{MEMBERS[name].base}+{digest}"


def materialize_member(name: str) -> Path:
    """The member merged into its base, as a cached HF folder keyed by the adapter's hash (built once)."""
    from study import model_cache
    from study.models import materialize_alias

    base = materialize_alias(FAMILY[name].base)
    adapter = member_folder(name) / ADAPTER_FILE
    folder, key = _cache_entry(name, check_member(name))
    return model_cache.ensure(folder, key, lambda staging: write_merged(base, adapter, staging),
                              f"{name} ({FAMILY[name].base} + its adapter)")


def cached_folder(name: str) -> Path | None:
    """The member's intact cache entry, or None (nothing is built)."""
    from study import model_cache

    path = member_folder(name) / ADAPTER_FILE
    if not path.is_file():
        return None
    folder, key = _cache_entry(name, adapter_sha256(path))
    return folder if model_cache.problem(folder, key) is None else None
