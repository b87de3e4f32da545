"""The Ray executor: a pool of `ModelActor`s per model, shards fanned out and collected with `ray.wait`.

- Pools: one actor per GPU (`gpus_per_actor`) or per `cpus_per_actor` CPU slot. The cluster's slots are
  shared among the models of a round; a model that gets none now waits and is served when another model's
  work is done and its pool is released, so several models never deadlock on resources.
- Each actor holds its model for the whole run (every round, every experiment) unless its slot is needed by a
  waiting model. A released pool's actors are not killed but handed to the next model (`ModelActor.load`):
  a new process would pay torch's and transformers' imports again (~3.5 s of a ~5 s actor start on a CPU).
- Faults: an actor that dies is restarted by Ray (`max_restarts`); the shard it held is queued again (shards
  are idempotent, and the driver keeps only the first result of each), up to `max_retries` times per shard.
  An actor that cannot be restarted is replaced.
- A model that fails to load (an error while loading it, or its actor dying before it computed anything for
  it: killed for memory, a corrupt file) is tried again, `max_retries` times in all for the model; then it is
  given up: its shards are dropped, its slots go to the other models, and `failed` names it with the cause. The
  other models' work goes on; `execute` and the runner turn `failed` into one line at the end of the run.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import pyarrow as pa
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.cluster import Slots, actor_slots, connect, shutdown
from actors.model_actor import ModelActor, ModelLoadError
from study.core.errors import UsageError
from study.runtime.executor import ExecutionConfig, Executor, WorkerOptions
from study.runtime.shards import ModelRef, Shard

log = logging.getLogger(__name__)

IN_FLIGHT = 1  # shards per actor at once: a shard runs for seconds, so a round trip between shards costs
# nothing, while a second queued shard can leave another actor idle at the end of a round
ACTOR_RESTARTS = 3
WAIT_S = 1.0
_ACTOR_LOST = (RayActorError, ActorUnavailableError)


@dataclass
class _Member:
    handle: Any
    ready_ref: Any | None  # None once the model is loaded
    busy: set = field(default_factory=set)  # refs of shards in flight
    loaded: bool = False  # has computed a shard of its current model (a death before that is a failed load)
    counted: bool = False  # its last death has been counted as a failed load
    core_slot: int | None = None  # which block of this machine's cores its engine threads are bound to


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

    def __init__(self, cfg: ExecutionConfig, *, actor_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.pools: dict[ModelRef, _Pool] = {}
        self._spare: list[_Member] = []  # actors of released pools, model dropped, for the next pool
        self.pids: dict[str, set[int]] = {}  # the processes that served each model (by label, as `stats`)
        self.load_failures: dict[ModelRef, int] = {}
        self.owns_ray = connect(cfg)
        try:
            self.slots: Slots = actor_slots(cfg)
        except BaseException:
            self.close()
            raise
        self.actor_options = actor_options or {}
        self._core_slots: set[int] = set()
        log.info("ray: %d actor slot(s) of %d CPU / %d GPU", self.slots.count, self.slots.num_cpus,
                 self.slots.num_gpus)

    # ------------------------------------------------------------------------------------------ pools
    def _targets(self, models: Sequence[ModelRef]) -> dict[ModelRef, int]:
        """Actors per model for a round: the slots shared out, at most `actors` each; models past the
        slots get 0 and wait for a pool to be released."""
        want = self.cfg.actors or self.slots.count
        targets = {m: 0 for m in models}
        free = self.slots.count
        while free > 0:
            grew = False
            for m in models:
                if free > 0 and targets[m] < want:
                    targets[m] += 1
                    free -= 1
                    grew = True
            if not grew:
                break
        return targets

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
        if self._spare:  # a released pool's actor: same process, another model
            member = self._spare.pop()
            self._load(member, pool)
            return member
        slot, env = self._core_binding()
        options: dict[str, Any] = dict(num_cpus=self.slots.num_cpus, num_gpus=self.slots.num_gpus,
                                       max_restarts=ACTOR_RESTARTS, max_task_retries=0)
        if env:
            options["runtime_env"] = {"env_vars": env}
        handle = ModelActor.options(**options).remote(
            pool.model, pool.options.device, pool.options.token_budget, self.slots.num_cpus, **self.actor_options)
        return _Member(handle, handle.ready.remote(), core_slot=slot)

    @staticmethod
    def _load(member: _Member, pool: _Pool) -> None:
        """Tell an existing actor which model it serves now; `ready_ref` answers once it does."""
        member.ready_ref = member.handle.load.remote(pool.model, pool.options.device, pool.options.token_budget)
        member.loaded = False

    def _drop(self, member: _Member) -> None:
        ray.kill(member.handle, no_restart=True)
        self._core_slots.discard(member.core_slot)

    def _grow(self, pool: _Pool, target: int) -> None:
        while len(pool.members) < target:
            pool.members.append(self._new_member(pool))

    def _release(self, model: ModelRef, keep: bool = True) -> None:
        """End a model's pool; its actors drop the model and wait for the next pool (`keep`) or are killed."""
        pool = self.pools.pop(model, None)
        if pool is None:
            return
        for m in pool.members:
            self._retire(m) if keep else self._drop(m)
        log.info("ray: released the pool of %s", model.label)

    def _retire(self, member: _Member) -> None:
        """An actor whose pool no longer needs it: it drops its model and waits for the next pool."""
        if member.busy:  # shards in flight (never, for a pool released when done): not reusable as is
            self._drop(member)
            return
        member.handle.unload.remote()  # ordered before the next model's `load`
        self._spare.append(member)

    # -------------------------------------------------------------------------------------------- run
    def run(self, shards: Sequence[Shard], options: dict[ModelRef, WorkerOptions]) -> Iterator[
            tuple[Shard, pa.RecordBatch]]:
        queues: dict[ModelRef, deque[Shard]] = {}
        for s in shards:
            queues.setdefault(s.model, deque()).append(s)
        for m in queues:
            device = options.get(m, WorkerOptions()).device
            if device.startswith("cuda") and not self.slots.num_gpus:
                raise UsageError(f"device {device!r} asked for {m.label!r}, but the Ray cluster has no GPU: "
                                 f"use --device auto or cpu")
        # models that already hold a pool keep it (their model is loaded); the others share what is left
        models = sorted(queues, key=lambda m: m not in self.pools)
        targets = self._targets(models)
        for m in list(self.pools):  # pools with nothing to do in this round give their slots back
            if targets.get(m, 0) == 0:
                self._release(m)
        waiting = [m for m in models if targets[m] == 0]
        models = [m for m in models if targets[m] > 0]
        for m in models:
            pool = self.pools.setdefault(m, _Pool(m, options.get(m, WorkerOptions())))
            if len(pool.members) > targets[m]:
                for extra in pool.members[targets[m]:]:
                    self._retire(extra)
                del pool.members[targets[m]:]
            self._grow(pool, targets[m])
        in_flight: dict[Any, tuple[_Pool, _Member, Shard]] = {}
        tries: dict[str, int] = {}
        done: set[str] = set()
        started = {m: time.perf_counter() for m in models}
        finished: dict[ModelRef, float] = {}
        if waiting:
            log.info("ray: %d model(s) wait for a free slot: %s", len(waiting), ", ".join(m.label for m in waiting))

        while any(queues.values()) or in_flight:
            self._dispatch(queues, in_flight)
            refs = list(in_flight) + [mb.ready_ref for p in self.pools.values() for mb in p.members
                                      if mb.ready_ref is not None]
            if not refs:
                raise RuntimeError("ray executor: work is queued but no actor can take it")
            ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_S)
            for ref in ready:
                if ref in in_flight:
                    pool, member, shard = in_flight.pop(ref)
                    member.busy.discard(ref)
                    try:
                        batch = ray.get(ref)
                    except ModelLoadError as err:
                        self._load_failed(pool, shard, queues, str(getattr(err, "cause", err)))
                        continue
                    except _ACTOR_LOST as err:
                        if member.loaded:
                            self._lost(pool, member, shard, queues, tries, err)
                        else:  # died before computing anything for this model: while loading it
                            member.counted = True
                            self._load_failed(pool, shard, queues, f"its actor died while loading it "
                                                                   f"({type(err).__name__}: killed, out of memory?)")
                            if member.ready_ref is None:
                                self._load(member, pool)
                        continue
                    member.loaded, member.counted = True, False
                    if shard.id in done:  # a retried shard that had finished after all: keep the first
                        continue
                    done.add(shard.id)
                    finished[shard.model] = time.perf_counter()
                    yield shard, batch
                else:
                    self._member_ready(ref, queues)
            for m in list(models):
                failed = m.label in self.failed
                if failed:  # given up: forget its shards in flight, free its actors
                    queues[m].clear()
                    for ref in [r for r, (p, _, _) in in_flight.items() if p.model == m]:
                        del in_flight[ref]
                # a model whose work is all done frees its slots for a waiting model
                if (failed or waiting) and not queues[m] and not any(p.model == m for p, _, _ in in_flight.values()):
                    slots = len(self.pools[m].members)  # a model that waited itself had no target of its own
                    self._release(m, keep=not failed)
                    models.remove(m)
                    if not waiting:
                        continue
                    nxt = waiting.pop(0)
                    models.append(nxt)
                    pool = self.pools.setdefault(nxt, _Pool(nxt, options.get(nxt, WorkerOptions())))
                    self._grow(pool, slots)
                    started[nxt] = time.perf_counter()
        for m, t in finished.items():  # wall time per model, from its pool's start to its last result
            self.stats_for(m).seconds += t - started[m]

    def _dispatch(self, queues: dict[ModelRef, deque[Shard]], in_flight: dict) -> None:
        for model, pool in self.pools.items():
            queue = queues.get(model)
            if not queue:
                continue
            for member in pool.members:
                while queue and member.ready_ref is None and len(member.busy) < IN_FLIGHT:
                    shard = queue.popleft()
                    ref = member.handle.run.remote(shard, pool.options.device, pool.options.token_budget)
                    member.busy.add(ref)
                    in_flight[ref] = (pool, member, shard)

    def _member_ready(self, ref: Any, queues: dict[ModelRef, deque[Shard]]) -> None:
        for pool in self.pools.values():
            for member in pool.members:
                if member.ready_ref == ref:
                    try:
                        self.pids.setdefault(pool.model.label, set()).add(ray.get(ref))
                        member.ready_ref = None
                    except _ACTOR_LOST as err:  # restarts exhausted: replace the actor
                        log.warning("ray: an actor of %s is gone (%s); starting a new one", pool.model.label,
                                    type(err).__name__)
                        self._drop(member)
                        pool.members.remove(member)
                        if not member.loaded and not member.counted:  # died starting or taking the model on
                            self._load_failed(pool, None, queues, f"its actor died while loading it "
                                                                  f"({type(err).__name__})")
                        if pool.model.label not in self.failed:
                            pool.members.append(self._new_member(pool))
                    return

    def _load_failed(self, pool: _Pool, shard: Shard | None, queues: dict[ModelRef, deque[Shard]],
                     cause: str) -> None:
        """A failed load of `pool.model`: try again (its shard first), or give the model up after `max_retries`."""
        model = pool.model
        if model.label in self.failed:
            return
        n = self.load_failures[model] = self.load_failures.get(model, 0) + 1
        if n > self.cfg.max_retries:
            self.failed[model.label] = f"{cause} ({n} tries)"
            log.error("ray: giving up %s after %d tries to load it: %s", model.label, n, cause)
            return
        log.warning("ray: %s failed to load (%s); trying again (%d of %d)", model.label, cause, n,
                    self.cfg.max_retries)
        self.stats_for(model).retries += 1
        if shard is not None:
            queues.setdefault(model, deque()).appendleft(shard)

    def _lost(self, pool: _Pool, member: _Member, shard: Shard, queues: dict, tries: dict[str, int],
              err: Exception) -> None:
        n = tries.get(shard.id, 0) + 1
        tries[shard.id] = n
        if n > self.cfg.max_retries:
            raise RuntimeError(f"shard {shard.id} of {shard.model.label} failed {n} times (actor lost: "
                               f"{type(err).__name__}); giving up") from err
        log.warning("ray: actor of %s lost while running shard %s (%s); retry %d", shard.model.label, shard.id,
                    type(err).__name__, n)
        self.stats_for(shard.model).retries += 1
        queues.setdefault(shard.model, deque()).appendleft(shard)
        if member.ready_ref is None:  # wait until Ray has restarted it: rebuilt with its first model, so say which
            self._load(member, pool)

    def close(self) -> None:
        for model in list(self.pools):
            self._release(model, keep=False)
        while self._spare:
            self._drop(self._spare.pop())
        if self.owns_ray:
            shutdown()
