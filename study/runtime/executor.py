"""Executors: where shards run. One interface, two implementations, the same answers.

An executor takes shards at any time (`submit`) and hands back results as they complete (`poll`); the runner's
`study.runtime.rounds` drives jobs on it with no barrier between them. `LocalExecutor` runs shards in this
process on one `Worker` at a time. The Ray executor (in `actors/`, found through the `headstudy.executors`
entry point) fans them out to a pool of Ray actors per model.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from study.core import plugins
from study.core.dtypes import ACCELERATOR_DTYPE, AUTO, CPU_DTYPE
from study.core.errors import DonorError, UsageError, one_line
from study.core.frozen import Frozen
from study.runtime.shards import AnyShard, ModelRef

log = logging.getLogger(__name__)

DEFAULT_EXECUTOR = "ray"


class ExecutionConfig(Frozen):
    """Where the work runs: in this process (`local`) or on a Ray pool (local cluster or `address`)."""

    executor: str = DEFAULT_EXECUTOR  # a name among the `headstudy.executors` entry points: local, ray
    address: str | None = None  # a running Ray cluster ("auto", "ray://host:10001", "host:6379")
    actors: int | None = Field(default=None, ge=1)  # per model, whenever it has work for them; None: by its work
    cpus_per_actor: int | None = Field(default=None, ge=1)  # CPUs and torch threads per actor. None: on GPUs,
    # the node's CPUs per actor slot; a CPU actor, 1; the local executor, torch's default (all cores)
    gpus_per_actor: int | None = Field(default=None, ge=1)  # None: 1 where the cluster has GPUs
    max_retries: int = Field(default=3, ge=0)  # per shard, after an actor died

    @field_validator("executor", mode="before")
    @classmethod
    def _executor(cls, v: Any) -> str:
        return plugins.check(plugins.EXECUTORS, v, "executor")

    @model_validator(mode="after")
    def _address(self) -> "ExecutionConfig":
        if self.address is not None and self.executor != "ray":
            raise UsageError(f"--address {self.address!r} needs the ray executor, not {self.executor!r}")
        return self


@dataclass(frozen=True)
class WorkerOptions:
    """How a model's workers run it (not part of a shard's identity: it never changes a value)."""

    device: str = "auto"  # cpu | cuda | cuda:N | auto (cuda where the worker has one)
    token_budget: int | None = None


def worker_options(options: dict[ModelRef, WorkerOptions], model: ModelRef) -> WorkerOptions:
    """The options of the worker that runs `model`'s shards: its host's (itself, or the model a head recipe
    edits), else the model's own, else defaults."""
    return options.get(model.host) or options.get(model) or WorkerOptions()


@dataclass
class ModelStats:
    """What one model's workers did in a run, for the closing summary and the manifest."""

    shards: int = 0  # computed (not read back from the store)
    reused: int = 0  # read back from the store
    rows: int = 0
    retries: int = 0
    actors: int = 0  # the most actors that held the model at once
    loads: int = 0  # times the model was loaded into a process (a handed-on actor loads it again)
    seconds: float = 0.0  # wall time from the first submission to the last result

    def as_dict(self) -> dict[str, float | int]:
        return dict(shards=self.shards, reused=self.reused, rows=self.rows, retries=self.retries,
                    actors=self.actors, loads=self.loads, seconds=round(self.seconds, 3))


