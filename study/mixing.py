"""Base-weight swaps in memory: an aligned model and its base mixed by recipe (METHOD.md section 6).

The paper's helper copies every parameter whose name contains "attn" from one model and "mlp" from the
other, keeping embeddings, norms and the LM head of the target. Here the parts are the modules the
architecture table names (`ArchSpec.attention`, `ArchSpec.mlp`), so nothing depends on parameter spelling,
and the head recipes move only one head's slices:
- q: the head's output rows of the query projection (and bias);
- k, v: the rows of the key/value group the head reads (under GQA the group is shared with the other
  query heads of the group, so they see the donor's keys and values too);
- o: the head's input columns of the output projection.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn

from study.ablation import Site
from study.architectures import Arch
from study.errors import UsageError
from study.heads import Head
from study.interventions import weight_view
from study.swap import Recipe

if TYPE_CHECKING:
    from study.models import LoadedModel
    from study.shards import ModelRef

log = logging.getLogger(__name__)


def check_pair(aligned: nn.Module, base: nn.Module, names: tuple[str, str] = ("aligned", "base")) -> None:
    """Refuse a pair that cannot be mixed: different architecture, shape, vocabulary or parameters."""
    a, b = Arch.of(aligned), Arch.of(base)
    what = f"{names[0]} and {names[1]}"
    if a.spec.name != b.spec.name:
        raise UsageError(f"cannot swap weights between {what}: architectures differ ({a.spec.name} vs {b.spec.name})")
    if a.shape != b.shape:
        raise UsageError(f"cannot swap weights between {what}: attention shapes differ ({a.shape} vs {b.shape})")
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
    views: list[torch.Tensor] = []
    q = arch.site_module(model, head.layer, Site.Q)
    k = arch.site_module(model, head.layer, Site.K)
    v = arch.v_module(model, head.layer)
    o = arch.site_module(model, head.layer, Site.O_IN)
    for module, site, index in ((q, Site.Q, head.head), (k, Site.K, group)):
        views.append(arch.part_view(weight_view(module, Site.Q), site)[..., index, :])
        if getattr(module, "bias", None) is not None:
            views.append(arch.part_view(module.bias.data, site)[..., index, :])
    views.append(arch.value_view(weight_view(v, Site.Q))[..., group, :])
    if getattr(v, "bias", None) is not None:
        views.append(arch.value_view(v.bias.data)[..., group, :])
    views.append(arch.part_view(weight_view(o, Site.O_IN), Site.O_IN)[..., head.head, :])
    return views


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
        pairs = [pair for h in heads for pair in zip(head_slices(target, arch, h), head_slices(donor, arch, h))]
    else:
        raise ValueError(f"recipe {recipe.value} builds no mixed model")
    copied = 0
    for t, d in pairs:
        t.copy_(d.to(device=t.device, dtype=t.dtype))
        copied += t.numel()
    log.info("swap %s: %d values copied from the donor", recipe.value, copied)
    return copied


def load_mixed(ref: "ModelRef", device: str = "cpu") -> "LoadedModel":
    """Load the two models of `ref.swap`, mix them by its recipe and keep only the result (in memory)."""
    from study.models import load_model

    swap = ref.swap
    aligned = (swap.aligned, ref.revision)
    base = (swap.base, swap.base_revision)
    (t_name, t_rev), (d_name, d_rev) = (base, aligned) if swap.recipe.target_is_base else (aligned, base)
    target = load_model(t_name, device=device, dtype=ref.dtype, revision=t_rev)
    donor = load_model(d_name, device="cpu", dtype=ref.dtype, revision=d_rev)
    if target.tokenizer.get_vocab() != donor.tokenizer.get_vocab():
        raise UsageError(f"cannot swap weights between {swap.aligned!r} and {swap.base!r}: their tokenizers' "
                         f"vocabularies differ")
    check_pair(target.model, donor.model, (t_name, d_name))
    mix(target.model, donor.model, swap.recipe, swap.heads)
    del donor
    return target
