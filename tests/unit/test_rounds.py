"""Jobs advance without a barrier (study.runtime.rounds): a job's next round is submitted the moment its last one
is back, while another model's long round still runs; a round read back from the run folder closes at once; a
shard two jobs need is computed once; a model given up fails its jobs and the jobs that take their results.
Progress counts scan rows and generated texts apart, per model."""

from __future__ import annotations

import heapq
from typing import Sequence

import pyarrow as pa

from study.core.ablation import Ablation
from study.core.heads import Head
from study.generation.decoding import Decoding
from study.prompts.formats import PromptFormat
from study.runtime.executor import Executor, Outcome, WorkerOptions
from study.runtime.progress import StudyProgress
from study.runtime.rounds import Rounds
from study.runtime.shards import GenShard, ModelRef, PromptBlock, Shard
from study.runtime.store import ShardStore

BLOCK = PromptBlock(ids=("p0", "p1"), texts=("a", "b"), format=PromptFormat.PAPER)


def shard(model: str, layer: int) -> Shard:
    return Shard(model=ModelRef(name=model), prompts=BLOCK, ablations=(Ablation(heads=(Head(layer, 0),)),))


def batch(s: Shard) -> pa.RecordBatch:
    labels = [a.label for a in s.ablations for _ in s.prompts.ids]
    return pa.RecordBatch.from_arrays([pa.array(labels), pa.array(list(s.prompts.ids) * len(s.ablations)),
                                       pa.array([0.5] * len(labels), pa.float64())], schema=s.schema)


class Clocked(Executor):
    """A real executor of the interface with `slots` parallel workers and virtual time: a shard of layer L takes
    `cost[model] * (L + 1)` time units; `poll` returns what finishes next. Records every submission's time."""

    name = "clocked"

    def __init__(self, slots: int, cost: dict[str, float], lost: str | None = None) -> None:
        super().__init__()
        self.slots, self.cost, self.lost = slots, cost, lost
        self.now = 0.0
        self.queue: list[Shard] = []
        self.running: list[tuple[float, int, Shard]] = []
        self.submitted: list[tuple[float, str]] = []
        self.urgent: list[bool] = []
        self._n = 0

    def _submit(self, shards: Sequence[Shard], options: dict[ModelRef, WorkerOptions], urgent: bool) -> None:
        for s in shards:
            if s.model.name == self.lost:
                self.failed[s.model.label] = "OSError: gone (1 tries)"
                continue
            self.submitted.append((self.now, s.id))
            self.urgent.append(urgent)
            self.queue.insert(0, s) if urgent else self.queue.append(s)

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.running)

    def poll(self):
        while self.queue and len(self.running) < self.slots:
            s = self.queue.pop(0)
            self._n += 1
            layer = s.ablations[0].heads[0].layer
            heapq.heappush(self.running, (self.now + self.cost[s.model.name] * (layer + 1), self._n, s))
        if not self.running:
            return []
        end, _, s = heapq.heappop(self.running)
        self.now = end
        self._returned(s)
        return [(s, batch(s))]


class Steps:
    """A job of `n` rounds on `model`, each round one shard per layer in `layers`; absorbs record when."""

    def __init__(self, model: str, n: int, layers: Sequence[int], clock: Clocked, after: "Steps | None" = None):
        self.model = ModelRef(name=model)
        self.n, self.layers, self.clock, self.after = n, layers, clock, after
        self.absorbed: list[float] = []
        self.source = after

    @property
    def done(self) -> bool:
        return len(self.absorbed) == self.n

    @property
    def round_label(self) -> str:
        return f"step {len(self.absorbed) + 1}"

    def pending(self) -> list[Shard]:
        if self.done or (self.after is not None and not self.after.done):
            return []
        step = len(self.absorbed)
        return [shard(self.model.name, 10 * step + layer) for layer in self.layers]

    def absorb(self, outcome: Outcome) -> None:
        assert all(sid in outcome.tables for sid in (s.id for s in self.pending()))
        self.absorbed.append(self.clock.now)


def test_a_job_takes_its_next_step_while_another_model_still_runs(tmp_path):
    clock = Clocked(slots=2, cost={"a": 1.0, "b": 100.0})
    a, b = Steps("a", 3, [0], clock), Steps("b", 1, [0], clock)
    rounds = Rounds([a, b], ShardStore(tmp_path), {}, lambda: clock)
    rounds.run()
    assert a.done and b.done
    # a's three steps (1 + 11 + 21 time units) all end long before b's single round (100)
    assert a.absorbed == [1.0, 12.0, 33.0] and b.absorbed == [100.0]
    assert [t for t, _ in clock.submitted] == [0.0, 0.0, 1.0, 12.0]


