"""Whole-process Ships benchmark: `headstudy ships` against a competent user's script and the naive strategy.

What a user waits for is the whole process: interpreter start, imports, model loading, the scan, the tables.
For each prompt format (`direct`, and `chat` with the "safety-system" system prompt of the README's family
table, `study.family_eval.SAFETY_SYSTEM_PROMPT`) on the first N AdvBench prompts and all heads of the embedded
model, three fresh processes are timed from launch to exit, on exactly the same token ids:

- headstudy  `headstudy ships --prompts advbench --format F [--system-prompt S] --limit N --executor local`
             into a fresh --out folder (nothing reused); its Ships table (Parquet) is read back;
- peer       `bench/peer_ships.py`: plain transformers, every prompt in one left-padded batch, one forward per
             head with the head's q_proj rows scaled, last-position logits only (no `study` import);
- naive      `bench/naive_ships.py`: `study.core.engine.naive_scan`, one full forward per head per prompt, batch 1.
             `--naive extrapolate` runs it on a few heads and scales the scan part to all heads.

The token ids come from the project's own prompt code (`study.prompts.sets.load_prompts` + `encode`, the tokenizer
`headstudy` loads) in a preparatory step that is not timed. The scores are compared (max relative difference
where the KL exceeds 1e-6), so a fast but wrong result shows. Targets (informational, never asserted):
headstudy >= 3x the peer in the direct format, >= 6x in the chat format, >= 12x the naive strategy in chat.

    python bench/bench_whole.py                                   # 8 prompts, direct and chat, naive measured
    python bench/bench_whole.py --naive extrapolate --json bench.jsonl
    python bench/bench_whole.py --prompts 2 --heads 6 --naive extrapolate --naive-heads 2 --threads 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEFAULT_DATA_DIR = ROOT / ".." / "shared" / "data"
PROMPT_SET = "advbench"
FORMATS = ("direct", "chat")
BUSY_WARN = 0.75  # warn when a process got less than this share of its threads' CPU time (a contended host)
REL_FLOOR = 1e-6  # relative differences are taken where the reference KL exceeds this
TARGETS = (("direct", "peer", 3.0), ("chat", "peer", 6.0), ("chat", "naive", 12.0))


@dataclass
class Proc:
    """One timed process."""

    wall_s: float = math.nan  # launch to exit, measured here
    cpu_s: float = math.nan  # the child's user + system CPU seconds
    internal: dict = field(default_factory=dict)  # what the script itself reported (peer, naive)
    all_heads_s: float = math.nan  # wall_s, or extrapolated to all heads when it scanned a subset
    extrapolated: bool = False
    heads: int = 0

    @property
    def busy(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else math.nan


@dataclass
class Agreement:
    n: int = 0  # (head, prompt) pairs compared
    n_rel: int = 0  # of which the reference KL > REL_FLOOR
    max_abs: float = math.nan
    max_rel: float = math.nan
    kl_at_max_rel: float = math.nan


@dataclass
class FormatFigures:
    format: str
    system_prompt: str | None
    n_prompts: int
    mean_len: float
    max_len: int
    n_heads_model: int
    headstudy: Proc
    peer: Proc
    naive: Proc | None
    ratio_peer: float = math.nan
    ratio_naive: float = math.nan
    hs_vs_peer: Agreement | None = None
    hs_vs_naive: Agreement | None = None
    peer_vs_naive: Agreement | None = None


# ----------------------------------------------------------------------------------------------- helpers

def run_timed(argv: list[str], log: Path, env: dict[str, str]) -> Proc:
    """Run one process from ROOT, stdout+stderr to `log`; wall time launch to exit and the child's CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        out.write("$ " + shlex.join(argv) + "\n")
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        sys.exit(f"failed ({proc.returncode}): {shlex.join(argv)}\n--- {log} (tail) ---\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Proc(wall_s=wall, cpu_s=cpu, all_heads_s=wall)


def best_of(repeat: int, make: callable) -> Proc:
    runs = [make(i) for i in range(max(1, repeat))]
    return min(runs, key=lambda p: p.wall_s)


def spread(labels: list[str], k: int) -> list[str]:
    """k labels evenly spread over the list (the same rule as peer_ships.pick_heads)."""
    k = max(1, min(k, len(labels)))
    if k == 1:
        return labels[:1]
    return [labels[i] for i in sorted({round(i * (len(labels) - 1) / (k - 1)) for i in range(k)})]


def extrapolate(p: Proc, n_heads_done: int, n_heads_all: int) -> None:
    """Scale the scan part of a process that scanned a subset of heads to all heads (fixed costs kept).

    The scan costs one normal pass plus one pass per head (per prompt for naive: (1 + H) x P forwards), so
    the scan time scales by (1 + H_all) / (1 + H_done)."""
    p.heads = n_heads_done
    if n_heads_done >= n_heads_all:
        return
    scan = p.internal["scan_s"]
    p.all_heads_s = p.wall_s - scan + scan * (1 + n_heads_all) / (1 + n_heads_done)
    p.extrapolated = True


def compare(test: np.ndarray, ref: np.ndarray) -> Agreement:
    """Max |test - ref| overall, and max |test - ref| / |ref| where ref > REL_FLOOR; NaN in `test` (a
    screened score that was not re-scored) is left out."""
    known = ~np.isnan(test)
    diff = np.where(known, np.abs(test - ref), 0.0)
    a = Agreement(n=int(known.sum()), max_abs=float(diff.max()) if diff.size else math.nan)
    sel = (ref > REL_FLOOR) & known
    a.n_rel = int(sel.sum())
    if a.n_rel:
        rel = np.where(sel, diff / np.where(sel, np.abs(ref), 1.0), -1.0)
        i = np.unravel_index(int(rel.argmax()), rel.shape)
        a.max_rel, a.kl_at_max_rel = float(rel[i]), float(ref[i])
    return a


def read_ships(out: Path, prompt_ids: list[str], labels: list[str]) -> np.ndarray:
    """headstudy's Ships table (Parquet under the --out folder) as a (heads x prompts) KL matrix."""
    import pandas as pd

    files = sorted(out.glob("ships/**/*.parquet"))
    if len(files) != 1:
        sys.exit(f"expected one Ships table under {out}/ships, found {[str(f) for f in files]}")
    df = pd.read_parquet(files[0], columns=["prompt_id", "head_label", "kl", "exact"])
    df.loc[df["exact"] == False, "kl"] = np.nan  # noqa: E712 - screened, not re-scored: not compared
    table = df.pivot(index="head_label", columns="prompt_id", values="kl")
    missing_p = [p for p in prompt_ids if p not in table.columns]
    missing_h = [h for h in labels if h not in table.index]
    if missing_p or missing_h:
        sys.exit(f"{files[0]}: missing prompts {missing_p[:3]} / heads {missing_h[:3]} (different prompts or inputs?)")
    return table.loc[labels, prompt_ids].to_numpy(dtype=np.float64)


def prepare(args: argparse.Namespace, fmt: str, system_prompt: str | None, path: Path) -> dict:
    """The token ids headstudy will see (its own prompt loading and encoding), written for the scripts."""
    from study.models.loading import load_tokenizer, model_shape, model_source
    from study.prompts.formats import encode
    from study.prompts.sets import load_prompts

    prompts = load_prompts(PROMPT_SET, data_dir=args.data_dir, limit=args.prompts)
    source = model_source(args.model)
    tokenizer = load_tokenizer(args.model, source=source)
    ids = [encode(p.text, fmt, tokenizer, system_prompt) for p in prompts]
    shape = model_shape(args.model)
    inputs = {"model_folder": source, "format": fmt, "system_prompt": system_prompt,
              "prompt_ids": [p.id for p in prompts], "texts": [p.text for p in prompts],
              "token_ids": ids, "pad_token_id": tokenizer.pad_token_id,
              "labels": [f"L{layer}H{head}" for layer in range(shape.n_layers) for head in range(shape.n_heads)]}
    path.write_text(json.dumps(inputs), encoding="utf-8")
    return inputs


def warm_page_cache(folder: str) -> None:
    """Read the model files once, so no process pays (or is spared) a cold disk read."""
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def headstudy_argv(args: argparse.Namespace) -> list[str]:
    exe = Path(sys.executable).parent / "headstudy"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "study.cli"]


