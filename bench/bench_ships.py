"""Benchmark the Ships scan: the scan engine against the naive strategy, on the same machine.

Ships scores every single head h on every prompt p with KL(normal || ablated_h) of the next-token
distribution. The naive strategy (the authors') runs one full forward per head per prompt, batch 1, with
the LM head at every position. `study.engine.ScanEngine` batches many (ablation, prompt) rows per forward,
reuses the residual stream below each row's ablated layer and computes the LM head at the last position
only (DESIGN.md section 3). This script times both on the same prompts and heads, checks that they agree,
and prints the speed ratio against the targets (>= 10x, KL relative difference <= 1e-4).

The naive strategy's cost per forward does not depend on which head is ablated, so on CPU it is timed on an
evenly spread subset of heads and extrapolated linearly to all heads; the engine is also timed on exactly
that subset, for a like-for-like ratio.

    python bench/bench_ships.py --prompts 8 --heads all --budget 16384 --threads 2 --device cpu
    python bench/bench_ships.py --random-llama7b            # GPU: a random-weight Llama-2-7B shape, bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from study.ablation import Ablation, Op
from study.architectures import Arch
from study.engine import DEFAULT_TOKEN_BUDGET, ScanEngine, ScanResult, naive_scan
from study.heads import Head, all_heads, parse_heads
from study.models import DEFAULT_MODEL, load_model
from study.prompts import PromptFormat, encode_all, load_prompts

SPEED_TARGET = 10.0  # engine vs naive, all heads
REL_DIFF_TARGET = 1e-4  # max |kl_engine - kl_naive| / |kl_naive| (fp32)
REL_FLOOR = 1e-6  # relative differences are taken where the naive KL exceeds this
REL_DENOM_MIN = 1e-8
NAIVE_FULL_LIMIT_S = 180.0  # by default run the naive strategy on all heads if estimated under this
NAIVE_SUBSET_S = 60.0  # ... else on a subset of heads sized to take about this long
MIN_NAIVE_HEADS = 3
EPS = 1e-5
PROMPT_SET = "builtin:harmful"
DEFAULT_PROMPTS = 8
LLAMA7B_PROMPTS = 100
LLAMA7B_LEN = (20, 30)  # random prompt lengths, inclusive: about 25 tokens
LLAMA7B_SEED = 0


@dataclass
class Workload:
    """What is benchmarked: a model, token-id prompts and the heads to scan."""

    model: torch.nn.Module
    model_id: str
    pad_id: int
    prompts: list[list[int]]
    heads: list[Head]
    source: str  # where the prompts came from


@dataclass
class Figures:
    """Everything the benchmark reports (also the JSON line)."""

    model: str
    prompt_source: str
    device: str
    dtype: str
    cpu_count: int | None
    torch_threads: int
    torch_version: str
    cpu: str
    gpu: str | None
    n_prompts: int
    mean_prompt_len: float
    n_layers: int
    n_heads_model: int
    n_heads: int
    token_budget: int
    engine_s: float = math.nan
    engine_rows: int = 0
    engine_rows_per_s: float = math.nan
    engine_layer_fraction: float = math.nan  # layer-rows computed / (rows x layers): what prefix reuse saves
    naive_heads: int = 0
    naive_subset: list[str] = field(default_factory=list)
    naive_estimate_s: float = math.nan  # the pre-run estimate for all heads
    naive_s: float = math.nan  # measured, on naive_heads heads
    naive_forward_s: float = math.nan  # per forward, measured
    naive_rows_per_s: float = math.nan
    naive_all_s: float = math.nan  # measured (all heads) or extrapolated
    naive_all_extrapolated: bool = False
    engine_subset_s: float = math.nan
    ratio_all: float = math.nan  # naive_all_s / engine_s
    ratio_subset: float = math.nan  # naive_s / engine_subset_s (like for like)
    max_abs_diff: float = math.nan  # over the common subset, both engine runs
    max_rel_diff: float = math.nan
    max_abs_diff_rel_region: float = math.nan  # max abs diff where naive kl > REL_FLOOR
    kl_min: float = math.nan
    kl_max: float = math.nan
    agreement_checked: bool = True
    speed_pass: bool = False
    agree_pass: bool | None = None


# ----------------------------------------------------------------------------------------------- helpers

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """(fn(), seconds), with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """k items evenly spread over `items` (first and last included when k >= 2)."""
    n = len(items)
    k = max(1, min(k, n))
    if k == 1:
        return [items[n // 2]]
    idx = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def ablations_of(heads: Sequence[Head]) -> list[Ablation]:
    return [Ablation(heads=(h,), op=Op.UNDIFF_Q, eps=EPS) for h in heads]


def select_heads(spec: str, n_layers: int, n_heads: int) -> list[Head]:
    """`all`, a count K (K heads evenly spread over the model) or labels `L2H26,L3H8`."""
    heads = all_heads(n_layers, n_heads)
    if spec == "all":
        return heads
    if spec.isdigit():
        return spread(heads, int(spec))
    chosen = list(parse_heads(spec))
    for h in chosen:
        h.check(n_layers, n_heads)
    return chosen


def kl_diffs(engine_kl: torch.Tensor, naive_kl: torch.Tensor) -> dict[str, float]:
    """Absolute and relative differences, the naive strategy as the reference."""
    a, b = engine_kl.double(), naive_kl.double()
    diff = (a - b).abs()
    region = b > REL_FLOOR
    rel = diff[region] / b.abs()[region].clamp(min=REL_DENOM_MIN)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(rel.max()) if rel.numel() else 0.0,
        "max_abs_diff_rel_region": float(diff[region].max()) if region.any() else 0.0,
        "kl_min": float(b.min()),
        "kl_max": float(b.max()),
    }


# ----------------------------------------------------------------------------------------------- workloads

def embedded_workload(args: argparse.Namespace) -> Workload:
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    prompt_set = load_prompts(PROMPT_SET, limit=args.prompts)
    prompts = encode_all(prompt_set, PromptFormat.PAPER, loaded.tokenizer)
    shape = Arch.of(loaded.model).shape
    return Workload(loaded.model, loaded.model_id, loaded.tokenizer.pad_token_id, prompts,
                    select_heads(args.heads, shape.n_layers, shape.n_heads),
                    f"{PROMPT_SET} (paper format)")


def random_llama7b_workload(args: argparse.Namespace) -> Workload:
    """A Llama-2-7B-shaped model with random weights, built directly on the GPU, and random prompts."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    layers = args.llama_layers or 32
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(LLAMA7B_SEED)
    with torch.device(args.device):  # parameters are created where they run, never staged on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(LLAMA7B_SEED)
    lo, hi = LLAMA7B_LEN
    lengths = torch.randint(lo, hi + 1, (args.prompts,), generator=gen).tolist()
    prompts = [[1] + torch.randint(3, config.vocab_size, (n - 1,), generator=gen).tolist() for n in lengths]
    name = "random-llama-2-7b-shape" + (f" ({layers} layers)" if layers != 32 else "")
    return Workload(model, name, 0, prompts, select_heads(args.heads, layers, 32),
                    f"random tokens, {lo}-{hi} long (seed {LLAMA7B_SEED})")


# ----------------------------------------------------------------------------------------------- the bench

def estimate_naive_forward(work: Workload, device: str) -> float:
    """Seconds per naive forward, timed on up to two prompts (after a warm-up forward)."""
    probe = work.prompts[:2]
    one = ablations_of(work.heads[:1])
    naive_scan(work.model, probe[:1], one)  # warm-up
    _, seconds = timed(lambda: naive_scan(work.model, probe, one), device)
    return seconds / (2 * len(probe))  # a normal and an ablated forward per prompt


def choose_naive_heads(requested: int | None, n_heads: int, n_prompts: int, per_forward: float) -> int:
    if requested is not None:
        return max(1, min(requested, n_heads))
    if (n_heads + 1) * n_prompts * per_forward <= NAIVE_FULL_LIMIT_S:
        return n_heads
    fit = int(NAIVE_SUBSET_S / (n_prompts * per_forward)) - 1  # the normal forwards count too
    return max(MIN_NAIVE_HEADS, min(fit, n_heads))


def run_bench(work: Workload, args: argparse.Namespace, say: Callable[[str], None]) -> Figures:
    shape = Arch.of(work.model).shape
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    fig = Figures(
        model=work.model_id, prompt_source=work.source, device=args.device, dtype=args.dtype,
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
        cpu=platform.processor() or platform.machine(), gpu=gpu, n_prompts=len(work.prompts),
        mean_prompt_len=sum(map(len, work.prompts)) / len(work.prompts), n_layers=shape.n_layers,
        n_heads_model=shape.n_heads, n_heads=len(work.heads), token_budget=args.budget)
    engine = ScanEngine(work.model, work.pad_id, token_budget=args.budget)
    ablations = ablations_of(work.heads)
    n_prompts = len(work.prompts)

    say("warm-up ...")
    engine.scan(work.prompts[:2], spread(ablations, 4))
    per_forward = estimate_naive_forward(work, args.device)
    fig.naive_estimate_s = (len(work.heads) + 1) * n_prompts * per_forward
    k = choose_naive_heads(args.naive_heads, len(work.heads), n_prompts, per_forward)
    subset_idx = spread(list(range(len(work.heads))), k)
    subset = [ablations[i] for i in subset_idx]
    fig.naive_heads = len(subset)
    fig.naive_subset = [work.heads[i].label for i in subset_idx]
    say(f"naive forward ~{per_forward * 1e3:.1f} ms; all heads estimated {fig.naive_estimate_s:.0f} s; "
        f"naive on {fig.naive_heads} heads")

    say(f"engine: {len(ablations)} heads x {n_prompts} prompts ...")
    full, fig.engine_s = timed(lambda: engine.scan(work.prompts, ablations), args.device)
    fig.engine_rows = len(ablations) * n_prompts
    fig.engine_rows_per_s = fig.engine_rows / fig.engine_s
    fig.engine_layer_fraction = full.layer_rows / max(1, full.rows_run * shape.n_layers)

    say(f"engine: the same {fig.naive_heads} heads ...")
    part, fig.engine_subset_s = timed(lambda: engine.scan(work.prompts, subset), args.device)

    say(f"naive: {fig.naive_heads} heads x {n_prompts} prompts ...")
    naive, fig.naive_s = timed(lambda: naive_scan(work.model, work.prompts, subset), args.device)
    forwards = (len(subset) + 1) * n_prompts  # one normal reference forward per prompt, then one per row
    fig.naive_forward_s = fig.naive_s / forwards
    fig.naive_rows_per_s = len(subset) * n_prompts / fig.naive_s
    fig.naive_all_extrapolated = len(subset) < len(ablations)
    fig.naive_all_s = (fig.naive_forward_s * (len(ablations) + 1) * n_prompts if fig.naive_all_extrapolated
                       else fig.naive_s)
    fig.ratio_all = fig.naive_all_s / fig.engine_s
    fig.ratio_subset = fig.naive_s / fig.engine_subset_s

    compare(fig, full, part, naive, subset_idx)
    fig.speed_pass = fig.ratio_all >= SPEED_TARGET
    return fig


def compare(fig: Figures, full: ScanResult, part: ScanResult, naive: ScanResult, subset_idx: list[int]) -> None:
    """KL differences on the common subset: both engine runs against the naive strategy; keep the worst."""
    assert full.kl is not None and part.kl is not None and naive.kl is not None
    a = kl_diffs(full.kl[subset_idx], naive.kl)
    b = kl_diffs(part.kl, naive.kl)
    for key in ("max_abs_diff", "max_rel_diff", "max_abs_diff_rel_region"):
        setattr(fig, key, max(a[key], b[key]))
    fig.kl_min, fig.kl_max = a["kl_min"], a["kl_max"]
    fig.agreement_checked = fig.dtype in ("float32", "float64")
    fig.agree_pass = fig.max_rel_diff <= REL_DIFF_TARGET if fig.agreement_checked else None


# ----------------------------------------------------------------------------------------------- output

def report(fig: Figures) -> str:
    extra = " (extrapolated linearly from the subset: per-forward cost is head-independent)" \
        if fig.naive_all_extrapolated else " (measured)"
    lines = [
        f"machine      : {fig.cpu_count} CPUs ({fig.cpu}), torch {fig.torch_version} with {fig.torch_threads} "
        f"threads, device {fig.device}" + (f" ({fig.gpu})" if fig.gpu else "") + f", dtype {fig.dtype}",
        f"model        : {fig.model} ({fig.n_layers} layers x {fig.n_heads_model} heads)",
        f"prompts      : {fig.n_prompts} from {fig.prompt_source}, mean length {fig.mean_prompt_len:.1f} tokens",
        f"heads        : {fig.n_heads} (undiff_q, eps {EPS:g}); token budget {fig.token_budget}",
        f"engine       : {fig.engine_s:8.2f} s  {fig.engine_rows} rows, {fig.engine_rows_per_s:.1f} rows/s, "
        f"{fig.engine_layer_fraction:.1%} of the layer work of full forwards",
        f"naive        : {fig.naive_s:8.2f} s  on {fig.naive_heads} heads, {fig.naive_rows_per_s:.2f} rows/s, "
        f"{fig.naive_forward_s * 1e3:.1f} ms per forward (pre-run estimate for all heads "
        f"{fig.naive_estimate_s:.0f} s)",
        f"naive, all   : {fig.naive_all_s:8.2f} s{extra}",
        f"engine, same : {fig.engine_subset_s:8.2f} s  on the naive strategy's {fig.naive_heads} heads",
        f"speed ratio  : {fig.ratio_all:.2f}x all heads;  {fig.ratio_subset:.2f}x like for like on "
        f"{fig.naive_heads} heads",
        f"KL agreement : max abs diff {fig.max_abs_diff:.3g} (overall); max rel diff {fig.max_rel_diff:.3g} "
        f"(where naive KL > {REL_FLOOR:g}, max abs there {fig.max_abs_diff_rel_region:.3g}); "
        f"naive KL in [{fig.kl_min:.3g}, {fig.kl_max:.3g}]",
    ]
    speed = f"speed {fig.ratio_all:.2f}x vs >= {SPEED_TARGET:g}x: {'PASS' if fig.speed_pass else 'MISS'}"
    if fig.agree_pass is None:
        agree = f"agreement {fig.max_rel_diff:.3g}: not judged in {fig.dtype} (target {REL_DIFF_TARGET:g} is for fp32)"
    else:
        agree = (f"agreement {fig.max_rel_diff:.3g} vs <= {REL_DIFF_TARGET:g}: "
                 f"{'PASS' if fig.agree_pass else 'MISS'}")
    overall = "PASS" if fig.speed_pass and fig.agree_pass is not False else "MISS"
    lines.append(f"{overall}: {speed}; {agree}")
    return "\n".join(lines)


def write_json(path: str, fig: Figures) -> None:
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(fig).items()}
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or HF id (default: %(default)s)")
    p.add_argument("--random-llama7b", action="store_true",
                   help="a random-weight Llama-2-7B-shaped model on CUDA, random prompts of ~25 tokens")
    p.add_argument("--llama-layers", type=int, default=None,
                   help="with --random-llama7b: fewer layers (a smoke test; the only way to run it on CPU)")
    p.add_argument("--prompts", type=int, default=None,
                   help=f"number of prompts (default {DEFAULT_PROMPTS}; {LLAMA7B_PROMPTS} with --random-llama7b)")
    p.add_argument("--heads", default="all", help="all | a count K (evenly spread) | labels L2H26,L3H8")
    p.add_argument("--naive-heads", type=int, default=None,
                   help="time the naive strategy on K evenly spread heads and extrapolate (default: all heads "
                        f"if estimated under {NAIVE_FULL_LIMIT_S:.0f} s, else a ~{NAIVE_SUBSET_S:.0f} s subset)")
    p.add_argument("--budget", type=int, default=DEFAULT_TOKEN_BUDGET, help="engine tokens per forward")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cpu; cuda with --random-llama7b)")
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float64 (default: float32; bfloat16 with --random-llama7b)")
    p.add_argument("--json", default=None, metavar="PATH", help="append the figures as one JSON line")
    args = p.parse_args(argv)
    llama = args.random_llama7b
    args.prompts = args.prompts or (LLAMA7B_PROMPTS if llama else DEFAULT_PROMPTS)
    args.device = args.device or ("cuda" if llama else "cpu")
    args.dtype = args.dtype or ("bfloat16" if llama else "float32")
    if args.prompts < 1 or args.budget < 1 or (args.naive_heads is not None and args.naive_heads < 1):
        p.error("--prompts, --budget and --naive-heads must be >= 1")
    if args.dtype not in ("float32", "bfloat16", "float16", "float64"):
        p.error(f"unknown dtype {args.dtype!r}: valid are float32, bfloat16, float16, float64")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.exit(2, f"{p.prog}: CUDA is not available on this machine"
                  + (": --random-llama7b builds a 7B model and runs on a GPU only" if llama else
                     ": use --device cpu") + "\n")
    if llama and not args.device.startswith("cuda") and args.llama_layers is None:
        p.exit(2, f"{p.prog}: --random-llama7b runs on CUDA only (the full 7B model is never built on the CPU); "
                  "for a CPU smoke test add --llama-layers N\n")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def say(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    say("loading model and prompts ...")
    work = random_llama7b_workload(args) if args.random_llama7b else embedded_workload(args)
    fig = run_bench(work, args, say)
    print(report(fig))
    if args.json:
        write_json(args.json, fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
