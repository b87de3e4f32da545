"""Interventions on a loaded model: per-row hook tables, scoped hooks and weight edits for an `Ablation`.

An operator acts on one site of a layer (q, k, or the o_proj input) at `Arch.site_module`, viewed as
(..., heads, d_head) by `Arch.part_view`. `apply_heads` is the one piece of math; hooks apply it to
activations (each batch row may carry its own ablation) and weight edits apply it to the parameters
`Arch.edit_target` names (projection weights and biases, or a q/k norm's weight), so the two agree exactly;
where no weight edit can express an operator (a q/k norm shared by the heads) the edits refuse and the hooks
still work. Every intervention is a context manager and is always undone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from study.core.ablation import Ablation, Op, Site
from study.core.architectures import Arch, EditTarget, weight_view

__all__ = ["HeadHooks", "HeadTables", "ablated", "apply_heads", "edit_weights_inplace", "first_divergent_layer",
           "weight_view", "weights_edited"]

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
    """Forward hooks on every layer's site modules (q/k projections or norms, o_proj) applying per-row tables.

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
        s = None if scale is None else scale[:, None, :].to(view.device)  # no copy unless the layer moved
        m = None if mean is None else mean[:, None, :].to(view.device)
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
    ablation.check(arch.shape)
    dtype = next(model.parameters()).dtype
    devices = arch.layer_devices(model)
    tables = HeadTables.build([ablation], arch)
    with HeadHooks(model, arch) as hooks:
        for layer in {h.layer for h in ablation.heads}:
            hooks.set_layer(layer, tables, devices[layer], dtype)
        yield


# --------------------------------------------------------------------------------------- the weight edits

def _edit_targets(model: nn.Module, ablation: Ablation, arch: Arch) -> dict[int, EditTarget]:
    """Each touched layer's edit target; refuses (UsageError) before anything is written."""
    return {layer: arch.edit_target(model, layer, ablation.op) for layer in sorted({h.layer for h in ablation.heads})}


def edit_weights_inplace(model: nn.Module, ablation: Ablation, arch: Arch) -> list[nn.Module]:
    """Apply `ablation` to the weights (and q/k biases) in place; return the touched modules."""
    targets = _edit_targets(model, ablation, arch)
    tables = HeadTables.build([ablation], arch)
    site = ablation.site
    with torch.no_grad():
        for layer, target in targets.items():
            scale = tables.scale[site][layer, 0] if site in tables.scale else None  # (heads,)
            mean = tables.mean[layer, 0] if (tables.mean is not None and site is Site.Q) else None
            for view in target.parts:  # (..., heads, d_head)
                view.copy_(apply_heads(view, scale, mean))
    return [t.module for t in targets.values()]


@contextlib.contextmanager
def weights_edited(model: nn.Module, ablation: Ablation, arch: Arch | None = None) -> Iterator[None]:
    """Run the block with the ablation written into the weights; the originals are restored bit-exactly."""
    arch = arch or Arch.of(model)
    ablation.check(arch.shape)
    saved = []
    for target in _edit_targets(model, ablation, arch).values():
        module = target.module
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
