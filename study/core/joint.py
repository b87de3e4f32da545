"""The joint head-group search: every head's gate optimised at once through the real forward pass.

Sahara grows a group one head at a time and scores every candidate with its own forward pass; here each head
has a gate g in [0, 1] (`study.core.gates`: 0 normal, 1 ablated by the same operator) and one forward and one
backward pass per step move all of them. The objective is one of
- `refusal`: the drop of the probability p of the model's own refusal openings (given per prompt), optimised as
  the rise of log(1 - p): p sits near 1 on a refusing model, where log p is flat and log(1 - p) is not;
- `subspace`: Sahara's, how far the gated model's final-norm, last-prompt-token states move from the normal
  model's (the principal angles between the two top-r singular subspaces), optimised as the log of the sum of
  the angles' squared sines (scale-free: the angles of a small model's heads are fractions of a degree);
minus a sparsity penalty: L1 on g = sigmoid(theta), or the expected number of open hard-concrete gates (stochastic
gates that are often exactly 0 or 1). The group of size k is the k heads with the largest final gates.
"""

from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from study.core.architectures import Arch
from study.core.errors import UsageError
from study.core.gates import gated
from study.core.heads import Head
from study.core.joint_spec import JointSettings, JointState, Objective
from study.core.scores import generalized_ships, log_softmax_fp, subspace_basis

log = logging.getLogger(__name__)

__all__ = ["JointResult", "group_objective", "group_objectives", "joint_search", "top_group"]


@dataclass(frozen=True)
class JointResult:
    gates: torch.Tensor  # (layers, heads) float64, the final gates
    history: tuple[dict[str, float], ...]  # every step: loss, objective, penalty, open (gates > 0.5 after it)
    gate_history: tuple[tuple[float, ...], ...]  # every step's gates after its update, (layers * heads) each
    forward_passes: int  # full-model passes over the prompt batch (each step: one forward and one backward)
    backward_passes: int
    state: JointState  # where the search stands: a later call goes on from here

    def heads(self) -> list[Head]:
        """Every head, largest gate first (ties: layer, then head)."""
        return top_group(self.gates, self.gates.numel())


