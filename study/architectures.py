"""Architecture knowledge as data: where each model family keeps its layers, q/k/o projections and final norm.

Adding an architecture is one `ArchSpec` row in `ARCHITECTURES`; nothing here copies a model's `forward()`.
`part_view` is the single slice computation that both the hooks and the weight edits use to find one
head's block inside a (possibly fused) projection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from study.ablation import Site
from study.errors import UsageError
from study.models import ModelShape


class Layout(str, enum.Enum):
    """How query/key/value heads sit in the projection outputs."""

    SEPARATE = "separate"  # q_proj, k_proj, v_proj: head h is columns h*d:(h+1)*d of its own projection
    FUSED = "fused"  # one projection, [q heads | k heads | v heads] (Phi-3, GPT-2)
    INTERLEAVED = "interleaved"  # one projection, per head [q | k | v] (GPT-NeoX)


@dataclass(frozen=True)
class ArchSpec:
    """Module paths for one architecture family (dotted, relative to the noted parent)."""

    name: str
    model_types: tuple[str, ...]
    decoder: str  # from the CausalLM to the decoder stack
    layers: str  # from the decoder to the list of layers
    attention: str  # from a layer to its attention module
    q: str  # from attention: q_proj, or the fused qkv projection
    k: str | None  # from attention: k_proj; None when fused
    o: str  # from attention: the output projection
    final_norm: str  # from the decoder
    mlp: str = "mlp"  # from a layer: the MLP block (a base-weight swap moves it whole)
    v: str | None = "v_proj"  # from attention: v_proj; None when fused
    layout: Layout = Layout.SEPARATE
    logit_softcap_attr: str | None = None  # config attribute holding a final-logit softcap


_LLAMA_LIKE = dict(decoder="model", layers="layers", attention="self_attn", q="q_proj", k="k_proj", o="o_proj",
                   final_norm="norm")

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), **_LLAMA_LIKE),
    ArchSpec("mistral", ("mistral",), **_LLAMA_LIKE),
    ArchSpec("qwen2", ("qwen2",), **_LLAMA_LIKE),
    ArchSpec("gemma", ("gemma",), **_LLAMA_LIKE),
    ArchSpec("gemma2", ("gemma2",), **_LLAMA_LIKE, logit_softcap_attr="final_logit_softcapping"),
    ArchSpec("phi3", ("phi3",), decoder="model", layers="layers", attention="self_attn", q="qkv_proj", k=None,
             v=None, o="o_proj", final_norm="norm", layout=Layout.FUSED),
    ArchSpec("gpt2", ("gpt2",), decoder="transformer", layers="h", attention="attn", q="c_attn", k=None,
             v=None, o="c_proj", final_norm="ln_f", layout=Layout.FUSED),
    ArchSpec("gpt_neox", ("gpt_neox",), decoder="gpt_neox", layers="layers", attention="attention",
             q="query_key_value", k=None, v=None, o="dense", final_norm="final_layer_norm",
             layout=Layout.INTERLEAVED),
)


def arch_for(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    known = ", ".join(t for s in ARCHITECTURES for t in s.model_types)
    raise UsageError(f"unsupported architecture {model_type!r}: supported model types are {known}")


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Arch:
    """An `ArchSpec` bound to one model instance: resolves modules and head views."""

    spec: ArchSpec
    shape: ModelShape

    @classmethod
    def of(cls, model: nn.Module) -> "Arch":
        return cls(arch_for(model.config.model_type), ModelShape.from_config(model.config))

    def decoder(self, model: nn.Module) -> nn.Module:
        return get_path(model, self.spec.decoder)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_path(self.decoder(model), self.spec.layers)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return get_path(self.decoder(model), self.spec.final_norm)

    def site_module(self, model: nn.Module, layer: int, site: Site) -> nn.Module:
        attn = get_path(self.layers(model)[layer], self.spec.attention)
        if site is Site.O_IN:
            return get_path(attn, self.spec.o)
        if site is Site.K and self.spec.k is not None:
            return get_path(attn, self.spec.k)
        return get_path(attn, self.spec.q)

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return get_path(self.layers(model)[layer], self.spec.attention)

    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        return get_path(self.layers(model)[layer], self.spec.mlp)

    def v_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose output holds the values: v_proj, or the fused projection."""
        return get_path(self.attention(model, layer), self.spec.v or self.spec.q)

    def value_view(self, x: torch.Tensor) -> torch.Tensor:
        """View the last dim of the value module's output as (..., kv_heads, d_head) (see `part_view`)."""
        s = self.shape
        d = s.d_head
        layout = self.spec.layout
        if layout is Layout.SEPARATE:
            return x.unflatten(-1, (s.n_kv_heads, d))
        if layout is Layout.FUSED:
            start = (s.n_heads + s.n_kv_heads) * d
            return x[..., start:start + s.n_kv_heads * d].unflatten(-1, (s.n_kv_heads, d))
        return x.unflatten(-1, (s.n_heads, 3, d))[..., 2, :]

    def logit_softcap(self, model: nn.Module) -> float | None:
        attr = self.spec.logit_softcap_attr
        return getattr(model.config, attr, None) if attr else None

    def part_view(self, x: torch.Tensor, site: Site) -> torch.Tensor:
        """View the last dim of a site module's output (q, k) or input (o_in) as (..., heads, d_head).

        The result is a view: writing into it writes into `x`. This is the one slice computation shared by
        the per-row hooks and the weight edits.
        """
        s = self.shape
        d = s.d_head
        if site is Site.O_IN:
            return x.unflatten(-1, (s.n_heads, d))
        layout = self.spec.layout
        if layout is Layout.SEPARATE:
            return x.unflatten(-1, (s.n_site_heads(site), d))
        if layout is Layout.FUSED:
            q_width, k_width = s.n_heads * d, s.n_kv_heads * d
            part = x[..., :q_width] if site is Site.Q else x[..., q_width:q_width + k_width]
            return part.unflatten(-1, (s.n_site_heads(site), d))
        # INTERLEAVED: per head [q | k | v]
        return x.unflatten(-1, (s.n_heads, 3, d))[..., 0 if site is Site.Q else 1, :]
