"""Shards: plain, picklable specs of scoring work, each with a stable content id.

A shard is "what to compute" (a model reference, a block of prompts with their format, a base ablation, a
block of ablations and what to measure) and nothing about where: a `study.runtime.worker.Worker` holding the model
turns it into an Arrow record batch, in this process or on a Ray actor. Experiments only make shards and
combine their batches, so they cannot tell which executor ran them; a completed shard is stored under its
id, so a run that is started again skips it.

Light: no torch here (planning a study imports none).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Literal, Sequence

import pyarrow as pa
from pydantic import Field, model_validator

from study.core.ablation import Ablation
from study.core.frozen import Frozen
from study.core.joint_spec import JointSettings, JointState
from study.core.subspace import SubspaceSpec
from study.generation.backends import check_backend
from study.generation.decoding import Decoding
from study.models.recipes import Swap
from study.prompts.formats import PromptFormat
from study.prompts.sets import PromptSet
from study.runtime.identity import scoring_identity

Measure = Literal["kl", "angle", "nll"]

# What a worker returns for each measure (one row per (ablation, prompt) for kl, per ablation for angle).
RESULT_SCHEMAS: dict[str, pa.Schema] = {
    "kl": pa.schema([pa.field("ablation", pa.string(), False), pa.field("prompt_id", pa.string(), False),
                     pa.field("kl", pa.float64(), False)]),
    "angle": pa.schema([pa.field("ablation", pa.string(), False), pa.field("score", pa.float64(), False)]),
    "nll": pa.schema([pa.field("ablation", pa.string(), False), pa.field("prompt_id", pa.string(), False),
                      pa.field("nll", pa.float64(), False), pa.field("n_tokens", pa.int64(), False)]),
    "generate": pa.schema([pa.field("ablation", pa.string(), False), pa.field("prompt_id", pa.string(), False),
                           pa.field("sample", pa.int32(), False), pa.field("seed", pa.int64(), False),
                           pa.field("token_ids", pa.list_(pa.int32()), False), pa.field("text", pa.string(), False),
                           pa.field("n_tokens", pa.int32(), False)]),
    "lm_eval": pa.schema([pa.field("ablation", pa.string(), False), pa.field("metric", pa.string(), False),
                          pa.field("value", pa.float64(), True), pa.field("n", pa.int64(), False),
                          pa.field("error", pa.string(), True)]),
    "joint": pa.schema([pa.field("step", pa.int32(), False), pa.field("loss", pa.float64(), False),
                        pa.field("objective", pa.float64(), False), pa.field("penalty", pa.float64(), False),
                        pa.field("open", pa.int32(), False), pa.field("gates", pa.list_(pa.float64()), False),
                        # the search's last step only: the exact objective of the top 1..k gates ablated outright
                        pa.field("exact", pa.list_(pa.float64()), True),
                        pa.field("prompts_used", pa.int32(), False),
                        # a link's last step only: where the search stands (JointState as JSON), for the next link
                        pa.field("state", pa.string(), True)]),
    "surgery": pa.schema([pa.field("checkpoint", pa.string(), False), pa.field("label", pa.string(), False),
                          pa.field("edited_parameters", pa.int64(), False),
                          pa.field("total_parameters", pa.int64(), False)]),
}


class ModelRef(Frozen):
    """Which weights, as the user named them (alias, folder or hub id), at which revision and dtype; with
    `swap`, the mixed model that recipe builds from `name` (the aligned model) and its base."""

    name: str
    revision: str | None = None  # a hub model's resolved commit where one is known (pinned at plan time)
    dtype: str = "float32"
    swap: Swap | None = None
    fingerprint: str | None = None  # the content identity (study.models.fingerprint): part of every shard id

    @property
    def key(self) -> dict:
        """Identity for shard ids (an unmixed model's key is what it was before swaps existed)."""
        return self.model_dump(mode="json", exclude={"swap"} if self.swap is None else None)

    @property
    def label(self) -> str:
        """The model as progress lines and summaries name it."""
        return self.name if self.swap is None else f"{self.name} [{self.swap.label}]"

    @property
    def host(self) -> "ModelRef":
        """The model whose worker runs this model's shards. A head recipe moves a few heads' slices: it is a scoped
        edit of the model it writes into (the aligned model; the base for `heads-into-base`), so it shares that
        model's actors instead of loading a model of its own. Anything else is its own host."""
        s = self.swap
        if s is None or not s.recipe.needs_heads:
            return self
        if s.recipe.target_is_base:
            return ModelRef(name=s.base, revision=s.base_revision, dtype=self.dtype, fingerprint=s.base_fingerprint)
        return self.model_copy(update={"swap": None})

    @property
    def donor(self) -> tuple[str, str | None] | None:
        """(name, revision) of the model a head recipe takes its heads' slices from, where this is one."""
        s = self.swap
        if s is None or not s.recipe.needs_heads:
            return None
        return (self.name, self.revision) if s.recipe.target_is_base else (s.base, s.base_revision)


class PromptBlock(Frozen):
    """Prompts (ids and texts, in order) and how they become model input."""

    ids: tuple[str, ...]
    texts: tuple[str, ...]
    format: PromptFormat
    system_prompt: str | None = None

    @classmethod
    def of(cls, prompts: PromptSet, fmt: PromptFormat, system_prompt: str | None,
           index: slice = slice(None)) -> "PromptBlock":
        chosen = prompts.prompts[index]
        return cls(ids=tuple(p.id for p in chosen), texts=tuple(p.text for p in chosen), format=fmt,
                   system_prompt=system_prompt)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def key(self) -> str:
        """Identity of the encoded block (texts are covered by their ids, which are their hashes)."""
        return _digest({"ids": self.ids, "format": self.format.value, "system": self.system_prompt})


class _Spec(Frozen):
    """What every shard kind shares: its result rows have the schema of its `measure`."""

    measure: str

    @property
    def schema(self) -> pa.Schema:
        return RESULT_SCHEMAS[self.measure]


class Shard(_Spec):
    """Score `ablations` on every prompt of `prompts`, starting rows from `base`'s cached residuals.

    measure `kl`: KL(normal || ablated) of the next-token distribution per (ablation, prompt).
    measure `angle`: generalized Ships of each ablation over the whole block (needs `subspace`).
    measure `nll`: summed next-token NLL of each prompt's own tokens under each ablation (perplexity).
    `base` only saves work (rows start at their first layer that differs from it); it never changes a value.
    """

    model: ModelRef
    prompts: PromptBlock
    ablations: tuple[Ablation, ...] = Field(min_length=1)
    base: Ablation = Ablation()
    measure: Measure = "kl"
    subspace: SubspaceSpec | None = None
    code_version: str = Field(default_factory=scoring_identity)

    @property
    def id(self) -> str:
        """Stable content id: the model's content, dtype, prompt ids, format, ablations, operator, eps, and the
        identity of the code that computes it."""
        return _digest({
            "model": self.model.key,
            "prompts": self.prompts.key,
            "ablations": [a.model_dump(mode="json") for a in self.ablations],
            "base": self.base.model_dump(mode="json"),
            "measure": self.measure,
            "subspace": None if self.subspace is None else self.subspace.model_dump(mode="json"),
            "code_version": self.code_version,
        })

    @property
    def rows(self) -> int:
        """(ablation, prompt) rows of work."""
        return len(self.ablations) * len(self.prompts)


class GenShard(_Spec):
    """Generate under ablation: `cross` runs every ablation on every prompt, `zip` gives prompt i its own
    ablation i (query-level experiments: each prompt's own top heads). One row per (pair, sample)."""

    model: ModelRef
    prompts: PromptBlock
    ablations: tuple[Ablation, ...] = Field(min_length=1)
    pairing: Literal["cross", "zip"] = "cross"
    decoding: Decoding
    backend: str = "hf"
    code_version: str = Field(default_factory=scoring_identity)
    measure: Literal["generate"] = "generate"

    def model_post_init(self, _: object) -> None:
        check_backend(self.backend)
        if self.pairing == "zip" and len(self.ablations) != len(self.prompts):
            raise ValueError(f"zip pairing needs one ablation per prompt: {len(self.ablations)} for "
                             f"{len(self.prompts)} prompts")

    @property
    def id(self) -> str:
        return _digest({
            "model": self.model.key, "prompts": self.prompts.key,
            "ablations": [a.model_dump(mode="json") for a in self.ablations], "pairing": self.pairing,
            "decoding": self.decoding.model_dump(mode="json"), "backend": self.backend,
            "measure": self.measure, "code_version": self.code_version,
        })

    def pairs(self) -> list[tuple[int, Ablation]]:
        """(prompt index, ablation) of every generation, before samples."""
        if self.pairing == "zip":
            return list(enumerate(self.ablations))
        return [(i, ab) for ab in self.ablations for i in range(len(self.prompts))]

    @property
    def rows(self) -> int:
        return len(self.pairs()) * self.decoding.samples


class EvalShard(_Spec):
    """lm-eval tasks (the paper's zero-shot accuracy) on the model under each ablation, run by the worker that holds
    the model. `include`: a folder of task YAMLs as the workers see it; its content is in `tasks_digest`."""

    model: ModelRef
    ablations: tuple[Ablation, ...] = Field(min_length=1)
    tasks: tuple[str, ...] = Field(min_length=1)
    include: str | None = None
    tasks_digest: str  # study.generation.lm_eval.tasks_digest: the tasks, lm-eval's version, the include files
    limit: int | None = None
    code_version: str = Field(default_factory=scoring_identity)
    measure: Literal["lm_eval"] = "lm_eval"

    @property
    def id(self) -> str:
        return _digest({
            "model": self.model.key, "ablations": [a.model_dump(mode="json") for a in self.ablations],
            "tasks": list(self.tasks), "tasks_digest": self.tasks_digest, "limit": self.limit,
            "measure": self.measure, "code_version": self.code_version,
        })

    @property
    def rows(self) -> int:
        """(ablation, task) pairs."""
        return len(self.ablations) * len(self.tasks)


class SurgeryShard(_Spec):
    """Write `ablation` into the model's weights, save a checkpoint to `checkpoint` (a folder the worker can write:
    on a cluster, shared storage) and put the weights back. An action, not a cached value: `nonce` (one per plan)
    keeps a rerun from reading an earlier save back instead of saving again."""

    model: ModelRef
    ablation: Ablation
    checkpoint: str
    may_hold: tuple[str, ...] = ()  # names the checkpoint folder may already hold (a run folder's own files)
    nonce: str = Field(default_factory=lambda: uuid.uuid4().hex)
    code_version: str = Field(default_factory=scoring_identity)
    measure: Literal["surgery"] = "surgery"

    @property
    def id(self) -> str:
        return _digest({"model": self.model.key, "ablation": self.ablation.model_dump(mode="json"),
                        "checkpoint": self.checkpoint, "nonce": self.nonce, "measure": self.measure,
                        "code_version": self.code_version})

    @property
    def rows(self) -> int:
        return 1


class JointShard(_Spec):
    """One link of a joint head-group search (`study.core.joint`, one seed) on `prompts`: steps `start + 1` to
    `stop` (default: all of them), one row per step with every head's gates after it; the link's last row holds
    where the search stands (`state`, which the next link starts from) and the search's last row the exact objective
    of the top 1..k heads ablated outright. A search cut into links ends bit for bit where one shard would; the
    links are what shows progress and what a resumed run skips. With the refusal objective, the prompts searched on
    are those the model refuses (its greedy answer of `answer_tokens`, the `refusal` judge) and each one's target is
    its answer's first `opening_tokens` tokens: the first link finds them, later ones carry them in `state`."""

    model: ModelRef
    prompts: PromptBlock
    settings: JointSettings
    k: int = Field(ge=1)
    opening_tokens: int = Field(default=4, ge=1)
    answer_tokens: int = Field(default=24, ge=1)
    start: int = Field(default=0, ge=0)  # steps done before this link
    stop: int | None = Field(default=None, ge=1)  # steps done after it (None: the search's last)
    state: JointState | None = None  # the previous link's end (None for the first link)
    after: str | None = None  # the previous link's id: the state's identity, without hashing every logit
    code_version: str = Field(default_factory=scoring_identity)
    measure: Literal["joint"] = "joint"

    @model_validator(mode="after")
    def _linked(self) -> "JointShard":
        if not self.start < self.end <= self.settings.steps:
            raise ValueError(f"a joint link runs steps {self.start + 1}..{self.end}, outside 1..{self.settings.steps}")
        if (self.start == 0) != (self.state is None and self.after is None) or \
                (self.state is not None and self.state.step != self.start):
            raise ValueError("a joint link after step 0 needs the previous link's state and id (the first, neither)")
        return self

    @property
    def end(self) -> int:
        return self.settings.steps if self.stop is None else self.stop

    @property
    def last(self) -> bool:
        """The search's last link: it also measures the group's exact objective."""
        return self.end == self.settings.steps

    @property
    def id(self) -> str:
        return _digest({"model": self.model.key, "prompts": self.prompts.key,
                        "settings": self.settings.model_dump(mode="json"), "k": self.k,
                        "opening_tokens": self.opening_tokens, "answer_tokens": self.answer_tokens,
                        "start": self.start, "end": self.end, "after": self.after,
                        "measure": self.measure, "code_version": self.code_version})

    @property
    def rows(self) -> int:
        return self.end - self.start


AnyShard = Shard | GenShard | EvalShard | SurgeryShard | JointShard


def _digest(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def blocks(items: Sequence, size: int) -> list[Sequence]:
    """`items` cut into consecutive blocks of at most `size`."""
    return [items[i:i + size] for i in range(0, len(items), size)]
