"""Slots follow the work, on a real Ray cluster with logical GPUs and the cost-model worker (no torch): a model
with more work gets more actors and inherits the actors of a model that is done; a node that joins during a
run is used; a generation engine is started on a second actor only where the generation left outweighs it."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import ray
from ray.cluster_utils import Cluster

from actors.cluster import _local_only
from actors.ray_executor import RayExecutor
from study.core.ablation import Ablation
from study.core.heads import Head
from study.generation.decoding import Decoding
from study.prompts.formats import PromptFormat
from study.runtime.executor import ExecutionConfig
from study.runtime.shards import GenShard, ModelRef, PromptBlock, Shard
from study.runtime.simulated import SimulatedWorker

pytestmark = pytest.mark.slow  # starts Ray

CONFIG = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=32000, model_type="llama")
BLOCK = PromptBlock(ids=tuple(f"p{i}" for i in range(8)), texts=("x" * 80,) * 8, format=PromptFormat.CHAT)
SCALE = 4.0  # a 7B load (22 simulated s) takes 5.5 s here; a scan shard about 0.3 s


@pytest.fixture(scope="module")
def cluster():
    with _local_only():  # every port on 127.0.0.1, as a local run's cluster
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "num_gpus": 1})
        ray.init(address=c.address, logging_level=logging.WARNING)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    out = []
    for name in ("a", "b"):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(CONFIG))
        out.append(ModelRef(name=str(root / name), dtype="bfloat16"))
    return out


def scans(model: ModelRef, n: int) -> list[Shard]:
    """`n` distinct scan shards of 32 single-head ablations x 8 prompts."""
    return [Shard(model=model, prompts=BLOCK,
                  ablations=tuple(Ablation(heads=(Head(i % 32, (h + i // 32) % 32),)) for h in range(32)))
            for i in range(n)]


def executor(**cfg) -> RayExecutor:
    ex = RayExecutor(ExecutionConfig(**cfg), actor_options={"worker": functools.partial(SimulatedWorker, scale=SCALE)})
    ex.refresh_s = 1.0
    return ex


def drain(ex: RayExecutor, on_result=lambda n: None) -> int:
    n = 0
    while ex.pending:
        n += len(ex.poll())
        on_result(n)
    return n


def test_a_node_that_joins_is_used_and_work_decides_pool_sizes(cluster, models):
    a, b = models
    ex = executor()
    assert ex.slots.count == 1
    joined = []

    def grow(n: int) -> None:
        if n >= 2 and not joined:  # mid-run: a node with three more GPUs joins
            with _local_only():
                joined.append(cluster.add_node(num_cpus=8, num_gpus=3))

    ex.submit(scans(a, 60) + scans(b, 3), {})
    assert drain(ex, grow) == 63
    assert ex.slots.count == 4
    # the heavy model grew onto the new node; the light one kept one actor, which went to the heavy one after
    assert ex.stats[a.label].actors >= 3 and ex.stats[b.label].actors == 1
    assert ex.stats[a.label].loads >= 3
    ex.close()


def test_an_engine_starts_on_a_second_actor_only_for_enough_generation(cluster, models):
    a, _ = models
    small = [GenShard(model=a, prompts=PromptBlock(ids=(f"q{i}",), texts=("hi",), format=PromptFormat.CHAT),
                      ablations=(Ablation(),), decoding=Decoding(max_new_tokens=4), backend="vllm") for i in range(6)]
    ex = executor(actors=2)
    ex.submit(scans(a, 6) + small, {})
    drain(ex)
    members = ex.pools[a].members
    assert len(members) == 2 and ex.stats[a.label].shards == 12
    assert sum("vllm" in m.engines for m in members) == 1  # six tiny generations never pay a second engine
    ex.close()
