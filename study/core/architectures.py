"""Architecture knowledge as data: where each model family keeps its layers, q/k/o projections and final norm.

Adding an architecture is one `ArchSpec` row in `ARCHITECTURES`; nothing here copies a model's `forward()`.
`site_module` says where an operator acts and `part_view` how to find one head's block there; the weight
edits and the base-weight swaps find a head's parameters through `edit_target` and `projection_view`.

Some families normalise q and k after the projections (`QKNorm`: Qwen3, Gemma3 and OLMo2). There a head's
query is final only at the norm's output: an RMSNorm undoes a scale of the projection's head rows (a
per-head norm exactly, up to its eps; OLMo2's norm over all heads changes the other heads instead), so the
operators on q/k act on the norm's output, and a weight edit exists only where it can express that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from study.core.ablation import SITE_OF, Op, Site
from study.core.errors import UsageError
from study.core.shape import ModelShape

if TYPE_CHECKING:  # the table and `arch_for` are light (a plan checks a config's architecture without torch)
    import torch
    from torch import nn


class Layout(str, enum.Enum):
    """How query/key/value heads sit in the projection outputs."""

    SEPARATE = "separate"  # q_proj, k_proj, v_proj: head h is columns h*d:(h+1)*d of its own projection
    FUSED = "fused"  # one projection, [q heads | k heads | v heads] (Phi-3, GPT-2)
    INTERLEAVED = "interleaved"  # one projection, per head [q | k | v] (GPT-NeoX)


class NormScope(str, enum.Enum):
    """What a q/k normalisation after the projection normalises (it decides which weight edits exist)."""

    # one RMSNorm over all heads' features (OLMo2): output (..., heads*d_head) = normalised x * weight, so the
    # weight has a slice per head (a `1 + weight` norm, as Gemma's, would need another edit)
    WHOLE = "whole"
    PER_HEAD = "per_head"  # an RMSNorm over each head's d_head (Qwen3, Gemma3): weight (d_head,) shared by heads


@dataclass(frozen=True)
class QKNorm:
    """The modules (from attention) whose outputs are the heads' final queries and keys."""

    q: str
    k: str
    scope: NormScope
    # PER_HEAD: where the head axis is in the norm's (..., d_head) output: -2 for (batch, seq, heads, d_head)
    # (Qwen3 normalises before the transpose), -3 for (batch, heads, seq, d_head) (Gemma3, after it)
    head_axis: int = -2


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
    qk_norm: QKNorm | None = None  # a norm after q/k: the heads' final queries/keys are its outputs


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
    ArchSpec("qwen3", ("qwen3",), **_LLAMA_LIKE, qk_norm=QKNorm("q_norm", "k_norm", NormScope.PER_HEAD, -2)),
    # gemma3_text only: a "gemma3" checkpoint loads as the multimodal Gemma3ForConditionalGeneration, whose
    # decoder sits at model.language_model and whose config keeps the text geometry in text_config
    ArchSpec("gemma3", ("gemma3_text",), **_LLAMA_LIKE, logit_softcap_attr="final_logit_softcapping",
             qk_norm=QKNorm("q_norm", "k_norm", NormScope.PER_HEAD, -3)),
    ArchSpec("olmo2", ("olmo2",), **_LLAMA_LIKE, qk_norm=QKNorm("q_norm", "k_norm", NormScope.WHOLE)),
)


