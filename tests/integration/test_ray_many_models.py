"""Several models in one run on a cluster with logical GPUs (torch sees no CUDA, so actors holding a GPU
compute on the CPU): three models, two GPU slots; the third model waits for a slot and the run completes
with the same tables as the local executor."""

from __future__ import annotations

import pytest

from actors.cluster import shutdown, start_local
from actors.ray_executor import RayExecutor
from study.core.frozen import build
from study.runner import run_study
from study.runtime.executor import ExecutionConfig
from study.spec import StudyConfig
from tests.integration.test_runner import assert_same_tables, spec
from tests.model_folders import tiny_llama_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpu_cluster():
    start_local(num_cpus=2, num_gpus=2, logging_level="ERROR")
    yield
    shutdown()


def test_three_models_two_gpu_slots(gpu_cluster, tmp_path):
    models = [str(tiny_llama_folder(tmp_path / f"m{i}", seed=i)) for i in range(3)]
    run_study(spec("", tmp_path / "local", heads=4, models=models))
    ex = RayExecutor(ExecutionConfig())
    assert ex.slots.count == 2 and ex.slots.num_gpus == 1  # one actor per (logical) GPU
    with ex:
        result = run_study(spec("", tmp_path / "ray", heads=4, models=models, executor="ray"), executor=ex)
        assert set(ex.stats) == set(models)
        assert all(ex.stats[m].shards > 0 and ex.stats[m].actors == 1 for m in models)
        # a waiting model takes over the process of a model that is done (in every round): two processes in all
        assert set(ex.pids) == set(models) and len(set().union(*ex.pids.values())) == 2
    assert result.computed == sum(s.shards for s in result.stats.values())
    assert_same_tables(tmp_path / "local", tmp_path / "ray", rtol=1e-10)
    groups = {j.cfg.model: j.group for j in result.jobs if j.experiment == "sahara"}
    assert len(groups) == 3 and all(len(g) == 2 for g in groups.values())


def test_a_chain_of_waiting_models_each_gets_the_slot_it_inherits(gpu_cluster, tmp_path):
    """Five models on two slots: three wait, and a model that waited hands its slot on when it is done
    (it had no slot of its own in the round's plan, so the next one must take the slot it actually held)."""
    models = [str(tiny_llama_folder(tmp_path / f"m{i}", seed=i, layers=2)) for i in range(5)]
    with RayExecutor(ExecutionConfig()) as ex:
        result = run_study(build(StudyConfig, dict(out=str(tmp_path / "ray"), models=models, ships={},
                                                   defaults=dict(dtype="float64", limit=2, shard_heads=8),
                                                   execution=dict(executor="ray"))), executor=ex)
        assert all(ex.stats[m].shards > 0 and ex.stats[m].actors == 1 for m in models)
        assert len(set().union(*ex.pids.values())) == 2  # five models, two processes: each handed on
    assert result.computed == sum(s.shards for s in result.stats.values())
