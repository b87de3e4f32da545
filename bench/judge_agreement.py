"""How well each offline judge agrees with JailbreakBench's labelled responses, and how fast it is.

JailbreakBench publishes its attack artifacts (`jailbreakbench/artifacts/<method>/<kind>/<model>.json`): every
jailbreak entry carries the attacked model's response and a boolean `jailbroken` from the benchmark's LLM
judge. Taking `jailbroken` as the truth (positive class: jailbroken = harmful), this script prints, per judge
of `study.generation.judges`: n, accuracy, precision, recall, F1, how many verdicts fell in each outcome
(refusal / answer / non-answer) and the time to judge 1,000 responses on this CPU; then the same on the
development and held-out halves, and the accuracy per attack method.

The halves are fixed by a hash of the response text (`Labelled.split`: the low bit of the first byte of its
SHA-256; 866 dev, 771 held-out). The `outcome` judge's rules were tuned on dev only; held-out is its honest figure.

    python bench/judge_agreement.py                                   # data from $HEADSTUDY_DATA or ../shared/data
    python bench/judge_agreement.py --data-dir /data --judges paper,refusal --errors 5
    python bench/judge_agreement.py --judges refusal,llm:smollm2-135m-instruct --limit 200

Loaded: every artifact JSON under `artifacts/**` holding a `jailbreaks` list, every entry with a non-null
`response` and a boolean `jailbroken`, except the `test-artifact` folder (three placeholder entries,
"Placeholder Response", labelled jailbroken). That gives 1,637 responses (937 jailbroken) in the March 2024
release.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without an install

from study.generation.judges.base import OUTCOMES, Judge, Verdict  # noqa: E402
from study.generation.judges.llm import LLMJudge  # noqa: E402
from study.generation.judges.registry import JUDGE_NAMES, get_judge  # noqa: E402
from study.prompts.sets import DATA_ENV  # noqa: E402

ARTIFACTS = Path("jailbreakbench") / "artifacts"
PLACEHOLDER_FOLDERS = ("test-artifact",)


@dataclass(frozen=True)
class Labelled:
    source: str  # artifact path relative to the artifacts folder
    prompt: str
    response: str
    jailbroken: bool

    @property
    def method(self) -> str:
        """The attack method: the artifact's first folder (GCG, PAIR, JBC, ...)."""
        return Path(self.source).parts[0]

    @property
    def split(self) -> str:
        """`dev` or `held`: the low bit of the first byte of the response's SHA-256 (fixed, label-blind)."""
        return "dev" if hashlib.sha256(self.response.encode("utf-8")).digest()[0] % 2 == 0 else "held"


def default_data_dir() -> Path:
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else REPO.parent / "shared" / "data"


def load_artifacts(data_dir: Path) -> list[Labelled]:
    """Every labelled response of the JailbreakBench artifacts under `data_dir` (see the module docstring)."""
    root = Path(data_dir) / ARTIFACTS
    if not root.is_dir():
        raise FileNotFoundError(f"no JailbreakBench artifacts at {root}")
    rows: list[Labelled] = []
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root)
        if rel.parts[0] in PLACEHOLDER_FOLDERS:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("jailbreaks"), list):
            continue  # attack-info.json, DSN's evaluation and submission logs
        for entry in data["jailbreaks"]:
            response, label = entry.get("response"), entry.get("jailbroken")
            if response is None or not isinstance(label, bool):
                continue
            rows.append(Labelled(str(rel), entry.get("prompt") or "", response, label))
    return rows


@dataclass(frozen=True)
class Agreement:
    judge: str
    n: int
    tp: int
    fp: int
    fn: int
    tn: int
    ms_per_1000: float
    outcomes: tuple[int, int, int] = (0, 0, 0)  # refusal, answer, non_answer verdicts

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else float("nan")


def score(label: str, verdicts: Sequence[Verdict], rows: Sequence[Labelled], ms: float = float("nan")) -> Agreement:
    """Agreement of `verdicts` (one per row; harmful = jailbroken) with the rows' labels."""
    pred = [v.harmful for v in verdicts]
    truth = [r.jailbroken for r in rows]
    tp = sum(p and t for p, t in zip(pred, truth))
    fp = sum(p and not t for p, t in zip(pred, truth))
    fn = sum(t and not p for p, t in zip(pred, truth))
    outcomes = tuple(sum(v.outcome == o for v in verdicts) for o in OUTCOMES)
    return Agreement(label, len(rows), tp, fp, fn, len(rows) - tp - fp - fn, ms, outcomes)  # type: ignore[arg-type]


def judged(judge: Judge, rows: Sequence[Labelled], repeats: int = 1) -> tuple[list[Verdict], float]:
    """`judge`'s verdicts on every row and its ms per 1,000 responses (the best of `repeats` passes)."""
    prompts, responses = [r.prompt for r in rows], [r.response for r in rows]
    best = float("inf")
    verdicts: list[Verdict] = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        verdicts = judge.judge_many(prompts, responses)
        best = min(best, time.perf_counter() - start)
    return verdicts, (1000 * best / len(rows) * 1000 if rows else float("nan"))


def agreement(judge: Judge, rows: Sequence[Labelled], repeats: int = 1) -> tuple[Agreement, list[bool]]:
    """Score `judge` against the labels; the time is the best of `repeats` passes over all rows."""
    verdicts, ms = judged(judge, rows, repeats)
    return score(judge.label, verdicts, rows, ms), [v.harmful for v in verdicts]


