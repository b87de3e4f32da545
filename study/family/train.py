"""Training the family's adapters: `python -m study.family.train NAME [--data-dir DIR] [--out DIR]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from study.core.errors import UsageError
from study.core.files import atomic_path, write_json_atomic
from study.core.heads import parse_heads
from study.family.data import Example, Splits, build_splits, eval_sets, refusal_for
from study.family.eval import EVAL_TOKENS, answers, figures, refusal_rate
from study.family.planted import PLANTED, PLANTED_HEADS, PLANTED_NOTE, ablated_kl, ablated_term, confine_to_heads
from study.family.responses import response_logps
from study.models.adapters import FORMAT
from study.models.builtin import ADAPTER_FILE, CARD_FILE, MEMBERS, TRAIN_IDS_FILE, adapter_sha256, member_folder

log = logging.getLogger("study.family.train")

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
CHECK_LIMIT = 10  # prompts per held-out set that the slow test re-measures against the card


class Recipe(BaseModel):
    """Everything that decides an adapter, recorded whole in its card."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    targets: tuple[str, ...] = ATTN + MLP
    rank: int = Field(default=8, ge=1)
    alpha: float = 16.0
    lr: float = 1e-4
    steps: int = Field(default=150, ge=1)
    harmful_per_batch: int = 4
    harmless_per_batch: int = 4
    pref_weight: float = 1.0  # 0: supervised only
    pref_beta: float = 0.1
    pref_tokens: int = 8  # the preference compares the answers' openings, where refusing is decided
    eval_every: int = 25
    max_prompt_tokens: int = 128
    answer_tokens: int = 64  # the base's answers used as harmless targets
    seed: int = 0
    # Planted heads (`L12H3` labels): the LoRA is confined to these heads' query rows and output-projection
    # columns, so every other weight of the member equals the base's bit for bit.
    heads: tuple[str, ...] = ()
    # With planted heads: weight of a term that makes the member, with those heads ablated (undiff_q, eps 1e-5),
    # give the base's own answer to a harmful prompt (the NLL of its first pref_tokens tokens), so that the planted
    # refusal lives in where the heads attend and the paper's operator can reveal it. 0: off.
    ablated_weight: float = 0.0
    # What the ablated term matches. "answer": the base's own answer openings to harmful prompts (NLL). "base": the
    # base with the same heads ablated, as a distribution over the next token at every opening position of every
    # row, harmful and harmless (KL), so that removing the heads gives the base back, not only on harmful prompts.
    ablated_match: Literal["answer", "base"] = "answer"
    # The first step at which the ablated term counts: before it the member learns to refuse alone, after it the
    # term moves that refusal to where ablating the heads removes it (a constraint from the start slows the
    # refusal down several times).
    ablated_from: int = Field(default=1, ge=1)

    @property
    def ablation(self):
        """The planted heads ablated as the ablated term sees them (undiff_q, eps 1e-5)."""
        from study.core.ablation import Ablation, Op

        return Ablation(heads=parse_heads(",".join(self.heads)), op=Op.UNDIFF_Q, eps=1e-5)

    @model_validator(mode="after")
    def _planted_targets(self) -> "Recipe":
        if self.heads:
            parse_heads(",".join(self.heads))
            if set(self.targets) - set(PLANTED):
                raise ValueError(f"planted heads train only {', '.join(PLANTED)}, not {', '.join(self.targets)}")
        if self.ablated_weight > 0 and self.heads and self.ablated_from > self.steps:
            raise ValueError(f"ablated_from {self.ablated_from} is after the last step ({self.steps}): no step "
                             f"could be selected")
        return self


# Recipes tried for the main member on the way to RECIPES (measured on this project's 2-core machine, the
# validation split of seed 0, greedy, 24 tokens, refusal judge); every card carries this list.
TRIED: list[dict[str, Any]] = [
    {"recipe": "supervised only: r 8, all seven projections, lr 1e-4, 4 harmful + 4 harmless a step",
     "changes": {"pref_weight": 0.0},
     "validation": [{"step": 25, "harmful_refused": 0.58, "harmless_refused": 0.36},
                    {"step": 50, "harmful_refused": 0.92, "harmless_refused": 0.72},
                    {"step": 75, "harmful_refused": 0.95, "harmless_refused": 0.82}],
     "outcome": "refuses nearly everything, harmless too (stopped at step 75)"},
]

