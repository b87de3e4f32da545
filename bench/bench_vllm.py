"""Benchmark ablated greedy generation: vLLM (head edits inside the workers) against HF `generate` with hooks.

Same prompts (AdvBench in the paper format where ../shared/data is present, else the built-in harmful set,
repeated to the batch size), same ablation (`undiff_q`, eps 1e-5, 3 heads), greedy, float32:

- vllm: `actors.vllm_engine.VllmGenerator.generate` for 1, 6 and 24 prompts at once; its time includes the
  apply + prefix cache reset before and the restore + reset after;
- hf: `model.generate(do_sample=False)` inside `study.core.interventions.ablated` (hooks), the same prompts as one
  left-padded batch, run before the engine starts (never next to its processes).

Tokens/s counts the generated tokens of each prompt up to and including its EOS. Also timed: one
apply + restore (each followed by a prefix cache reset) for 1 and 4 heads, the median of `--edit-repeats`.
`same` counts the prompts whose vLLM continuation equals HF's (left padding changes HF's float32 rounding,
so a rare difference there is not a parity failure; tests/integration/test_vllm.py checks parity unpadded).
Figures on a machine shared with other jobs are meaningless: check the load first.

    python bench/bench_vllm.py                      # the embedded SmolLM2, 64 new tokens
    python bench/bench_vllm.py --new-tokens 32 --sizes 1,6 --json bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from study.core.ablation import Ablation, Op
from study.core.heads import Head
from study.core.interventions import ablated
from study.models.builtin import ALIASES, DEFAULT_MODEL, materialize_alias
from study.models.loading import load_model
from study.prompts.formats import PromptFormat, encode_all
from study.prompts.sets import load_prompts

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ABLATION = Ablation(heads=(Head(0, 3), Head(9, 5), Head(18, 8)), op=Op.UNDIFF_Q, eps=1e-5)
EDITS_1 = [(9, "q", 5, 1e-5)]
EDITS_4 = [(0, "q", 3, 1e-5), (9, "q", 5, 1e-5), (9, "q", 6, 1e-5), (18, "o_in", 8, 1e-5)]


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    if (SHARED_DATA / "advbench").is_dir():
        pset = load_prompts("advbench", data_dir=SHARED_DATA, limit=n)
    else:
        pset = load_prompts("builtin:harmful")
    ids = encode_all(pset, PromptFormat.PAPER, tokenizer)
    return [ids[i % len(ids)] for i in range(n)]


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos) + 1] if eos in row else row


def n_tokens(rows: list[list[int]], eos: int) -> int:
    return sum(len(until_eos(r, eos)) for r in rows)


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad: int) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad(), ablated(model, ABLATION):
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad)
    return out[:, width:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--sizes", default="1,6,24", help="numbers of prompts per generate call")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--edit-repeats", type=int, default=10)
    ap.add_argument("--reserved-cpus", type=int, default=0,
                    help="VLLM_CPU_NUM_OF_RESERVED_CPU (vLLM's default keeps one core off the worker: half the "
                         "cores of a 2-core machine, while HF uses them all)")
    ap.add_argument("--json", default=None, help="append the figures as one JSON line")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(args.reserved_cpus))
    sizes = [int(s) for s in args.sizes.split(",")]

    from actors.vllm_engine import VllmGenerator, edits_for

    hf = load_model(args.model, dtype="float32")
    eos = hf.tokenizer.eos_token_id
    # HF first, with no engine alive: the engine's processes would compete with it for the cores
    hf_generate(hf.model, prompt_ids(hf.tokenizer, 2), 4, eos)  # warm-up
    hf_runs = {}
    for n in sizes:
        prompts = prompt_ids(hf.tokenizer, n)
        t = time.perf_counter()
        hf_runs[n] = (hf_generate(hf.model, prompts, args.new_tokens, eos), time.perf_counter() - t)

    path = materialize_alias(args.model) if args.model in ALIASES else args.model
    start = time.perf_counter()
    engine = VllmGenerator(str(path), dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")
    engine_start = time.perf_counter() - start
    edits = edits_for(ABLATION)
    rows = []
    try:
        engine.generate(prompt_ids(hf.tokenizer, 2), edits, max_new_tokens=4)  # warm-up
        for n in sizes:
            prompts = prompt_ids(hf.tokenizer, n)
            t = time.perf_counter()
            out = engine.generate(prompts, edits, greedy=True, top_k=0, temperature=0.0,
                                  max_new_tokens=args.new_tokens, samples=1, seed=0)
            v_s = time.perf_counter() - t
            v_tok = n_tokens([o[0] for o in out], eos)
            ref, h_s = hf_runs[n]
            h_tok = n_tokens(ref, eos)
            same = sum(until_eos(a[0], eos) == until_eos(b, eos) for a, b in zip(out, ref))
            rows.append(dict(prompts=n, vllm_s=v_s, vllm_tokens=v_tok, vllm_tok_s=v_tok / v_s, hf_s=h_s,
                             hf_tokens=h_tok, hf_tok_s=h_tok / h_s, speedup=(v_tok / v_s) / (h_tok / h_s),
                             same_tokens=same))
        edit_ms = {}
        for label, e in (("1 head", EDITS_1), ("4 heads", EDITS_4)):
            times = [engine.time_edit(e) for _ in range(args.edit_repeats)]
            edit_ms[label] = 1000 * statistics.median(times)
    finally:
        engine.close()

    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, float32; model {args.model}; "
          f"ablation {ABLATION.label}; greedy, <= {args.new_tokens} new tokens; HF torch threads "
          f"{torch.get_num_threads()}, VLLM_CPU_NUM_OF_RESERVED_CPU={os.environ['VLLM_CPU_NUM_OF_RESERVED_CPU']}")
    print(f"vLLM engine start: {engine_start:.1f} s")
    print(f"{'prompts':>7} | {'vLLM tok/s':>10} | {'HF tok/s':>8} | {'ratio':>5} | {'vLLM s':>6} | {'HF s':>6} | "
          f"{'tokens v/hf':>11} | same")
    for r in rows:
        print(f"{r['prompts']:>7} | {r['vllm_tok_s']:>10.1f} | {r['hf_tok_s']:>8.1f} | {r['speedup']:>5.1f} | "
              f"{r['vllm_s']:>6.2f} | {r['hf_s']:>6.2f} | {r['vllm_tokens']:>5}/{r['hf_tokens']:<5} | "
              f"{r['same_tokens']}/{r['prompts']}")
    for label, ms in edit_ms.items():
        print(f"apply + restore + 2 prefix cache resets, {label}: {ms:.1f} ms (median of {args.edit_repeats})")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(model=args.model, new_tokens=args.new_tokens, engine_start_s=engine_start,
                                    rows=rows, edit_ms=edit_ms)) + "\n")


if __name__ == "__main__":
    main()
