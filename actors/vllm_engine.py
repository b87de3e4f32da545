"""Ablated generation with vLLM: one engine, head edits applied inside its workers between `generate` calls.

`VllmGenerator` owns a `vllm.LLM` created with the worker extension `actors.vllm_ext.HeadEditExtension`.
`generate(token_ids, edits, ...)` applies the edits in every worker (`collective_rpc`), resets the prefix
cache, generates, restores the weights and resets the prefix cache again, in a try/finally so that a
failure still leaves the normal model behind. The prefix cache resets matter: vLLM reuses KV blocks of
an identical prefix computed before the edit (or before the restore) otherwise, which silently mixes the
old weights into the new generation for any prompt longer than one block.

An edit applies to every request in the engine, so a call carries one head set for all its prompts;
group prompts by head set and call once per group. vLLM is imported here only (never from `study`), and
engines spawn processes: create one under `if __name__ == "__main__":` or inside an actor.
"""

from __future__ import annotations

import gc
import math
import os
import time
from typing import Any, Sequence

EXTENSION = "actors.vllm_ext.HeadEditExtension"
SITES = ("q", "o_in")
Edit = tuple[int, str, int, float]  # (layer, site "q" | "o_in", head, eps)


def check_edits(edits: Sequence[Sequence[Any]]) -> list[list]:
    """Plain `[layer, site, head, eps]` lists (what crosses into the workers), validated on the driver."""
    out = []
    for e in edits:
        if len(e) != 4:
            raise ValueError(f"an edit is (layer, site, head, eps), got {e!r}")
        layer, site, head, eps = int(e[0]), str(e[1]), int(e[2]), float(e[3])
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}: expected one of {SITES}")
        if not math.isfinite(eps):
            raise ValueError(f"eps must be finite, got {eps!r}")
        out.append([layer, site, head, eps])
    return out


def edits_for(ablation: Any) -> list[Edit]:
    """The edits of a `study.core.ablation.Ablation` (undiff_q -> site q, scale_v -> site o_in)."""
    sites = {"undiff_q": "q", "scale_v": "o_in"}
    op = getattr(ablation.op, "value", ablation.op)
    if ablation.heads and op not in sites:
        raise ValueError(f"operator {op!r} has no vLLM weight edit: use undiff_q or scale_v")
    return [(h.layer, sites[op], h.head, float(ablation.eps)) for h in ablation.heads]


def sampling_params(*, greedy: bool, top_k: int, temperature: float, max_new_tokens: int, seed: int) -> Any:
    """vLLM sampling settings for one request: temperature 0 for greedy, else top-k sampling with its seed."""
    from vllm import SamplingParams

    if greedy:
        return SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
    return SamplingParams(temperature=temperature, top_k=top_k, max_tokens=max_new_tokens, seed=seed,
                          detokenize=False)


GPU_SHARE = 0.9  # of the GPU memory free when an engine starts: weights, activations and the KV cache


def gpu_memory_share(share: float = GPU_SHARE) -> float:
    """vLLM's `gpu_memory_utilization` (a fraction of each GPU's total memory) that takes `share` of the
    memory free now on the tightest visible GPU: what is left beside anything else this process holds."""
    import torch

    left = min(free / total for free, total in (torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count())))
    return round(share * left, 4)


def engine_kwargs(device: str, *, dtype: str, seed: int, block_size: int | None, enforce_eager: bool | None, tensor_parallel_size: int | None,
                  gpu_memory_utilization: float | None) -> dict[str, Any]:
    """The `vllm.LLM` arguments of an engine for one model on `device`.

    On a GPU: CUDA graphs (the head edits change weights in place, so the captured graphs read them), one
    tensor-parallel rank per GPU the process sees (an actor holding several GPUs spreads the model over them),
    and the KV cache sized from the memory left (`gpu_memory_share`). On the CPU: eager (the KV space is set
    through the environment)."""
    kwargs: dict[str, Any] = dict(dtype=dtype, seed=seed, worker_extension_cls=EXTENSION,
                                  enable_prefix_caching=True)
    if block_size is not None:
        kwargs["block_size"] = block_size
    if device == "cpu":
        kwargs["enforce_eager"] = True if enforce_eager is None else enforce_eager
        return kwargs
    import torch

    kwargs["enforce_eager"] = False if enforce_eager is None else enforce_eager
    kwargs["tensor_parallel_size"] = tensor_parallel_size or max(1, torch.cuda.device_count())
    if kwargs["tensor_parallel_size"] > 1:  # ranks as this process's children, on the GPUs it holds (inside a Ray
        kwargs["distributed_executor_backend"] = "mp"  # actor vLLM would otherwise ask Ray for more GPUs)
    kwargs["gpu_memory_utilization"] = gpu_memory_utilization or gpu_memory_share()
    return kwargs