def fmt_s(p: Proc | None) -> str:
    if p is None:
        return "skipped"
    return f"{'~' if p.extrapolated else ''}{p.all_heads_s:.1f} s"


def fmt_agree(a: Agreement | None) -> str:
    if a is None:
        return "-"
    if not a.n_rel:
        return f"max abs {a.max_abs:.2g} (no KL > {REL_FLOOR:g})"
    return f"max rel {a.max_rel:.2g} at KL {a.kl_at_max_rel:.2g} (max abs {a.max_abs:.2g}, n={a.n_rel})"


# ----------------------------------------------------------------------------------------------- one format

def bench_format(args: argparse.Namespace, fmt: str, system_prompt: str | None, work: Path,
                 env: dict[str, str]) -> FormatFigures:
    tag = fmt if system_prompt is None else f"{fmt}-system"
    inputs_path = work / f"inputs-{tag}.json"
    inputs = prepare(args, fmt, system_prompt, inputs_path)
    warm_page_cache(inputs["model_folder"])
    labels = inputs["labels"]
    n_all = len(labels)
    heads = labels if args.heads == "all" else spread(labels, int(args.heads))
    lengths = [len(t) for t in inputs["token_ids"]]
    threads = str(args.threads)

    # headstudy: always every head (the CLI has no head selection)
    def hs(i: int) -> Proc:
        out = work / f"hs-{tag}-{i}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [*headstudy_argv(args), "ships", "--model", args.model, "--prompts", PROMPT_SET,
                "--data-dir", str(args.data_dir), "--format", fmt, "--limit", str(args.prompts),
                "--eps", repr(args.eps), "--executor", args.executor, "--cpus-per-actor", threads,
                "--device", "cpu", "--dtype", "float32", "--out", str(out)]
        if system_prompt is not None:
            argv[argv.index("--limit"):argv.index("--limit")] = ["--system-prompt", system_prompt]
        if args.screen:
            argv += ["--screen", args.screen, "--verify-top", str(args.verify_top)]
        p = run_timed(argv, work / f"hs-{tag}-{i}.log", env)
        p.heads = n_all
        p.internal["out"] = str(out)
        return p

    hs_proc = best_of(args.repeat, hs)
    hs_kl = read_ships(Path(hs_proc.internal["out"]), inputs["prompt_ids"], labels)

    def script(name: str, head_spec: list[str], i: int) -> Proc:
        out = work / f"{name}-{tag}-{i}.npy"
        argv = [sys.executable, str(BENCH / f"{name}_ships.py"), "--model", inputs["model_folder"],
                "--inputs", str(inputs_path), "--out", str(out), "--eps", repr(args.eps), "--threads", threads,
                "--heads", "all" if len(head_spec) == n_all else ",".join(head_spec)]
        if len(head_spec) < n_all:
            argv.append("--warmup")  # the first forward's one-off cost stays out of the part scaled to all heads
        p = run_timed(argv, work / f"{name}-{tag}-{i}.log", env)
        p.internal = json.loads(out.with_suffix(".json").read_text())
        p.internal["kl"] = str(out)
        extrapolate(p, len(head_spec), n_all)
        return p

    peer_proc = best_of(args.repeat, lambda i: script("peer", heads, i))
    peer_kl = np.load(peer_proc.internal["kl"])

    naive_proc = None
    naive_heads: list[str] = []
    if args.naive != "skip":
        naive_heads = heads if args.naive == "measure" else spread(heads, args.naive_heads)
        naive_proc = script("naive", naive_heads, 0)
    row = {h: i for i, h in enumerate(labels)}
    peer_row = {h: i for i, h in enumerate(peer_proc.internal["heads"])}

    fig = FormatFigures(fmt, system_prompt, len(lengths), sum(lengths) / len(lengths), max(lengths), n_all,
                        hs_proc, peer_proc, naive_proc)
    fig.ratio_peer = peer_proc.all_heads_s / hs_proc.wall_s
    fig.hs_vs_peer = compare(hs_kl[[row[h] for h in heads]], peer_kl)
    if naive_proc is not None:
        naive_kl = np.load(naive_proc.internal["kl"])
        fig.ratio_naive = naive_proc.all_heads_s / hs_proc.wall_s
        fig.hs_vs_naive = compare(hs_kl[[row[h] for h in naive_heads]], naive_kl)
        common = [h for h in naive_heads if h in peer_row]
        if common:
            fig.peer_vs_naive = compare(peer_kl[[peer_row[h] for h in common]],
                                        naive_kl[[naive_heads.index(h) for h in common]])
    for p in (hs_proc, peer_proc, naive_proc):
        if p is not None:
            p.internal.pop("heads", None)  # long lists; the counts are kept
    return fig