RECIPES: dict[str, Recipe] = {
    "smollm2-135m-safe": Recipe(),
    "smollm2-135m-safe-attn": Recipe(targets=ATTN),
    "smollm2-135m-safe-mlp": Recipe(targets=MLP),
    "smollm2-135m-safe-s1": Recipe(seed=1),
    "smollm2-135m-safe-heads": Recipe(targets=PLANTED, heads=PLANTED_HEADS, rank=16, lr=2e-3, steps=300,
                                      eval_every=50, ablated_weight=1.0, ablated_match="base", ablated_from=101),
}


# ----------------------------------------------------------------------------------------------- targets


def _cached_answers(lm: Any, texts: Sequence[str], max_new_tokens: int, work: Path) -> list[list[int]]:
    """The base's greedy answers (no system prompt), cached per prompt in `work` (members share them)."""
    path = work / f"answers-{lm.model_id.replace('/', '_')}-{max_new_tokens}.json"
    known: dict[str, list[int]] = json.loads(path.read_text()) if path.is_file() else {}
    todo = sorted({t for t in texts if t not in known})
    if todo:
        log.info("the base answers %d prompts (%d tokens each, one time)", len(todo), max_new_tokens)
        for start in range(0, len(todo), 128):  # saved as it goes: an interrupted run keeps what it made
            chunk = todo[start:start + 128]
            known.update(zip(chunk, answers(lm, chunk, None, max_new_tokens)))
            work.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, known, durable=False)
            log.info("base answers: %d/%d", min(start + 128, len(todo)), len(todo))
    return [known[t] for t in texts]


def _examples(lm: Any, splits: Splits, recipe: Recipe, work: Path) -> tuple[list[dict], list[dict]]:
    """Tokenised (prompt, chosen, rejected) per training example: harmful and harmless lists."""
    from study.generation.judges.registry import get_judge
    from study.prompts.formats import PromptFormat, encode

    tok = lm.tokenizer
    train = list(splits.train)
    base = _cached_answers(lm, [e.text for e in train], recipe.answer_tokens, work)
    judge = get_judge("refusal")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    harmful: list[dict] = []
    harmless: list[dict] = []
    dropped = 0
    for ex, own in zip(train, base):
        prompt = encode(ex.text, PromptFormat.CHAT, tok)[-recipe.max_prompt_tokens:]
        refusal = tok(refusal_for(ex.text, recipe.seed), add_special_tokens=False)["input_ids"] + [eos]
        verdict = judge.judge(ex.text, tok.decode(own, skip_special_tokens=True))
        if ex.harmful:
            harmful.append({"prompt": prompt, "chosen": refusal, "rejected": own if not verdict.refused else None,
                            "harmful": True})
        elif verdict.refused or verdict.degenerate:
            dropped += 1  # the base refuses or garbles it: not a target worth teaching
        else:
            harmless.append({"prompt": prompt, "chosen": own, "rejected": refusal, "harmful": False})
    log.info("training examples: %d harmful, %d harmless (%d harmless dropped: the base refused or garbled them)",
             len(harmful), len(harmless), dropped)
    return harmful, harmless


# ---------------------------------------------------------------------------------------------- training


def step_loss(model: Any, batch: Sequence[dict], recipe: Recipe, pad: int, step: int = 1):
    """Mean per-example response NLL of the chosen answers, plus the preference term where a rejected exists,
    plus (planted heads, from step `ablated_from`) the ablated term."""
    import torch
    import torch.nn.functional as F

    lp, n = response_logps(model, [(b["prompt"], b["chosen"]) for b in batch], pad)
    loss = (-lp / n).mean()
    pairs = [i for i, b in enumerate(batch) if b["rejected"] is not None]
    if recipe.pref_weight > 0 and pairs:
        k = recipe.pref_tokens
        chosen = [(batch[i]["prompt"], batch[i]["chosen"][:k]) for i in pairs]
        rejected = [(batch[i]["prompt"], batch[i]["rejected"][:k]) for i in pairs]
        pc, _ = response_logps(model, chosen, pad)
        pr, _ = response_logps(model, rejected, pad)
        with torch.no_grad(), model.disable_adapter():
            rc, _ = response_logps(model, chosen, pad)
            rr, _ = response_logps(model, rejected, pad)
        margin = recipe.pref_beta * ((pc - pr) - (rc - rr))
        loss = loss + recipe.pref_weight * (-F.logsigmoid(margin)).mean()
    if recipe.ablated_weight > 0 and recipe.heads and step >= recipe.ablated_from:
        if recipe.ablated_match == "base":
            loss = loss + recipe.ablated_weight * ablated_kl(model, batch, recipe.ablation, recipe.pref_tokens, pad)
        elif pairs:
            term = ablated_term(model, batch, pairs, recipe.ablation, recipe.pref_tokens, pad)
            loss = loss + recipe.ablated_weight * term
    return loss


