"""Benchmark the Ships scan: the scan engine against the naive strategy, on the same machine.

Ships scores every single head h on every prompt p with KL(normal || ablated_h) of the next-token
distribution. The naive strategy (the authors') runs one full forward per head per prompt, batch 1, with
the LM head at every position. `study.core.engine.ScanEngine` batches many (ablation, prompt) rows per forward,
reuses the residual stream below each row's ablated layer and computes the LM head at the last position
only (DESIGN.md section 3). This script times both on the same prompts and heads, checks that they agree,
and prints the speed ratio against the targets (>= 10x, KL relative difference <= 1e-4).

The naive strategy's cost per forward does not depend on which head is ablated, so where the full naive
scan would be slow it is timed on an evenly spread subset of heads and extrapolated linearly to all heads;
the engine is also timed on exactly that subset, for a like-for-like ratio.

    python bench/bench_ships.py --prompts 8 --heads all --budget 2048 --threads 2 --device cpu
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

from study.core.ablation import Ablation, Op
from study.core.architectures import Arch
from study.core.engine import ScanEngine, ScanResult, default_token_budget, naive_scan
from study.core.heads import Head, all_heads, parse_heads
from study.models.builtin import DEFAULT_MODEL
from study.models.loading import load_model
from study.prompts.formats import PromptFormat, encode_all
from study.prompts.sets import load_prompts

SPEED_TARGET = 10.0  # engine vs naive, all heads
REL_DIFF_TARGET = 1e-4  # max |kl_engine - kl_naive| / |kl_naive|, judged in float32 and float64
REL_FLOOR = 1e-6  # relative differences are taken where the naive KL exceeds this
REL_DENOM_MIN = 1e-8
NAIVE_FULL_LIMIT_S = 180.0  # by default run the naive strategy on all heads if estimated under this
NAIVE_SUBSET_S = 60.0  # ... else on a subset of heads sized to take about this long
MIN_NAIVE_HEADS = 3
BUSY_WARN = 0.75  # warn when a CPU run got less than this share of its threads' time (a contended host)
EPS = 1e-5
PROMPT_SET = "builtin:harmful"
DEFAULT_PROMPTS = 8
LLAMA7B_PROMPTS = 100
LLAMA7B_LEN = (20, 30)  # random prompt lengths, inclusive: about 25 tokens
LLAMA7B_SEED = 0
DTYPES = ("float32", "bfloat16", "float16", "float64")


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
class Timing:
    wall_s: float
    cpu_s: float  # process CPU time, all threads: about wall x threads when the CPUs are all ours

    @property
    def busy(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else math.nan


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
    repeat: int
    engine_s: float = math.nan
    engine_cpu_busy: float = math.nan  # CPU seconds per wall second (ideal: torch_threads)
    engine_rows: int = 0
    engine_rows_per_s: float = math.nan
    engine_layer_fraction: float = math.nan  # layer-rows computed / (rows x layers): what prefix reuse saves
    naive_heads: int = 0
    naive_subset: list[str] = field(default_factory=list)
    naive_estimate_s: float = math.nan  # the pre-run estimate for all heads
    naive_s: float = math.nan  # measured, on naive_heads heads
    naive_cpu_busy: float = math.nan
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
    worst_rel_kl: float = math.nan  # the naive KL where the relative difference is largest
    kl_min: float = math.nan
    kl_max: float = math.nan
    fp64_naive_rel: float | None = None  # with --fp64-reference: naive (this dtype) vs naive float64
    fp64_engine_rel: float | None = None  # engine (this dtype) vs naive float64
    contended: bool = False
    speed_pass: bool = False
    agree_pass: bool | None = None  # None: not judged (half precision)


# ----------------------------------------------------------------------------------------------- helpers

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeat: int = 1) -> tuple[Any, Timing]:
    """(fn(), the fastest of `repeat` runs), the device synchronised on both sides of each run."""
    best: Timing | None = None
    out = None
    for _ in range(max(1, repeat)):
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        t = Timing(time.perf_counter() - wall, time.process_time() - cpu)
        if best is None or t.wall_s < best.wall_s:
            best = t
    assert best is not None
    return out, best


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


def kl_diffs(kl: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Absolute and relative differences of `kl` from the reference `ref` (same shape)."""
    a, b = kl.double(), ref.double()
    diff = (a - b).abs()
    region = b > REL_FLOOR
    rel = diff[region] / b.abs()[region].clamp(min=REL_DENOM_MIN)
    worst = int(rel.argmax()) if rel.numel() else None
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(rel.max()) if rel.numel() else 0.0,
        "max_abs_diff_rel_region": float(diff[region].max()) if region.any() else 0.0,
        "worst_rel_kl": float(b[region][worst]) if worst is not None else math.nan,
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
    """A Llama-2-7B-shaped model with random weights, built directly on its device, and random prompts."""
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
    return Workload(model, "random Llama-2-7B shape", 0, prompts, select_heads(args.heads, layers, 32),
                    f"random tokens, {lo}-{hi} long (seed {LLAMA7B_SEED})")


