"""What a study runs in where nobody said: `dtype: auto` is bfloat16 where the workers hold a GPU and float32 on
CPUs, decided at plan time (it is part of every shard's identity) and recorded in each job's config."""

from __future__ import annotations

import pytest

from study.core.errors import UsageError
from study.core.frozen import build
from study.runner import plan_study
from study.runtime import executor as executor_module
from study.runtime.executor import ExecutionConfig, resolve_dtype, visible_gpus
from study.spec import StudyConfig


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine shows `n` GPUs to `visible_gpus` (read from the driver, without torch)."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(executor_module, "visible_gpus", lambda: n)
    return set_count


def test_auto_is_bfloat16_exactly_where_the_workers_hold_a_gpu(gpus):
    local, ray = ExecutionConfig(executor="local"), ExecutionConfig()
    gpus(0)
    assert resolve_dtype("auto", "auto", local) == resolve_dtype("auto", "auto", ray) == "float32"
    assert resolve_dtype("auto", "cuda", local) == resolve_dtype("auto", "cuda:1", ray) == "bfloat16"
    assert resolve_dtype("auto", "auto", ExecutionConfig(gpus_per_actor=2)) == "bfloat16"
    gpus(8)
    assert resolve_dtype("auto", "auto", local) == resolve_dtype("auto", "auto", ray) == "bfloat16"
    assert resolve_dtype("auto", "cpu", ray) == "float32"
    for given in ("float32", "float16", "float64", "bfloat16"):  # a dtype the user named is kept, GPU or not
        assert resolve_dtype(given, "auto", ray) == given


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch):
    found = visible_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert visible_gpus() == min(found, 1)


def test_the_plan_resolves_auto_into_every_job_and_its_shards(gpus, tmp_path):
    spec = dict(out=str(tmp_path / "o"), defaults=dict(limit=2), ships={}, sahara=dict(steps=1))
    gpus(0)
    cpu = plan_study(build(StudyConfig, spec))
    assert {j.cfg.dtype for j in cpu.jobs} == {j.model.dtype for j in cpu.jobs} == {"float32"}
    gpus(1)
    gpu = plan_study(build(StudyConfig, spec))
    assert {j.cfg.dtype for j in gpu.jobs} == {j.model.dtype for j in gpu.jobs} == {"bfloat16"}
    # a result computed in one dtype is never read back as the other's
    assert not {s.id for j in cpu.jobs for s in j.pending()} & {s.id for j in gpu.jobs for s in j.pending()}
    named = plan_study(build(StudyConfig, {**spec, "defaults": dict(limit=2, dtype="float32")}))
    assert {s.id for j in named.jobs for s in j.pending()} == {s.id for j in cpu.jobs for s in j.pending()}


def test_a_bad_dtype_names_auto_among_the_valid_ones(tmp_path):
    with pytest.raises(UsageError, match="valid dtypes are auto, float32"):
        build(StudyConfig, dict(out=str(tmp_path), defaults=dict(dtype="fp8"), ships={}))


def test_vllm_engines_on_a_gpu_use_cuda_graphs_every_gpu_and_the_memory_left(monkeypatch):
    """The arguments an actor's engine gets (on a GPU machine: tests/gpu/test_vllm_cuda.py starts one)."""
    import torch

    from actors.vllm_engine import engine_kwargs

    common = dict(dtype="bfloat16", seed=0, block_size=None, enforce_eager=None, tensor_parallel_size=None,
                  gpu_memory_utilization=None)
    cpu = engine_kwargs("cpu", **common)
    assert cpu["enforce_eager"] is True and "tensor_parallel_size" not in cpu and "gpu_memory_utilization" not in cpu
    # an actor holding 4 GPUs of 80 GiB with 60, 70, 80, 80 GiB free (what torch.cuda reports there)
    free = {0: 60, 1: 70, 2: 80, 3: 80}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i] * 2**30, 80 * 2**30))
    gpu = engine_kwargs("cuda", **common)
    assert gpu["enforce_eager"] is False  # CUDA graphs: the head edits keep every weight's storage
    assert gpu["tensor_parallel_size"] == 4 and gpu["distributed_executor_backend"] == "mp"  # within the actor
    assert gpu["gpu_memory_utilization"] == pytest.approx(0.9 * 60 / 80)  # the tightest GPU decides
    assert "kv_cache_memory_bytes" not in gpu  # no fixed KV cache: vLLM sizes it from that share
    fixed = engine_kwargs("cuda", **{**common, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
                                     "enforce_eager": True})
    assert (fixed["tensor_parallel_size"], fixed["gpu_memory_utilization"], fixed["enforce_eager"]) == (2, 0.5, True)
