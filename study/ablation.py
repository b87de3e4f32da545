"""Ablations of attention heads: the `Ablation` value, per-row hook tables, scoped hooks and weight edits.

An operator acts on one site of a layer (q, k, or the o_proj input), viewed as (..., heads, d_head) by
`Arch.part_view`. `apply_heads` is the one piece of math; hooks apply it to activations (each batch row
may carry its own ablation) and weight edits apply it to the projection weights and biases, so the two
agree exactly. Every intervention is a context manager and is always undone.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from study.architectures import Arch, Site
from study.errors import UsageError
from study.heads import Head


class Op(str, enum.Enum):
    UNDIFF_Q = "undiff_q"  # scale the head's queries: attention becomes uniform (the paper's main operator)
    UNDIFF_K = "undiff_k"  # scale the head's keys (a whole KV group under GQA, so refused there)
    SCALE_V = "scale_v"  # scale the head's output (softmax . V), i.e. its o_proj input slice
    MEAN = "mean"  # replace the head's queries by the mean over the layer's heads


SITE_OF = {Op.UNDIFF_Q: Site.Q, Op.UNDIFF_K: Site.K, Op.SCALE_V: Site.O_IN, Op.MEAN: Site.Q}
SCALING_OPS = (Op.UNDIFF_Q, Op.UNDIFF_K, Op.SCALE_V)


def parse_op(name: str) -> Op:
    try:
        return Op(name)
    except ValueError:
        raise UsageError(f"unknown operator {name!r}: valid operators are {', '.join(o.value for o in Op)}") from None


def check_eps(op: Op, eps: float) -> float:
    if op in SCALING_OPS and not (0.0 < eps < 1.0 and math.isfinite(eps)):
        raise UsageError(f"eps {eps!r} is invalid for {op.value}: scaling operators need 0 < eps < 1")
    return float(eps)


class Ablation(BaseModel):
    """A set of heads and one operator with its eps. The empty set is the normal model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    heads: tuple[Head, ...] = ()
    op: Op = Op.UNDIFF_Q
    eps: float = 1e-5

    @field_validator("heads")
    @classmethod
    def _sorted_unique(cls, heads: tuple[Head, ...]) -> tuple[Head, ...]:
        return tuple(sorted(set(heads)))

    @model_validator(mode="after")
    def _eps_valid(self) -> "Ablation":
        check_eps(self.op, self.eps)
        return self

    @property
    def site(self) -> Site:
        return SITE_OF[self.op]

    @property
    def label(self) -> str:
        if not self.heads:
            return "none"
        return f"{self.op.value}:{self.eps:g}:{','.join(h.label for h in self.heads)}"

    def with_head(self, head: Head) -> "Ablation":
        return Ablation(heads=self.heads + (head,), op=self.op, eps=self.eps)

    def check(self, arch: Arch) -> "Ablation":
        """Validate against a model: heads in range, and no silent GQA group ablation for keys."""
        s = arch.shape
        for h in self.heads:
            h.check(s.n_layers, s.n_heads)
        if self.op is Op.UNDIFF_K and self.heads and s.n_kv_heads != s.n_heads:
            group = s.n_heads // s.n_kv_heads
            raise UsageError(
                f"undiff_k is ambiguous under GQA: this model shares each key head among {group} query heads "
                f"({s.n_heads} query heads, {s.n_kv_heads} key heads); use undiff_q, scale_v or mean"
            )
        return self


# ----------------------------------------------------------------------------------------------- the math

def apply_heads(x: torch.Tensor, scale: torch.Tensor | None, mean: torch.Tensor | None) -> torch.Tensor:
    """Return `x` with per-head operators applied.

    x: (..., heads, d_head); scale: (..., heads) multiplicative factors (1 = untouched);
    mean: (..., heads) bool, where True the head's block is replaced by the mean over heads.
    Both are linear maps along the head axis, so applying them to a projection's output-feature blocks
    (weights and bias) is the same as applying them to its activations.
    """
    if mean is not None:
        avg = x.mean(dim=-2, keepdim=True)  # (..., 1, d_head)
        x = torch.where(mean.unsqueeze(-1), avg, x)
    if scale is not None:
        x = x * scale.unsqueeze(-1).to(x.dtype)
    return x