def top_group(gates: torch.Tensor, k: int) -> list[Head]:
    """The k heads with the largest gates, largest first; ties go to the earlier head."""
    n_layers, n_heads = gates.shape
    flat = gates.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return [Head(i // n_heads, i % n_heads) for i in order[:k]]


HC_BETA, HC_LOW, HC_HIGH = 2 / 3, -0.1, 1.1  # hard concrete (Louizos et al. 2018): temperature and stretch


def _uniform(theta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(theta.shape, generator=gen, dtype=theta.dtype).clamp(1e-6, 1 - 1e-6).to(theta.device)


def _hard_concrete(theta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(layers, heads) gates of the stretched, clamped concrete of location theta at the uniform draw u: often
    exactly 0 or 1."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + theta) / HC_BETA)
    return (s * (HC_HIGH - HC_LOW) + HC_LOW).clamp(0.0, 1.0)


def _gate_mean(theta: torch.Tensor, sparsity: str) -> torch.Tensor:
    """The deterministic gates a search ends with."""
    if sparsity == "hard_concrete":
        return (torch.sigmoid(theta) * (HC_HIGH - HC_LOW) + HC_LOW).clamp(0.0, 1.0)
    return torch.sigmoid(theta)


def _log1m_exp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp <= 0, accurate at both ends."""
    logp = logp.clamp_max(-1e-12)
    return torch.where(logp > -0.6931, torch.log(-torch.expm1(logp)), torch.log1p(-logp.exp()))


def _padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (batch, seq) ids and mask: position ids then start at 0 in every row."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.as_tensor(list(p))
        mask[i, :len(p)] = 1
    return ids.to(device), mask.to(device)


class _Measure:
    """The objective's forward pass over the prompt batch, and its value for the normal model."""

    def __init__(self, model: nn.Module, arch: Arch, prompts: Sequence[Sequence[int]], pad_id: int,
                 settings: JointSettings, targets: Sequence[Sequence[int]] | None) -> None:
        self.model, self.arch, self.settings = model, arch, settings
        device = next(model.parameters()).device
        if settings.objective is Objective.REFUSAL:
            if targets is None or len(targets) != len(prompts) or any(len(t) == 0 for t in targets):
                raise UsageError("the refusal objective needs one non-empty answer opening per prompt")
            rows = [list(p) + list(t) for p, t in zip(prompts, targets)]
            # position j predicts token j + 1: the opening's tokens are predicted from len(prompt) - 1 on
            self.positions = [(len(p) - 1, len(t)) for p, t in zip(prompts, targets)]
            self.targets = [list(t) for t in targets]
        else:
            rows = [list(p) for p in prompts]
        self.ids, self.mask = _padded(rows, pad_id, device)
        self.last = torch.as_tensor([len(p) - 1 for p in prompts], device=device)
        with torch.no_grad():
            self.normal = self._all()
        if settings.objective is Objective.SUBSPACE:
            self.basis = subspace_basis(self.normal, settings.subspace)  # (n | d, r)

    def _chunks(self) -> list[slice]:
        """The prompt rows of each forward pass (`settings.batch_prompts` at a time; all at once without it)."""
        n = self.ids.shape[0]
        size = self.settings.batch_prompts or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _raw(self, rows: slice = slice(None)) -> torch.Tensor:
        """subspace: (prompts, d_model) final-norm states at the last prompt token; refusal: (prompts,) each
        opening's log-probability (the sum over its tokens); for the prompts `rows`."""
        ids, mask = self.ids[rows], self.mask[rows]
        if self.settings.objective is Objective.SUBSPACE:
            states: list[torch.Tensor] = []
            hook = self.arch.final_norm(self.model).register_forward_hook(lambda m, a, o: states.append(o))
            try:
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                hook.remove()
            index = torch.arange(ids.shape[0], device=ids.device)
            return states[-1][index, self.last[rows]].to(torch.float64)  # (prompts, d_model)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = []
        for i, ((start, n), target) in enumerate(zip(self.positions[rows], self.targets[rows])):
            logp = log_softmax_fp(logits[i, start:start + n])  # (n, vocab)
            out.append(logp.gather(-1, torch.as_tensor(target, device=logp.device)[:, None]).sum())
        return torch.stack(out).to(torch.float64)  # (prompts,)

    def _all(self) -> torch.Tensor:
        return torch.cat([self._raw(rows) for rows in self._chunks()])

    def _value(self, raw: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """The smooth objective of `raw` (every prompt, or the refusal objective's share of `rows`)."""
        if self.settings.objective is Objective.SUBSPACE:
            moved = subspace_basis(raw, self.settings.subspace)  # (n | d, r)
            sin2 = self.settings.subspace.rank - (self.basis.mT @ moved).square().sum()  # sum of sin^2
            return torch.log(sin2.clamp_min(1e-30))
        return (_log1m_exp(raw) - _log1m_exp(self.normal[rows])).sum() / self.normal.shape[0]

    def ascend(self, gates: Callable[[], torch.Tensor]) -> float:
        """Add the gradient of minus the smooth objective to the gates' logits, one forward and one backward pass
        per chunk of prompts (`gates()` rebuilds the gates' graph for each); returns the objective. Exact in
        chunks: the refusal objective is a sum over prompts, and the subspace objective's gradient with respect to
        the states (the SVD couples the prompts) is taken once, then pulled back chunk by chunk."""
        chunks = self._chunks()
        s = self.settings
        if s.objective is Objective.REFUSAL or len(chunks) == 1:
            total = 0.0
            for rows in chunks:
                with gated(self.model, gates(), s.op, s.eps, self.arch):
                    value = self._value(self._raw(rows), rows)
                (-value).backward()
                total += float(value.detach())
            return total
        with torch.no_grad(), gated(self.model, gates().detach(), s.op, s.eps, self.arch):
            states = self._all().requires_grad_(True)  # (prompts, d_model)
        with torch.enable_grad():
            value = self._value(states)
            (d_states,) = torch.autograd.grad(value, states)  # (prompts, d_model)
        for rows in chunks:
            with gated(self.model, gates(), s.op, s.eps, self.arch):
                (-(self._raw(rows) * d_states[rows]).sum()).backward()
        return float(value.detach())

    def exact(self) -> float:
        """The objective as reported: subspace in degrees (generalized Ships' sum of angles), refusal as the drop of
        the openings' mean probability."""
        with torch.no_grad():
            value = self._all()
        if self.settings.objective is Objective.SUBSPACE:
            return generalized_ships(self.normal, value, self.settings.subspace)
        return float((self.normal.exp() - value.exp()).mean())


def _rng_state(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode("ascii")


def _set_rng_state(gen: torch.Generator, text: str) -> None:
    gen.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))


def joint_search(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, settings: JointSettings,
                 targets: Sequence[Sequence[int]] | None = None,
                 on_step: Callable[[dict[str, float]], None] | None = None, state: JointState | None = None,
                 until: int | None = None) -> JointResult:
    """Optimise every head's gate at once for `settings.objective` on `prompts` (token ids); the model's own
    weights stay frozen and untouched. `targets`: the answer openings of the refusal objective, one per prompt.
    From `state` (a search's `JointResult.state`) it goes on where that one stopped; `until` stops it after that
    many steps in all (default `settings.steps`). Links run this way end bit for bit where one search would."""
    if not prompts:
        raise UsageError("the joint search needs at least one prompt")
    if settings.objective is Objective.SUBSPACE and settings.subspace.side == "left" \
            and settings.subspace.rank > len(prompts):
        raise UsageError(f"subspace rank {settings.subspace.rank} needs at least {settings.subspace.rank} prompts")
    arch = Arch.of(model)
    s = arch.shape
    first = state.step if state else 0
    until = settings.steps if until is None else until
    if not first < until <= settings.steps:
        raise ValueError(f"a joint search link runs steps {first + 1}..{until}, outside 1..{settings.steps}")
    device = next(model.parameters()).device
    measure = _Measure(model, arch, prompts, pad_id, settings, targets)
    gen = torch.Generator().manual_seed(settings.seed)
    if state is None:
        start = torch.logit(torch.tensor(settings.init, dtype=torch.float64))
        theta = start + settings.jitter * torch.randn(s.n_layers, s.n_heads, generator=gen, dtype=torch.float64)
    else:
        if len(state.theta) != s.n_layers * s.n_heads:
            raise ValueError(f"a joint search state of {len(state.theta)} heads for a model of "
                             f"{s.n_layers * s.n_heads}")
        theta = torch.tensor(state.theta, dtype=torch.float64).reshape(s.n_layers, s.n_heads)
        _set_rng_state(gen, state.rng)
    theta = theta.to(device).requires_grad_(True)  # (layers, heads)
    opt = torch.optim.Adam([theta], lr=settings.lr)
    if state is not None:
        moments = opt.state_dict()
        moments["state"] = {0: {"step": torch.tensor(float(state.step)),
                                "exp_avg": torch.tensor(state.adam_m, dtype=torch.float64).reshape(theta.shape),
                                "exp_avg_sq": torch.tensor(state.adam_v, dtype=torch.float64).reshape(theta.shape)}}
        opt.load_state_dict(moments)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    history: list[dict[str, float]] = []
    gate_history: list[tuple[float, ...]] = []
    try:
        for step in range(first + 1, until + 1):
            opt.zero_grad()
            if settings.sparsity == "hard_concrete":
                noise = _uniform(theta, gen)  # one draw per step, shared by every chunk of prompts
                penalty = settings.l1 * torch.sigmoid(theta - HC_BETA * math.log(-HC_LOW / HC_HIGH)).sum()
                objective = measure.ascend(lambda: _hard_concrete(theta, noise))
            else:
                penalty = settings.l1 * torch.sigmoid(theta).sum()
                objective = measure.ascend(lambda: torch.sigmoid(theta))
            penalty.backward()
            opt.step()
            loss = float(penalty.detach()) - objective
            now = _gate_mean(theta.detach(), settings.sparsity)  # (layers, heads)
            gate_history.append(tuple(now.reshape(-1).tolist()))
            row = {"step": step, "loss": loss, "objective": objective, "penalty": float(penalty.detach()),
                   "open": int((now > 0.5).sum())}
            history.append(row)
            if on_step:
                on_step(row)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    moments = opt.state[theta]
    end = JointState(step=until, theta=tuple(theta.detach().reshape(-1).tolist()),
                     adam_m=tuple(moments["exp_avg"].reshape(-1).tolist()),
                     adam_v=tuple(moments["exp_avg_sq"].reshape(-1).tolist()), rng=_rng_state(gen))
    gates = _gate_mean(theta.detach(), settings.sparsity).cpu()
    log.info("joint search: steps %d-%d of %d, top heads %s", first + 1, until, settings.steps,
             ", ".join(h.label for h in top_group(gates, 5)))
    # in chunks, the subspace objective takes one more forward pass a step (the states without a graph, first)
    per_step = 2 if settings.objective is Objective.SUBSPACE and len(measure._chunks()) > 1 else 1
    return JointResult(gates, tuple(history), tuple(gate_history), forward_passes=1 + per_step * (until - first),
                       backward_passes=until - first, state=end)


def group_objectives(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, settings: JointSettings,
                     groups: Sequence[Sequence[Head]], targets: Sequence[Sequence[int]] | None = None) -> list[float]:
    """The objective (`exact` units) of ablating each group outright (gates 1 on it, 0 elsewhere), against one
    pass of the normal model."""
    arch = Arch.of(model)
    s = arch.shape
    measure = _Measure(model, arch, prompts, pad_id, settings, targets)
    out = []
    for group in groups:
        g = torch.zeros(s.n_layers, s.n_heads, dtype=torch.float64)
        for h in group:
            h.check(s.n_layers, s.n_heads)
            g[h.layer, h.head] = 1.0
        with gated(model, g.to(next(model.parameters()).device), settings.op, settings.eps, arch):
            out.append(measure.exact())
    return out


def group_objective(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, settings: JointSettings,
                    group: Sequence[Head], targets: Sequence[Sequence[int]] | None = None) -> float:
    """The objective (`exact` units) of ablating `group` outright."""
    return group_objectives(model, prompts, pad_id, settings, [group], targets)[0]
