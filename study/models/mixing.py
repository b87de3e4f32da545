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

A head recipe is also a scoped edit (`swapped`) of a model already loaded: a worker holding the aligned model (or
the base, for `heads-into-base`) runs the recipe's shards with the donor's head slices written in and put back
after, reading only the donor's tensors of those heads' layers (`donor_slices`), not loading a second model.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
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


# ------------------------------------------------------------------------------------ head recipes as edits


def _layer_parameters(model: nn.Module, arch: Arch, heads: Sequence[Head]) -> dict[str, nn.Parameter]:
    """Every parameter of the heads' layers' attention modules, by its name in `model` (where their slices live)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Parameter] = {}
    for layer in sorted({h.layer for h in heads}):
        module = arch.attention(model, layer)
        out |= {f"{names[id(module)]}.{n}": p for n, p in module.named_parameters()}
    return out


def _norm_weights(model: nn.Module, arch: Arch, heads: Sequence[Head]) -> list[torch.Tensor]:
    norm = arch.spec.qk_norm
    if norm is None or norm.scope is not NormScope.PER_HEAD:
        return []
    return [p.data for layer in sorted({h.layer for h in heads}) for site in (Site.Q, Site.K)
            for p in arch.site_module(model, layer, site).parameters()]


@torch.no_grad()
def slices_from(target: nn.Module, tensors: dict[str, torch.Tensor], heads: Sequence[Head]) -> list[torch.Tensor]:
    """The donor's values of every slice `head_slices` gives for `heads` (in that order), from the donor's whole
    tensors of the heads' layers (`tensors`, named as `target`'s parameters), cast to `target`'s dtype and device.

    The target's parameters point at the donor's tensors only while the slices are read, so the slices are the
    same views `mix` copies, whatever the layout (fused, Conv1D, GQA)."""
    arch = Arch.of(target)
    for h in heads:
        h.check(arch.shape.n_layers, arch.shape.n_heads)
    params = _layer_parameters(target, arch, heads)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise UsageError(f"the donor has no tensor {missing[0]}: it is not a model of the target's architecture")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise UsageError(f"cannot swap weights: {name} is {tuple(p.shape)} in the target, "
                             f"{tuple(tensors[name].shape)} in the donor (a different width)")
    own = {name: p.data for name, p in params.items()}
    mine = [t.clone() for t in _norm_weights(target, arch, heads)]
    try:
        for name, p in params.items():
            p.data = tensors[name].to(device=p.device, dtype=p.dtype)
        for a, b in zip(mine, _norm_weights(target, arch, heads)):
            if not torch.equal(a, b):
                raise UsageError(f"cannot move single heads of {arch.spec.name}: its per-head q/k norm (one weight "
                                 f"shared by every head of a layer) differs between the two models, so no head "
                                 f"owns it; use attn-from-base to move whole attention modules")
        return [v.clone() for h in heads for v in head_slices(target, arch, h)]
    finally:
        for name, p in params.items():
            p.data = own[name]


def read_tensors(folder: Path, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """`names` read from a model folder's safetensors files alone (a few layers, not the model), or None where the
    folder holds no safetensors or they lack one of the names."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in set(names) & set(st.keys()):
                out[name] = st.get_tensor(name)
    return out if files and set(out) == set(names) else None


def donor_slices(target: nn.Module, donor: str, revision: str | None, heads: Sequence[Head],
                 dtype: str = "float32") -> list[torch.Tensor]:
    """The donor model's values of the heads' slices (see `slices_from`): read from its folder's safetensors where
    it has them locally, else from the donor loaded whole (in `dtype`) on the CPU and dropped after."""
    from study.models.loading import load_model, model_source

    names = list(_layer_parameters(target, Arch.of(target), heads))
    folder = Path(model_source(donor))
    tensors = read_tensors(folder, names) if folder.is_dir() else None
    if tensors is None:
        log.info("swap: %s has no local safetensors with those layers: loading it whole for its head slices", donor)
        whole = load_model(donor, device="cpu", dtype=dtype, revision=revision).model
        tensors = {n: p.data for n, p in whole.named_parameters()}
    return slices_from(target, tensors, heads)


@contextlib.contextmanager
def swapped(model: nn.Module, heads: Sequence[Head], values: Sequence[torch.Tensor]) -> Iterator[nn.Module]:
    """`model` with the heads' slices set to `values` (from `donor_slices`) inside the block, its own values put
    back after, even on an error: a head recipe as a scoped edit of an already loaded model."""
    arch = Arch.of(model)
    views = [v for h in heads for v in head_slices(model, arch, h)]
    if len(views) != len(values):
        raise ValueError(f"{len(values)} donor slices for {len(views)} slices of heads {[h.label for h in heads]}")
    own = [v.clone() for v in views]  # before any write: a key/value group shared by two heads overlaps
    try:
        with torch.no_grad():
            for v, d in zip(views, values):
                v.copy_(d)
        yield model
    finally:
        with torch.no_grad():
            for v, o in zip(views, own):
                v.copy_(o)