def test_a_dependent_job_starts_when_its_source_is_done_and_reuse_closes_rounds_at_once(tmp_path):
    clock = Clocked(slots=1, cost={"a": 1.0})
    src = Steps("a", 2, [0, 1], clock)
    dep = Steps("a", 1, [5], clock, after=src)
    rounds = Rounds([dep, src], ShardStore(tmp_path), {}, lambda: clock)
    rounds.run()
    assert dep.absorbed[0] > src.absorbed[-1] and rounds.computed == 5
    # again on the same folder: everything is read back, no executor is even made
    again = [Steps("a", 2, [0, 1], clock), None]
    again[1] = Steps("a", 1, [5], clock, after=again[0])
    made = []
    rerun = Rounds(again, ShardStore(tmp_path), {}, lambda: made.append(1) or clock)
    rerun.run()
    assert rerun.computed == 0 and rerun.reused == 5 and not made and all(j.done for j in again)


def test_a_round_other_jobs_wait_on_goes_before_queued_work(tmp_path):
    """The critical path first: a source's round (a Sahara step) jumps a terminal job's queue (Ships)."""
    clock = Clocked(slots=1, cost={"a": 1.0})
    terminal = Steps("a", 1, [0, 1, 2, 3], clock)
    src = Steps("a", 2, [5], clock)
    dep = Steps("a", 1, [7], clock, after=src)
    Rounds([terminal, src, dep], ShardStore(tmp_path), {}, lambda: clock, sources=lambda j: j.source).run()
    assert clock.urgent == [False] * 4 + [True, True, False]
    # src's first step ran first (layer 5: t=6), its second right after (layer 15: t=6+16), the terminal job after
    assert src.absorbed == [6.0, 22.0] and terminal.absorbed[0] > 22.0


def test_a_shard_two_jobs_need_is_computed_once(tmp_path):
    clock = Clocked(slots=2, cost={"a": 1.0})
    one, two = Steps("a", 1, [0, 1], clock), Steps("a", 1, [1, 2], clock)
    rounds = Rounds([one, two], ShardStore(tmp_path), {}, lambda: clock)
    rounds.run()
    assert one.done and two.done and rounds.computed == 3 and len(clock.submitted) == 3


def test_a_lost_model_fails_its_jobs_and_their_dependents_only(tmp_path):
    clock = Clocked(slots=2, cost={"a": 1.0, "b": 1.0}, lost="b")
    a, b = Steps("a", 2, [0], clock), Steps("b", 2, [0], clock)
    dep = Steps("b", 1, [3], clock, after=b)
    rounds = Rounds([a, b, dep], ShardStore(tmp_path), {}, lambda: clock, sources=lambda j: j.source)
    rounds.run()
    assert a.done and rounds.failed_jobs == [b, dep] and rounds.failed == {"b": "OSError: gone (1 tries)"}


class HostLost(Clocked):
    """The host model `lost` is given up when its own shard is submitted; a head recipe it hosts is queued and
    then dropped with the host's queue (as the Ray executor forgets a failed model), never returned."""

    def _submit(self, shards, options, urgent):
        super()._submit([s for s in shards if s.model.host == s.model], options, urgent)
        self.polls = 0

    def poll(self):
        self.polls = getattr(self, "polls", 0) + 1
        assert self.polls < 1000, "a round waits for a shard that nobody runs"
        return super().poll()


def test_a_lost_host_fails_the_head_recipes_it_hosts(tmp_path):
    from study.models.recipes import Recipe, Swap

    clock = HostLost(slots=2, cost={"a": 1.0, "b": 1.0}, lost="b")
    hosted = Steps("b", 1, [1], clock)
    hosted.model = ModelRef(name="b", swap=Swap(recipe=Recipe.HEADS_FROM_BASE, aligned="b", base="a",
                                                 heads=(Head(1, 0),)))
    hosted.pending = lambda: [] if hosted.done else [Shard(model=hosted.model, prompts=BLOCK,
                                                           ablations=(Ablation(heads=(Head(1, 0),)),))]
    a, b = Steps("a", 1, [0], clock), Steps("b", 1, [0], clock)
    rounds = Rounds([a, b, hosted], ShardStore(tmp_path), {}, lambda: clock)
    rounds.run()
    assert a.done and rounds.failed_jobs == [b, hosted]


def test_progress_counts_rows_and_texts_apart_per_model():
    progress = StudyProgress(tty=False)
    scan = shard("org/m", 0)
    gen = GenShard(model=ModelRef(name="org/m"), prompts=BLOCK, ablations=(Ablation(),), decoding=Decoding())
    progress.opened("org/m", "ships", [scan, scan])
    progress.opened("org/m", "asr generation", [gen])
    progress.advanced(scan)
    [line] = progress.lines()
    assert "m: ships | asr generation: 2/4 rows, ETA" in line and "0/2 texts" in line
    progress.advanced(scan)
    progress.advanced(gen)
    progress.closed("org/m", "ships")
    progress.closed("org/m", "asr generation")
    assert progress.lines() == [] and progress.lines(final=True)[0].endswith("m: done: 4/4 rows, 2/2 texts")
