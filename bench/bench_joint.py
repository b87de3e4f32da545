"""Compute of the two head-group searches as the number of heads grows: Sahara (greedy; the prefix-reusing
scorer a study uses) against the joint search (every head's gate at once), on random Llamas of 64, 256 and
1,024 heads, the same prompts and the same objective (Sahara's subspace: r = 1, left, uncentred; undiff_q).

The models keep 16 heads of width 16 per layer and grow in depth (4, 16 and 64 layers), as real models grow in
both. Work is counted in forward-pass equivalents over the prompt batch: a Sahara step scores each candidate
from its own layer on (cached residuals below it), so a candidate in layer l costs (L - l) / L of a forward,
plus one forward for the group's residuals; a joint step is one forward and one backward (counted as two
forwards), plus the normal model's forward once. Wall time is measured on this machine. Random weights: the groups found mean nothing, only the cost does.

    python bench/bench_joint.py                       # 64, 256 and 1,024 heads
    python bench/bench_joint.py --heads 64 --joint-steps 50 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from study.core.ablation import Op
from study.core.engine import ScanEngine
from study.core.heads import all_heads
from study.core.joint import joint_search, top_group
from study.core.joint_spec import JointSettings, Objective
from study.core.search import sahara
from study.core.subspace import SubspaceSpec
from study.runtime.worker import GeneralizedShipsScorer

HEADS_PER_LAYER = 16
HEAD_DIM = 16
VOCAB = 1024


def tiny_llama(n_heads: int, seed: int = 0):
    layers = n_heads // HEADS_PER_LAYER
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS_PER_LAYER * HEAD_DIM, intermediate_size=512,
                      num_hidden_layers=layers, num_attention_heads=HEADS_PER_LAYER,
                      num_key_value_heads=HEADS_PER_LAYER, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(16, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="64,256,1024", help="comma-separated head counts (multiples of 16)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--sahara-steps", type=int, default=3)
    ap.add_argument("--joint-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="append one line of figures per model to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)
    ids = prompts(args.prompts)
    spec = SubspaceSpec.paper()
    k = args.sahara_steps
    print(f"{args.prompts} prompts of 16-24 tokens, {torch.get_num_threads()} threads; Sahara {k} steps, joint "
          f"{args.joint_steps} steps, k {k}")
    print(f"{'heads':>6} {'layers':>6}  {'sahara fwd-eq':>13} {'sahara s':>9}  {'joint fwd-eq':>12} {'joint s':>8}")
    for n_heads in (int(x) for x in args.heads.split(",")):
        model = tiny_llama(n_heads)
        layers = n_heads // HEADS_PER_LAYER
        heads = all_heads(layers, HEADS_PER_LAYER)
        engine = ScanEngine(model, 0)

        t0 = time.perf_counter()
        scorer = GeneralizedShipsScorer(engine, ids, spec, Op.UNDIFF_Q, 1e-5)
        steps = sahara(heads, scorer, k)
        sahara_s = time.perf_counter() - t0
        sahara_fwd = 1.0  # the normal model's hidden states
        for st in steps:
            sahara_fwd += 1 + sum((layers - h.layer) / layers for h in st.candidates)

        t0 = time.perf_counter()
        settings = JointSettings(objective=Objective.SUBSPACE, steps=args.joint_steps)
        result = joint_search(model, ids, 0, settings)
        group = top_group(result.gates, k)
        joint_s = time.perf_counter() - t0
        joint_fwd = result.forward_passes + 2 * result.backward_passes

        print(f"{n_heads:>6} {layers:>6}  {sahara_fwd:>13.0f} {sahara_s:>9.1f}  {joint_fwd:>12.0f} {joint_s:>8.1f}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(heads=n_heads, layers=layers, prompts=len(ids), threads=torch.get_num_threads(),
                                        sahara_steps=k, sahara_forward_equivalents=sahara_fwd, sahara_s=sahara_s,
                                        sahara_group=[s.chosen.label for s in steps], joint_steps=args.joint_steps,
                                        joint_forward_equivalents=joint_fwd, joint_s=joint_s,
                                        joint_group=[h.label for h in group])) + "\n")


if __name__ == "__main__":
    main()