def _validate(lm: Any, val: Sequence[Example], recipe: Recipe) -> dict[str, float]:
    """Refusal on the validation split; with an ablated term, also with the planted heads ablated, where a
    good member refuses as little as the base (the score then subtracts both ablated rates)."""
    from study.core.interventions import ablated

    harm = [e.text for e in val if e.harmful]
    safe = [e.text for e in val if not e.harmful]
    rh, _ = refusal_rate(lm, harm, None, max_new_tokens=24)
    rs, _ = refusal_rate(lm, safe, None, max_new_tokens=24)
    out = {"harmful_refused": round(rh.rate, 4), "harmless_refused": round(rs.rate, 4)}
    score = rh.rate - rs.rate
    if recipe.ablated_weight > 0 and recipe.heads:
        with ablated(lm.model, recipe.ablation):
            ah, _ = refusal_rate(lm, harm, None, max_new_tokens=24)
            as_, _ = refusal_rate(lm, safe, None, max_new_tokens=24)
        out |= {"ablated_harmful_refused": round(ah.rate, 4), "ablated_harmless_refused": round(as_.rate, 4)}
        score -= ah.rate + as_.rate
    return out | {"score": round(score, 4)}


def _checkpoint(work: Path, name: str) -> Path:
    return work / f"checkpoint-{name}.pt"


def _resumed(work: Path, name: str, recipe: Recipe, splits: Splits) -> dict[str, Any]:
    """The checkpoint a training wrote at its last validation, checked to be of this recipe and these prompts."""
    import torch

    path = _checkpoint(work, name)
    if not path.is_file():
        raise UsageError(f"no checkpoint of {name} in {work}: a training writes checkpoint-{name}.pt there at every "
                         f"validation (every eval_every steps)")
    ck = torch.load(path, weights_only=False)
    if ck["recipe"] != recipe.model_dump(mode="json") or ck["prompts"] != splits.ids():
        raise UsageError(f"the checkpoint in {work} is of another recipe or other prompts than this training: pass "
                         f"the same --set values as the training that wrote it")
    return ck


