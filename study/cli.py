"""The `headstudy` command line: a thin layer over `study.runner` (see DESIGN.md section 6).

Bad input ends with one line on stderr and exit code 2, before any model is loaded where possible.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn, Sequence

from study import __version__
from study.core.ablation import DEFAULT_OP, SCORING_EPS, SURGERY_EPS
from study.core.errors import RunFailed, UsageError
from study.models.builtin import DEFAULT_MODEL
from study.runtime.stopping import Terminated, sigterm_as_interrupt

EXAMPLES = """examples:
  headstudy run                                   the built-in quickstart on a local Ray cluster
  headstudy plan quickstart --out runs/q          what a study will compute, and what runs/q already holds
  headstudy ships --limit 8 --out runs/ships      Ships of every head on 8 built-in harmful prompts
  headstudy sahara --prompts advbench --data-dir DATA --limit 100 --steps 3 --out runs/sahara
  headstudy asr --from-run runs/sahara --random-controls 3 --judge refusal,paper --out runs/asr
  headstudy joint --prompts advbench --data-dir DATA --limit 32 --k 3 --seeds 0,1 --out runs/joint
  headstudy asr --from-run runs/joint --groups joint --random-controls 3 --out runs/asr-joint
  headstudy asr --from-run runs/ships --level query --k 1 --backend vllm --out runs/asr-query
  headstudy surgery --heads L18H8,L7H2 --out ckpt/smollm2-ablated
  headstudy submit quickstart --address http://HEAD:8265 --out /shared/runs/q
  headstudy report runs/q                          figures and runs/q/report.html from the tables
