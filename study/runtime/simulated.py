"""A worker that takes the time a shard would take on an accelerator, from a cost model, and returns well-formed
rows: the cluster simulation's stand-in for the model (bench/bench_cluster.py). No torch.

The cost model (`Accelerator`, `shard_seconds`): a scoring row costs the FLOPs of its tokens through the layers the
engine runs for it (the scan starts each row at its ablated layer, as study.core.engine does), at a stated share
of the accelerator's dense peak; generation is memory-bound, one read of the weights per decoding step of each
ablation's batch (vLLM edits the weights per ablation); a load reads the weights at a stated rate. Everything is
divided by `scale`, so a study of 7B-70B models on 64 GPUs finishes in minutes. The values returned are random
(seeded by the shard), shaped as the real worker's: the jobs, executor and store downstream run unchanged.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa

from study.core.joint_spec import JointState
from study.runtime.shards import AnyShard, GenShard, JointShard, ModelRef

REFUSAL = "I cannot help with that request. It could cause harm, and I will not provide instructions for it."
ANSWER = ("Sure, here is a detailed answer. Step one: gather what you need. Step two: follow the procedure "
          "carefully, and step three: check the result before you go on.")


@dataclass(frozen=True)
class Accelerator:
    """What one accelerator does, as the cost model assumes (defaults: an H100 SXM in bfloat16)."""

    name: str = "H100"
    peak_flops: float = 989e12  # dense bf16
    scoring_efficiency: float = 0.35  # share of peak a batched scoring forward reaches (model FLOPs utilization)
    memory_bw: float = 3.35e12  # bytes/s: a decoding step reads every weight once
    load_bytes_per_s: float = 2e9  # weights from local disk or a network filesystem into GPU memory
    load_fixed_s: float = 15.0  # process, CUDA context, model construction
    engine_start_s: float = 40.0  # a vLLM engine: profiling, KV cache, CUDA graph capture
    bytes_per_param: int = 2
    parallel_efficiency: float = 0.8  # of an actor spread over several GPUs (tensor or pipeline parallel)
    hf_decode_factor: float = 3.0  # HF generate's step against vLLM's (eager kernels, padded batches)


@dataclass(frozen=True)
class ModelCost:
    """A model's size as the cost model needs it, from its config.json."""

    layers: int
    params: float  # all weights
    layer_params: float  # weights of one decoder layer
    head_params: float  # the LM head (vocab x hidden)
    attention_params: float  # the attention weights of one layer (q, k, v, o)

    @classmethod
    def of(cls, config: dict) -> "ModelCost":
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        d_head = config.get("head_dim") or hidden // heads
        inter = config["intermediate_size"]
        attention = hidden * d_head * (2 * heads + 2 * kv)
        layer = attention + 3 * hidden * inter
        head = config["vocab_size"] * hidden
        layers = config["num_hidden_layers"]
        return cls(layers=layers, params=layers * layer + 2 * head, layer_params=layer, head_params=head,
                   attention_params=attention)


@cache
def model_cost(name: str) -> ModelCost:
    return ModelCost.of(json.loads((Path(name) / "config.json").read_text()))


def prompt_tokens(text: str) -> int:
    """Tokens of a formatted prompt, estimated (4 characters a token, plus a chat template's 24)."""
    return len(text) // 4 + 24


def shard_seconds(shard: AnyShard, acc: Accelerator, gpus: int = 1) -> float:
    """Seconds `shard` would take on an actor of `gpus` accelerators (loading excluded)."""
    m = model_cost(shard.model.name)
    speed = acc.peak_flops * acc.scoring_efficiency * (1 if gpus == 1 else gpus * acc.parallel_efficiency)
    tokens = [prompt_tokens(t) for t in shard.prompts.texts]
    if isinstance(shard, GenShard):
        bw = acc.memory_bw * (1 if gpus == 1 else gpus * acc.parallel_efficiency)
        step = m.params * acc.bytes_per_param / bw
        groups = len({ab for _, ab in shard.pairs()})  # one batch of decoding steps per ablation
        prefill = 2 * m.params * sum(tokens[i] for i, _ in shard.pairs()) * shard.decoding.samples / speed
        slower = 1.0 if shard.backend == "vllm" else acc.hf_decode_factor
        return groups * shard.decoding.max_new_tokens * step * slower + prefill
    if shard.measure == "nll":
        return len(shard.ablations) * sum(tokens) * 2 * (m.layers * m.layer_params + m.head_params) / speed
    if isinstance(shard, JointShard):  # a forward and a backward (about twice a forward) over the block per step
        return 3 * shard.rows * sum(tokens) * 2 * (m.layers * m.layer_params + m.head_params) / speed
    flops = 0.0
    for ab in shard.ablations:  # each row starts at its first ablated layer; the LM head at the last position
        start = min((h.layer for h in ab.heads), default=0)
        flops += sum(2 * (t * (m.layers - start) * m.layer_params + m.head_params) for t in tokens)
    if shard.measure == "angle":  # the block's hidden states at every layer, then an SVD per ablation (float64)
        flops *= 2
    return flops / speed