class Executor(ABC):
    """Takes shards at any time (`submit`) and hands back results as they complete (`poll`), in any order: the
    runner submits each job's next round the moment that job can take it, while other jobs' shards still run."""

    name: str = "executor"

    def __init__(self) -> None:
        self.stats: dict[str, ModelStats] = {}
        self.failed: dict[str, str] = {}  # model label -> why it was given up (it could not be loaded)
        self._first: dict[str, float] = {}  # model label -> when its first shard was submitted

    def stats_for(self, model: ModelRef) -> ModelStats:
        return self.stats.setdefault(model.label, ModelStats())

    @classmethod
    def from_config(cls, cfg: ExecutionConfig) -> "Executor":
        """The executor a study's `execution` section describes."""
        raise NotImplementedError

    @classmethod
    def has_gpus(cls, cfg: ExecutionConfig) -> bool:
        """Whether this executor's workers will hold GPUs (asked only where the plan cannot tell: a cluster
        elsewhere). By default: this machine's."""
        return visible_gpus() > 0

    def submit(self, shards: Sequence[AnyShard], options: dict[ModelRef, WorkerOptions], *,
               urgent: bool = False) -> None:
        """Queue `shards` (each model's `options` say how its workers run it); `urgent` ones go before the
        model's queued shards (a round other jobs wait on: the critical path first)."""
        now = time.perf_counter()
        for shard in shards:
            self._first.setdefault(shard.model.label, now)
        self._submit(shards, options, urgent)

    @abstractmethod
    def _submit(self, shards: Sequence[AnyShard], options: dict[ModelRef, WorkerOptions], urgent: bool) -> None:
        ...

    def expect(self, rows: dict[tuple[ModelRef, str], int]) -> None:
        """Work to come, not yet submitted: rows by the model that will run them and kind ("row", "text"). An
        executor that sizes pools may count it; the default ignores it."""

    @abstractmethod
    def poll(self) -> list[tuple[AnyShard, pa.RecordBatch]]:
        """Results that came back since the last call, waiting up to about a second for one; [] when none did
        (or nothing is pending). A model given up (`failed`) drops its queued shards."""

    @property
    @abstractmethod
    def pending(self) -> int:
        """Shards submitted that have neither come back nor been dropped with their model."""

    def gone(self, shard: AnyShard) -> bool:
        """Whether `shard`'s model was given up: itself, or the model hosting it."""
        return shard.model.label in self.failed or shard.model.host.label in self.failed

    def _returned(self, shard: AnyShard) -> None:
        """Bookkeeping of a result (shards and rows computed; the model's wall time runs from its first
        submission to its last result)."""
        stats = self.stats_for(shard.model)
        stats.shards += 1
        stats.rows += shard.rows
        stats.seconds = time.perf_counter() - self._first.get(shard.model.label, time.perf_counter())

    def run(self, shards: Sequence[AnyShard], options: dict[ModelRef, WorkerOptions]) -> Iterator[
            tuple[AnyShard, pa.RecordBatch]]:
        """`shards` submitted at once, their results as they come (a single round, for tests and tools)."""
        self.submit(shards, options)
        while self.pending:
            yield from self.poll()

    def close(self) -> None:
        """Release workers (models, actors)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Shards in this process, one model resident at a time (a laptop holds one model, not a study's worth):
    the resident model's queued shards run first, then the model with the most queued work is loaded. A model
    that cannot be loaded is tried `max_retries` more times, then given up (named in `failed`, its shards
    dropped) while the other models' shards still run, as on Ray."""

    name = "local"

    def __init__(self, threads: int | None = None, max_retries: int = 3) -> None:
        super().__init__()
        self.threads = threads
        self.max_retries = max_retries
        self.workers: dict[ModelRef, object] = {}
        self.queues: dict[ModelRef, deque[AnyShard]] = {}
        self.options: dict[ModelRef, WorkerOptions] = {}

    @classmethod
    def from_config(cls, cfg: ExecutionConfig) -> "LocalExecutor":
        return cls(threads=cfg.cpus_per_actor, max_retries=cfg.max_retries)

    def _submit(self, shards: Sequence[AnyShard], options: dict[ModelRef, WorkerOptions], urgent: bool) -> None:
        for shard in reversed(shards) if urgent else shards:
            host = shard.model.host  # a head recipe runs on its host model's worker
            queue = self.queues.setdefault(host, deque())
            queue.appendleft(shard) if urgent else queue.append(shard)
            self.options.setdefault(host, worker_options(options, shard.model))

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _next_model(self) -> ModelRef | None:
        resident = [m for m in self.workers if self.queues.get(m)]
        if resident:
            return resident[0]
        waiting = [m for m, q in self.queues.items() if q]
        return max(waiting, key=lambda m: sum(s.rows for s in self.queues[m]), default=None)

    def poll(self) -> list[tuple[AnyShard, pa.RecordBatch]]:
        model = self._next_model()
        if model is None:
            return []
        shard = self.queues[model][0]
        worker = self._prepared(shard, self.options[model])
        if worker is None:  # given up: its shards are dropped (a hosted recipe's alone, where the host is fine)
            self.queues[model] = deque(s for s in self.queues[model] if not self.gone(s))
            return []
        self.queues[model].popleft()
        batch = worker.run(shard)
        self._returned(shard)
        return [(shard, batch)]

    def worker(self, model: ModelRef, options: WorkerOptions):
        if model not in self.workers:
            from study.runtime.worker import Worker, resolve_device

            self.close()  # free the previous model before loading the next
            self.workers[model] = Worker(model, device=resolve_device(options.device),
                                         token_budget=options.token_budget, threads=self.threads)
            self.stats_for(model).actors = 1
            self.stats_for(model).loads += 1
        return self.workers[model]

    def _prepared(self, shard: AnyShard, options: WorkerOptions):
        """The worker of `shard`'s model (its host) with what the shard needs loaded, or None once the model is
        given up (the host, or a hosted recipe whose donor cannot be read)."""
        for attempt in range(1, self.max_retries + 2):
            if self.gone(shard):
                return None
            worker = self.worker(shard.model.host, options)
            try:
                worker.prepare(shard)
                return worker
            except Exception as err:  # a corrupt file, out of memory: the same bound as an actor's load
                hosted = isinstance(err, DonorError)  # the host stays loaded; the recipe is what failed
                if not hosted:
                    self.close()
                model = shard.model if hosted else shard.model.host
                cause = one_line(err.__cause__ or err) if hosted else one_line(err)
                if attempt > self.max_retries:
                    self.failed[model.label] = f"{cause} ({attempt} tries)"
                    log.error("local: giving up %s after %d tries to load it: %s", model.label, attempt, cause)
                    return None
                self.stats_for(model).retries += 1
                log.warning("local: %s failed to load (%s); trying again (%d of %d)", model.label, cause, attempt,
                            self.max_retries)
        return None

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()


