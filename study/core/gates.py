"""Soft head ablation: one gate g in [0, 1] per head that moves the head from normal (g = 0) to ablated (g = 1)
with the same operator as `study.core.interventions`, differentiable in g (the joint head-group search).

For the scaling operators the head's block is multiplied by (1 - g) + g * eps: exactly 1 at g = 0 and exactly
eps at g = 1, so the two ends are the normal model and the hook ablation bit for bit. For `mean` the block is
`lerp(x, mean over heads, g)`, exact at both ends as well.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from study.core.ablation import SCALING_OPS, Op, Site, check_eps
from study.core.architectures import Arch
from study.core.errors import UsageError

__all__ = ["apply_gates", "gate_scale", "gated"]


def gate_scale(g: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., heads) multiplicative factor of each head, in float64: 1 at g = 0, eps at g = 1, linear between."""
    g = g.to(torch.float64)
    return (1.0 - g) + g * eps


def apply_gates(x: torch.Tensor, g: torch.Tensor, op: Op, eps: float) -> torch.Tensor:
    """`x` (..., heads, d_head) with each head moved a fraction g (heads,) of the way to its ablation by `op`."""
    if op is Op.MEAN:
        avg = x.mean(dim=-2, keepdim=True).expand_as(x)  # (..., heads, d_head)
        return torch.lerp(x, avg, g.to(x.dtype)[:, None].expand_as(x))
    return x * gate_scale(g, eps).to(x.dtype)[:, None]  # (..., heads, d_head)


@contextlib.contextmanager
def gated(model: nn.Module, gates: torch.Tensor, op: Op, eps: float, arch: Arch | None = None) -> Iterator[None]:
    """Run the block with every head gated: `gates` (layers, heads) in [0, 1], gradients flow into them.

    Hooks sit where `ablated` puts its own (the site module of the operator), one per layer, and are removed on
    exit whatever happens."""
    arch = arch or Arch.of(model)
    s = arch.shape
    site = Site.Q if op is Op.MEAN else {Op.UNDIFF_Q: Site.Q, Op.UNDIFF_K: Site.K, Op.SCALE_V: Site.O_IN}[op]
    if op in SCALING_OPS:
        check_eps(op, eps)
    if op is Op.UNDIFF_K and s.n_kv_heads != s.n_heads:
        raise UsageError("undiff_k is ambiguous under GQA (a key head serves several query heads); use undiff_q, "
                         "scale_v or mean")
    if tuple(gates.shape) != (s.n_layers, s.n_heads):
        raise UsageError(f"gates must be (layers, heads) = {(s.n_layers, s.n_heads)}, got {tuple(gates.shape)}")
    devices = arch.layer_devices(model)

    def transform(layer: int, x: torch.Tensor) -> torch.Tensor:
        g = gates[layer].to(devices[layer])
        out = x.clone()
        view = arch.part_view(out, site)  # (rows, seq, heads, d_head)
        view.copy_(apply_gates(arch.part_view(x, site), g, op, eps))
        return out

    handles = []
    try:
        for layer in range(s.n_layers):
            module = arch.site_module(model, layer, site)
            if site is Site.O_IN:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, layer=layer: (transform(layer, args[0]), *args[1:])))
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, layer=layer: transform(layer, out)))
        yield
    finally:
        for handle in handles:
            handle.remove()
