"""The family's data splits: licence-clean sources only, and nothing an evaluation set holds ever trains."""

from __future__ import annotations

import csv

from study.family.data import NEVER_TRAIN, advbench_half, build_splits, eval_sets, norm, refusal_for, refusals
from study.generation.judges.registry import get_judge
from study.prompts.sets import load_prompts


def test_training_prompts_are_disjoint_from_every_evaluation_set(shared_data):
    splits = build_splits(shared_data, seed=0)
    trained = {norm(e.text) for e in splits.train + splits.val}
    for label, (_, texts) in eval_sets(shared_data).items():
        assert not trained & {norm(t) for t in texts}, label
    for spec in NEVER_TRAIN:
        assert not trained & {norm(t) for t in load_prompts(spec, shared_data).texts}, spec
    # MaliciousInstruct hides inside StrongREJECT (source column): none of those rows trains either
    with (shared_data / "strongreject" / "strongreject.csv").open(encoding="utf-8") as f:
        mi_rows = {norm(r["forbidden_prompt"]) for r in csv.DictReader(f) if r["source"] == "MaliciousInstruct"}
    assert len(mi_rows) == 12 and not trained & mi_rows
    assert not {e.source for e in splits.train} & {"alpaca", "maliciousinstruct"}


def test_splits_are_stable_and_the_seed_moves_only_validation(shared_data):
    a, b = build_splits(shared_data, seed=0), build_splits(shared_data, seed=0)
    assert a == b
    c = build_splits(shared_data, seed=1)
    assert set(a.train + a.val) == set(c.train + c.val) and set(a.val) != set(c.val)
    assert 0.05 < len(a.val) / len(a.train + a.val) < 0.2
    kinds = {e.harmful for e in a.val}
    assert kinds == {True, False}


def test_advbench_is_split_once_for_every_member(shared_data):
    texts = load_prompts("advbench", shared_data).texts
    held = [t for t in texts if advbench_half(t) == "heldout"]
    assert 0.3 < len(held) / len(texts) < 0.5
    assert len(eval_sets(shared_data)["advbench-heldout"][1]) == len(held)


def test_every_refusal_target_reads_as_a_refusal_to_the_judges():
    for text in refusals():
        assert get_judge("refusal").judge("q", text).refused, text
        assert not get_judge("paper").judge("q", text).harmful, text
    assert len({refusal_for(f"prompt {i}", 0) for i in range(200)}) == len(refusals())


def _content_words(text: str) -> set[str]:
    import re

    template = {"how", "to", "a", "an", "the", "i", "my", "can", "what", "are", "some", "ways", "way", "of", "in",
                "without", "for", "someone", "do", "is", "and", "you", "me", "best", "on", "get", "s", "with", "that"}
    return set(re.findall(r"[a-z]+", text.lower())) - template


def test_no_written_prompt_is_a_near_copy_of_an_evaluation_prompt(shared_data):
    """The written data's short phrasings ("How to ...?", "Ways to ...?") are MaliciousInstruct's style: none
    may paraphrase one of its prompts (or any evaluation prompt) closely. Word overlap over the union of content
    words is at most one half (a third for the closest of the short phrasings)."""
    from study.family.data import _written

    harmless, pairs = _written()
    written = [_content_words(t) for t in harmless + [t for pair in pairs for t in pair]]
    for label, (_, texts) in eval_sets(shared_data).items():
        for text in texts:
            theirs = _content_words(text)
            for ours in written:
                if ours and theirs:
                    assert len(ours & theirs) / len(ours | theirs) <= 0.5, (label, text, sorted(ours))
