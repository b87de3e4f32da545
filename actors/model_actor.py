"""`ModelActor`: a thin Ray actor around `study.worker.Worker` (one model, loaded once, kept for the run).

It takes shards and returns Arrow record batches (never tensors on a device). `die_on_shard` makes the
first incarnation of an actor exit on its k-th shard: fault injection for the tests of restart and retry.
"""

from __future__ import annotations

import os
import warnings

import pyarrow as pa
import ray

from study.shards import ModelRef, Shard


@ray.remote
class ModelActor:
    def __init__(self, model: ModelRef, device: str, token_budget: int | None, threads: int,
                 die_on_shard: int | None = None) -> None:
        from study.worker import Worker

        self.worker = Worker(model, device=device, token_budget=token_budget, threads=threads)
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

    def run(self, shard: Shard) -> pa.RecordBatch:
        self.seen += 1
        if self.die_on_shard is not None and self.seen == self.die_on_shard:
            os._exit(1)  # as a crash would: no cleanup, no reply
        return self.worker.run(shard)