# ----------------------------------------------------------------------------------------------- main

def _finite(x):
    """NaN/inf as null, so the JSON line is standard JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, folder or hub id (default the embedded)")
    ap.add_argument("--prompts", type=int, default=8, help="the first N AdvBench prompts (default 8)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                    help="folder holding advbench/ (default ../shared/data from the repository root)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="direct,chat (default both)")
    ap.add_argument("--no-system", action="store_true", help="chat without the safety system prompt")
    ap.add_argument("--heads", default="all",
                    help="all (default), or K heads spread over the model for the peer and naive scripts "
                         "(smoke tests: their time is extrapolated to all heads; headstudy always scans all)")
    ap.add_argument("--naive", choices=("measure", "extrapolate", "skip"), default="measure",
                    help="measure (default: every head, slow), extrapolate (a few heads, scaled), skip")
    ap.add_argument("--naive-heads", type=int, default=6, help="heads the naive strategy runs with extrapolate")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch/OpenMP threads of every process (default: the CPU count)")
    ap.add_argument("--executor", default="local", help="headstudy's --executor (default local: no Ray)")
    ap.add_argument("--screen", default=None, help="headstudy ships --screen bf16|fp16 (its agreement is then "
                                                   "judged on the re-scored rows only)")
    ap.add_argument("--verify-top", type=int, default=20, help="with --screen: heads re-scored per prompt")
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--repeat", type=int, default=1, help="best of R runs of headstudy and the peer (default 1)")
    ap.add_argument("--json", default=None, help="append the figures as one JSON line to this file")
    ap.add_argument("--keep", default=None, help="keep the work folder (inputs, logs, tables) here")
    args = ap.parse_args()
    if args.heads != "all" and not args.heads.isdigit():
        ap.error("--heads: all or a count")
    args.data_dir = args.data_dir.resolve()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if any(f not in FORMATS for f in formats):
        ap.error(f"--formats: some of {', '.join(FORMATS)}")

    from study.family.eval import SAFETY_SYSTEM_PROMPT

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    import torch

    load = os.getloadavg()
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, threads {args.threads} "
          f"per process, torch {torch.__version__}, python {platform.python_version()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    print(f"workload: {args.model}, the first {args.prompts} {PROMPT_SET} prompts, undiff_q eps {args.eps:g}, "
          f"float32 cpu; headstudy --executor {args.executor}; naive: {args.naive}")
    if args.heads != "all":
        print(f"note: --heads {args.heads}: peer and naive scan a subset and their times are extrapolated to all "
              f"heads (~); headstudy scans every head. Smoke-test figures, not a benchmark.")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-whole-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: list[FormatFigures] = []
    try:
        for fmt in formats:
            system = SAFETY_SYSTEM_PROMPT if fmt == "chat" and not args.no_system else None
            fig = bench_format(args, fmt, system, work, env)
            figures.append(fig)
            name = fmt + (" +safety-system" if system else "")
            naive_note = "" if fig.naive is None else (" (extrapolated)" if fig.naive.extrapolated else " (measured)")
            print(f"{name:<22} prompts {fig.n_prompts} (mean {fig.mean_len:.1f} tokens, max {fig.max_len}), "
                  f"{fig.n_heads_model} heads | headstudy {fmt_s(fig.headstudy)} | peer {fmt_s(fig.peer)} | "
                  f"naive {fmt_s(fig.naive)}{naive_note} | vs peer {fig.ratio_peer:.2f}x | "
                  f"vs naive {fig.ratio_naive:.2f}x")
            print(f"{'':<22} CPU busy (CPU s / wall s): headstudy {fig.headstudy.busy:.2f}, peer {fig.peer.busy:.2f}"
                  + ("" if fig.naive is None else f", naive {fig.naive.busy:.2f}")
                  + f" | peer: imports {fig.peer.internal['import_s']:.1f} s, load {fig.peer.internal['load_s']:.1f} s,"
                  f" scan {fig.peer.internal['scan_s']:.1f} s")
            slow = [n for n, p in (("headstudy", fig.headstudy), ("peer", fig.peer), ("naive", fig.naive))
                    if p is not None and p.busy < BUSY_WARN * args.threads]
            if slow:
                print(f"{'':<22} warning: {', '.join(slow)} got under {BUSY_WARN:.0%} of {args.threads} thread(s) of "
                      f"CPU time: the machine is busy, the timings are not representative")
            print(f"{'':<22} agreement: headstudy~peer {fmt_agree(fig.hs_vs_peer)}")
            if fig.naive is not None:
                print(f"{'':<22}            headstudy~naive {fmt_agree(fig.hs_vs_naive)}; "
                      f"peer~naive {fmt_agree(fig.peer_vs_naive)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    verdicts = []
    by_fmt = {f.format: f for f in figures}
    for fmt, against, target in TARGETS:
        f = by_fmt.get(fmt)
        if f is None or (f.system_prompt is None and fmt == "chat"):
            continue
        ratio = f.ratio_peer if against == "peer" else f.ratio_naive
        if math.isnan(ratio):
            verdicts.append(f"{fmt} vs {against} (not run) >= {target:g}x -")
            continue
        approx = "~" if (f.peer if against == "peer" else f.naive).extrapolated else ""
        verdicts.append(f"{fmt} vs {against} {approx}{ratio:.2f}x >= {target:g}x {'PASS' if ratio >= target else 'MISS'}")
    if verdicts:
        print("targets (informational): " + "; ".join(verdicts))

    if args.json:
        record = {"bench": "bench_whole", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count(),
                  "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
                  "loadavg_start": load, "model": args.model, "prompt_set": PROMPT_SET, "eps": args.eps,
                  "heads_option": args.heads, "naive_mode": args.naive, "executor": args.executor,
                  "repeat": args.repeat, "formats": [asdict(f) for f in figures]}
        with open(args.json, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_finite(record)) + "\n")


if __name__ == "__main__":
    main()
