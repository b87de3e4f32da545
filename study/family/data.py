"""The family's training and evaluation data: which prompts train, which validate, which evaluate.

Licence-clean sources only (DESIGN §2): AdvBench, StrongREJECT (less its MaliciousInstruct rows) and HarmBench
are MIT; the harmless requests, the contrast pairs and the refusals are written for this project
(`study/data/family/`). Alpaca (CC BY-NC) and MaliciousInstruct (no licence) are never trained on, nor is any
prompt of an evaluation set: held-out AdvBench, JailbreakBench (whose rows come partly from AdvBench and
HarmBench), HarmBench test, MaliciousInstruct, XSTest and the builtin sets the default study uses. Prompts
are compared after normalising case and whitespace, so a copy in another set is caught too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from study.core.errors import UsageError
from study.models.builtin import family_root
from study.prompts.sets import load_prompts, prompt_id

# Held-out evaluation: (card label, prompt spec, limit). AdvBench is split by prompt hash (see `advbench_half`).
EVAL_HARMFUL = (("advbench-heldout", "advbench", None), ("jailbreakbench", "jailbreakbench", None),
                ("harmbench-test", "harmbench:test", None), ("maliciousinstruct", "maliciousinstruct", None))
EVAL_HARMLESS = (("xstest-safe", "xstest:safe", None),)
NEVER_TRAIN = ("jailbreakbench", "harmbench:test", "maliciousinstruct", "xstest", "builtin:harmful",
               "builtin:benign")


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def bucket(text: str, salt: str = "") -> int:
    """A stable 0-99 bucket of a prompt (splits that do not move when a file is reordered)."""
    return int(hashlib.sha256(f"{salt}{norm(text)}".encode()).hexdigest()[:8], 16) % 100


def advbench_half(text: str) -> str:
    """AdvBench is split once for every member: 60 % may train, 40 % is held out for evaluation."""
    return "train" if bucket(text, "advbench") < 60 else "heldout"


@dataclass(frozen=True)
class Example:
    text: str
    harmful: bool
    source: str


@dataclass(frozen=True)
class Splits:
    train: tuple[Example, ...]
    val: tuple[Example, ...]

    def ids(self) -> list[str]:
        return sorted({prompt_id(e.text) for e in self.train + self.val})


def _family_file(name: str) -> Path:
    return family_root() / name


def refusals() -> list[str]:
    return [ln.strip() for ln in _family_file("refusals.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]


def refusal_for(text: str, seed: int) -> str:
    """A refusal target for a harmful prompt, varied by prompt and seed (one fixed refusal teaches one string)."""
    options = refusals()
    return options[bucket(text, f"refusal{seed}") % len(options)]


def _written() -> tuple[list[str], list[tuple[str, str]]]:
    harmless = [ln.strip() for ln in _family_file("harmless.txt").read_text(encoding="utf-8").splitlines()
                if ln.strip()]
    pairs = []
    for ln in _family_file("contrast.jsonl").read_text(encoding="utf-8").splitlines():
        if ln.strip():
            row = json.loads(ln)
            pairs.append((row["harmful"], row["harmless"]))
    return harmless, pairs


def _strongreject(data_dir: Path) -> list[str]:
    import csv

    path = data_dir / "strongreject" / "strongreject.csv"
    with path.open(encoding="utf-8", newline="") as f:
        return [r["forbidden_prompt"] for r in csv.DictReader(f) if r["source"] != "MaliciousInstruct"]


def eval_sets(data_dir: Path, limit: int | None = None) -> dict[str, tuple[bool, list[str]]]:
    """The held-out evaluation sets: label -> (harmful?, texts), each cut to `limit` prompts."""
    out: dict[str, tuple[bool, list[str]]] = {}
    for harmful, specs in ((True, EVAL_HARMFUL), (False, EVAL_HARMLESS)):
        for label, spec, _ in specs:
            texts = load_prompts(spec, data_dir).texts
            if spec == "advbench":
                texts = [t for t in texts if advbench_half(t) == "heldout"]
            out[label] = (harmful, texts[:limit] if limit else texts)
    return out


def build_splits(data_dir: Path, seed: int, val_share: int = 12) -> Splits:
    """Training and validation examples for one seed: the seed moves which prompts validate, nothing else."""
    if not (data_dir / "advbench").is_dir():
        raise UsageError(f"the training data needs a data directory with advbench/, strongreject/, harmbench/ "
                         f"(and the evaluation sets): {data_dir} has no advbench/")
    banned = {norm(t) for spec in NEVER_TRAIN for t in load_prompts(spec, data_dir).texts}
    banned |= {norm(t) for t in load_prompts("advbench", data_dir).texts if advbench_half(t) == "heldout"}
    harmless, pairs = _written()
    sources: list[tuple[str, bool, list[str]]] = [
        ("advbench-train", True, [t for t in load_prompts("advbench", data_dir).texts if advbench_half(t) == "train"]),
        ("strongreject", True, _strongreject(data_dir)),
        ("harmbench-val", True, load_prompts("harmbench:val", data_dir).texts),
        ("contrast-harmful", True, [h for h, _ in pairs]),
        ("contrast-harmless", False, [b for _, b in pairs]),
        ("harmless", False, harmless),
    ]
    seen: set[str] = set()
    train: list[Example] = []
    val: list[Example] = []
    for source, harmful, texts in sources:
        for text in texts:
            key = norm(text)
            if key in banned or key in seen:
                continue
            seen.add(key)
            (val if bucket(text, f"val{seed}") < val_share else train).append(Example(text, harmful, source))
    return Splits(tuple(train), tuple(val))
