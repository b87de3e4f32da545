"""The `headstudy` command line: a thin layer over `study.runner` (see DESIGN.md section 6).

Bad input ends with one line on stderr and exit code 2, before any model is loaded where possible.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from study.errors import UsageError

DEFAULT_CONFIG = "configs/quickstart.yaml"


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--executor", default="local", help="local (in this process); ray arrives with the Ray issue")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64")
    g.add_argument("--data-dir", default=None, help="folder with known datasets (default $HEADSTUDY_DATA)")
    g.add_argument("--token-budget", type=int, default=None, help="rows x tokens per forward (memory bound)")
    g.add_argument("-v", "--verbose", action="store_true")


def _scan_args(p: argparse.ArgumentParser, eps_default: float = 1e-5) -> None:
    p.add_argument("--model", default=None, help="alias, local folder or HF id (default smollm2-135m-instruct)")
    p.add_argument("--revision", default=None)
    p.add_argument("--prompts", default=None, help="builtin:harmful, a file[:column] or a known name (advbench...)")
    p.add_argument("--format", default=None, help="paper (default), direct or chat")
    p.add_argument("--system-prompt", default=None, help="system prompt for --format chat")
    p.add_argument("--op", default=None, help="undiff_q (default), undiff_k, scale_v or mean")
    p.add_argument("--eps", type=float, default=None, help=f"operator scale, 0 < eps < 1 (default {eps_default:g})")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--out", required=True, help="output folder (tables + manifest.json)")
    _common(p)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="headstudy", description="Attention heads that LLM safety depends on.")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="a full study from a YAML spec")
    p.add_argument("config", nargs="?", default=None, help=f"study spec (default {DEFAULT_CONFIG})")
    p.add_argument("--out", default=None, help="output folder (default: the spec's 'out')")
    _common(p)

    p = sub.add_parser("ships", help="query-level Ships: KL(normal || ablated) per prompt and head")
    _scan_args(p)
    p.add_argument("--top", type=int, default=None, help="heads printed per prompt (default 5)")

    p = sub.add_parser("sahara", help="generalized Ships per head and the Sahara greedy group search")
    _scan_args(p)
    p.add_argument("--steps", type=int, default=None, help="greedy steps (default 3)")
    p.add_argument("--rank", type=int, default=None, help="subspace rank r (default 1, the paper)")
    p.add_argument("--subspace", default=None, help="left (default, the paper) or right")
    p.add_argument("--center", action="store_true", default=None, help="centre the hidden states first")
    p.add_argument("--min-gain", type=float, default=None, help="stop when a step gains less (degrees)")

    p = sub.add_parser("surgery", help="write an ablation into the weights and save a checkpoint")
    p.add_argument("--model", default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--heads", required=True, help="e.g. L2H26,L3H8")
    p.add_argument("--op", default="undiff_q")
    p.add_argument("--eps", type=float, default=1e-10)
    p.add_argument("--out", required=True, help="checkpoint folder (new or empty)")
    _common(p)
    return top


_SHARED = ("model", "revision", "prompts", "format", "system_prompt", "op", "eps", "limit", "device", "dtype",
           "data_dir", "token_budget", "executor")


def _values(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _check_executor(name: str) -> None:
    if name != "local":
        raise UsageError(f"unknown executor {name!r}: valid executors in this version are local")


def _cmd_ships(args: argparse.Namespace) -> None:
    from study.config import ShipsConfig, build
    from study.runner import run_ships

    cfg = build(ShipsConfig, _values(args, (*_SHARED, "top")))
    out = run_ships(cfg, args.out)
    print_ships(out.tables["ships"], cfg.top)
    print(f"wrote {out.out} (run {out.run_id})")


def _cmd_sahara(args: argparse.Namespace) -> None:
    from study.config import SaharaConfig, build
    from study.runner import run_sahara_job

    cfg = build(SaharaConfig, _values(args, (*_SHARED, "steps", "rank", "subspace", "center", "min_gain")))
    out = run_sahara_job(cfg, args.out)
    print_sahara(out)
    print(f"wrote {out.out} (run {out.run_id})")


def _cmd_run(args: argparse.Namespace) -> None:
    from study.config import load_study
    from study.runner import run_study

    study = load_study(args.config or DEFAULT_CONFIG)
    overrides = _values(args, ("device", "dtype", "data_dir", "token_budget", "executor"))
    if overrides:
        study = study.model_copy(update={"defaults": {**study.defaults, **overrides}})
        study.ships_config(), study.sahara_config()
    out = run_study(study, args.out)
    if "ships" in out.tables:
        print_ships(out.tables["ships"], 3)
    if out.steps:
        print_sahara(out)
    print(f"wrote {out.out} (run {out.run_id})")


def _cmd_surgery(args: argparse.Namespace) -> None:
    from study.ablation import Ablation, parse_op
    from study.heads import parse_heads
    from study.models import DEFAULT_MODEL, check_model_name, load_model
    from study.surgery import save_ablated

    heads = parse_heads(args.heads)
    ablation = Ablation(heads=heads, op=parse_op(args.op), eps=args.eps)
    model = args.model or DEFAULT_MODEL
    check_model_name(model)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise UsageError(f"checkpoint folder {args.out!r} exists and is not empty: choose a new --out")
    lm = load_model(model, device=args.device, dtype=args.dtype, revision=args.revision)
    save_ablated(lm, ablation, args.out)
    print(f"wrote {args.out}: {ablation.label}")


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
        print(f"  {label:<8} top-1 on {int(r.top1):>3} prompts   mean KL {r.mean_kl:.4g}")


def print_sahara(out) -> None:
    print("\nSahara (generalized Ships, degrees):")
    previous = 0.0
    for st in out.steps:
        order = sorted(range(len(st.scores)), key=lambda i: -st.scores[i])
        runner = st.candidates[order[1]].label if len(order) > 1 else "-"
        print(f"  step {st.step}: + {st.chosen.label:<8} score {st.best:8.4f}  gain {st.best - previous:+8.4f}"
              f"  (runner-up {runner} {st.scores[order[1]] if len(order) > 1 else float('nan'):.4f})")
        previous = st.best
    print(f"group: {', '.join(h.label for h in out.group)}")


COMMANDS = {"run": _cmd_run, "ships": _cmd_ships, "sahara": _cmd_sahara, "surgery": _cmd_surgery}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _check_executor(args.executor)
        COMMANDS[args.command](args)
    except UsageError as err:
        print(f"headstudy: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
