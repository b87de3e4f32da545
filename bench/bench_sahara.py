"""Benchmark Sahara steps: the prefix-reusing scorer against the naive strategy, on the same machine.

One Sahara step with chosen group G scores every candidate G ∪ {h} by generalized Ships over the prompt set.
The naive strategy runs one full forward (batch 1, fp32, LM head everywhere) per candidate per prompt. The
engine caches the G-ablated model's residuals once and starts each candidate at layer(h)
(`study.runtime.worker.GeneralizedShipsScorer`). Per-forward naive cost does not depend on the candidate, so the naive
step is timed on an evenly spread subset of candidates and extrapolated linearly to all of them; the engine is
timed on the full step. Both give the same scores (checked on the subset).

    python bench/bench_sahara.py --prompts 16 --naive-candidates 6
    python bench/bench_sahara.py --prompts 100 --search-steps 3      # also time a full 3-step search
    python bench/bench_sahara.py --prompts 100 --prompt-set advbench --data-dir ../shared/data --search-steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from study.core.ablation import Ablation
from study.core.engine import ScanEngine, naive_scan
from study.core.heads import all_heads
from study.core.scores import generalized_ships_batch
from study.core.search import sahara
from study.core.subspace import SubspaceSpec
from study.models.builtin import DEFAULT_MODEL
from study.models.loading import load_model
from study.prompts.formats import PromptFormat, encode
from study.prompts.sets import load_prompts
from study.runtime.worker import GeneralizedShipsScorer

SPEED_TARGET = 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-set", default=None,
                    help="a prompt set spec (e.g. advbench with --data-dir); default: builtin harmful, then benign")
    ap.add_argument("--data-dir", default=None, help="folder of the known benchmark sets")
    ap.add_argument("--naive-candidates", type=int, default=6)
    ap.add_argument("--budget", type=int, default=None, help="engine tokens per forward (default: the device's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--search-steps", type=int, default=0, help="also time a full search of this many steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # figures appear as they are measured, even into a file

    lm = load_model(args.model)
    if args.prompt_set:
        texts = load_prompts(args.prompt_set, data_dir=args.data_dir, limit=args.prompts).texts
    else:  # the built-in harmful set, then benign prompts when more are asked for
        texts = load_prompts("builtin:harmful").texts + load_prompts("builtin:benign").texts
    ids = [encode(t, PromptFormat.PAPER, lm.tokenizer) for t in texts[: args.prompts]]
    engine = ScanEngine(lm.model, lm.tokenizer.pad_token_id, token_budget=args.budget)
    shape = engine.arch.shape
    heads = all_heads(shape.n_layers, shape.n_heads)
    spec = SubspaceSpec.paper()
    engine.scan(ids[:2], [Ablation(heads=(heads[0],))], kl=False)  # warm-up

    t0 = time.perf_counter()
    bar = tqdm(unit="row", desc="engine rows", disable=None)
    scorer = GeneralizedShipsScorer(engine, ids, spec, Ablation().op, 1e-5, progress=bar.update)
    step1 = scorer((), heads)
    t_step1 = time.perf_counter() - t0
    group = (heads[max(range(len(heads)), key=lambda i: step1[i])],)
    cands = [h for h in heads if h not in group]
    t0 = time.perf_counter()
    step2 = scorer(group, cands)
    t_step2 = time.perf_counter() - t0

    subset = cands[:: max(1, len(cands) // args.naive_candidates)][: args.naive_candidates]
    t0 = time.perf_counter()
    naive = naive_scan(lm.model, ids, [Ablation(heads=group + (h,)) for h in subset], kl=False)
    t_naive_subset = time.perf_counter() - t0
    normal = naive_scan(lm.model, ids, [Ablation()], kl=False).hidden[0].double()
    naive_scores = generalized_ships_batch(normal, naive.hidden.double(), spec)
    engine_scores = torch.tensor([step2[cands.index(h)] for h in subset], dtype=torch.float64)
    max_abs = float((naive_scores - engine_scores).abs().max())
    naive_step = t_naive_subset / len(subset) * len(cands)

    fig = dict(model=lm.model_id, prompt_set=args.prompt_set or "builtin:harmful+benign", cpu_count=os.cpu_count(), threads=torch.get_num_threads(), prompts=len(ids),
               mean_len=sum(map(len, ids)) / len(ids), candidates=len(cands), token_budget=engine.token_budget, engine_step1_s=t_step1,
               engine_step2_s=t_step2, naive_step_s_extrapolated=naive_step, naive_subset=len(subset),
               ratio_step2=naive_step / t_step2, max_abs_angle_diff_deg=max_abs,
               max_angle_deg=float(naive_scores.abs().max()))
    print(f"model {fig['model']}  threads {fig['threads']}  prompts {fig['prompts']} "
          f"(mean {fig['mean_len']:.1f} tokens)  candidates {len(cands)}")
    print(f"engine: step 1 {t_step1:.1f} s (incl. normal pass), step 2 {t_step2:.1f} s")
    print(f"naive:  {t_naive_subset:.1f} s for {len(subset)} candidates -> {naive_step:.1f} s per step (extrapolated)")
    print(f"ratio (step 2): {fig['ratio_step2']:.1f}x   [{'PASS' if fig['ratio_step2'] >= SPEED_TARGET else 'MISS'}"
          f" against {SPEED_TARGET:.0f}x]")
    print(f"agreement: max |angle diff| {max_abs:.2e} deg (largest angle {fig['max_angle_deg']:.3g} deg)")

    if args.search_steps:
        t0 = time.perf_counter()
        steps = sahara(heads, scorer, args.search_steps)
        fig["search_steps"] = args.search_steps
        fig["search_s"] = time.perf_counter() - t0
        fig["search_group"] = [s.chosen.label for s in steps]
        print(f"{args.search_steps}-step search on {len(ids)} prompts: {fig['search_s']:.1f} s, "
              f"group {', '.join(fig['search_group'])}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(fig) + "\n")


if __name__ == "__main__":
    main()
