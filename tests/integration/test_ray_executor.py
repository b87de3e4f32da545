"""The Ray executor on a real local cluster (2 CPUs, 2 one-thread actors): the same tables as the local
executor, actors killed from the driver or dying by themselves mid-scan, and bad cluster options."""

from __future__ import annotations

import pytest
import ray

from actors.cluster import shutdown, start_local
from actors.ray_executor import RayExecutor
from study.core.errors import RunFailed
from study.core.frozen import build
from study.experiments.ships import ShipsJob
from study.runner import plan_study, run_study
from study.runtime.executor import ExecutionConfig, LocalExecutor
from study.runtime.store import read_table
from study.spec import StudyConfig
from tests.integration.test_runner import assert_same_tables, spec
from tests.model_folders import broken_copy, tiny_llama_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    start_local(num_cpus=2, logging_level="ERROR")  # as a run starts it: token authentication, 127.0.0.1 only
    yield
    shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "m"))


def test_ray_equals_local_and_survives_an_actor_dying_on_its_kth_shard(cluster, tiny, tmp_path):
    run_study(spec(tiny, tmp_path / "local", heads=2))
    ex = RayExecutor(ExecutionConfig(actors=2), actor_options=dict(die_on_shard=3))
    with ex:
        result = run_study(spec(tiny, tmp_path / "ray", heads=2, executor="ray"), executor=ex)
        stats = ex.stats[tiny]
        assert stats.actors == 2
        assert stats.retries >= 2  # each actor's first incarnation died once, with shards in flight
        assert stats.shards == result.computed == 24  # none lost, none counted twice
    assert_same_tables(tmp_path / "local", tmp_path / "ray", rtol=1e-10)
    ships = read_table(tmp_path / "ray", "ships").to_pandas()
    assert len(ships) == 4 * 12 and not ships.duplicated(["prompt_id", "head_label"]).any()


def test_actor_killed_from_the_driver_mid_scan(cluster, tiny, tmp_path):
    job = plan_study(spec(tiny, tmp_path / "x", heads=1, prompts=1)).jobs[0]
    assert isinstance(job, ShipsJob)
    shards = job.pending()
    options = {job.model: job.options}
    expected = {shard.id: batch for shard, batch in LocalExecutor().run(shards, options)}
    got = {}
    with RayExecutor(ExecutionConfig(actors=2)) as ex:
        for i, (shard, batch) in enumerate(ex.run(shards, options)):
            if i == 3:
                victim = ex.pools[job.model].members[0].handle
                ray.kill(victim, no_restart=False)  # Ray restarts it; its shards in flight are run again
            assert shard.id not in got
            got[shard.id] = batch
        assert ex.stats[tiny].retries >= 1
    assert set(got) == {s.id for s in shards}
    for shard in shards:
        a = expected[shard.id].to_pydict()
        b = got[shard.id].to_pydict()
        assert a["ablation"] == b["ablation"] and a["prompt_id"] == b["prompt_id"]
        assert max(abs(x - y) for x, y in zip(a["kl"], b["kl"])) <= 1e-12 * max(1.0, max(a["kl"]))


def test_a_handed_on_actor_restarted_by_ray_loads_its_new_model(cluster, tiny, tmp_path):
    """One slot, two models: the second takes over the first's actor process; killed mid-scan, Ray rebuilds it
    with the FIRST model's arguments, and the executor tells it which model it serves now."""
    other = str(tiny_llama_folder(tmp_path / "other", seed=5))
    jobs = [plan_study(spec(m, tmp_path / f"x{i}", heads=1, prompts=1)).jobs[0] for i, m in enumerate((tiny, other))]
    shards = [s for job in jobs for s in job.pending()]
    options = {job.model: job.options for job in jobs}
    expected = {shard.id: batch for shard, batch in LocalExecutor().run(shards, options)}
    got = {}
    with RayExecutor(ExecutionConfig(cpus_per_actor=2)) as ex:
        assert ex.slots.count == 1
        killed = False
        for shard, batch in ex.run(shards, options):
            got[shard.id] = batch
            if shard.model == jobs[1].model and not killed:
                assert ex.pids[other] == ex.pids[tiny]  # the same process, handed on
                ray.kill(ex.pools[jobs[1].model].members[0].handle, no_restart=False)
                killed = True
        assert killed and ex.stats[other].retries >= 1
        assert len(ex.pids[other]) == 2  # the handed-on process, then its restart
        restarted = ex.pools[jobs[1].model].members[0].handle
        assert ray.get(restarted.history.remote()) == [other]  # took on the model it serves now, not its first
    assert set(got) == {s.id for s in shards}
    for shard in shards:
        a, b = expected[shard.id].to_pydict(), got[shard.id].to_pydict()
        assert a["ablation"] == b["ablation"] and a["prompt_id"] == b["prompt_id"]
        assert max(abs(x - y) for x, y in zip(a["kl"], b["kl"])) <= 1e-12 * max(1.0, max(a["kl"]))


@pytest.mark.parametrize("how", ["corrupt file", "actor killed while loading"])
def test_a_model_that_fails_to_load_is_retried_then_named_while_the_others_land(cluster, tiny, how, tmp_path):
    """Two models, one slot each: one cannot be loaded. It is tried `max_retries` + 1 times, then the run ends
    with one line naming it and the cause, and the other model's tables are written."""
    if how == "corrupt file":
        bad, options = broken_copy(tiny, tmp_path / "bad"), {}
    else:
        bad = str(tiny_llama_folder(tmp_path / "bad", seed=3))
        options = dict(die_loading=bad)
    out = tmp_path / "run"
    study = build(StudyConfig, dict(out=str(out), models=[tiny, bad], ships={},
                                    defaults=dict(dtype="float64", limit=2, shard_heads=6)))
    with RayExecutor(ExecutionConfig(actors=1, max_retries=2), actor_options=options) as ex:
        with pytest.raises(RunFailed) as failed:
            run_study(study, executor=ex)
        assert ex.load_failures[next(m for m in ex.load_failures if m.label == bad)] == 3  # 1 try + 2 retries
        assert ex.stats[tiny].shards > 0 and ex.stats[bad].shards == 0
    line = str(failed.value)
    assert len(line.splitlines()) == 1 and f"model {bad} could not be loaded" in line and tiny not in line
    assert ("SafetensorError" in line or "Error" in line) if how == "corrupt file" else "died while loading" in line
    ships = read_table(out, "ships").to_pandas()
    assert set(ships["model"]) == {tiny} and len(ships) == 2 * 12


@pytest.mark.parametrize("argv,needle", [
    (["--actors", "0"], "actors"),
    (["--cpus-per-actor", "64"], "cpus-per-actor"),
    (["--gpus-per-actor", "2"], "gpus-per-actor"),
    (["--address", "127.0.0.1:9"], "127.0.0.1:9"),
    (["--executor", "local", "--address", "127.0.0.1:9"], "address"),
])
def test_bad_cluster_options_one_line_exit_2_nothing_written(argv, needle, tmp_path, capsys):
    from study.cli import main

    out = tmp_path / "out"
    was_running = ray.is_initialized()
    assert main(["ships", "--limit", "1", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
    assert ray.is_initialized() == was_running  # the command neither started Ray nor left it half-started