@dataclass(frozen=True)
class HeadTables:
    """Per-row operator tables for a list of ablations.

    scale[site]: (layers, rows, site_heads) factors; mean: (layers, rows, heads) bool (only for Site.Q).
    Row r is ablation r. Rows that do not touch a (layer, site) hold ones/False there.
    """

    scale: dict[Site, torch.Tensor]
    mean: torch.Tensor | None

    @classmethod
    def build(cls, ablations: Sequence[Ablation], arch: Arch) -> "HeadTables":
        s = arch.shape
        rows = len(ablations)
        scale: dict[Site, torch.Tensor] = {}
        mean: torch.Tensor | None = None
        for r, ab in enumerate(ablations):
            for h in ab.heads:
                if ab.op is Op.MEAN:
                    if mean is None:
                        mean = torch.zeros(s.n_layers, rows, s.n_heads, dtype=torch.bool)
                    mean[h.layer, r, h.head] = True
                    continue
                site = ab.site
                if site not in scale:
                    scale[site] = torch.ones(s.n_layers, rows, s.n_site_heads(site), dtype=torch.float64)
                scale[site][h.layer, r, h.head] = ab.eps
        return cls(scale, mean)

    def layer_signature(self) -> torch.Tensor:
        """(rows, layers, features) float64: two rows act identically at layer l iff their [:, l] rows are equal."""
        parts = [t.permute(1, 0, 2) for t in self.scale.values()]  # (rows, layers, heads)
        if self.mean is not None:
            parts.append(self.mean.permute(1, 0, 2).to(torch.float64))
        if not parts:
            return torch.zeros(0, 0, 0, dtype=torch.float64)
        return torch.cat(parts, dim=-1)  # (rows, layers, features)

    def select(self, rows: torch.Tensor) -> "HeadTables":
        return HeadTables({k: v[:, rows] for k, v in self.scale.items()},
                          None if self.mean is None else self.mean[:, rows])


def first_divergent_layer(rows: Sequence[Ablation], base: Ablation, arch: Arch) -> torch.Tensor:
    """(rows,) the first layer at which each row's ablation differs from `base` (n_layers if never).

    The residual stream entering that layer is the same for the row and for the base model, so the
    engine can start the row there from the base model's cached residuals.
    """
    n_layers = arch.shape.n_layers
    tables = HeadTables.build([base, *rows], arch)
    sig = tables.layer_signature()  # (1 + rows, layers, features)
    if sig.numel() == 0:
        return torch.full((len(rows),), n_layers, dtype=torch.long)
    differs = (sig[1:] != sig[:1]).any(dim=-1)  # (rows, layers)
    first = torch.where(differs.any(dim=1), differs.int().argmax(dim=1), torch.full((len(rows),), n_layers))
    return first.long()


# ---------------------------------------------------------------------------------------------- the hooks