"""


def _common(p: argparse.ArgumentParser, *, submitted: bool = False) -> None:
    """Options every study command shares; a submitted job runs on the cluster, so it takes no executor."""
    g = p.add_argument_group("common")
    if not submitted:
        g.add_argument("--executor", default=None, help="ray (default: a local Ray cluster, or --address) or "
                                                        "local (this process, no Ray)")
        g.add_argument("--address", default=None, help="a running Ray cluster (auto, HOST:6379, ray://HOST:10001)")
    g.add_argument("--actors", type=int, default=None, help="model actors per model, whenever it has work for them (default: as many as its work is worth)")
    g.add_argument("--cpus-per-actor", type=int, default=None,
                   help="CPUs (and torch threads) per actor (default: on GPUs, a node's CPUs over its GPU slots; "
                        "on CPUs, 1)")
    g.add_argument("--gpus-per-actor", type=int, default=None, help="GPUs per actor where the cluster has GPUs "
                                                                    "(default 1; more spreads a model's weights)")
    g.add_argument("--device", default=None,
                   help="auto (default: cuda where the worker holds a GPU, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--dtype", default=None, help="auto (default: bfloat16 where the workers hold a GPU, else "
                                                 "float32), float32, bfloat16, float16 or float64")
    g.add_argument("--data-dir", default=None, help="folder with known datasets (default $HEADSTUDY_DATA)"
                   + ("; as the head node sees it" if submitted else ""))
    g.add_argument("--token-budget", type=int, default=None,
                   help="rows x tokens per forward (default 2048 on CPU, 16384 on GPU)")
    g.add_argument("--force", action="store_true", help="recompute every shard, even those already in --out")
    g.add_argument("-v", "--verbose", action="count", default=0, help="-v: log each step (info), -vv: debug "
                   "(default: warnings and errors only)")


def _screen_args(p: argparse.ArgumentParser, whose: str) -> None:
    p.add_argument("--screen", default=None, help=f"bf16 or fp16: score every head in that precision first, then "
                                                  f"re-score {whose} top --verify-top heads exactly")
    p.add_argument("--verify-top", type=int, default=None, help=f"{whose} top heads re-scored exactly (default 20)")


def _int_list(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {value!r}") from None


def _scan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="alias, local folder or HF id (default smollm2-135m-instruct)")
    p.add_argument("--revision", default=None, help="model revision (default: the latest)")
    p.add_argument("--prompts", default=None,
                   help="builtin:harmful (default), builtin:benign, a file[:column] or a known name (advbench...)")
    p.add_argument("--format", default=None, help="paper (default), direct or chat")
    p.add_argument("--system-prompt", default=None, help="system prompt for --format chat")
    p.add_argument("--op", default=None, help="undiff_q (default), undiff_k, scale_v or mean")
    p.add_argument("--eps", type=float, default=None, help=f"operator scale, 0 < eps < 1 (default {SCORING_EPS:g})")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts (default all)")
    p.add_argument("--out", required=True, help="output folder (tables + manifest.json)")
    _common(p)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, as every other bad input gets (argparse prints its usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="headstudy", description="Find the attention heads an LLM's safety depends on (Ships, generalized "
                                      "Ships, Sahara) and measure what removing them does.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"headstudy {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="a full study from a YAML spec")
    p.add_argument("config", nargs="?", default=None,
                   help="study spec: a file, or a built-in name (default quickstart)")
    p.add_argument("--out", default=None, help="output folder (default: the spec's 'out')")
    _common(p)

    p = sub.add_parser("plan", help="the work a study implies and what --out already holds, loading no model")
    p.add_argument("config", nargs="?", default=None, help="study spec (default quickstart)")
    p.add_argument("--out", default=None, help="output folder (default: the spec's 'out')")
    _common(p)

    p = sub.add_parser("submit", help="the same study as a Ray job on a cluster (Ray Jobs API)")
    p.add_argument("config", nargs="?", default=None, help="study spec (default quickstart)")
    p.add_argument("--address", required=True, help="the cluster's Jobs API, e.g. http://HEAD:8265")
    p.add_argument("--out", required=True, help="absolute output folder the head node can write")
    _common(p, submitted=True)

    p = sub.add_parser("report", help="figures and a self-contained report.html from a run folder's tables")
    p.add_argument("run_dir", help="a run folder (the --out of a study)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: log each step (info), -vv: debug "
                   "(default: warnings and errors only)")

    p = sub.add_parser("models", help="the built-in model aliases")
    p = sub.add_parser("configs", help="the built-in study specs")

    p = sub.add_parser("ships", help="query-level Ships: KL(normal || ablated) per prompt and head")
    _scan_args(p)
    p.add_argument("--top", type=int, default=None, help="heads printed per prompt (default 5)")
    _screen_args(p, "each prompt's")

    p = sub.add_parser("sahara", help="generalized Ships per head and the Sahara greedy group search")
    _scan_args(p)
    p.add_argument("--steps", type=int, default=None, help="greedy steps (default 3)")
    p.add_argument("--rank", type=int, default=None, help="subspace rank r (default 1, the paper)")
    p.add_argument("--subspace", default=None, help="left (default, the paper) or right")
    p.add_argument("--center", action="store_true", default=None, help="centre the hidden states first")
    _screen_args(p, "each step's")
    p.add_argument("--min-gain", type=float, default=None, help="stop when a step gains less (degrees)")

    p = sub.add_parser("joint", help="the joint head-group search: every head's gate optimised at once")
    _scan_args(p)
    p.add_argument("--objective", default=None, help="refusal (default: the drop of the probability of the "
                                                     "model's own refusals) or subspace (Sahara's)")
    p.add_argument("--k", type=int, default=None, help="the group's size, read from the top gates (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate on the gates' logits (default 0.1)")
    p.add_argument("--l1", type=float, default=None, help="the sparsity penalty's weight (default 0.01)")
    p.add_argument("--sparsity", default=None, help="l1 (default) or hard_concrete")
    p.add_argument("--init", type=float, default=None, help="every gate's start, in (0, 1) (default 0.1)")
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds, one search each; the "
                                                                 "group is the best seed's (default 0)")
    p.add_argument("--rank", type=int, default=None, help="subspace objective: rank r (default 1, the paper)")
    p.add_argument("--subspace", default=None, help="subspace objective: left (default) or right")
    p.add_argument("--center", action="store_true", default=None, help="subspace objective: centre first")
    p.add_argument("--batch-prompts", type=int, default=None, help="prompts per forward pass (default: all; "
                                                                   "the gradient is the same)")
    p.add_argument("--shard-steps", type=int, default=None, help="steps per shard, the unit of progress and resume "
                                                                 "(default 25; the numbers are the same)")

    p = sub.add_parser("asr", help="generate under ablation and judge: attack success rate with controls")
    _scan_args(p)
    p.add_argument("--heads", default=None, help="a head set to ablate, e.g. L18H8,L7H2")
    p.add_argument("--from-run", default=None, help="a run folder: its searched groups (--level dataset) or each "
                                                    "prompt's top Ships heads (--level query)")
    p.add_argument("--groups", type=lambda v: [x.strip() for x in v.split(",")], default=None,
                   help="--level dataset: comma-separated, whose groups: sahara (default), joint, ships (heads by "
                        "mean Ships over the prompts)")
    p.add_argument("--level", default=None, help="dataset (default: the group's prefixes of size 1..k) or query")
    p.add_argument("--k", type=int, default=None, help="group sizes 1..k (default: the whole group), or top-k "
                                                       "heads per prompt at --level query (default 1)")
    p.add_argument("--random-controls", type=int, default=None,
                   help="draws of as many random heads, per group size (default 0)")
    p.add_argument("--backend", default=None, help="hf (default: transformers with hooks) or vllm")
    p.add_argument("--decoding", default=None, help="greedy (default) or topk (k = 5, temperature 1)")
    p.add_argument("--samples", type=int, default=None, help="generations per prompt (default 1; topk only)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (the paper)")
    p.add_argument("--seed", type=int, default=None, help="sampling and control seed (default 0)")
    p.add_argument("--judge", dest="judges", default=None,
                   help="comma-separated: outcome, paper, paper-code, gcg, refusal, llm:MODEL; the first is the "
                        "headline (default outcome,paper)")
    p.add_argument("--benign", default=None, help="over-refusal prompt set (default builtin:benign; none to skip)")

    p = sub.add_parser("surgery", help="write an ablation into the weights and save a checkpoint")
    p.add_argument("--model", default=None, help=f"alias, local folder or HF id (default {DEFAULT_MODEL})")
    p.add_argument("--revision", default=None, help="model revision (default: the latest)")
    p.add_argument("--heads", required=True, help="head labels, zero-based, e.g. L18H8,L7H2")
    p.add_argument("--op", default=None, help=f"operator (default {DEFAULT_OP.value})")
    p.add_argument("--eps", type=float, default=None, help=f"scale (default {SURGERY_EPS:g}, the paper's)")
    p.add_argument("--out", required=True, help="checkpoint folder (new or empty)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="auto (default: bfloat16 on a GPU, else float32), float32, "
                                                 "bfloat16, float16 or float64")
    p.add_argument("--force", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: log each step (info), -vv: debug "
                   "(default: warnings and errors only)")
    return top


_SHARED = ("model", "revision", "prompts", "format", "system_prompt", "op", "eps", "limit")
_DEFAULTS = ("device", "dtype", "data_dir", "token_budget")  # also apply to every section of a spec
_EXECUTION = ("executor", "address", "actors", "cpus_per_actor", "gpus_per_actor")


def _values(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _single(args: argparse.Namespace, extra: Sequence[str]):
    from study.spec import one_experiment

    return one_experiment(args.command, _values(args, (*_SHARED, *_DEFAULTS, *extra)), _values(args, _EXECUTION),
                          args.out)


def _study(args: argparse.Namespace):
    from study.spec import load_study

    study = load_study(args.config)
    return study.with_overrides(_values(args, _DEFAULTS), _values(args, _EXECUTION))


def _run(study, args: argparse.Namespace) -> None:
    from analysis.derive import derive_run
    from study.runner import run_study, summary_lines

    _interrupted_out[0] = str(args.out or study.out)
    result = run_study(study, args.out, force=args.force, command=args.command, derive=derive_run)
    for job, tables in zip(result.jobs, result.job_tables):
        if job.experiment == "ships":
            print_ships(tables["ships"], job.cfg.top)
        elif job.experiment == "sahara":
            print_sahara(job)
        elif job.experiment == "joint":
            print_joint(tables["joint"], job)
        elif job.experiment == "asr":
            print_asr(tables["asr"], job)
        elif job.experiment == "swap":
            print_swaps(tables["swaps"], job)
        elif job.experiment == "surgery":
            saved = job.summary()
            print(f"saved {saved['checkpoint']}: {saved['label']} ({saved['edited_parameters']:,} of "
                  f"{saved['total_parameters']:,} parameters edited)")
    if "overlap" in result.derived:
        print_overlap(result.derived["overlap"])
    print("\n".join(summary_lines(result)))
    print(f"wrote {result.out} (run {result.run_id})")
    print(f"report: {_report(result.out)}")


_interrupted_out: list[str | None] = [None]  # the run folder a Ctrl-C would leave, for its one line


def _report(run_dir) -> str:
    """The run folder's figures and report.html (from its tables only: `headstudy report` redoes it)."""
    from analysis.report import write_report

    return str(write_report(run_dir))


