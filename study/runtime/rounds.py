"""Jobs advanced round by round on one executor, with no barrier between jobs.

A job (an experiment on a model) works in rounds: a round is a set of shards whose results it needs together
(Ships' scan, one Sahara step, ASR's generations). Each job's round is submitted the moment the job can name
it, and absorbed the moment its last shard is back: model A's Sahara step 2 starts while model B is still
generating. A job with nothing to submit yet waits on another job (ASR on its Sahara group) and is asked again
whenever any round closes. Shards already in the run folder are read back instead of computed; a shard two
jobs need is computed once; every result is stored the moment it arrives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import pyarrow as pa

from study.runtime.executor import Executor, ModelStats, Outcome, WorkerOptions
from study.runtime.progress import StudyProgress
from study.runtime.shards import AnyShard, ModelRef
from study.runtime.store import ShardStore

log = logging.getLogger(__name__)


class RoundJob(Protocol):
    """What `Rounds` needs of a job (study.experiments.base.Job is one)."""

    model: ModelRef

    @property
    def done(self) -> bool: ...

    @property
    def round_label(self) -> str: ...

    def pending(self) -> list[AnyShard]: ...

    def absorb(self, outcome: Outcome) -> None: ...


@dataclass(eq=False)
class _Round:
    job: RoundJob
    label: str
    tables: dict[str, pa.Table] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    shards: dict[str, AnyShard] = field(default_factory=dict)


class Rounds:
    """Runs `jobs` to the end on the executor `make_executor()` builds when the first shard needs computing."""

    def __init__(self, jobs: Sequence[RoundJob], store: ShardStore, options: dict[ModelRef, WorkerOptions],
                 make_executor: Callable[[], Executor], *, force: bool = False,
                 sources: Callable[[RoundJob], RoundJob | None] = lambda job: None) -> None:
        self.jobs = list(jobs)
        self.store, self.options, self.force = store, options, force
        self.make_executor = make_executor
        self.sources = sources  # the job whose results a job takes (its heads' source): fails with it
        self.executor: Executor | None = None
        self.computed = self.reused = 0
        self.failed_jobs: list[RoundJob] = []
        self.reused_by: dict[str, int] = {}  # model label -> shards read back
        self._waiting: list[RoundJob] = list(jobs)
        self._open: list[_Round] = []
        self._wanted: dict[str, list[_Round]] = {}  # shard id -> the open rounds that need it
        self._results: dict[str, pa.Table] = {}  # computed in this run (a shard another job may need too)
        self._lost: set[str] = set()  # model labels given up, already acted on
        self.progress = StudyProgress()
        self._expected_stale = True  # a round opened or closed since the executor was last told what is to come

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> None:
        try:
            self._start_ready()
            while self._open:
                ex = self.executor
                for shard, batch in ex.poll() if ex is not None else []:
                    self._deliver(shard, batch)
                self._drop_failed_models()
                self._start_ready()
                self._tell_expected()
                self.progress.refresh()
        finally:
            self.progress.close()
        stuck = [j for j in self.jobs if not j.done and j not in self.failed_jobs]
        if stuck:  # every job left waits on another: a dependency no round can satisfy
            raise RuntimeError(f"no work left for {', '.join(j.round_label for j in stuck)}")

    @property
    def failed(self) -> dict[str, str]:
        return dict(self.executor.failed) if self.executor is not None else {}

    def model_stats(self) -> dict[str, ModelStats]:
        """Per model: what the executor computed, and the shards read back from the run folder."""
        out = {k: ModelStats(**vars(v)) for k, v in (self.executor.stats if self.executor else {}).items()}
        for label, n in self.reused_by.items():
            out.setdefault(label, ModelStats()).reused = n
        return out

    # ------------------------------------------------------------------------------------ internals
    def _start_ready(self) -> None:
        """Open the next round of every job that can name one (repeating: a round read back entirely from the
        run folder closes at once, and its job may name the next)."""
        again = True
        while again:
            again = False
            for job in list(self._waiting):
                if job.done or job in self.failed_jobs:
                    self._waiting.remove(job)
                    continue
                shards = job.pending()
                if shards:
                    self._waiting.remove(job)
                    self._begin(job, shards)
                    again = True

    def _tell_expected(self) -> None:
        """Tell the executor the work the jobs will submit in rounds they cannot name yet (`Job.expected`), so
        that pools are sized for it before it is queued."""
        if not self._expected_stale or self.executor is None:
            return
        self._expected_stale = False
        total: dict[tuple[ModelRef, str], int] = {}
        for job in self.jobs:
            if job.done or job in self.failed_jobs:
                continue
            for key, rows in getattr(job, "expected", dict)().items():
                total[key] = total.get(key, 0) + rows
        self.executor.expect(total)

    def _begin(self, job: RoundJob, shards: Sequence[AnyShard]) -> None:
        self._expected_stale = True
        rnd = _Round(job, job.round_label, shards={s.id: s for s in shards})
        todo = []
        for sid, shard in rnd.shards.items():
            if sid in self._results:
                rnd.tables[sid] = self._results[sid]
            elif not self.force and self.store.has(sid):
                rnd.tables[sid] = self._results[sid] = self.store.get(sid)
                self.reused += 1
                self.reused_by[shard.model.label] = self.reused_by.get(shard.model.label, 0) + 1
            else:
                rnd.missing.add(sid)
                if sid not in self._wanted:
                    todo.append(shard)
                self._wanted.setdefault(sid, []).append(rnd)
        if not rnd.missing:
            self._close(rnd)
            return
        if todo and self.executor is None:  # before any progress is shown: a bad cluster option is one line
            self.executor = self.make_executor()
        self._open.append(rnd)
        self.progress.opened(job.model.label, rnd.label, todo)
        if todo:  # a round other jobs wait on (a Sahara step) goes first: the critical path
            urgent = any(self.sources(j) is job for j in self.jobs if not j.done)
            self.executor.submit(todo, self.options, urgent=urgent)

    def _deliver(self, shard: AnyShard, batch: pa.RecordBatch) -> None:
        if not batch.schema.equals(shard.schema):
            raise RuntimeError(f"shard {shard.id} came back with schema {batch.schema}, expected {shard.schema}")
        if shard.id in self._results:  # a retried shard that had finished after all: keep the first
            return
        self.store.put(shard.id, batch)
        table = self._results[shard.id] = pa.Table.from_batches([batch])
        self.computed += 1
        self.progress.advanced(shard)
        for rnd in self._wanted.pop(shard.id, []):
            rnd.tables[shard.id] = table
            rnd.missing.discard(shard.id)
            if not rnd.missing and rnd in self._open:
                self._close(rnd)

    def _close(self, rnd: _Round) -> None:
        self._expected_stale = True
        if rnd in self._open:
            self._open.remove(rnd)
        self.progress.closed(rnd.job.model.label, rnd.label)
        rnd.job.absorb(Outcome(tables=rnd.tables))
        self._waiting.append(rnd.job)

    def _drop_failed_models(self) -> None:
        """Rounds that need a shard of a model the executor gave up fail with their job, and so do the jobs
        that take their results from a failed job."""
        lost = set(self.failed) - self._lost
        if not lost:
            return
        self._lost |= lost
        for rnd in list(self._open):
            if any({rnd.shards[sid].model.label, rnd.shards[sid].model.host.label} & lost for sid in rnd.missing):
                self._open.remove(rnd)
                self.failed_jobs.append(rnd.job)
                for sid in rnd.missing:
                    rounds = self._wanted.get(sid, [])
                    if rnd in rounds:
                        rounds.remove(rnd)
        while more := [j for j in self.jobs if j not in self.failed_jobs and self.sources(j) in self.failed_jobs]:
            self.failed_jobs += more
