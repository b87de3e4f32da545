"""A cluster simulation you can run on a laptop: how busy a study keeps G GPUs.

SIMULATION. The real runner, the real Ray executor and Ray's own scheduler run on a local Ray cluster that
declares G logical GPUs; each actor's worker is `study.runtime.simulated.SimulatedWorker`, which sleeps for the
time a shard would take on an H100 (from the cost model in that module: FLOPs of the rows the engine runs at a
stated share of peak, memory-bound decoding, weight loading at a stated rate) divided by `--scale`, and returns
random rows of the right shape. The jobs, shards, executor, store and tables are the ones a real run uses; only
the model is replaced. Nothing here is a measurement of a GPU.

Study, per fine-tune (each with one shared base model): Ships on `--prompts` advbench prompts, a 3-step Sahara
on 16 of them, ASR (vLLM generation, 3 random-head controls, the outcome judge) and the base-weight swaps (HF generation).
Models are Llama-2-7B-shaped (`--size 7b`) or Llama-2-70B-shaped (`--size 70b`, 4 GPUs per actor) configs;
no weights exist.

The final line: `utilization U makespan S lower_bound L driver_rss_mb R`, in simulated seconds, where the work
is every shard's compute plus one load of each model that loads on its own and one read of each hosted head
recipe's donor slices (the least any schedule pays: a reload, an engine start, a second actor's copy of a model are
overhead), U = work / (GPU slots x makespan), and L = the larger of the work
over the slots and
the longest chain of dependent steps of one model (its load, each Sahara step's longest shard, then the longest
of ASR's and each swap recipe's load, engine start and longest shard). Targets (benchmark, not a test): U >= 0.9
for 20 models on 64 GPUs and for 3 models on 64 GPUs; the driver's peak memory under 4 GiB.

    python bench/bench_cluster.py --gpus 64 --models 20
    python bench/bench_cluster.py --gpus 64 --models 3 --size 70b --json bench.jsonl

`--trace FILE` writes every shard's model, kind, cost and end time; `--pools FILE` each model's pool (actors,
loading, busy, holding an engine, queued shards, remaining work) every 5 wall seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from study.core.frozen import build  # noqa: E402
from study.runtime.executor import ExecutionConfig, Executor, WorkerOptions  # noqa: E402
from study.runtime.shards import AnyShard, GenShard, ModelRef  # noqa: E402
from study.runtime.simulated import Accelerator, SimulatedWorker, donor_seconds, load_seconds, shard_seconds  # noqa: E402

CONFIGS = {
    "7b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
               max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="bfloat16"),
    "70b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192, intermediate_size=28672,
                num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="bfloat16"),
}
GPUS_PER_ACTOR = {"7b": 1, "70b": 4}
TARGET_U = 0.9
TARGET_RSS_MB = 4096


class Recording(Executor):
    """The executor under test, with every shard it returns and when, for the figures."""

    def __init__(self, inner: Executor, pools_every: float | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.stats, self.failed = inner.stats, inner.failed
        self.done: list[tuple[AnyShard, float]] = []
        self.pools_every = pools_every  # wall seconds between two samples of the pools (`--pools`), or None
        self.pools: list[tuple[float, dict]] = []
        self._sampled = 0.0

    def _submit(self, shards: Sequence[AnyShard], options: dict[ModelRef, WorkerOptions], urgent: bool) -> None:
        self.inner.submit(shards, options, urgent=urgent)

    def expect(self, rows: dict[tuple[ModelRef, str], int]) -> None:
        self.inner.expect(rows)

    def poll(self) -> list[tuple[AnyShard, pa.RecordBatch]]:
        out = self.inner.poll()
        now = time.perf_counter()
        self.done += [(shard, now) for shard, _ in out]
        if self.pools_every is not None and now - self._sampled >= self.pools_every:
            self._sampled = now
            self.pools.append((now, pool_sample(self.inner)))
        return out

    @property
    def pending(self) -> int:
        return self.inner.pending

    def close(self) -> None:
        self.inner.close()


def pool_sample(ex: Any) -> dict:
    """Each model's pool as the Ray executor `ex` holds it now: its actors (loading, busy, holding an engine), its
    queued shards and its remaining work in seconds on one actor."""
    out = {}
    for model in set(ex.pools) | {m for m, q in ex.queues.items() if q}:
        pool = ex.pools.get(model)
        members = pool.members if pool else []
        out[model.label.rsplit("/", 1)[-1]] = dict(
            actors=len(members), loading=sum(mb.ready_ref is not None for mb in members),
            busy=sum(bool(mb.busy) for mb in members), engines=sum(bool(mb.engines) for mb in members),
            queued=len(ex.queues.get(model, ())), remaining_s=round(ex.remaining(model), 1))
    return out


def model_folders(root: Path, size: str, n: int) -> tuple[str, list[str]]:
    """A base and `n` fine-tunes of one shape: config.json only (the simulated worker reads nothing else)."""
    names = []
    for name in ["base", *(f"tune-{i:02d}" for i in range(n))]:
        folder = root / f"sim-{size}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(CONFIGS[size]))
        names.append(str(folder))
    return names[0], names[1:]


def study_spec(out: Path, base: str, tunes: list[str], prompts: int, data_dir: str) -> dict:
    return dict(
        out=str(out),
        models=[{"name": base, "role": "base", "experiments": []}, *({"name": t, "base": base} for t in tunes)],
        defaults=dict(prompts="advbench", data_dir=data_dir, limit=prompts, format="chat", dtype="bfloat16"),
        ships={}, sahara=dict(steps=3, limit=16),
        asr=dict(random_controls=3, judges=["outcome"], backend="vllm"),
        swap=dict(k=3),  # a mixed model lives in memory: HF generation
    )


def chain_seconds(done: Sequence[AnyShard], acc: Accelerator, gpus: int) -> float:
    """The longest chain of dependent steps of one model (see the module docstring), in simulated seconds."""
    longest = 0.0
    models = {s.model.name for s in done}
    for name in models:
        mine = [s for s in done if s.model.name == name]
        plain = [s for s in mine if s.model.swap is None]
        sahara: dict[int, float] = {}
        for s in plain:
            if not isinstance(s, GenShard) and s.measure == "angle":
                k = len(s.base.heads)
                sahara[k] = max(sahara.get(k, 0.0), shard_seconds(s, acc, gpus))
        head = load_seconds(plain[0].model, acc) if plain else 0.0
        after = 0.0
        for ref in {s.model for s in mine if isinstance(s, GenShard) or s.model.swap is not None}:
            part = [s for s in mine if s.model == ref]
            # a whole-module recipe is a model loaded on its own; a head recipe an edit of its loaded host
            start = load_seconds(ref, acc) if ref.host == ref and ref.swap is not None else (
                donor_seconds(ref, acc) if ref.host != ref else 0.0)
            engine = any(isinstance(s, GenShard) and s.backend == "vllm" for s in part)
            after = max(after, start + (acc.engine_start_s if engine else 0.0)
                        + max(shard_seconds(s, acc, gpus) for s in part))
        longest = max(longest, head + sum(sahara.values()) + after)
    return longest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=64, help="logical GPUs the local Ray cluster declares")
    ap.add_argument("--models", type=int, default=20, help="fine-tunes (each with the shared base for its swaps)")
    ap.add_argument("--size", choices=sorted(CONFIGS), default="7b")
    ap.add_argument("--prompts", type=int, default=100, help="Ships, ASR and swap prompts per model")
    ap.add_argument("--scale", type=float, default=None,
                    help="simulated seconds per wall second (default: the total work in about 3 wall minutes)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--json", default=None, help="append the figures as one JSON line")
    ap.add_argument("--trace", default=None, help="write every shard's model, kind, cost and end time (JSON lines)")
    ap.add_argument("--pools", default=None, help="write each model's pool every 5 wall seconds (JSON lines)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import ray

    from actors.cluster import start_local
    from actors.ray_executor import RayExecutor
    from study.runner import plan_study, run_study
    from study.spec import StudyConfig

    acc = Accelerator()
    gpa = GPUS_PER_ACTOR[args.size]
    slots = args.gpus // gpa
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    base, tunes = model_folders(work / "models", args.size, args.models)
    study = build(StudyConfig, study_spec(work / "run", base, tunes, args.prompts, args.data_dir))
    # the scale: first-round work (Ships, Sahara's first step) priced before anything runs, x3 for the rest
    plan = plan_study(study)
    first = sum(shard_seconds(s, acc, gpa) for j in plan.jobs for s in j.pending())
    scale = args.scale or max(1.0, 3 * first / slots / 180)
    print(f"SIMULATION (no model runs): {args.models} {args.size} fine-tunes + base on {args.gpus} logical GPUs "
          f"({slots} actor slots of {gpa} GPU), cost model {acc.name} bf16, time scale {scale:g}x", flush=True)

    start_local(num_cpus=slots + 2, num_gpus=args.gpus, logging_level=logging.WARNING,
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    cfg = ExecutionConfig(executor="ray", gpus_per_actor=gpa)
    worker = functools.partial(SimulatedWorker, accelerator=acc, scale=scale, gpus=gpa)
    ex = Recording(RayExecutor(cfg, actor_options={"worker": worker}), pools_every=5.0 if args.pools else None)
    t0 = time.perf_counter()
    try:
        result = run_study(study, executor=ex)
    finally:
        ex.close()
        ray.shutdown()
    wall = time.perf_counter() - t0
    done = [s for s, _ in ex.done]
    # the work: every shard's compute, one load of each model loaded on its own (the least any schedule pays) and
    # one read of each hosted head recipe's donor slices
    models = {s.model for s in done}
    busy = (sum(shard_seconds(s, acc, gpa) for s in done) + sum(load_seconds(m, acc) for m in models if m.host == m)
            + sum(donor_seconds(m, acc) for m in models if m.host != m))
    makespan = wall * scale
    lower = max(busy / slots, chain_seconds(done, acc, gpa))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss_mb = usage.ru_maxrss / 1024
    driver_cpu_s = usage.ru_utime + usage.ru_stime  # wall seconds of this machine's CPU, not simulated ones
    u = busy / (slots * makespan)
    loads = sum(st.loads for st in ex.stats.values())
    figures = dict(date=time.strftime("%Y-%m-%d"), simulation=True, gpus=args.gpus, models=args.models,
                   size=args.size, slots=slots, scale=scale, shards=len(done), computed=result.computed,
                   utilization=round(u, 4), makespan_s=round(makespan, 1), lower_bound_s=round(lower, 1),
                   driver_rss_mb=round(rss_mb), wall_s=round(wall, 1), driver_cpu_s=round(driver_cpu_s, 1),
                   loads=loads,
                   first_result_s=round((min(t for _, t in ex.done) - t0) * scale if ex.done else 0.0, 1),
                   cpus=os.cpu_count())
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(figures) + "\n")
    if args.trace:
        with open(args.trace, "w") as f:
            for shard, end in ex.done:
                f.write(json.dumps(dict(model=shard.model.label, measure=shard.measure, rows=shard.rows,
                                        cost_s=shard_seconds(shard, acc, gpa), end_s=(end - t0) * scale)) + "\n")
    if args.pools:
        with open(args.pools, "w") as f:
            for at, sample in ex.pools:
                f.write(json.dumps(dict(t_s=round((at - t0) * scale, 1), pools=sample)) + "\n")
    first = (min(t for _, t in ex.done) - t0) * scale if ex.done else 0.0
    print(f"shards {len(done)}; work {busy:.0f} GPU-slot s; wall {wall:.0f} s; {loads} model loads for "
          f"{len({s.model for s in done})} models; first result at {first:.0f} s (actor processes starting on "
          f"this machine's {os.cpu_count()} cores, then the cost model's load); the driver used "
          f"{driver_cpu_s:.0f} CPU s of this machine")
    verdict = "PASS" if u >= TARGET_U and rss_mb < TARGET_RSS_MB else "MISS"
    print(f"{verdict} (targets: utilization >= {TARGET_U}, driver under {TARGET_RSS_MB} MB)")
    print(f"utilization {u:.3f} makespan {makespan:.0f} lower_bound {lower:.0f} driver_rss_mb {rss_mb:.0f}")


if __name__ == "__main__":
    main()