def _cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    if not Path(args.run_dir).is_dir():
        raise UsageError(f"run folder {args.run_dir!r} not found: give the --out folder of a study")
    print(f"wrote {_report(args.run_dir)}")


def _cmd_ships(args: argparse.Namespace) -> None:
    _run(_single(args, ("top", "screen", "verify_top")), args)


def _cmd_sahara(args: argparse.Namespace) -> None:
    _run(_single(args, ("steps", "rank", "subspace", "center", "min_gain", "screen", "verify_top")), args)


def _cmd_joint(args: argparse.Namespace) -> None:
    _run(_single(args, ("objective", "k", "steps", "lr", "l1", "sparsity", "init", "seeds", "rank", "subspace",
                        "center", "batch_prompts", "shard_steps")), args)


def _cmd_asr(args: argparse.Namespace) -> None:
    _run(_single(args, ("heads", "from_run", "groups", "level", "k", "random_controls", "backend", "decoding", "samples",
                        "max_new_tokens", "seed", "judges", "benign")), args)


def _cmd_run(args: argparse.Namespace) -> None:
    _run(_study(args), args)


def _cmd_plan(args: argparse.Namespace) -> None:
    from study.runner import describe_plan, plan_study

    print("\n".join(describe_plan(plan_study(_study(args), args.out), args.force)))