def visible_gpus() -> int:
    """The NVIDIA GPUs a process started here could use, read without importing torch (plans stay light): the
    driver's device list, narrowed by CUDA_VISIBLE_DEVICES."""
    found = len(os.listdir("/proc/driver/nvidia/gpus")) if os.path.isdir("/proc/driver/nvidia/gpus") else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    named = [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    return min(found, len(named))


def workers_hold_gpus(cfg: ExecutionConfig, device: str) -> bool:
    """Whether the workers of a model run on `device` ("auto": a GPU where they get one) will hold a GPU."""
    if device != "auto":
        return device.startswith("cuda")
    if cfg.executor == "ray" and cfg.gpus_per_actor:
        return True
    if cfg.address is None:  # this process, or a Ray cluster started on this machine
        return visible_gpus() > 0
    return plugins.load(plugins.EXECUTORS, cfg.executor, "executor").has_gpus(cfg)  # a cluster elsewhere: asked


def resolve_dtype(dtype: str, device: str, cfg: ExecutionConfig) -> str:
    """`auto` -> bfloat16 where the workers hold a GPU, else float32; any other dtype as given."""
    if dtype != AUTO:
        return dtype
    return ACCELERATOR_DTYPE if workers_hold_gpus(cfg, device) else CPU_DTYPE


def make_executor(cfg: ExecutionConfig) -> Executor:
    """The executor a study asked for, found by name in the `headstudy.executors` entry points (so nothing
    in `study` imports the Ray executor, and Ray is imported only when `ray` is asked for)."""
    cls = plugins.load(plugins.EXECUTORS, cfg.executor, "executor", "pip install ray==2.60.0, or --executor local")
    return cls.from_config(cfg)


@dataclass
class Outcome:
    """A job's round come back: every shard's table by id (what the job absorbs)."""

    tables: dict[str, pa.Table] = field(default_factory=dict)

    def table(self, shard: AnyShard) -> pa.Table:
        return self.tables[shard.id]

    def after(self, early: "Outcome | None") -> "Outcome":
        """This round's tables with those of a job's earlier round (work it started before its inputs were
        all known)."""
        return Outcome(tables={**(early.tables if early else {}), **self.tables})
