"""Model loading: a built-in alias, a local folder or a Hugging Face id becomes a model and its tokenizer
(`LoadedModel`); its shape and fingerprint are read without loading weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.core.dtypes import check_dtype
from study.core.errors import UsageError
from study.core.shape import ModelShape
from study.models.builtin import (
    ALIASES,
    FAMILY,
    check_model_name,
    materialize_alias,
    materialize_member,
    model_id,
)

DEVICES = ("auto", "cpu", "cuda")  # auto: cuda where the process has one, else cpu


def hub_offline() -> bool:
    """Whether the user asked for no hub access (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


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
    offline = hub_offline()
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
