"""Which queued shard a free Ray actor runs next (`RayExecutor._pick`): generation on an engine it holds first, a
model's first engine started as soon as its generation is queued, and otherwise the queue's order. No Ray is
started: the choice is a pure function of the executor's queue and pool state."""

from __future__ import annotations

from collections import deque

from actors.ray_executor import RayExecutor, _Member, _Pool
from study.core.ablation import Ablation
from study.core.heads import Head
from study.generation.decoding import Decoding
from study.prompts.formats import PromptFormat
from study.runtime.executor import WorkerOptions
from study.runtime.shards import GenShard, ModelRef, PromptBlock, Shard

MODEL = ModelRef(name="org/m")
BLOCK = PromptBlock(ids=("p0", "p1"), texts=("a", "b"), format=PromptFormat.PAPER)


def _executor(queue: list) -> RayExecutor:
    ex = RayExecutor.__new__(RayExecutor)  # the state `_pick` reads, without a cluster
    ex.queues = {MODEL: deque(queue)}
    ex._rows, ex.row_seconds, ex._kind_mean, ex.engine_seconds = {}, {}, {}, {}
    for shard in queue:
        ex._count(shard, +1)
    return ex


def _scan(layer: int) -> Shard:
    return Shard(model=MODEL, prompts=BLOCK, ablations=(Ablation(heads=(Head(layer, 0),)),))


def _gen(backend: str = "vllm") -> GenShard:
    return GenShard(model=MODEL, prompts=BLOCK, ablations=(Ablation(),), decoding=Decoding(), backend=backend)


def _pool(*members: _Member) -> _Pool:
    return _Pool(model=MODEL, options=WorkerOptions(), members=list(members))


def test_the_first_free_actor_starts_the_models_engine_before_its_scans():
    queue = [_scan(0), _scan(1), _gen()]
    ex, member = _executor(queue), _Member(handle=None, ready_ref=None)
    assert ex._pick(member, _pool(member), ex.queues[MODEL]) == 2


def test_an_actor_holding_the_engine_takes_generation_first_and_the_others_scan():
    queue = [_scan(0), _gen(), _scan(1), _gen()]
    ex = _executor(queue)
    holder, other = _Member(handle=None, ready_ref=None), _Member(handle=None, ready_ref=None)
    holder.engines.add("vllm")
    pool = _pool(holder, other)
    assert ex._pick(holder, pool, ex.queues[MODEL]) == 1
    ex.engine_seconds[MODEL] = 1e9  # a second engine is not worth it: the other actor keeps to the queue's order
    assert ex._pick(other, pool, ex.queues[MODEL]) == 0


def test_without_engine_generation_the_queue_order_holds():
    queue = [_scan(0), _gen("hf"), _scan(1)]
    ex, member = _executor(queue), _Member(handle=None, ready_ref=None)
    assert ex._pick(member, _pool(member), ex.queues[MODEL]) == 0
    ex2 = _executor([_gen(), _scan(0)])
    busy = _Member(handle=None, ready_ref=None, starting="vllm")  # another actor is starting the engine already
    ex2.engine_seconds[MODEL] = 1e9
    free = _Member(handle=None, ready_ref=None)
    assert ex2._pick(free, _pool(busy, free), ex2.queues[MODEL]) == 1  # it scans rather than start a second