def arch_for(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    known = ", ".join(t for s in ARCHITECTURES for t in s.model_types)
    raise UsageError(f"unsupported architecture {model_type!r}: supported model types are {known}")


def check_architecture(model: str, shape: ModelShape) -> ArchSpec:
    """`model`'s row of the table, or one line naming the model, its type and the covered ones: read from the
    config at plan time, so an uncovered architecture (Mixtral, Falcon...) ends before any actor loads it."""
    try:
        return arch_for(shape.model_type)
    except UsageError as err:
        raise UsageError(f"model {model!r}: {err}") from None


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def weight_view(module: nn.Module, site: Site) -> torch.Tensor:
    """A projection's weight with the site's feature axis last: output features for q/k, input features for o_in."""
    w = module.weight.data
    from transformers.pytorch_utils import Conv1D

    conv = isinstance(module, Conv1D)  # Conv1D stores (in, out); nn.Linear stores (out, in)
    if site is Site.O_IN:
        return w.T if conv else w  # (out, in)
    return w if conv else w.T  # (in, out)


@dataclass(frozen=True)
class EditTarget:
    """What a weight edit at one layer writes: a module and (..., heads, d_head) views into its parameters."""

    module: nn.Module
    parts: tuple[torch.Tensor, ...]  # the weight's view, then the bias's where the bias is a head's


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

    def layer_devices(self, model: nn.Module) -> list[torch.device]:
        """Each layer's device: a model spread over several GPUs (`device_map`) keeps a layer's weights on one."""
        return [next(layer.parameters()).device for layer in self.layers(model)]

    def site_module(self, model: nn.Module, layer: int, site: Site) -> nn.Module:
        """Where an operator on `site` acts (the hooks attach here): the module whose output holds the heads'
        final queries/keys (the q/k norm where the row has one, else the projection), or whose input holds
        the head outputs (o_in)."""
        norm = self.spec.qk_norm
        if norm is not None and site is not Site.O_IN:
            return get_path(self.attention(model, layer), norm.q if site is Site.Q else norm.k)
        return self.projection(model, layer, site)

    def projection(self, model: nn.Module, layer: int, site: Site) -> nn.Module:
        """The projection holding the heads' weights for `site`: q (or the fused qkv), k, or o."""
        attn = self.attention(model, layer)
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
        """View a site module's output (q, k) or input (o_in) as (..., heads, d_head), see `site_module`.

        The result is a view: writing into it writes into `x`. This is the one slice computation of the hooks;
        for a norm over all heads (`NormScope.WHOLE`) it also slices the norm's weight, which has the output's
        feature layout.
        """
        norm = self.spec.qk_norm
        if norm is None or site is Site.O_IN:
            return self.projection_view(x, site)
        n, d = self.shape.n_site_heads(site), self.shape.d_head
        if norm.scope is NormScope.WHOLE:
            return x.unflatten(-1, (n, d))  # (..., heads, d_head)
        view = x.movedim(norm.head_axis, -2)  # (..., seq, heads, d_head)
        if view.shape[-2:] != (n, d):
            raise RuntimeError(f"{self.spec.name}: the {site.value} norm's output is {tuple(x.shape)}, expected "
                               f"{n} heads of {d} on axis {norm.head_axis} (the architecture row is wrong)")
        return view

    def projection_view(self, x: torch.Tensor, site: Site) -> torch.Tensor:
        """View the last dim of a projection's output features (q, k) or input features (o_in) as
        (..., heads, d_head): a (possibly fused) projection's activations, weight (`weight_view`) or bias."""
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

    def edit_target(self, model: nn.Module, layer: int, op: Op) -> EditTarget:
        """The parameters a weight edit of `op` writes at `layer`, with each head's block as (..., heads, d_head).

        Without a q/k norm: the projection's weight and its q/k bias (the o bias is no head's). Behind a norm
        over all heads a head's final block is its slice of the norm's output times its slice of the norm's
        weight, so a scale is written there. A per-head norm's weight is shared by all heads, and `mean`
        mixes heads across a norm: no weight edit expresses those, so this refuses (the hooks do them).
        """
        site = SITE_OF[op]
        norm = self.spec.qk_norm
        if norm is None or site is Site.O_IN:
            module = self.projection(model, layer, site)
            parts = [self.projection_view(weight_view(module, site), site)]
            if site is not Site.O_IN and getattr(module, "bias", None) is not None:
                parts.append(self.projection_view(module.bias.data, site))
            return EditTarget(module, tuple(parts))
        if norm.scope is NormScope.WHOLE and op is not Op.MEAN:
            module = self.site_module(model, layer, site)
            return EditTarget(module, (self.part_view(module.weight.data, site),))
        why = (f"it mixes the heads' queries after the {site.value} norm, which no edit of the projection or "
               f"of the norm's weight expresses" if op is Op.MEAN else
               f"the per-head {site.value} norm undoes a scale of the projection and its weight is shared by "
               f"all heads")
        raise UsageError(f"{op.value} on {self.spec.name} cannot be written into the weights: {why}; use the "
                         f"hooks instead (scoring, and generation with --backend hf); scale_v works as a weight edit")
