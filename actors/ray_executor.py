"""The Ray executor: a pool of `ModelActor`s per model that grows and shrinks with the model's remaining work.

- Shards are submitted at any time (`submit`) and come back as they complete (`poll`, on `ray.wait`), so the
  runner's jobs advance independently (study.runtime.rounds).
- Slots follow the work. One actor per `gpus_per_actor` GPUs (or `cpus_per_actor` CPUs); Ray places each actor
  by its resource request. Whenever a result comes back, an actor is free or the cluster changed, the slots
  are dealt again: a model with queued work and no actor comes first; then an actor goes to the model with the
  most remaining work per actor, but only while that work, spread over one more actor, still outweighs loading
  the model into it (the load time measured for that model, or `LOAD_GUESS_S` before one is). Remaining work
  is each queued or running shard's rows times the model's measured seconds per row of that kind (scan rows,
  generated texts). An actor whose model has nothing queued goes to such a model; otherwise it keeps its model,
  whose next round (a Sahara step) may come any moment. The cluster's slots are read again every
  `REFRESH_S`, so nodes that join during a run are used. `actors` fixes a model's pool size instead: up to
  that many actors whenever it has queued shards for them, with no weighing against the load.
- A handed-on actor is not killed but given the next model (`ModelActor.load`): a new process would pay torch's
  and transformers' imports again (~3.5 s of a ~5 s actor start on a CPU).
- Faults: an actor that dies is restarted by Ray (`max_restarts`); the shard it held is queued again (shards
  are idempotent, and the driver keeps only the first result of each), up to `max_retries` times per shard.
  An actor that cannot be restarted is replaced.
- A model that fails to load (an error while loading it, or its actor dying before it computed anything for
  it: killed for memory, a corrupt file) is tried again, `max_retries` times in all for the model; then it is
  given up: its shards are dropped, its actors go to the other models, and `failed` names it with the cause.
  The other models' work goes on; the runner turns `failed` into one line at the end of the run.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.cluster import Slots, actor_slots, connect, shutdown
from actors.model_actor import HostedLoadError, ModelActor, ModelLoadError
from study.core.errors import UsageError
from study.runtime.executor import ExecutionConfig, Executor, WorkerOptions, worker_options
from study.runtime.shards import AnyShard, GenShard, ModelRef

log = logging.getLogger(__name__)

IN_FLIGHT = 1  # shards per actor at once: a shard runs for seconds, so a round trip between shards costs
# nothing, while a second queued shard can leave another actor idle at the end of a round
ACTOR_RESTARTS = 3
WAIT_S = 1.0
REFRESH_S = 10.0  # how often the cluster's slots are read again (nodes that join); `refresh_s` per executor
LOAD_GUESS_S = 30.0  # a model's load time before one is measured
ENGINE_GUESS_S = 30.0  # a generation engine's start (vLLM: profiling, KV cache) before one is measured
ENGINE_BACKENDS = {"vllm"}  # backends that start an engine of their own in the actor on their first shard
SCAN = 256  # how far into a model's queue a free actor looks for a shard it should take
_ACTOR_LOST = (RayActorError, ActorUnavailableError)


def _kind(shard: AnyShard) -> str:
    return "text" if isinstance(shard, GenShard) else "row"


@dataclass
class _Member:
    handle: Any
    ready_ref: Any | None  # None once the model is loaded
    busy: set = field(default_factory=set)  # refs of shards in flight
    loaded: bool = False  # has computed a shard of its current model (a death before that is a failed load)
    counted: bool = False  # its last death has been counted as a failed load
    core_slot: int | None = None  # which block of this machine's cores its engine threads are bound to
    asked: float = field(default_factory=time.perf_counter)  # when it was told to load its model
    sent: float = 0.0  # when its shard in flight was sent
    idle_since: float = field(default_factory=time.perf_counter)
    engines: set = field(default_factory=set)  # generation backends whose engine this actor has started
    starting: str | None = None  # the backend whose engine its shard in flight starts

    @property
    def free(self) -> bool:
        """Loaded, and with room for another shard."""
        return self.ready_ref is None and len(self.busy) < IN_FLIGHT


@dataclass
class _Pool:
    model: ModelRef
    options: WorkerOptions
    members: list[_Member] = field(default_factory=list)


class RayExecutor(Executor):
    """Runs shards on Ray actors; see the module docstring."""

    name = "ray"

    @classmethod
    def from_config(cls, cfg: ExecutionConfig) -> "RayExecutor":
        return cls(cfg)

    @classmethod
    def has_gpus(cls, cfg: ExecutionConfig) -> bool:
        """A cluster elsewhere (`address`): joined now, so the plan knows whether its actors will hold GPUs."""
        if not cfg.address:
            return super().has_gpus(cfg)
        joined = connect(cfg)
        try:
            return actor_slots(cfg).num_gpus > 0
        finally:
            if joined:  # leave Ray as it was found: a driver still joined when the cluster stops is ended by Ray
                ray.shutdown()

    def __init__(self, cfg: ExecutionConfig, *, actor_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.pools: dict[ModelRef, _Pool] = {}
        self.pids: dict[str, set[int]] = {}  # the processes that served each model (by label, as `stats`)
        self.load_failures: dict[ModelRef, int] = {}
        self.queues: dict[ModelRef, deque[AnyShard]] = {}
        self.options: dict[ModelRef, WorkerOptions] = {}
        self.in_flight: dict[Any, tuple[_Pool, _Member, AnyShard]] = {}
        self._tries: dict[str, int] = {}
        self._done: set[str] = set()
        self.row_seconds: dict[tuple[ModelRef, str], float] = {}  # measured seconds per row, per model and kind
        self.load_seconds: dict[ModelRef, float] = {}  # measured load time per model
        self._kind_mean: dict[str, float] = {}  # mean of row_seconds per kind
        self.engine_seconds: dict[ModelRef, float] = {}  # measured engine start (with its first shard) per model
        self._rows: dict[ModelRef, dict[str, int]] = {}  # rows queued or running, per model and kind
        self._expected: dict[ModelRef, dict[str, int]] = {}  # rows the jobs will submit later (`expect`)
        self.owns_ray = connect(cfg)
        try:
            self.slots: Slots = actor_slots(cfg)
        except BaseException:
            self.close()
            raise
        self._read_at = time.perf_counter()
        self.refresh_s = REFRESH_S
        self.actor_options = actor_options or {}
        self._core_slots: set[int] = set()
        log.info("ray: %d actor slot(s) of %d CPU / %d GPU", self.slots.count, self.slots.num_cpus,
                 self.slots.num_gpus)

    # -------------------------------------------------------------------------------------- submit
    def _submit(self, shards: Sequence[AnyShard], options: dict[ModelRef, WorkerOptions], urgent: bool) -> None:
        for shard in reversed(shards) if urgent else shards:
            if self.gone(shard):
                continue
            m = shard.model.host  # a head recipe runs on its host model's actors
            opts = self.options.setdefault(m, worker_options(options, shard.model))
            if opts.device.startswith("cuda") and not self.slots.num_gpus:
                raise UsageError(f"device {opts.device!r} asked for {m.label!r}, but the Ray cluster has no GPU: "
                                 f"use --device auto or cpu")
            queue = self.queues.setdefault(m, deque())
            queue.appendleft(shard) if urgent else queue.append(shard)
            self._count(shard, +1)

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values()) + len(self.in_flight)

    # ------------------------------------------------------------------------------ what work is left
    def _row_cost(self, model: ModelRef, kind: str) -> float:
        """Measured seconds per row of `kind` for `model`; before a measurement, the mean over the models that
        have one; before any, 1."""
        return self.row_seconds.get((model, kind), self._kind_mean.get(kind, 1.0))

    def _measured(self, model: ModelRef, kind: str, per_row: float) -> None:
        old = self.row_seconds.get((model, kind))
        self.row_seconds[(model, kind)] = per_row if old is None else 0.7 * old + 0.3 * per_row
        known = [v for (_, k), v in self.row_seconds.items() if k == kind]
        self._kind_mean[kind] = sum(known) / len(known)

    def _count(self, shard: AnyShard, sign: int) -> None:
        rows = self._rows.setdefault(shard.model.host, {})
        rows[_kind(shard)] = rows.get(_kind(shard), 0) + sign * shard.rows

    def expect(self, rows: dict[tuple[ModelRef, str], int]) -> None:
        self._expected = {}
        for (model, kind), n in rows.items():
            later = self._expected.setdefault(model.host, {})
            later[kind] = later.get(kind, 0) + n

    def remaining(self, model: ModelRef) -> float:
        """Estimated seconds on one actor of the model's queued and running shards and of the work its jobs will
        submit later (rows kept as counters: this is asked for every model at every result)."""
        rows = self._rows.get(model, {})
        later = self._expected.get(model, {})
        return sum((rows.get(kind, 0) + later.get(kind, 0)) * self._row_cost(model, kind)
                   for kind in set(rows) | set(later))

    def _load_cost(self, model: ModelRef) -> float:
        if model in self.load_seconds:
            return self.load_seconds[model]
        return max(self.load_seconds.values(), default=LOAD_GUESS_S)

    # ---------------------------------------------------------------------------------------- slots
    def _refresh_slots(self) -> None:
        if time.perf_counter() - self._read_at < self.refresh_s:
            return
        self._read_at = time.perf_counter()
        try:
            slots = actor_slots(self.cfg)
        except Exception as err:  # a node leaving mid-read: keep the last count
            log.debug("ray: could not read the cluster's slots again: %s", err)
            return
        if slots.count != self.slots.count:
            log.info("ray: the cluster now holds %d actor slot(s) (was %d)", slots.count, self.slots.count)
            self.slots = Slots(slots.count, self.slots.num_cpus, self.slots.num_gpus)

    def _actors(self) -> int:
        return sum(len(p.members) for p in self.pools.values())

    def _would_take(self, member: _Member, pool: _Pool) -> bool:
        """Whether `member` would take one of its model's queued shards (see `_takes`). Asked for every member at
        every result: `_takes` depends only on the shard's kind and backend, so each is asked once."""
        asked = set()
        for shard in itertools.islice(self.queues.get(pool.model) or (), SCAN):
            key = shard.backend if isinstance(shard, GenShard) else None
            if key not in asked:
                asked.add(key)
                if self._takes(member, pool, shard):
                    return True
        return False

    def _idle(self, model: ModelRef) -> list[_Member]:
        """Members of `model`'s pool that are loaded and have nothing to do: its queue is empty, or holds only
        generation on an engine they have not started and should not start (`_takes`)."""
        pool = self.pools.get(model)
        if pool is None:
            return []
        return [mb for mb in pool.members if mb.free and not self._would_take(mb, pool)]

    def _wants(self, model: ModelRef) -> bool:
        """Whether `model` should get one more actor: it has queued work nobody is free to take, its pool is
        under `actors`, and (unless it has no actor, or `actors` was given) that work over one more actor
        outweighs loading it."""
        queue = self.queues.get(model)
        if not queue or model.label in self.failed:
            return False
        pool = self.pools.get(model)
        n = len(pool.members) if pool else 0
        if n >= (self.cfg.actors or self.slots.count):
            return False
        if pool is not None and any(mb.free and self._would_take(mb, pool) for mb in pool.members):
            return False  # a member of its own is free and will take the work
        if pool is not None and not self._would_take(_Member(handle=None, ready_ref=None), pool):
            return False  # a new actor would not take it either (generation not worth another engine)
        if n == 0:
            return True
        loading = sum(1 for mb in pool.members if mb.ready_ref is not None)
        if len(queue) <= loading:
            return False
        if self.cfg.actors:  # a pool size the user chose: as many actors as there is queued work for
            return True
        return self.remaining(model) / (n + 1) > self._load_cost(model)

    def _rebalance(self) -> None:
        """Deal free slots and idle actors to the models whose work needs them most."""
        self._refresh_slots()
        while True:
            wanting = [m for m in self.queues if self._wants(m)]
            if not wanting:
                return

            def need(m: ModelRef) -> float:
                pool = self.pools.get(m)
                n = len(pool.members) if pool else 0
                return float("inf") if n == 0 else self.remaining(m) / n

            model = max(wanting, key=need)
            pool = self.pools.setdefault(model, _Pool(model, self.options.get(model, WorkerOptions())))
            if self._actors() < self.slots.count:
                pool.members.append(self._new_member(pool))
                continue
            donors = [(mb, m) for m in list(self.pools) if m != model for mb in self._idle(m)]
            if not donors:
                return
            member, owner = min(donors, key=lambda d: d[0].idle_since)  # the longest idle gives way
            self._hand_over(member, owner, pool)

    def _hand_over(self, member: _Member, owner: ModelRef, pool: _Pool) -> None:
        """An idle actor of `owner` drops its model and takes `pool`'s (same process)."""
        old = self.pools[owner]
        old.members.remove(member)
        if not old.members:
            del self.pools[owner]
        member.handle.unload.remote()  # ordered before the next model's `load`
        pool.members.append(member)
        self._load(member, pool)
        self.stats_for(pool.model).actors = max(self.stats_for(pool.model).actors, len(pool.members))
        log.info("ray: an actor of %s goes to %s", owner.label, pool.model.label)

    def _core_binding(self) -> tuple[int | None, dict[str, str]]:
        """A free block of cores for an actor on a local CPU cluster, as vLLM's CPU thread binding.

        vLLM's CPU engine pins its threads itself; two engines on one machine both pin to core 0 (half speed
        each) unless each actor names its own cores. Only where Ray runs on this machine without GPUs (on a
        cluster the node an actor lands on is not known in advance)."""
        if not self.owns_ray or self.slots.num_gpus:
            return None, {}
        slot = next(i for i in range(len(self._core_slots) + 1) if i not in self._core_slots)
        self._core_slots.add(slot)
        lo = slot * self.slots.num_cpus
        hi = lo + self.slots.num_cpus - 1
        return slot, {"VLLM_CPU_OMP_THREADS_BIND": str(lo) if hi == lo else f"{lo}-{hi}",
                      "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}

    def _new_member(self, pool: _Pool) -> _Member:
        self.stats_for(pool.model).actors = max(self.stats_for(pool.model).actors, len(pool.members) + 1)
        slot, env = self._core_binding()
        options: dict[str, Any] = dict(num_cpus=self.slots.num_cpus, num_gpus=self.slots.num_gpus,
                                       max_restarts=ACTOR_RESTARTS, max_task_retries=0)
        if env:
            options["runtime_env"] = {"env_vars": env}
        handle = ModelActor.options(**options).remote(
            pool.model, pool.options.device, pool.options.token_budget, self.slots.num_cpus, **self.actor_options)
        self.stats_for(pool.model).loads += 1
        return _Member(handle, handle.ready.remote(), core_slot=slot)

    def _load(self, member: _Member, pool: _Pool) -> None:
        """Tell an existing actor which model it serves now; `ready_ref` answers once it does."""
        member.ready_ref = member.handle.load.remote(pool.model, pool.options.device, pool.options.token_budget)
        member.loaded = False
        member.engines, member.starting = set(), None
        member.asked = time.perf_counter()
        self.stats_for(pool.model).loads += 1

    def _drop(self, member: _Member) -> None:
        ray.kill(member.handle, no_restart=True)
        self._core_slots.discard(member.core_slot)

    def _release(self, model: ModelRef) -> None:
        """End a model's pool and kill its actors (a model given up, or the executor closing; an actor that is
        still useful is handed on by `_hand_over` instead)."""
        pool = self.pools.pop(model, None)
        if pool is None:
            return
        for m in pool.members:
            self._drop(m)
        log.info("ray: released the pool of %s", model.label)

    # ------------------------------------------------------------------------------------------ poll
    def poll(self) -> list[tuple[AnyShard, pa.RecordBatch]]:
        if not self.pending:
            return []
        self._rebalance()
        self._dispatch()
        refs = list(self.in_flight) + [mb.ready_ref for p in self.pools.values() for mb in p.members
                                       if mb.ready_ref is not None]
        if not refs:
            raise RuntimeError("ray executor: work is queued but no actor can take it")
        ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_S)
        if ready:  # and whatever else has finished meanwhile
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            if ref in self.in_flight:
                got = self._result(ref)
                if got is not None:
                    out.append(got)
            else:
                self._member_ready(ref)
        for model in [m for m in list(self.pools) if m.label in self.failed]:
            self._forget(model)
        return out

    def _result(self, ref: Any) -> tuple[AnyShard, pa.RecordBatch] | None:
        pool, member, shard = self.in_flight.pop(ref)
        member.busy.discard(ref)
        member.idle_since = time.perf_counter()
        starting, member.starting = member.starting, None
        try:
            batch = ray.get(ref)
        except HostedLoadError as err:  # the recipe's donor: its actor and host model are fine
            member.loaded, member.counted = True, False
            self._load_failed(shard.model, shard, str(getattr(err, "cause", err)))
            return None
        except ModelLoadError as err:
            self._load_failed(pool.model, shard, str(getattr(err, "cause", err)))
            return None
        except _ACTOR_LOST as err:
            if member.loaded:
                self._lost(pool, member, shard, err)
            else:  # died before computing anything for this model: while loading it
                member.counted = True
                self._load_failed(pool.model, shard, f"its actor died while loading it "
                                               f"({type(err).__name__}: killed, out of memory?)")
                if member.ready_ref is None and pool.model.label not in self.failed:
                    self._load(member, pool)
            return None
        took = time.perf_counter() - member.sent
        if starting is not None:  # this shard started an engine: its time is mostly the engine's
            self.engine_seconds[pool.model] = max(self.engine_seconds.get(pool.model, 0.0), took)
            member.engines.add(starting)
        elif member.loaded:  # a first shard also paid for loading what it needed: not a row cost
            self._measured(pool.model, _kind(shard), took / max(shard.rows, 1))
        member.loaded, member.counted = True, False
        if shard.id in self._done:  # a retried shard that had finished after all: keep the first
            return None
        self._done.add(shard.id)
        self._count(shard, -1)
        self._returned(shard)
        return shard, batch

    def _forget(self, model: ModelRef) -> None:
        """A model given up: drop its queue and its shards in flight, and kill its actors (a failed load may
        have left them in any state)."""
        self.queues.pop(model, None)
        self._rows.pop(model, None)
        for ref in [r for r, (p, _, _) in self.in_flight.items() if p.model == model]:
            del self.in_flight[ref]
        self._release(model)

    def _dispatch(self) -> None:
        for model, pool in self.pools.items():
            queue = self.queues.get(model)
            for member in pool.members:
                while queue and member.free:
                    i = self._pick(member, pool, queue)
                    if i is None:
                        break
                    shard = queue[i]
                    del queue[i]
                    ref = member.handle.run.remote(shard, pool.options.device, pool.options.token_budget)
                    member.busy.add(ref)
                    member.sent = time.perf_counter()
                    if isinstance(shard, GenShard) and shard.backend in ENGINE_BACKENDS and \
                            shard.backend not in member.engines:
                        member.starting = shard.backend
                    self.in_flight[ref] = (pool, member, shard)

    def _pick(self, member: _Member, pool: _Pool, queue: deque) -> int | None:
        """Which queued shard `member` runs next: generation on an engine it holds first (what the engine is for;
        on a GPU it has displaced the scanning copy); where no actor of the model holds or starts the engine
        its queued generation needs, that generation, so that the engine starts beside the scans and is warm
        when the rounds that wait for a search arrive; else the first shard it takes (`_takes`)."""
        if self._rows.get(pool.model, {}).get("text"):
            held: dict[str, int] = {}  # engine holders per backend, counted once per pick
            for i, shard in enumerate(queue):
                if not isinstance(shard, GenShard) or shard.backend not in ENGINE_BACKENDS:
                    continue
                if shard.backend not in held:
                    held[shard.backend] = self._holders(pool, shard.backend)
                if shard.backend in member.engines or not held[shard.backend]:
                    return i
        return next((i for i, shard in enumerate(itertools.islice(queue, SCAN))
                     if self._takes(member, pool, shard)), None)

    def _takes(self, member: _Member, pool: _Pool, shard: AnyShard) -> bool:
        """Whether `member` should run `shard`: anything but generation on a backend whose engine it has not
        started; that only where no actor of the model has one, or the model's generation left per engine
        outweighs starting another."""
        if not isinstance(shard, GenShard) or shard.backend not in ENGINE_BACKENDS or shard.backend in member.engines:
            return True
        holders = self._holders(pool, shard.backend)
        if not holders:
            return True
        left = self._rows.get(pool.model, {}).get("text", 0) * self._row_cost(pool.model, "text")
        return left / holders > self.engine_seconds.get(pool.model, ENGINE_GUESS_S)

    @staticmethod
    def _holders(pool: _Pool, backend: str) -> int:
        """How many of the pool's actors hold `backend`'s engine or are starting it."""
        return sum(1 for mb in pool.members if backend in mb.engines or mb.starting == backend)

    def _member_ready(self, ref: Any) -> None:
        for pool in list(self.pools.values()):
            for member in pool.members:
                if member.ready_ref == ref:
                    try:
                        self.pids.setdefault(pool.model.label, set()).add(ray.get(ref))
                        member.ready_ref = None
                        member.idle_since = time.perf_counter()
                        took = time.perf_counter() - member.asked
                        old = self.load_seconds.get(pool.model)
                        # the recent loads weigh: a first one also waited for a process to start, a hand-over
                        # to an actor already running does not
                        self.load_seconds[pool.model] = took if old is None else 0.5 * old + 0.5 * took
                    except _ACTOR_LOST as err:  # restarts exhausted: replace the actor
                        log.warning("ray: an actor of %s is gone (%s); starting a new one", pool.model.label,
                                    type(err).__name__)
                        self._drop(member)
                        pool.members.remove(member)
                        if not member.loaded and not member.counted:  # died starting or taking the model on
                            self._load_failed(pool.model, None,
                                              f"its actor died while loading it ({type(err).__name__})")
                        if pool.model.label not in self.failed:
                            pool.members.append(self._new_member(pool))
                    return

    def _load_failed(self, model: ModelRef, shard: AnyShard | None, cause: str) -> None:
        """A failed load of `model`, a host's own model or a hosted head recipe's donor: try again (its shard
        first), or give it up after `max_retries`. A given-up host is forgotten with its pool (`poll`); a given-up
        recipe's queued shards leave its host's queue, and the host goes on."""
        if model.label in self.failed:
            return
        n = self.load_failures[model] = self.load_failures.get(model, 0) + 1
        if n <= self.cfg.max_retries:
            log.warning("ray: %s failed to load (%s); trying again (%d of %d)", model.label, cause, n,
                        self.cfg.max_retries)
            self.stats_for(model).retries += 1
            if shard is not None:
                self.queues.setdefault(shard.model.host, deque()).appendleft(shard)
            return
        self.failed[model.label] = f"{cause} ({n} tries)"
        log.error("ray: giving up %s after %d tries to load it: %s", model.label, n, cause)
        if model.host != model:
            if shard is not None:
                self._count(shard, -1)
            queue = self.queues.get(model.host, deque())
            for s in [s for s in queue if s.model == model]:
                queue.remove(s)
                self._count(s, -1)

    def _lost(self, pool: _Pool, member: _Member, shard: AnyShard, err: Exception) -> None:
        n = self._tries.get(shard.id, 0) + 1
        self._tries[shard.id] = n
        if n > self.cfg.max_retries:
            raise RuntimeError(f"shard {shard.id} of {shard.model.label} failed {n} times (actor lost: "
                               f"{type(err).__name__}); giving up") from err
        log.warning("ray: actor of %s lost while running shard %s (%s); retry %d", shard.model.label, shard.id,
                    type(err).__name__, n)
        self.stats_for(shard.model).retries += 1
        self.queues.setdefault(shard.model.host, deque()).appendleft(shard)
        if member.ready_ref is None:  # wait until Ray has restarted it: rebuilt with its first model, so say which
            self._load(member, pool)

    def close(self) -> None:
        for model in list(self.pools):
            self._release(model)
        if self.owns_ray:
            shutdown()
