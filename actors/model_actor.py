"""`ModelActor`: a thin Ray actor around `study.runtime.worker.Worker` (one model at a time, loaded once, kept).

It takes shards and returns Arrow record batches (never tensors on a device). When a model's work is done the
executor hands the actor to the next model (`load`) instead of starting a new process: the process keeps its
imports (torch and transformers, seconds on a CPU), its CUDA context and its core binding.

Every shard comes with the options of its model, and the actor takes that model on first if it holds another:
so an actor that Ray restarts (rebuilt with its first model's arguments) holds nothing until a shard or `load`
says which model it serves now. Loading is the model's part of a shard (`Worker.prepare`): an error there is a
`ModelLoadError`, which the executor retries a bounded number of times and then reports with the model's name.

Fault injection for the tests of restart and retry: `die_on_shard` makes the first incarnation of an actor exit
on its k-th shard; `die_loading` makes every incarnation exit while loading that model (as the kernel's
out-of-memory killer would). `worker` replaces the real worker by another of the same interface (the cluster
simulation's `study.runtime.simulated.SimulatedWorker`, which never imports torch).
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
from typing import Any, Callable

import pyarrow as pa
import ray

from study.core.errors import DonorError, one_line
from study.runtime.shards import ModelRef, Shard


class ModelLoadError(RuntimeError):
    """A model could not be loaded (the cause's type and first line)."""


class HostedLoadError(ModelLoadError):
    """A hosted head recipe's donor slices could not be read: the recipe fails, its host model does not."""


@ray.remote
class ModelActor:
    def __init__(self, model: ModelRef, device: str, token_budget: int | None, threads: int,
                 die_on_shard: int | None = None, die_loading: str | None = None,
                 worker: Callable[..., Any] | None = None) -> None:
        self.threads = threads
        self.make_worker = worker
        self.worker = None
        self.held: tuple | None = None  # (model, device, token_budget) of the worker
        self.taken: list[str] = []  # the models this incarnation has held, in order
        with warnings.catch_warnings():  # Ray's own accessor warns about an API it uses internally
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if not restarted:  # a restart holds nothing: its first model may not be the one it serves now
            self.load(model, device, token_budget)
        self.die_on_shard = None if restarted else die_on_shard  # only the first incarnation dies
        self.die_loading = die_loading
        self.seen = 0

    @ray.method(max_task_retries=-1)  # waits through a restart (the model loads again) instead of failing
    def ready(self) -> int:
        """The actor's pid, once the model is loaded."""
        return os.getpid()

    @ray.method(max_task_retries=-1)
    def load(self, model: ModelRef, device: str, token_budget: int | None) -> int:
        """Hold `model` from now on (nothing to do if it already does); returns the actor's pid.

        Also what the executor sends after a restart: Ray rebuilds an actor with its first model's arguments."""
        if self.held != (model, device, token_budget):
            self.unload()
            if self.make_worker is None:
                from study.runtime.worker import Worker

                self.make_worker = Worker
            self.worker = self.make_worker(model, device=device, token_budget=token_budget, threads=self.threads)
            self.held = (model, device, token_budget)
            self.taken.append(model.label)
        return os.getpid()

    def history(self) -> list[str]:
        """The models this incarnation of the actor has held, in order (for the tests of hand-on and restart)."""
        return list(self.taken)

    def unload(self) -> None:
        """Drop the model (and any generation engine) so the memory is free for the next one."""
        if self.worker is None:
            return
        self.worker.close()
        self.worker, self.held = None, None
        gc.collect()
        torch = sys.modules.get("torch")  # never imported by a simulated worker
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, shard: Shard, device: str, token_budget: int | None) -> pa.RecordBatch:
        """One shard of `shard.model` (run with `device` and `token_budget`), taken on first if need be."""
        self.seen += 1
        if self.die_on_shard is not None and self.seen == self.die_on_shard:
            os._exit(1)  # as a crash would: no cleanup, no reply
        self.load(shard.model.host, device, token_budget)  # a head recipe runs on its host model's worker
        if self.die_loading is not None and self.die_loading == shard.model.label:
            os._exit(137)  # killed while loading, as for memory
        try:
            self.worker.prepare(shard)
        except DonorError as err:
            raise HostedLoadError(one_line(err.__cause__ or err)) from None
        except Exception as err:
            raise ModelLoadError(one_line(err)) from None
        return self.worker.run(shard)