def answer_rubrics(judge: Judge, rows: Sequence[Labelled]) -> float:
    """Run an `llm:MODEL` judge's rubric on every row with the HF backend (greedy); returns the seconds."""
    from study.core.ablation import Ablation
    from study.generation.decoding import Decoding
    from study.generation.hf import HFGenerator
    from study.generation.judges.llm import ANSWER_TOKENS, rubric
    from study.models.loading import load_model
    from study.prompts.formats import PromptFormat, encode
    from study.prompts.sets import prompt_id

    lm = load_model(judge.model)
    texts = sorted({rubric(r.prompt, r.response) for r in rows})
    ids = [encode(t, PromptFormat.CHAT, lm.tokenizer) for t in texts]
    start = time.perf_counter()
    out = HFGenerator(lm, batch_rows=8).generate(ids, [Ablation()] * len(ids), Decoding(max_new_tokens=ANSWER_TOKENS),
                                                 [0] * len(ids))
    judge.answers = {prompt_id(t): lm.tokenizer.decode(o, skip_special_tokens=True) for t, o in zip(texts, out)}
    return time.perf_counter() - start


def table(results: Sequence[Agreement], timing: bool = True) -> str:
    w = max([14, *(len(a.judge) + 1 for a in results)])
    head = (f"{'judge':<{w}} {'n':>5} {'accuracy':>8} {'precision':>9} {'recall':>6} {'f1':>6} {'FP':>4} {'FN':>4} "
            f"{'refusal':>7} {'answer':>6} {'non-answer':>10}" + (f" {'ms/1000':>8}" if timing else ""))
    lines = [head, "-" * len(head)]
    for a in results:
        lines.append(f"{a.judge:<{w}} {a.n:>5} {a.accuracy:>8.4f} {a.precision:>9.3f} {a.recall:>6.3f} "
                     f"{a.f1:>6.3f} {a.fp:>4} {a.fn:>4} {a.outcomes[0]:>7} {a.outcomes[1]:>6} {a.outcomes[2]:>10}"
                     + (f" {a.ms_per_1000:>8.1f}" if timing else ""))
    return "\n".join(lines)


def by_method(labels: Sequence[str], verdicts: Sequence[Sequence[Verdict]], rows: Sequence[Labelled]) -> str:
    """Accuracy per attack method (columns) for each judge (rows)."""
    methods = sorted({r.method for r in rows})
    w = max([14, *(len(x) + 1 for x in labels)])
    cols = [f"{m} ({sum(r.method == m for r in rows)})" for m in methods]
    lines = [f"{'judge':<{w}} " + " ".join(f"{c:>{max(9, len(c))}}" for c in cols)]
    for label, vs in zip(labels, verdicts):
        cells = []
        for m, c in zip(methods, cols):
            idx = [i for i, r in enumerate(rows) if r.method == m]
            a = score(label, [vs[i] for i in idx], [rows[i] for i in idx])
            cells.append(f"{a.accuracy:>{max(9, len(c))}.3f}")
        lines.append(f"{label:<{w}} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None,
                    help=f"dataset folder holding jailbreakbench/artifacts (default ${DATA_ENV}, else ../shared/data)")
    ap.add_argument("--judges", default=",".join(JUDGE_NAMES), help="comma-separated (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timing passes, best kept (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, metavar="N",
                    help="a seeded random sample of N responses (an llm: judge generates for each)")
    ap.add_argument("--errors", type=int, default=0, metavar="K",
                    help="also print K disagreements of each kind for each judge")
    args = ap.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    try:
        rows = load_artifacts(data_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.limit is not None:
        rows = random.Random(0).sample(rows, min(args.limit, len(rows)))
    judges = [get_judge(name.strip()) for name in args.judges.split(",") if name.strip()]
    print(f"{len(rows)} labelled responses ({sum(r.jailbroken for r in rows)} jailbroken) from "
          f"{data_dir / ARTIFACTS}")
    results, verdicts = [], []
    for judge in judges:
        if isinstance(judge, LLMJudge):
            seconds = answer_rubrics(judge, rows)
            print(f"{judge.label}: {len(rows)} rubric answers generated in {seconds:.1f} s")
        vs, ms = judged(judge, rows, args.repeats)
        verdicts.append(vs)
        results.append(score(judge.label, vs, rows, ms))
        if args.errors:
            for kind, want in (("false harmful", False), ("missed harmful", True)):
                bad = [(r, v) for r, v in zip(rows, vs) if v.harmful != r.jailbroken and r.jailbroken == want]
                for r, v in bad[:args.errors]:
                    print(f"  {judge.label} {kind} [{v.rule}] {r.source}: {r.response[:120]!r}")
    labels = [j.label for j in judges]
    print("\nall responses\n" + table(results))
    for split, name in (("dev", "development half (rules tuned here)"), ("held", "held-out half")):
        idx = [i for i, r in enumerate(rows) if r.split == split]
        part = [rows[i] for i in idx]
        print(f"\n{name}: {len(part)} responses ({sum(r.jailbroken for r in part)} jailbroken)\n"
              + table([score(lab, [vs[i] for i in idx], part) for lab, vs in zip(labels, verdicts)], timing=False))
    print("\naccuracy per attack method (all responses)\n" + by_method(labels, verdicts, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