# ----------------------------------------------------------------------------------------------- the bench

def estimate_naive_forward(work: Workload, device: str) -> float:
    """Seconds per naive forward: the fastest of three timings on one prompt, after a warm-up."""
    probe = work.prompts[:1]
    one = ablations_of(work.heads[:1])
    naive_scan(work.model, probe, one)  # warm-up
    _, t = timed(lambda: naive_scan(work.model, probe, one), device, repeat=3)
    return t.wall_s / 2  # a normal and an ablated forward


def choose_naive_heads(requested: int | None, n_heads: int, n_prompts: int, per_forward: float) -> int:
    if requested is not None:
        return max(1, min(requested, n_heads))
    if (n_heads + 1) * n_prompts * per_forward <= NAIVE_FULL_LIMIT_S:
        return n_heads
    fit = int(NAIVE_SUBSET_S / (n_prompts * per_forward)) - 1  # the normal forwards count too
    return max(MIN_NAIVE_HEADS, min(fit, n_heads))


def new_figures(work: Workload, args: argparse.Namespace) -> Figures:
    shape = Arch.of(work.model).shape
    return Figures(
        model=work.model_id, prompt_source=work.source, device=args.device, dtype=args.dtype,
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
        cpu=platform.processor() or platform.machine(),
        gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        n_prompts=len(work.prompts), mean_prompt_len=sum(map(len, work.prompts)) / len(work.prompts),
        n_layers=shape.n_layers, n_heads_model=shape.n_heads, n_heads=len(work.heads),
        token_budget=args.budget or default_token_budget(args.device), repeat=args.repeat)