def load_seconds(model: ModelRef, acc: Accelerator, engine: bool = False) -> float:
    """Seconds to load `model` into an actor (and start a generation engine on it, with `engine`)."""
    m = model_cost(model.name)
    return acc.load_fixed_s + m.params * acc.bytes_per_param / acc.load_bytes_per_s + (acc.engine_start_s if engine
                                                                                      else 0.0)


def donor_seconds(model: ModelRef, acc: Accelerator) -> float:
    """Seconds to read a hosted head recipe's donor slices: the attention weights of the heads' layers."""
    layers = len({h.layer for h in model.swap.heads})
    return layers * model_cost(model.name).attention_params * acc.bytes_per_param / acc.load_bytes_per_s


def _rng(shard: AnyShard) -> random.Random:
    return random.Random(int(hashlib.sha256(shard.id.encode()).hexdigest()[:16], 16))


class SimulatedWorker:
    """The real `Worker`'s interface (prepare, run, close) with the cost model's time and random values."""

    def __init__(self, model: ModelRef, *, device: str = "cpu", token_budget: int | None = None,
                 threads: int | None = None, accelerator: Accelerator = Accelerator(), scale: float = 1.0,
                 gpus: int = 1) -> None:
        self.ref = model
        self.acc, self.scale, self.gpus = accelerator, scale, gpus
        self.loaded = False
        self.engine = False
        self.donors: set[ModelRef] = set()

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds / self.scale)

    def prepare(self, shard: AnyShard) -> None:
        if not self.loaded:
            self._sleep(load_seconds(self.ref, self.acc))
            self.loaded = True
        if shard.model != self.ref and shard.model not in self.donors:  # a hosted head recipe
            if shard.model.host != self.ref:
                raise ValueError(f"shard for {shard.model.label!r} sent to the worker of {self.ref.label!r}")
            self._sleep(donor_seconds(shard.model, self.acc))
            self.donors.add(shard.model)
        if isinstance(shard, GenShard) and shard.backend == "vllm" and not self.engine:
            self._sleep(self.acc.engine_start_s)
            self.engine = True

    def run(self, shard: AnyShard) -> pa.RecordBatch:
        self.prepare(shard)
        self._sleep(shard_seconds(shard, self.acc, self.gpus))
        return fake_batch(shard)

    def close(self) -> None:
        self.loaded = self.engine = False
        self.donors.clear()


def fake_batch(shard: AnyShard) -> pa.RecordBatch:
    """Random values in the shape the real worker returns for `shard`, the same for the same shard."""
    rng = _rng(shard)
    ids = shard.prompts.ids
    if isinstance(shard, GenShard):
        rows = [(i, ab, k) for i, ab in shard.pairs() for k in range(shard.decoding.samples)]
        texts = [ANSWER if ab.heads and rng.random() < 0.6 else REFUSAL for _, ab, _ in rows]
        tokens = [[rng.randrange(100, 30000) for _ in range(len(t) // 4)] for t in texts]
        columns = [[ab.label for _, ab, _ in rows], [ids[i] for i, _, _ in rows], [k for _, _, k in rows],
                   [rng.randrange(2**31) for _ in rows], tokens, texts, [len(t) for t in tokens]]
    elif isinstance(shard, JointShard):
        config = json.loads((Path(shard.model.name) / "config.json").read_text())
        n, steps = config["num_hidden_layers"] * config["num_attention_heads"], shard.rows
        theta = tuple(rng.random() for _ in range(n))
        state = JointState(step=shard.end, theta=theta, adam_m=theta, adam_v=theta, rng="")
        columns = [list(range(shard.start + 1, shard.end + 1)), [-rng.random() for _ in range(steps)],
                   [rng.random() for _ in range(steps)], [rng.random() for _ in range(steps)], [0] * steps,
                   [[rng.random() for _ in range(n)] for _ in range(steps)],
                   [None] * (steps - 1) + [[rng.random() for _ in range(shard.k)] if shard.last else None],
                   [len(ids)] * steps, [None] * (steps - 1) + [state.model_dump_json()]]
    elif shard.measure == "angle":
        columns = [[a.label for a in shard.ablations], [rng.uniform(0, 30) for _ in shard.ablations]]
    elif shard.measure == "nll":
        labels = [a.label for a in shard.ablations for _ in ids]
        columns = [labels, list(ids) * len(shard.ablations), [rng.uniform(50, 80) for _ in labels],
                   [rng.randrange(20, 40) for _ in labels]]
    else:
        labels = [a.label for a in shard.ablations for _ in ids]
        columns = [labels, list(ids) * len(shard.ablations), [rng.expovariate(20) for _ in labels]]
    return pa.RecordBatch.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, shard.schema)],
                                      schema=shard.schema)

