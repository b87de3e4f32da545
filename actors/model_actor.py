"""`ModelActor`: a thin Ray actor around `study.runtime.worker.Worker` (one model at a time, loaded once, kept).

It takes shards and returns Arrow record batches (never tensors on a device). When a model's work is done the
executor hands the actor to the next model (`load`) instead of starting a new process: the process keeps its
imports (torch and transformers, seconds on a CPU), its CUDA context and its core binding. `die_on_shard`
makes the first incarnation of an actor exit on its k-th shard: fault injection for the tests of restart and
retry.
"""

from __future__ import annotations

import gc
import os
import warnings

import pyarrow as pa
import ray

from study.runtime.shards import ModelRef, Shard


@ray.remote
class ModelActor:
    def __init__(self, model: ModelRef, device: str, token_budget: int | None, threads: int,
                 die_on_shard: int | None = None) -> None:
        self.threads = threads
        self.worker = None
        self.held: tuple | None = None  # (model, device, token_budget) of the worker
        self.load(model, device, token_budget)
        if die_on_shard is not None:
            with warnings.catch_warnings():  # Ray's own accessor warns about an API it uses internally
                warnings.simplefilter("ignore", DeprecationWarning)
                if ray.get_runtime_context().was_current_actor_reconstructed:
                    die_on_shard = None  # only the first incarnation dies
        self.die_on_shard = die_on_shard
        self.seen = 0

    @ray.method(max_task_retries=-1)  # waits through a restart (the model loads again) instead of failing
    def ready(self) -> int:
        """The actor's pid, once the model is loaded."""
        return os.getpid()

    @ray.method(max_task_retries=-1)
    def load(self, model: ModelRef, device: str, token_budget: int | None) -> int:
        """Hold `model` from now on (nothing to do if it already does); returns the actor's pid.

        Also what the executor sends after a restart: Ray rebuilds an actor with its first model's arguments."""
        from study.runtime.worker import Worker

        if self.held != (model, device, token_budget):
            self.unload()
            self.worker = Worker(model, device=device, token_budget=token_budget, threads=self.threads)
            self.held = (model, device, token_budget)
        return os.getpid()

    def unload(self) -> None:
        """Drop the model (and any generation engine) so the memory is free for the next one."""
        if self.worker is None:
            return
        self.worker.close()
        self.worker, self.held = None, None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, shard: Shard) -> pa.RecordBatch:
        self.seen += 1
        if self.die_on_shard is not None and self.seen == self.die_on_shard:
            os._exit(1)  # as a crash would: no cleanup, no reply
        if self.worker is None:
            raise RuntimeError(f"actor {os.getpid()} holds no model: load one before sending shards")
        return self.worker.run(shard)
