"""How many actors a cluster holds and what each asks for, from its nodes' resources (no Ray started)."""

from __future__ import annotations

import pytest

from actors.cluster import Slots, slots_of
from study.core.errors import UsageError
from study.runtime.executor import ExecutionConfig


def test_gpu_actors_get_the_cpus_of_their_node_per_slot():
    nodes = [{"CPU": 64, "GPU": 8}, {"CPU": 32, "GPU": 8}, {"CPU": 16}]  # a CPU-only node holds no GPU actor
    assert slots_of(nodes, ExecutionConfig()) == Slots(16, 4, 1)  # 32 CPUs / 8 slots on the smaller GPU node
    assert slots_of(nodes, ExecutionConfig(gpus_per_actor=4)) == Slots(4, 16, 4)  # 32 CPUs / 2 slots
    assert slots_of(nodes, ExecutionConfig(cpus_per_actor=2)) == Slots(16, 2, 1)
    assert slots_of([{"CPU": 2, "GPU": 4}], ExecutionConfig()) == Slots(4, 1, 1)  # never below one thread


def test_cpu_clusters_and_impossible_requests():
    assert slots_of([{"CPU": 2}, {"CPU": 5}], ExecutionConfig(cpus_per_actor=2)) == Slots(3, 2, 0)
    with pytest.raises(UsageError, match="--gpus-per-actor 16 is more than any node has"):
        slots_of([{"CPU": 64, "GPU": 8}], ExecutionConfig(gpus_per_actor=16))
    with pytest.raises(UsageError, match="--cpus-per-actor 8 is more than any node has"):
        slots_of([{"CPU": 4}], ExecutionConfig(cpus_per_actor=8))
