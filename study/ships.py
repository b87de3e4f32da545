"""Query-level Ships: KL(normal || head ablated) of the next-token distribution, per prompt and head."""

from __future__ import annotations

import logging

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from study.ablation import Ablation
from study.config import ShipsConfig
from study.engine import ScanEngine
from study.heads import all_heads
from study.inputs import Inputs
from study.schema import make_table
from study.scores import rank_desc

log = logging.getLogger(__name__)


def ships_table(cfg: ShipsConfig, inputs: Inputs, run_id: str) -> pa.Table:
    """Score every head on every prompt and return the `ships` table (rank 1 = largest KL per prompt)."""
    engine = ScanEngine(inputs.lm.model, inputs.lm.tokenizer.pad_token_id, token_budget=cfg.token_budget)
    shape = engine.arch.shape
    heads = all_heads(shape.n_layers, shape.n_heads)
    ablations = [Ablation(heads=(h,), op=cfg.op, eps=cfg.eps) for h in heads]
    n_rows = len(heads) * len(inputs.token_ids)
    with tqdm(total=n_rows, desc=f"ships {inputs.lm.name}", unit="row", disable=None) as bar:
        result = engine.scan(inputs.token_ids, ablations, kl=True, progress=bar.update)
    kl = result.kl.T.contiguous()  # (prompts, heads)
    rank = rank_desc(kl)  # (prompts, heads)
    meta = inputs.meta(run_id, cfg)
    n_p, n_h = kl.shape
    prompts = list(inputs.prompts.prompts)
    columns = {k: [v] * (n_p * n_h) for k, v in meta.items()}
    columns.update(
        prompt_id=[p.id for p in prompts for _ in heads],
        prompt=[p.text for p in prompts for _ in heads],
        layer=[h.layer for _ in prompts for h in heads],
        head=[h.head for _ in prompts for h in heads],
        head_label=[h.label for _ in prompts for h in heads],
        op=[cfg.op.value] * (n_p * n_h),
        eps=[cfg.eps] * (n_p * n_h),
        kl=kl.flatten().tolist(),
        rank=rank.flatten().to(torch.int64).tolist(),
    )
    log.info("ships: %d prompts x %d heads, %d rows computed, %d layer-rows", n_p, n_h, result.rows_run,
             result.layer_rows)
    return make_table("ships", columns)