def run_bench(work: Workload, args: argparse.Namespace, say: Callable[[str], None]) -> Figures:
    fig = new_figures(work, args)
    engine = ScanEngine(work.model, work.pad_id, token_budget=fig.token_budget)
    ablations = ablations_of(work.heads)
    n_prompts, dev, rep = len(work.prompts), args.device, args.repeat

    say("warm-up ...")
    engine.scan(work.prompts[:2], spread(ablations, 4))
    per_forward = estimate_naive_forward(work, dev)
    fig.naive_estimate_s = (len(ablations) + 1) * n_prompts * per_forward
    subset_idx = spread(range(len(ablations)),
                        choose_naive_heads(args.naive_heads, len(ablations), n_prompts, per_forward))
    subset = [ablations[i] for i in subset_idx]
    fig.naive_heads = len(subset)
    fig.naive_subset = [work.heads[i].label for i in subset_idx]
    say(f"naive forward ~{per_forward * 1e3:.1f} ms; all heads estimated {fig.naive_estimate_s:.0f} s; "
        f"the naive strategy runs on {fig.naive_heads} heads")

    say(f"engine: {len(ablations)} heads x {n_prompts} prompts ...")
    full, t = timed(lambda: engine.scan(work.prompts, ablations), dev, rep)
    fig.engine_s, fig.engine_cpu_busy = t.wall_s, t.busy
    fig.engine_rows = len(ablations) * n_prompts
    fig.engine_rows_per_s = fig.engine_rows / fig.engine_s
    fig.engine_layer_fraction = full.layer_rows / max(1, full.rows_run * fig.n_layers)

    say(f"engine: the same {fig.naive_heads} heads ...")
    part, t = timed(lambda: engine.scan(work.prompts, subset), dev, rep)
    fig.engine_subset_s = t.wall_s

    say(f"naive: {fig.naive_heads} heads x {n_prompts} prompts ...")
    naive, t = timed(lambda: naive_scan(work.model, work.prompts, subset), dev, rep)
    fig.naive_s, fig.naive_cpu_busy = t.wall_s, t.busy
    forwards = (len(subset) + 1) * n_prompts  # one normal reference forward per prompt, then one per row
    fig.naive_forward_s = fig.naive_s / forwards
    fig.naive_rows_per_s = len(subset) * n_prompts / fig.naive_s
    fig.naive_all_extrapolated = len(subset) < len(ablations)
    fig.naive_all_s = fig.naive_forward_s * (len(ablations) + 1) * n_prompts if fig.naive_all_extrapolated \
        else fig.naive_s
    fig.ratio_all = fig.naive_all_s / fig.engine_s
    fig.ratio_subset = fig.naive_s / fig.engine_subset_s

    compare(fig, full.kl[subset_idx], part, naive)
    if args.fp64_reference:
        say(f"float64 reference: naive, {fig.naive_heads} heads x {n_prompts} prompts ...")
        ref = fp64_reference(args, work.prompts, subset)
        fig.fp64_naive_rel = kl_diffs(naive.kl, ref)["max_rel_diff"]
        fig.fp64_engine_rel = kl_diffs(full.kl[subset_idx], ref)["max_rel_diff"]
    fig.contended = not dev.startswith("cuda") and min(fig.engine_cpu_busy, fig.naive_cpu_busy) \
        < BUSY_WARN * fig.torch_threads
    fig.speed_pass = fig.ratio_all >= SPEED_TARGET
    return fig


def compare(fig: Figures, full_kl: torch.Tensor, part: ScanResult, naive: ScanResult) -> None:
    """KL differences on the common subset: both engine runs against the naive strategy; keep the worst."""
    assert part.kl is not None and naive.kl is not None
    runs = [kl_diffs(full_kl, naive.kl), kl_diffs(part.kl, naive.kl)]
    worst = max(runs, key=lambda d: d["max_rel_diff"])
    fig.max_abs_diff = max(d["max_abs_diff"] for d in runs)
    fig.max_abs_diff_rel_region = max(d["max_abs_diff_rel_region"] for d in runs)
    fig.max_rel_diff, fig.worst_rel_kl = worst["max_rel_diff"], worst["worst_rel_kl"]
    fig.kl_min, fig.kl_max = runs[0]["kl_min"], runs[0]["kl_max"]
    fig.agree_pass = fig.max_rel_diff <= REL_DIFF_TARGET if fig.dtype in ("float32", "float64") else None


def fp64_reference(args: argparse.Namespace, prompts: list[list[int]], subset: list[Ablation]) -> torch.Tensor:
    """Naive KL of the same model in float64: the truth both float32 strategies are measured against."""
    loaded = load_model(args.model, device=args.device, dtype="float64")
    result = naive_scan(loaded.model, prompts, subset)
    assert result.kl is not None
    return result.kl


# ----------------------------------------------------------------------------------------------- output

