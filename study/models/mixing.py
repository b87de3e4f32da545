"""Base-weight swaps in memory: an aligned model and its base mixed by recipe (METHOD.md section 6).

The paper's helper copies every parameter whose name contains "attn" from one model and "mlp" from the
other, keeping embeddings, norms and the LM head of the target. Here the parts are the modules the
architecture table names (`ArchSpec.attention`, `ArchSpec.mlp`), so nothing depends on parameter spelling,
and the head recipes move only one head's slices:
- q: the head's output rows of the query projection (and bias);
- k, v: the rows of the key/value group the head reads (under GQA the group is shared with the other
  query heads of the group, so they see the donor's keys and values too);
- o: the head's input columns of the output projection;
- behind a q/k norm over all heads (OLMo2): the head's slice of the q norm's weight and its group's slice of
  the k norm's weight (the norm's scale still couples the heads, as a shared KV group does). A per-head
  q/k norm (Qwen3, Gemma3) has one weight shared by every head of the layer: no head owns it, so a head
  recipe keeps the target's and is refused unless both models' norm weights are equal there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn

from study.core.ablation import Site
from study.core.architectures import Arch, NormScope, weight_view
from study.core.errors import UsageError
from study.core.heads import Head
from study.models.recipes import Recipe, Swap

if TYPE_CHECKING:
    from study.models.loading import LoadedModel

log = logging.getLogger(__name__)


def check_pair(aligned: nn.Module, base: nn.Module, names: tuple[str, str] = ("aligned", "base")) -> None:
    """Refuse a pair that cannot be mixed: different architecture, shape, vocabulary or parameters."""
    a, b = Arch.of(aligned), Arch.of(base)
    what = f"{names[0]} and {names[1]}"
    if a.spec.name != b.spec.name:
        raise UsageError(f"cannot swap weights between {what}: architectures differ ({a.spec.name} vs {b.spec.name})")
    if a.shape != b.shape:
        raise UsageError(f"cannot swap weights between {what}: shapes differ ({a.shape.differences(b.shape)}): "
                         f"a swap needs two models of one architecture, width and vocabulary")
    pa_, pb = dict(aligned.named_parameters()), dict(base.named_parameters())
    if set(pa_) != set(pb):
        diff = sorted(set(pa_) ^ set(pb))
        raise UsageError(f"cannot swap weights between {what}: parameter names differ (e.g. {diff[0]})")
    for name, p in pa_.items():
        if p.shape != pb[name].shape:
            raise UsageError(f"cannot swap weights between {what}: {name} is {tuple(p.shape)} vs "
                             f"{tuple(pb[name].shape)} (a different vocabulary or width)")


def _module_parameters(model: nn.Module, arch: Arch, part: str) -> Iterator[torch.Tensor]:
    for layer in range(arch.shape.n_layers):
        module = arch.attention(model, layer) if part == "attention" else arch.mlp(model, layer)
        yield from module.parameters()


def head_slices(model: nn.Module, arch: Arch, head: Head) -> list[torch.Tensor]:
    """Views of every weight (and bias) slice that belongs to `head`: writing them writes the model."""
    s = arch.shape
    group = head.head // (s.n_heads // s.n_kv_heads)
    norm = arch.spec.qk_norm
    views: list[torch.Tensor] = []
    for site, index in ((Site.Q, head.head), (Site.K, group)):
        module = arch.projection(model, head.layer, site)
        views.append(arch.projection_view(weight_view(module, site), site)[..., index, :])
        if getattr(module, "bias", None) is not None:
            views.append(arch.projection_view(module.bias.data, site)[..., index, :])
        if norm is not None and norm.scope is NormScope.WHOLE:  # the norm's weight has the output's layout
            views.append(arch.part_view(arch.site_module(model, head.layer, site).weight.data, site)[..., index, :])
    v = arch.v_module(model, head.layer)
    views.append(arch.value_view(weight_view(v, Site.Q))[..., group, :])
    if getattr(v, "bias", None) is not None:
        views.append(arch.value_view(v.bias.data)[..., group, :])
    o = arch.projection(model, head.layer, Site.O_IN)
    views.append(arch.projection_view(weight_view(o, Site.O_IN), Site.O_IN)[..., head.head, :])
    return views


def check_shared_norms(target: nn.Module, donor: nn.Module, arch: Arch, heads: Sequence[Head]) -> None:
    """Refuse a head recipe that would pair the donor's head with the target's different per-head q/k norm."""
    norm = arch.spec.qk_norm
    if norm is None or norm.scope is not NormScope.PER_HEAD:
        return
    for layer in sorted({h.layer for h in heads}):
        for site in (Site.Q, Site.K):
            t, d = arch.site_module(target, layer, site), arch.site_module(donor, layer, site)
            if any(not torch.equal(a, b.to(a)) for a, b in zip(t.parameters(), d.parameters())):
                raise UsageError(f"cannot move single heads of {arch.spec.name} at layer {layer}: its {site.value} "
                                 f"norm (one weight shared by every head) differs between the two models, so "
                                 f"no head owns it; use attn-from-base to move whole attention modules")


@torch.no_grad()
def mix(target: nn.Module, donor: nn.Module, recipe: Recipe, heads: Sequence[Head] = ()) -> int:
    """Copy the recipe's part of `donor` into `target` in place; returns the number of values copied.

    The caller loads `target` as the recipe says (`Recipe.target`): the aligned model, or the base for
    `heads-into-base`."""
    check_pair(target, donor, ("target", "donor"))
    arch = Arch.of(target)
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    if recipe in (Recipe.ATTN_FROM_BASE, Recipe.MLP_FROM_BASE):
        part = "attention" if recipe is Recipe.ATTN_FROM_BASE else "mlp"
        pairs = list(zip(_module_parameters(target, arch, part), _module_parameters(donor, arch, part)))
        pairs = [(t.data, d.data) for t, d in pairs]
    elif recipe in (Recipe.HEADS_FROM_BASE, Recipe.HEADS_INTO_BASE):
        if not heads:
            raise UsageError(f"swap recipe {recipe.value} needs safety heads")
        for h in heads:
            h.check(arch.shape.n_layers, arch.shape.n_heads)
        check_shared_norms(target, donor, arch, heads)
        pairs = [pair for h in heads for pair in zip(head_slices(target, arch, h), head_slices(donor, arch, h))]
    else:
        raise ValueError(f"recipe {recipe.value} builds no mixed model")
    copied = 0
    for t, d in pairs:
        t.copy_(d.to(device=t.device, dtype=t.dtype))
        copied += t.numel()
    log.info("swap %s: %d values copied from the donor", recipe.value, copied)
    return copied


def load_mixed(swap: "Swap", revision: str | None, dtype: str, device: str = "cpu") -> "LoadedModel":
    """Load the two models of `swap` (the aligned one at `revision`), mix them by its recipe and keep only the
    result (in memory)."""
    from study.models.loading import load_model

    aligned = (swap.aligned, revision)
    base = (swap.base, swap.base_revision)
    (t_name, t_rev), (d_name, d_rev) = (base, aligned) if swap.recipe.target_is_base else (aligned, base)
    target = load_model(t_name, device=device, dtype=dtype, revision=t_rev)
    donor = load_model(d_name, device="cpu", dtype=dtype, revision=d_rev)
    if target.tokenizer.get_vocab() != donor.tokenizer.get_vocab():
        raise UsageError(f"cannot swap weights between {swap.aligned!r} and {swap.base!r}: their tokenizers' "
                         f"vocabularies differ")
    check_pair(target.model, donor.model, (t_name, d_name))
    mix(target.model, donor.model, swap.recipe, swap.heads)
    del donor
    return target
