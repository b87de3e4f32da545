"""The vLLM generation backend behind `study.generation.Generator`: rows grouped by ablation, one weight edit
per group, each row sampled with its own seed.

The `headstudy.generation_backends` entry point `vllm` names this class (`--backend vllm`), so `study` never imports vLLM. An
edit applies to every request in the engine: rows are grouped by head set and each group is one edited
`generate` call, restored (and the prefix cache reset) before the next.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from actors.vllm_engine import VllmGenerator, edits_for, sampling_params
from study.core.ablation import Ablation
from study.generation.decoding import Decoding


class VllmBackend:
    """A `VllmGenerator` for one model, answering the row-level interface the worker uses."""

    def __init__(self, engine: VllmGenerator) -> None:
        self.engine = engine

    @classmethod
    def for_worker(cls, worker: Any) -> "VllmBackend":
        from study.models.loading import model_source

        device = "cpu" if worker.device == "cpu" else "cuda"
        if device == "cpu":  # vLLM keeps a core off its CPU worker by default: half of a 2-core machine
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        extra = {} if worker.ref.revision is None else {"revision": worker.ref.revision}
        return cls(VllmGenerator(model_source(worker.ref.name), dtype=worker.ref.dtype, device=device, **extra))

    def generate(self, token_ids: Sequence[Sequence[int]], ablations: Sequence[Ablation], decoding: Decoding,
                 seeds: Sequence[int]) -> list[list[int]]:
        if not (len(token_ids) == len(ablations) == len(seeds)):
            raise ValueError("token_ids, ablations and seeds must have one entry per row")
        groups: dict[Ablation, list[int]] = {}
        for i, ab in enumerate(ablations):
            groups.setdefault(ab, []).append(i)
        out: list[list[int]] = [[] for _ in token_ids]
        for ab, rows in groups.items():  # an edit applies to the whole engine: one edited call per head set
            params = [sampling_params(greedy=not decoding.sampled, top_k=decoding.top_k,
                                      temperature=decoding.temperature, max_new_tokens=decoding.max_new_tokens,
                                      seed=int(seeds[i])) for i in rows]
            got = self.engine.run_requests([token_ids[i] for i in rows], params, edits_for(ab))
            for i, tokens in zip(rows, got):
                out[i] = tokens
        return out

    def close(self) -> None:
        self.engine.close()
