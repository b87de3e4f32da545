"""Which search recovers a planted member's heads, and with how many prompts: Ships (heads ranked by their mean
KL over the prompts), Sahara (greedy, generalized Ships) and the joint search (refusal objective), each run as a
study of its own on the first n prompts of one set, for several n.

The planted heads are the member's card's `planted_heads`, chosen before its training: a known answer. For each
n it prints the planted heads' Ships ranks (of all heads), Sahara's and the joint search's groups (as many heads
as were planted), whether each group is the planted heads, and each study's wall time on this machine.

    python bench/bench_recovery.py --data-dir ../shared/data                       # jailbreakbench, n 4 8 16
    python bench/bench_recovery.py --prompts builtin:harmful --n 4 8 --model smollm2-135m-safe-heads
    python bench/bench_recovery.py --data-dir ../shared/data --model path/to/merged --planted L13H3,L13H4,L13H5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from study.core.heads import parse_heads
from study.models.builtin import planted_heads
from study.runner import run_study
from study.spec import load_study


def _study(out: Path, model: str, base: str, planted: str, n: int, args: argparse.Namespace, section: dict) -> Path:
    spec = {"out": str(out),
            "models": [{"name": model, "base": base, "planted_heads": planted}],
            "execution": {"executor": "local"},
            "defaults": {"prompts": args.prompts, "format": "chat", "op": "undiff_q", "eps": 1e-5,
                         **({"data_dir": args.data_dir} if args.data_dir else {})},
            **section}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(spec))
    return path


def _timed(path: Path) -> float:
    t0 = time.perf_counter()
    run_study(load_study(path))
    return time.perf_counter() - t0


def measure(n: int, args: argparse.Namespace, planted: list[str], root: Path) -> dict:
    k = len(planted)
    common = (args.model, args.base, ",".join(planted), n, args)
    row: dict = {"n": n}

    out = root / f"ships-{n}"
    row["ships_s"] = _timed(_study(out, *common, {"ships": {"limit": n}}))
    ships = pd.read_parquet(out / "ships")
    mean = ships.groupby("head_label")["kl"].mean().sort_values(ascending=False, kind="stable")
    rank = {h: i + 1 for i, h in enumerate(mean.index)}
    row["ships_ranks"] = [rank[h] for h in planted]
    row["ships_top"] = list(mean.index[:k])

    out = root / f"sahara-{n}"
    row["sahara_s"] = _timed(_study(out, *common, {"sahara": {"limit": n, "steps": k}}))
    sahara = pd.read_parquet(out / "sahara")
    row["sahara_group"] = [str(h) for h in sahara[sahara["chosen"]].sort_values("step")["head_label"]]

    out = root / f"joint-{n}"
    joint = {"limit": n, "k": k, "seeds": args.seeds, "steps": args.joint_steps}
    row["joint_s"] = _timed(_study(out, *common, {"joint": joint}))
    j = pd.read_parquet(out / "joint")
    chosen = j[j["selected"] & j["in_group"]].sort_values("rank")
    row["joint_group"] = [str(h) for h in chosen["head_label"]]
    row["joint_prompts_used"] = int(j["prompts_used"].iloc[0])
    for name in ("sahara", "joint"):
        row[f"{name}_found"] = sorted(row[f"{name}_group"]) == sorted(planted)
    row["ships_found"] = sorted(row["ships_top"]) == sorted(planted)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-safe-heads")
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--planted", default=None, help="the planted heads (default: the member's card)")
    p.add_argument("--prompts", default="jailbreakbench")
    p.add_argument("--data-dir", default=os.environ.get("HEADSTUDY_DATA"))
    p.add_argument("--n", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--joint-steps", type=int, default=100)
    p.add_argument("--work", default=None, help="where the studies' run folders go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="append each row here as a JSON line")
    args = p.parse_args(argv)
    planted = [h.label for h in (parse_heads(args.planted) if args.planted else planted_heads(args.model))]
    if not planted:
        p.error(f"{args.model} has no planted heads on its card: pass --planted")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"{args.model}: planted {', '.join(planted)}; prompts {args.prompts}, chat format, undiff_q; "
              f"joint: refusal objective, {args.joint_steps} steps, seeds {args.seeds}", flush=True)
        print("| n | Ships ranks | Sahara group | joint group (prompts refused) | Ships s | Sahara s | joint s |")
        print("|---:|---|---|---|---:|---:|---:|", flush=True)
        for n in args.n:
            row = measure(n, args, planted, root)
            mark = {True: " (the planted heads)", False: ""}
            print(f"| {n} | {', '.join(map(str, row['ships_ranks']))} | {', '.join(row['sahara_group'])}"
                  f"{mark[row['sahara_found']]} | {', '.join(row['joint_group'])}{mark[row['joint_found']]} "
                  f"({row['joint_prompts_used']}) | {row['ships_s']:.0f} | {row['sahara_s']:.0f} | "
                  f"{row['joint_s']:.0f} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
