"""Dataset-level attribution on one model: the generalized-Ships scorer and the `head_scores`/`sahara` tables.

`GeneralizedShipsScorer` is the batched score function the search (`study.search.sahara`) takes: for a
chosen group G it caches the G-ablated model's residuals once and starts every candidate G ∪ {h} at
layer(h), so a step costs far less than one forward per candidate per prompt.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from study.ablation import Ablation, Op
from study.config import SaharaConfig
from study.engine import ScanEngine
from study.heads import Head, all_heads
from study.inputs import Inputs
from study.schema import make_table
from study.scores import SubspaceSpec, generalized_ships_batch, rank_desc
from study.search import Step, final_group, sahara

log = logging.getLogger(__name__)

# candidates per engine call: bounds the (candidates, prompts, d_model) hidden-state block held at once
CANDIDATE_BLOCK = 128


class GeneralizedShipsScorer:
    """score(G, candidates)[i] = generalized Ships of G ∪ {candidates[i]} against the NORMAL model."""

    def __init__(self, engine: ScanEngine, token_ids: Sequence[Sequence[int]], spec: SubspaceSpec, op: Op,
                 eps: float, progress: Callable[[int], None] | None = None) -> None:
        self.engine, self.token_ids, self.spec, self.op, self.eps = engine, token_ids, spec, op, eps
        self.progress = progress
        normal = engine.scan(token_ids, [Ablation(op=op, eps=eps)], kl=False)
        self.normal = normal.hidden[0].double()  # (prompts, d_model)

    def __call__(self, group: tuple[Head, ...], candidates: Sequence[Head]) -> list[float]:
        base = Ablation(heads=group, op=self.op, eps=self.eps)
        scores: list[float] = []
        for i in range(0, len(candidates), CANDIDATE_BLOCK):
            block = [base.with_head(h) for h in candidates[i:i + CANDIDATE_BLOCK]]
            res = self.engine.scan(self.token_ids, block, base=base, kl=False, progress=self.progress)
            scores += generalized_ships_batch(self.normal, res.hidden.double(), self.spec).tolist()
        return scores


def run_sahara(cfg: SaharaConfig, inputs: Inputs, run_id: str,
               on_step: Callable[[Step], None] | None = None) -> tuple[pa.Table, pa.Table, list[Step]]:
    """Run the search on one model; return the `head_scores` (step 1) and `sahara` tables and the steps."""
    engine = ScanEngine(inputs.lm.model, inputs.lm.tokenizer.pad_token_id, token_budget=cfg.token_budget)
    shape = engine.arch.shape
    heads = all_heads(shape.n_layers, shape.n_heads)
    n_prompts = len(inputs.token_ids)
    total = sum(len(heads) - s for s in range(min(cfg.steps, len(heads)))) * n_prompts
    with tqdm(total=total, desc=f"sahara {inputs.lm.name}", unit="row", disable=None) as bar:
        scorer = GeneralizedShipsScorer(engine, inputs.token_ids, cfg.subspace_spec, cfg.op, cfg.eps, bar.update)
        steps = sahara(heads, scorer, cfg.steps, min_gain=cfg.min_gain, on_step=on_step)
    return head_scores_table(cfg, inputs, run_id, steps[0]), sahara_table(cfg, inputs, run_id, steps), steps


def _subspace_columns(cfg: SaharaConfig, n: int) -> dict[str, list]:
    return dict(op=[cfg.op.value] * n, eps=[cfg.eps] * n, subspace=[cfg.subspace] * n, rank_r=[cfg.rank] * n,
                centered=[cfg.center] * n)


def head_scores_table(cfg: SaharaConfig, inputs: Inputs, run_id: str, first: Step) -> pa.Table:
    n = len(first.candidates)
    rank = rank_desc(torch.tensor(first.scores, dtype=torch.float64))
    cols = {k: [v] * n for k, v in inputs.meta(run_id, cfg).items()}
    cols.update(layer=[h.layer for h in first.candidates], head=[h.head for h in first.candidates],
                head_label=[h.label for h in first.candidates], **_subspace_columns(cfg, n),
                angle_deg=list(first.scores), rank=rank.tolist())
    return make_table("head_scores", cols)


def sahara_table(cfg: SaharaConfig, inputs: Inputs, run_id: str, steps: Sequence[Step]) -> pa.Table:
    rows: dict[str, list] = {}
    meta = inputs.meta(run_id, cfg)
    for st in steps:
        n = len(st.candidates)
        part = {k: [v] * n for k, v in meta.items()}
        part.update(_subspace_columns(cfg, n), step=[st.step] * n, layer=[h.layer for h in st.candidates],
                    head=[h.head for h in st.candidates], head_label=[h.label for h in st.candidates],
                    group=[[h.label for h in st.group]] * n, score=list(st.scores),
                    chosen=[h == st.chosen for h in st.candidates])
        for k, v in part.items():
            rows.setdefault(k, []).extend(v)
    return make_table("sahara", rows)


def settled_group(cfg: SaharaConfig, steps: Sequence[Step]) -> tuple[Head, ...]:
    return final_group(steps, cfg.min_gain)