def _cmd_submit(args: argparse.Namespace) -> None:
    from study.spec import load_study

    study = load_study(args.config).with_overrides(_values(args, _DEFAULTS),
                                                   _values(args, ("actors", "cpus_per_actor", "gpus_per_actor")))
    from actors.jobs import submit

    print("\n".join(submit(study, args.address, args.out, force=args.force).follow_lines()))


def _cmd_models(args: argparse.Namespace) -> None:
    from study.models.builtin import ALIASES, FAMILY, MEMBERS, alias_cached, cached_folder, read_card

    print(f"{'alias':<24} {'base':<24} {'size':>9}  {'cached':<6}  what")
    for name, alias in ALIASES.items():
        s = alias.shape
        cached = "yes" if alias_cached(name) else "no"
        print(f"{name:<24} {'-':<24} {'135M':>9}  {cached:<6}  {alias.hub_id} ({s.n_layers} layers x {s.n_heads} "
              f"heads), from the package {alias.package.replace('_', '-')}")
    for name, member in FAMILY.items():
        card = read_card(name)
        size = f"{card['adapter_bytes'] / 1e6:.1f} MB"
        cached = "yes" if cached_folder(name) is not None else "no"
        print(f"{name:<24} {member.base:<24} {size:>9}  {cached:<6}  {member.recipe}{_card_line(card)}")
    missing = [n for n in MEMBERS if n not in FAMILY]
    if missing:
        print(f"(not in this installation: {', '.join(missing)}; python -m study.family.train NAME builds one)")


def _card_line(card: dict) -> str:
    """The card's headline: refusal on held-out harmful prompts and on XSTest safe, no system prompt."""
    figs = card.get("eval", {}).get("figures", {}).get("no-system", {})
    harm = [f for f in figs.values() if f["harmful"]]
    safe = [f for f in figs.values() if not f["harmful"]]
    if not harm or not safe:
        return ""
    rate = lambda fs: sum(f["refused"] for f in fs) / sum(f["n"] for f in fs)  # noqa: E731
    n = sum(f["n"] for f in harm)
    return f"; refuses {rate(harm):.0%} of {n} held-out harmful ({len(harm)} sets), {rate(safe):.0%} of XSTest safe"


