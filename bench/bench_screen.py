"""Benchmark screening: every head scored in low precision, each prompt's top K re-scored exactly, against
the exact scan, on the same machine and prompts.

Reports the time of each (the low-precision copy of the model is made before timing), the time saved, how
many rows were re-scored, and how often a prompt's top-10 heads equal the exact top-10: for the screen alone
and after re-scoring (what a ranking then reads).

    python bench/bench_screen.py --prompts 8 --verify-top 20
    python bench/bench_screen.py --prompts 8 --format chat --verify-top 10 --json bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from study.core.ablation import Ablation
from study.core.engine import ScanEngine
from study.core.heads import all_heads
from study.core.screening import screen_copy, screened_scan, top_agreement
from study.family.eval import SAFETY_SYSTEM_PROMPT
from study.models.builtin import DEFAULT_MODEL
from study.models.loading import load_model
from study.prompts.formats import PromptFormat, encode_all
from study.prompts.sets import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=8, help="the first N prompts of --prompt-set")
    ap.add_argument("--prompt-set", default="advbench")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    ap.add_argument("--format", default="direct", choices=["direct", "chat", "paper"],
                    help="chat uses the safety system prompt of the README's family table")
    ap.add_argument("--screen", default="bf16", help="bf16 or fp16")
    ap.add_argument("--verify-top", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="append the figures as one JSON line to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model, device=args.device, dtype="float32")
    fmt = PromptFormat(args.format)
    system = SAFETY_SYSTEM_PROMPT if fmt is PromptFormat.CHAT else None
    ids = encode_all(load_prompts(args.prompt_set, limit=args.prompts, data_dir=args.data_dir), fmt, lm.tokenizer,
                     system)
    shape = ScanEngine(lm.model, lm.tokenizer.pad_token_id).arch.shape
    ablations = [Ablation(heads=(h,)) for h in all_heads(shape.n_layers, shape.n_heads)]
    pad = lm.tokenizer.pad_token_id
    exact = ScanEngine(lm.model, pad)
    screen = ScanEngine(screen_copy(lm.model, args.screen), pad)
    for engine in (exact, screen):  # warm-up
        engine.scan(ids, ablations[:20], hidden=False)

    t0 = time.perf_counter()
    ref = exact.scan(ids, ablations, hidden=False).kl
    exact_s = time.perf_counter() - t0
    res = screened_scan(exact, screen, ids, ablations, verify_top=args.verify_top)
    screened_s = res.screen_seconds + res.verify_seconds
    verified = int(res.exact[:, 0].sum())
    fig = {
        "model": args.model, "prompts": len(ids), "format": args.format, "heads": len(ablations),
        "screen": args.screen, "verify_top": args.verify_top, "threads": args.threads, "device": args.device,
        "exact_s": exact_s, "screen_s": res.screen_seconds, "verify_s": res.verify_seconds,
        "screened_total_s": screened_s, "speedup": exact_s / screened_s, "heads_rescored": verified,
        "top10_screen_only": top_agreement(res.screen_kl, ref, 10),
        "top10_after_verify": top_agreement(res.kl, ref, 10),
        "top1_after_verify": top_agreement(res.kl, ref, 1),
    }
    print(f"{args.model}, {len(ids)} {args.prompt_set} prompts ({args.format}), {len(ablations)} heads, "
          f"{args.threads} threads, {args.device}")
    print(f"exact scan (float32): {exact_s:.1f} s")
    print(f"screened ({args.screen}, top {args.verify_top} per prompt re-scored): {screened_s:.1f} s "
          f"(screen {res.screen_seconds:.1f} s + re-score {verified} heads {res.verify_seconds:.1f} s): "
          f"{fig['speedup']:.2f}x")
    print(f"prompts whose top-10 equals the exact top-10: screen alone {fig['top10_screen_only']:.0%}, "
          f"after re-scoring {fig['top10_after_verify']:.0%}; top-1 after re-scoring {fig['top1_after_verify']:.0%}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(fig) + "\n")


if __name__ == "__main__":
    main()