class HeadHooks:
    """Forward hooks on every layer's q/k/o_proj modules that apply per-row operator tables.

    The engine sets the tables of the layer it is about to run (`set_layer`); `ablated()` sets one
    ablation for every layer, broadcast over any batch. Hooks are removed on exit, whatever happens.
    """

    def __init__(self, model: nn.Module, arch: Arch) -> None:
        self.model = model
        self.arch = arch
        self._active: dict[tuple[int, Site], tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "HeadHooks":
        for layer in range(self.arch.shape.n_layers):
            for site in Site:
                module = self.arch.site_module(self.model, layer, site)
                if site is Site.O_IN:
                    handle = module.register_forward_pre_hook(self._pre_hook(layer))
                else:
                    handle = module.register_forward_hook(self._post_hook(layer, site))
                self._handles.append(handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active.clear()

    def clear(self) -> None:
        self._active.clear()

    def set_layer(self, layer: int, tables: HeadTables, device: torch.device, dtype: torch.dtype) -> None:
        """Activate `tables` (rows = the batch rows of the next forward) at one layer."""
        for site in Site:
            scale = tables.scale.get(site)
            mean = tables.mean if site is Site.Q else None
            s = scale[layer] if scale is not None else None  # (rows, heads)
            m = mean[layer] if mean is not None else None
            if s is not None and bool((s == 1).all()):
                s = None
            if m is not None and not bool(m.any()):
                m = None
            if s is None and m is None:
                self._active.pop((layer, site), None)
            else:
                self._active[(layer, site)] = (
                    None if s is None else s.to(device=device, dtype=dtype),
                    None if m is None else m.to(device=device),
                )

    def _transform(self, layer: int, site: Site, x: torch.Tensor) -> torch.Tensor | None:
        entry = self._active.get((layer, site))
        if entry is None:
            return None
        scale, mean = entry
        x = x.clone()
        view = self.arch.part_view(x, site)  # (rows, seq, heads, d_head)
        # tables are (rows, heads): add the sequence axis; a single row broadcasts over the batch
        s = None if scale is None else scale[:, None, :]
        m = None if mean is None else mean[:, None, :]
        view.copy_(apply_heads(view, s, m))
        return x

    def _post_hook(self, layer: int, site: Site):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            return self._transform(layer, site, output)
        return hook

    def _pre_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple):
            new = self._transform(layer, Site.O_IN, args[0])
            return None if new is None else (new, *args[1:])
        return hook


@contextlib.contextmanager
def ablated(model: nn.Module, ablation: Ablation, arch: Arch | None = None) -> Iterator[None]:
    """Run the block with `ablation` applied by hooks to every forward (any batch, every decoding step)."""
    arch = arch or Arch.of(model)
    ablation.check(arch)
    param = next(model.parameters())
    tables = HeadTables.build([ablation], arch)
    with HeadHooks(model, arch) as hooks:
        for layer in {h.layer for h in ablation.heads}:
            hooks.set_layer(layer, tables, param.device, param.dtype)
        yield


# --------------------------------------------------------------------------------------- the weight edits

def _weight_view(module: nn.Module, site: Site) -> torch.Tensor:
    """The weight with the site's feature axis last: output features for q/k, input features for o_in."""
    w = module.weight.data
    conv = isinstance(module, Conv1D)  # Conv1D stores (in, out); nn.Linear stores (out, in)
    if site is Site.O_IN:
        return w.T if conv else w  # (out, in)
    return w if conv else w.T  # (in, out)


def edit_weights_inplace(model: nn.Module, ablation: Ablation, arch: Arch) -> list[nn.Module]:
    """Apply `ablation` to the weights (and q/k biases) in place; return the touched modules."""
    tables = HeadTables.build([ablation], arch)
    touched: list[nn.Module] = []
    with torch.no_grad():
        for layer in sorted({h.layer for h in ablation.heads}):
            site = ablation.site
            module = arch.site_module(model, layer, site)
            scale = tables.scale[site][layer, 0] if site in tables.scale else None  # (heads,)
            mean = tables.mean[layer, 0] if (tables.mean is not None and site is Site.Q) else None
            targets = [_weight_view(module, site)]
            if site is not Site.O_IN and getattr(module, "bias", None) is not None:
                targets.append(module.bias.data)  # the o_proj bias is not a head's contribution
            for t in targets:
                view = arch.part_view(t, site)  # (..., heads, d_head)
                view.copy_(apply_heads(view, scale, mean))
            touched.append(module)
    return touched


@contextlib.contextmanager
def weights_edited(model: nn.Module, ablation: Ablation, arch: Arch | None = None) -> Iterator[None]:
    """Run the block with the ablation written into the weights; the originals are restored bit-exactly."""
    arch = arch or Arch.of(model)
    ablation.check(arch)
    saved = []
    for layer in sorted({h.layer for h in ablation.heads}):
        module = arch.site_module(model, layer, ablation.site)
        saved.append((module, module.weight.data.clone(),
                      None if getattr(module, "bias", None) is None else module.bias.data.clone()))
    try:
        edit_weights_inplace(model, ablation, arch)
        yield
    finally:
        with torch.no_grad():
            for module, weight, bias in saved:
                module.weight.data.copy_(weight)
                if bias is not None:
                    module.bias.data.copy_(bias)