def _cmd_configs(args: argparse.Namespace) -> None:
    from study.spec import packaged_configs

    for path in sorted(packaged_configs().glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{path.stem:<16} {first}")


def _cmd_surgery(args: argparse.Namespace) -> None:
    from study.spec import one_experiment

    values = _values(args, ("model", "revision", "heads", "op", "eps", "device", "dtype"))
    # one model, one save: in this process (a study's surgery section runs on its executor, an actor on a cluster)
    _run(one_experiment("surgery", {**values, "checkpoint": args.out}, {"executor": "local"}, args.out), args)


def print_ships(table, top: int) -> None:
    df = table.to_pandas()
    print(f"\nShips ({df['op'].iloc[0]}, eps {df['eps'].iloc[0]:g}): top {top} heads per prompt")
    for pid, g in df[df["rank"] <= top].sort_values(["prompt_id", "rank"]).groupby("prompt_id", sort=False):
        text = g["prompt"].iloc[0]
        heads = "  ".join(f"{r.head_label} {r.kl:.3g}" for r in g.itertuples())
        print(f"  {text[:60]:<60}  {heads}")
    overall = df.groupby("head_label").agg(mean_kl=("kl", "mean"), top1=("rank", lambda r: int((r == 1).sum())))
    overall = overall.sort_values(["top1", "mean_kl"], ascending=False).head(10)
    print("overall (prompts where the head is top-1, mean KL):")
    for label, r in overall.iterrows():
        n = int(r.top1)
        print(f"  {label:<8} top-1 on {n:>3} prompt{'s' if n != 1 else ' '}   mean KL {r.mean_kl:.4g}")


def print_sahara(job) -> None:
    print(f"\nSahara on {job.cfg.model} (generalized Ships, degrees):")
    previous = 0.0
    for st in job.steps:
        order = sorted(range(len(st.scores)), key=lambda i: -st.scores[i])
        runner = st.candidates[order[1]].label if len(order) > 1 else "-"
        print(f"  step {st.step}: + {st.chosen.label:<8} score {st.best:8.4f}  gain {st.best - previous:+8.4f}"
              f"  (runner-up {runner} {st.scores[order[1]] if len(order) > 1 else float('nan'):.4f})")
        previous = st.best
    print(f"group: {', '.join(h.label for h in job.group)}")


def print_joint(table, job) -> None:
    """Each seed's group with its exact objective, and the selected one."""
    df = table.to_pandas()
    unit = "probability drop" if job.cfg.objective.value == "refusal" else "degrees"
    print(f"\njoint search on {job.cfg.model} ({job.cfg.objective.value} objective, {unit}; "
          f"{int(df['prompts_used'].iloc[0])} prompts, {job.cfg.steps} steps):")
    for seed, g in df.groupby("seed", sort=False):
        top = g[g["in_group"]].sort_values("rank")
        heads = "  ".join(f"{r.head_label} gate {r.gate:.2f} -> {r.score:.4g}" for r in top.itertuples())
        print(f"  seed {seed}{' (selected)' if bool(top['selected'].iloc[0]) else ''}: {heads}")
    print(f"group: {', '.join(h.label for h in job.group)}")


def print_asr(table, job) -> None:
    """Per set and judge: each arm's ASR with its interval, the paired p-value, and what the text became."""
    df = table.to_pandas()
    dec = job.decoding
    print(f"\nASR on {job.cfg.model} ({dec.label}, {dec.max_new_tokens} new tokens, {job.cfg.backend}):")
    for (kind, dataset, judge), g in df.groupby(["kind", "dataset", "judge"], sort=False):
        what = "ASR" if kind == "harmful" else "complied"
        print(f"  {dataset} ({kind}, {int(g['n'].iloc[0])} generations), judge {judge}:")
        print(f"    {'condition':<26} {what:>8}  {'95% CI':<13} {'p vs normal':>11}  {'refused':>7}  "
              f"{'non-answer':>10}  {'degenerate':>10}")
        for r in g[g["condition"] != "random"].itertuples():
            p = "" if r.p_mcnemar is None or r.p_mcnemar != r.p_mcnemar else f"{r.p_mcnemar:.3g}"
            name = r.condition if r.condition == "normal" else f"{r.condition} {r.ablation.split(':')[-1]}"
            print(f"    {name[:26]:<26} {r.asr:8.2f}  [{r.ci_low:.2f}, {r.ci_high:.2f}]  {p:>11}  "
                  f"{r.refusal_rate:7.2f}  {r.non_answer_rate:10.2f}  {r.degenerate_frac:10.2f}")
        for size, c in g[g["condition"] == "random"].groupby("group_size"):
            print(f"    {f'random {size} heads (x{len(c)})':<26} {c['asr'].mean():8.2f}  "
                  f"[{c['asr'].min():.2f} .. {c['asr'].max():.2f}] {'':>11}  {c['refusal_rate'].mean():7.2f}  "
                  f"{c['non_answer_rate'].mean():10.2f}  {c['degenerate_frac'].mean():10.2f}")
    print("  (random: mean ASR of the draws, [min .. max]; non-answer: neither refused nor answered; degenerate: "
          "repetition, an echo or no words)")


def print_swaps(table, job) -> None:
    """Per recipe: ASR on the harmful set, refusals on the benign set (first judge), the safety heads' Ships."""
    df = table.to_pandas()
    judge = job.judges[0].label
    heads = ",".join(h.label for h in job.safety or ()) or "none"
    print(f"\nbase-weight swaps: {job.cfg.model} <- {job.cfg.base} (safety heads {heads}; judge {judge}):")
    print(f"  {'recipe':<18} {'ASR':>6}  {'95% CI':<13} {'benign refused':>14}  {'degenerate':>10}  {'Ships':>8}")
    for recipe, g in df.groupby("recipe", sort=False):
        def value(kind: str, metric: str, j: str | None = judge):
            r = g[(g["kind"] == kind) & (g["metric"] == metric) & ((g["judge"] == j) if j else True)]
            return r.iloc[0] if len(r) else None
        asr, benign = value("harmful", "asr"), value("benign", "refusal_rate")
        degen = value("harmful", "degenerate_frac")
        ships = g[g["kind"] == "ships"]
        ships_v = ships[ships["metric"] == "ships:group"] if (ships["metric"] == "ships:group").any() else ships
        print(f"  {recipe:<18} {asr.value:6.2f}  [{asr.ci_low:.2f}, {asr.ci_high:.2f}]  "
              f"{'' if benign is None else f'{benign.value:.2f}':>14}  {degen.value:10.2f}  "
              f"{ships_v['value'].mean() if len(ships_v) else float('nan'):8.3f}")
    print("  (Ships: mean KL when the safety heads are ablated together, in that model)")


def print_overlap(table) -> None:
    """Pairs of models: how many top-k heads they share, against random head sets of the same size."""
    df = table.to_pandas()
    df = df[(df["axis"] == "models") & (df["n_sets"] == 2)]
    if df.empty:
        return
    print("\nshared top heads across models (p: chance that random head sets of that size share as many):")
    for r in df.itertuples():
        a, b = (m.split("/")[-1] for m in r.models)
        shared = ",".join(r.shared_heads) or "none"
        print(f"  {r.source:<11} {r.datasets[0][:22]:<22} {r.ops[0]:<8} top-{r.k}: {a} & {b}: {r.shared} "
              f"({shared}), p = {r.p_value:.2g}")


COMMANDS = {"run": _cmd_run, "plan": _cmd_plan, "submit": _cmd_submit, "ships": _cmd_ships,
            "sahara": _cmd_sahara, "joint": _cmd_joint, "asr": _cmd_asr, "surgery": _cmd_surgery,
            "report": _cmd_report, "models": _cmd_models, "configs": _cmd_configs}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    verbosity = getattr(args, "verbose", 0) or 0
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbosity, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with sigterm_as_interrupt():
            COMMANDS[args.command](args)
    except UsageError as err:  # raised on a Ray actor, it comes wrapped: its own message, not Ray's traceback
        print(f"headstudy: error: {getattr(err, 'cause', None) or err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"headstudy: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated)
        out = _interrupted_out[0]
        kept = (f"finished shards are kept in {out}/shards and the same command resumes from them" if out
                else "nothing was being written")
        what, code = ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        print(f"headstudy: {what}: {kept}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