class VllmGenerator:
    """A vLLM engine for one model, generating token ids with optional head ablations.

    `kv_cache_gib` (CPU only) becomes `VLLM_CPU_KVCACHE_SPACE` (whole GiB, rounded up); on a GPU the engine
    sizes its KV cache from the memory left (`engine_kwargs`). `block_size=None` keeps vLLM's default (128 on
    CPU, where it must be a multiple of 32). Extra keyword arguments go to `vllm.LLM`. On CPU the worker's
    cores come from the environment: vLLM keeps one core off the worker by default
    (`VLLM_CPU_NUM_OF_RESERVED_CPU=0` gives it all of them; `VLLM_CPU_OMP_THREADS_BIND` pins it, e.g. one core
    per engine when several share a machine).
    """

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu", block_size: int | None = None,
                 kv_cache_gib: float = 1, enforce_eager: bool | None = None, seed: int = 0,
                 tensor_parallel_size: int | None = None, gpu_memory_utilization: float | None = None,
                 **llm_kwargs: Any) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r} (pick GPUs with CUDA_VISIBLE_DEVICES)")
        self.model_path = str(model_path)
        self.device = device
        kwargs = engine_kwargs(device, dtype=dtype, seed=seed, block_size=block_size, enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                               gpu_memory_utilization=gpu_memory_utilization)
        if device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gib)))
        kwargs.update(llm_kwargs)
        self.settings = {k: v for k, v in kwargs.items() if k != "worker_extension_cls"}  # what the engine ran with
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage report to vLLM unless the user asks for one
        from vllm import LLM

        self.llm = LLM(model=self.model_path, **kwargs)

    # ------------------------------------------------------------------------------------------ edits

    def _rpc(self, method: str, *args: Any) -> list:
        return self.llm.collective_rpc(method, args=args)

    def reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")

    def apply(self, edits: Sequence[Sequence[Any]]) -> None:
        """Edit the weights in every worker and reset the prefix cache. Pair with `restore` (or use
        `generate`, which does both)."""
        plain = check_edits(edits)
        try:
            self._rpc("headstudy_apply", plain)
        except BaseException:
            self._rpc("headstudy_restore")  # a worker that did apply (tensor parallel) must not stay edited
            raise
        finally:
            self.reset_prefix_cache()

    def restore(self) -> None:
        """Put back the original weights in every worker (bitwise) and reset the prefix cache."""
        try:
            self._rpc("headstudy_restore")
        finally:
            self.reset_prefix_cache()

    def probe(self, layers: Sequence[int] | None = None) -> list[dict[str, str]]:
        """Per worker: sha256 of each layer's qkv/o weights as the workers compute with them."""
        return self._rpc("headstudy_probe", None if layers is None else [int(x) for x in layers])

    def time_edit(self, edits: Sequence[Sequence[Any]]) -> float:
        """Seconds for one apply + restore, each followed by a prefix cache reset (as in `generate`)."""
        start = time.perf_counter()
        self.apply(edits)
        self.restore()
        return time.perf_counter() - start

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, token_ids: list[list[int]], edits: Sequence[Sequence[Any]] = (), *, greedy: bool = True,
                 top_k: int = 0, temperature: float = 1.0, max_new_tokens: int = 32, samples: int = 1,
                 seed: int = 0) -> list[list[list[int]]]:
        """Per prompt, per sample: the generated token ids (ending with EOS when the model stopped).

        Greedy is temperature 0 (one sample is enough; `samples` copies are still returned). Sampled
        requests carry their own seed, `seed + sample`, so a prompt's k-th sample does not depend on the
        batch it is in. `top_k` 0 means no top-k cut.
        """
        n_draw = 1 if greedy else samples
        rows = [ids for ids in token_ids for _ in range(n_draw)]
        params = [sampling_params(greedy=greedy, top_k=top_k, temperature=temperature,
                                  max_new_tokens=max_new_tokens, seed=seed + k)
                  for _ in token_ids for k in range(n_draw)]
        tokens = self.run_requests(rows, params, edits)
        result = []
        for i in range(len(token_ids)):
            drawn = tokens[i * n_draw:(i + 1) * n_draw]
            result.append([list(t) for t in drawn] * samples if greedy else drawn)
        return result

    def run_requests(self, token_ids: Sequence[Sequence[int]], params: Sequence[Any],
                     edits: Sequence[Sequence[Any]] = ()) -> list[list[int]]:
        """One request per (token ids, SamplingParams), generated with `edits` applied around the call (and
        restored, the prefix cache reset, even when generation fails); the new token ids per request."""
        from vllm import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in token_ids]
        edited = bool(edits)
        if edited:
            self.apply(edits)
        try:
            outputs = self.llm.generate(prompts, list(params), use_tqdm=False)
        finally:
            if edited:
                self.restore()
        return [[int(t) for t in o.outputs[0].token_ids] for o in outputs]

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop the engine's processes and free its memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()

    def __enter__(self) -> "VllmGenerator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