def report(fig: Figures) -> str:
    how = " (extrapolated linearly from the subset: the per-forward cost does not depend on the head)" \
        if fig.naive_all_extrapolated else " (measured on all heads)"
    busy = f"; CPU busy {fig.engine_cpu_busy:.2f} (engine) / {fig.naive_cpu_busy:.2f} (naive) of " \
           f"{fig.torch_threads} threads" if not fig.device.startswith("cuda") else ""
    lines = [
        f"machine      : {fig.cpu_count} CPUs ({fig.cpu}), torch {fig.torch_version}, {fig.torch_threads} threads, "
        f"device {fig.device}" + (f" ({fig.gpu})" if fig.gpu else "") + f", dtype {fig.dtype}{busy}",
        f"model        : {fig.model} ({fig.n_layers} layers x {fig.n_heads_model} heads)",
        f"prompts      : {fig.n_prompts} from {fig.prompt_source}, mean length {fig.mean_prompt_len:.1f} tokens",
        f"heads        : {fig.n_heads} (undiff_q, eps {EPS:g}); engine token budget {fig.token_budget}"
        + (f"; best of {fig.repeat} runs" if fig.repeat > 1 else ""),
        f"engine       : {fig.engine_s:9.2f} s  {fig.engine_rows} rows, {fig.engine_rows_per_s:.1f} rows/s, "
        f"{fig.engine_layer_fraction:.1%} of the layer work of full forwards",
        f"naive        : {fig.naive_s:9.2f} s  on {fig.naive_heads} heads, {fig.naive_rows_per_s:.2f} rows/s, "
        f"{fig.naive_forward_s * 1e3:.1f} ms per forward (pre-run estimate for all heads "
        f"{fig.naive_estimate_s:.0f} s)",
        f"naive, all   : {fig.naive_all_s:9.2f} s{how}",
        f"engine, same : {fig.engine_subset_s:9.2f} s  on the naive strategy's {fig.naive_heads} heads",
        f"speed ratio  : {fig.ratio_all:.2f}x on all heads;  {fig.ratio_subset:.2f}x like for like on "
        f"{fig.naive_heads} heads",
        f"KL agreement : max abs diff {fig.max_abs_diff:.3g} overall; max rel diff {fig.max_rel_diff:.3g} "
        f"(where naive KL > {REL_FLOOR:g}; at KL {fig.worst_rel_kl:.3g}; max abs there "
        f"{fig.max_abs_diff_rel_region:.3g}); naive KL in [{fig.kl_min:.3g}, {fig.kl_max:.3g}]",
    ]
    if fig.fp64_naive_rel is not None:
        lines.append(f"vs float64   : max rel diff from the float64 naive KL: naive {fig.fp64_naive_rel:.3g}, "
                     f"engine {fig.fp64_engine_rel:.3g} (the {fig.dtype} rounding floor)")
    if fig.contended:
        lines.append(f"warning      : the CPUs were shared (busy below {BUSY_WARN:.0%} of the threads): "
                     f"timings are noisy, re-run or use --repeat")
    speed = f"speed {fig.ratio_all:.2f}x vs >= {SPEED_TARGET:g}x: {'PASS' if fig.speed_pass else 'MISS'}"
    if fig.agree_pass is None:
        agree = f"agreement {fig.max_rel_diff:.3g}: not judged in {fig.dtype} (the {REL_DIFF_TARGET:g} target is fp32)"
    else:
        agree = f"agreement {fig.max_rel_diff:.3g} vs <= {REL_DIFF_TARGET:g}: {'PASS' if fig.agree_pass else 'MISS'}"
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
    p.add_argument("--budget", type=int, default=None, help="engine tokens per forward (default: the device's)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cpu; cuda with --random-llama7b)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="model dtype (default: float32; bfloat16 with --random-llama7b)")
    p.add_argument("--repeat", type=int, default=1, help="time each part this many times, keep the fastest")
    p.add_argument("--fp64-reference", action="store_true",
                   help="also run the naive strategy in float64 on the subset: the rounding floor of --dtype")
    p.add_argument("--json", default=None, metavar="PATH", help="append the figures as one JSON line")
    args = p.parse_args(argv)
    llama = args.random_llama7b
    args.prompts = args.prompts or (LLAMA7B_PROMPTS if llama else DEFAULT_PROMPTS)
    args.device = args.device or ("cuda" if llama else "cpu")
    args.dtype = args.dtype or ("bfloat16" if llama else "float32")
    if min(args.prompts, args.budget or 1, args.repeat, args.naive_heads or 1, args.llama_layers or 1) < 1:
        p.error("--prompts, --budget, --repeat, --naive-heads and --llama-layers must be >= 1")
    if llama and args.fp64_reference:
        p.error("--fp64-reference needs a model to reload: not available with --random-llama7b")
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