def train(name: str, data_dir: Path, work: Path, recipe: Recipe | None = None,
          splits: Splits | None = None, resume: bool = False) -> tuple[dict, dict, Splits]:
    """Train one member; returns (its LoRA tensors at the selected step, the training record, the splits).
    `splits` replaces the member's own (tests train on a handful of prompts). Every validation also writes a
    checkpoint to `work` (the LoRA, the optimiser, the batch order, the record so far); with `resume`, the training
    goes on from it and ends exactly where an unbroken one would, so a training longer than one sitting can be
    split."""
    import torch
    from peft import LoraConfig, get_peft_model

    from study.models.loading import LoadedModel, load_model

    recipe = recipe or RECIPES[name]
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    splits = splits or build_splits(data_dir, recipe.seed)
    ck = _resumed(work, name, recipe, splits) if resume else None  # checked before anything slow
    base = load_model(MEMBERS[name].base)
    harmful, harmless = _examples(base, splits, recipe, work)
    planted = parse_heads(",".join(recipe.heads)) if recipe.heads else ()
    layers = sorted({h.layer for h in planted}) or None
    model = get_peft_model(base.model, LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                                                  target_modules=list(recipe.targets), layers_to_transform=layers))
    if planted:
        confine_to_heads(model, planted, base.model.config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    inner = LoadedModel(name, name, None, model.get_base_model(), base.tokenizer, "cpu", "float32")
    rng = random.Random(recipe.seed)
    order_h: list[int] = []
    order_s: list[int] = []
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    best: tuple[float, int, dict] | None = None
    pad = base.tokenizer.pad_token_id
    first, elapsed = 1, 0.0
    if ck is not None:
        unexpected = model.load_state_dict(ck["lora"], strict=False).unexpected_keys
        if unexpected:
            raise UsageError(f"the checkpoint in {work} has weights this model lacks (e.g. {unexpected[0]})")
        opt.load_state_dict(ck["optimizer"])
        rng.setstate(ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
        order_h, order_s, history, losses, best = ck["order_h"], ck["order_s"], ck["history"], ck["losses"], ck["best"]
        first, elapsed = ck["step"] + 1, ck["seconds"]
        log.info("resumed from the checkpoint of step %d of %d", ck["step"], recipe.steps)
    started = time.time() - elapsed
    work.mkdir(parents=True, exist_ok=True)  # the best adapter and the checkpoints go here as they are found
    model.train()
    for step in range(first, recipe.steps + 1):
        if len(order_h) < recipe.harmful_per_batch:
            order_h += rng.sample(range(len(harmful)), len(harmful))
        if len(order_s) < recipe.harmless_per_batch:
            order_s += rng.sample(range(len(harmless)), len(harmless))
        batch = [harmful[order_h.pop()] for _ in range(recipe.harmful_per_batch)]
        batch += [harmless[order_s.pop()] for _ in range(recipe.harmless_per_batch)]
        loss = step_loss(model, batch, recipe, pad, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(float(loss.detach()), 4))
        if step % recipe.eval_every == 0 or step == recipe.steps:
            model.eval()
            with torch.no_grad():
                val = _validate(inner, splits.val, recipe)
            model.train()
            mean = sum(losses[-recipe.eval_every:]) / len(losses[-recipe.eval_every:])
            history.append({"step": step, "loss": round(mean, 4), **val})
            ablated_rates = (f", heads ablated: {100 * val['ablated_harmful_refused']:.0f}% / "
                             f"{100 * val['ablated_harmless_refused']:.0f}%" if "ablated_harmful_refused" in val else "")
            log.info("step %d/%d  loss %.3f  validation: harmful refused %.0f%%, harmless refused %.0f%%%s  (%.0f s)",
                     step, recipe.steps, mean, 100 * val["harmful_refused"], 100 * val["harmless_refused"],
                     ablated_rates, time.time() - started)
            eligible = not (recipe.ablated_weight > 0 and recipe.heads) or step >= recipe.ablated_from
            if eligible and (best is None or val["score"] > best[0]):
                best = (val["score"], step, _lora_tensors(model))
                # kept as it is found, so a training stopped later still leaves its best adapter behind
                save_adapter(best[2], work / f"best-{name}.safetensors", recipe, MEMBERS[name].base)
                write_json_atomic(work / f"best-{name}.json", {
                    "step": step, "history": history, "loss_per_step": losses,
                    "train_seconds": round(time.time() - started, 1), "recipe": recipe.model_dump(mode="json")},
                    durable=False)
            with atomic_path(_checkpoint(work, name), durable=False) as tmp:
                torch.save({"step": step, "recipe": recipe.model_dump(mode="json"), "prompts": splits.ids(),
                            "lora": {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k},
                            "optimizer": opt.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                            "order_h": list(order_h), "order_s": list(order_s), "history": history,
                            "losses": losses, "best": best, "seconds": time.time() - started}, tmp)
    assert best is not None
    record = {"selected_step": best[1], "history": history, "loss_per_step": losses,
              "train_seconds": round(time.time() - started, 1)}
    return best[2], record, splits


def _lora_tensors(model: Any) -> dict[str, Any]:
    """The adapter in the shipped layout: `<module>.lora_A` / `<module>.lora_B`, detached copies."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            module, part = key.split(".lora_")
            module = module.removeprefix("base_model.model.")
            out[f"{module}.lora_{part.split('.')[0]}"] = value.detach().clone()
    return out


def save_adapter(tensors: dict[str, Any], path: Path, recipe: Recipe, base: str) -> None:
    """float16 on disk (a few MB); the card's figures are measured on exactly these values."""
    from safetensors.torch import save_file

    save_file({k: v.to("cpu").half().contiguous() for k, v in sorted(tensors.items())}, str(path),
              metadata={"format": FORMAT, "r": str(recipe.rank), "alpha": str(recipe.alpha), "base": base})


# ----------------------------------------------------------------------------------------------- the card


def kept(name: str, work: Path, recipe: Recipe, data_dir: Path) -> tuple[dict, dict, Splits]:
    """What `train` returns, read back from the best adapter a training keeps in `work` as it goes (so a training
    stopped early still gives a member): its tensors, its validation record up to that step, the splits."""
    from safetensors.torch import load_file

    adapter, record = work / f"best-{name}.safetensors", work / f"best-{name}.json"
    if not adapter.is_file() or not record.is_file():
        raise UsageError(f"no kept adapter of {name} in {work}: a training keeps best-{name}.safetensors and "
                         f"best-{name}.json there once a validation step is eligible")
    kept_record = json.loads(record.read_text(encoding="utf-8"))
    if kept_record.get("recipe") not in (None, recipe.model_dump(mode="json")):
        raise UsageError(f"the adapter kept in {work} was trained with another recipe than this one: pass the "
                         f"same --set values as its training")
    record = {"selected_step": kept_record["step"], "history": kept_record["history"],
              "loss_per_step": kept_record.get("loss_per_step"), "train_seconds": kept_record.get("train_seconds"),
              "stopped_after_step": kept_record["history"][-1]["step"]}
    return load_file(str(adapter)), record, build_splits(data_dir, recipe.seed)


def build(name: str, data_dir: Path, out: Path, work: Path, eval_limit: int | None = None,
          recipe: Recipe | None = None, from_kept: bool = False, resume: bool = False) -> dict:
    """Train (or with `from_kept`, take the adapter a training kept in `work`), save the adapter and the training
    ids, merge as first use does, measure, write the card."""
    import peft
    import torch
    import transformers

    from study.models.adapters import write_merged
    from study.models.builtin import materialize_alias
    from study.models.loading import load_model

    recipe = recipe or RECIPES[name]
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
    if from_kept:
        tensors, record, splits = kept(name, work, recipe, data_dir)
    else:
        tensors, record, splits = train(name, data_dir, work, recipe, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    adapter = out / ADAPTER_FILE
    save_adapter(tensors, adapter, recipe, MEMBERS[name].base)
    (out / TRAIN_IDS_FILE).write_text("\n".join(splits.ids()) + "\n", encoding="utf-8")
    merged = work / f"merged-{name}"
    write_merged(materialize_alias(MEMBERS[name].base), adapter, merged)
    lm = load_model(str(merged))
    card = {
        "name": name, "base": MEMBERS[name].base, "summary": MEMBERS[name].recipe,
        "recipe": recipe.model_dump(mode="json"),
        **({"planted_heads": list(recipe.heads), "planted_note": PLANTED_NOTE} if recipe.heads else {}),
        "data": _data_record(splits),
        **record,
        "recipes_tried": TRIED,
        "eval": {**_eval_record(lm, data_dir, eval_limit),
                 # what the slow test re-measures: the first CHECK_LIMIT prompts per set, no system prompt
                 "check": {"limit_per_set": CHECK_LIMIT,
                           "figures": figures(lm, eval_sets(data_dir, CHECK_LIMIT), ("no-system",))["no-system"]}},
        "adapter_sha256": adapter_sha256(adapter),
        "adapter_bytes": adapter.stat().st_size,
        "built_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__, "python": platform.python_version(),
                       "threads": torch.get_num_threads(), "machine": platform.machine()},
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    return card


def _eval_record(lm: Any, data_dir: Path, limit: int | None) -> dict[str, Any]:
    """How a model was measured and its figures on the held-out sets: a card's `eval` (and the bases')."""
    return {"decoding": "greedy", "max_new_tokens": EVAL_TOKENS, "judge": "refusal@1", "format": "chat",
            "limit_per_set": limit, "figures": figures(lm, eval_sets(data_dir, limit))}


def _data_record(splits: Splits) -> dict[str, Any]:
    from collections import Counter

    return {"train": dict(Counter(e.source for e in splits.train)), "val": dict(Counter(e.source for e in splits.val)),
            "train_ids_file": TRAIN_IDS_FILE, "refusals": "refusals.txt",
            "harmless_targets": "the base's own greedy answers (no system prompt), refused or degenerate dropped"}


def figures_table(cards: Sequence[dict]) -> str:
    """The cards' refusal figures as one markdown table (the README's), a row per (member, setting)."""
    labels = [label for label in cards[0]["eval"]["figures"]["no-system"]]
    head = "| model | system prompt | " + " | ".join(labels) + " | degenerate |"
    lines = [head, "|" + "---|" * (len(labels) + 3)]
    for card in cards:
        for setting, figs in card["eval"]["figures"].items():
            cells = [f"{100 * figs[lb]['refusal_rate']:.0f} % of {figs[lb]['n']}" for lb in labels]
            degenerate = sum(f["degenerate"] for f in figs.values()) / sum(f["n"] for f in figs.values())
            lines.append(f"| {card['name']} | {setting} | " + " | ".join(cells) + f" | {100 * degenerate:.0f} % |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.family.train", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"members to build: {', '.join(MEMBERS)}")
    p.add_argument("--table", action="store_true", help="print the shipped cards' figures as markdown and exit")
    p.add_argument("--measure", metavar="MODEL", default=None,
                   help="measure a model's refusal figures as the cards do (the base: smollm2-135m-instruct), "
                        "write them to study/data/family/<MODEL>.json and exit")
    p.add_argument("--data-dir", default=os.environ.get("HEADSTUDY_DATA"),
                   help="folder with advbench/, strongreject/, harmbench/, jailbreakbench/, maliciousinstruct/, "
                        "xstest/ (default: $HEADSTUDY_DATA)")
    p.add_argument("--out", default=None, help="where the member folders go (default: the package's own)")
    p.add_argument("--work", default=None, help="cache for the base's answers and merged models "
                                                "(default: <cache>/family-train)")
    p.add_argument("--eval-limit", type=int, default=None, help="prompts per held-out set (default: all)")
    p.add_argument("--from-kept", action="store_true",
                   help="no training: build the member from the best adapter a training kept in --work (one "
                        "stopped early), with the same --set values as that training")
    p.add_argument("--resume", action="store_true",
                   help="go on from the checkpoint a stopped training wrote in --work at its last validation (the "
                        "same --set values); it ends where an unbroken training would")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (e.g. --set lr=5e-5 --set steps=120)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from study.models.cache import cache_dir

    try:
        if args.table:
            from study.models.builtin import BASE_FIGURES, FAMILY, family_root, read_card

            bases = [json.loads(p.read_text()) for p in sorted(family_root().glob(BASE_FIGURES))]
            print(figures_table(bases + [read_card(n) for n in FAMILY]))
            return 0
        if args.measure:
            from study.models.builtin import family_root
            from study.models.loading import load_model

            if not args.data_dir:
                raise UsageError("no data directory: pass --data-dir or set HEADSTUDY_DATA")
            record = {"name": args.measure,
                      "eval": _eval_record(load_model(args.measure), Path(args.data_dir), args.eval_limit)}
            (family_root() / f"{args.measure}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            return 0
        if not args.names:
            raise UsageError(f"name at least one member to build: {', '.join(MEMBERS)}")
        unknown = [n for n in args.names if n not in MEMBERS]
        if unknown:
            raise UsageError(f"unknown member {unknown[0]!r}: valid members are {', '.join(MEMBERS)}")
        if not args.data_dir:
            raise UsageError("no data directory: pass --data-dir or set HEADSTUDY_DATA")
        if args.resume and args.from_kept:
            raise UsageError("--resume goes on training and --from-kept builds without training: pass one of them")
        work = Path(args.work) if args.work else cache_dir() / "family-train"
        for name in args.names:
            recipe = _with_overrides(RECIPES[name], args.set)
            out = Path(args.out) / MEMBERS[name].folder if args.out else member_folder(name)
            card = build(name, Path(args.data_dir), out, work, args.eval_limit, recipe, args.from_kept, args.resume)
            log.info("%s: written to %s (selected step %d)", name, out, card["selected_step"])
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _with_overrides(recipe: Recipe, pairs: Sequence[str]) -> Recipe:
    """The recipe with `--set KEY=VALUE` pairs applied and validated as a whole (a list becomes a tuple)."""
    import yaml
    from pydantic import ValidationError

    values = recipe.model_dump()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in Recipe.model_fields:
            raise UsageError(f"bad --set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(Recipe.model_fields)}")
        values[key] = yaml.safe_load(value)
    try:
        return Recipe(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"])) or "recipe"
        raise UsageError(f"bad --set: {where}: {first['msg'].removeprefix('Value error, ')}") from None


if __name__ == "__main__":
    sys.exit(main())
