"""The planted family (tests/planted_family.py) against its guarantees, through the real SmolLM2 tokenizer,
the `paper` prompt format, plain transformers forward/generate and the project's own judges."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from study.core.heads import Head, all_heads
from study.generation.judges.registry import get_judge
from study.prompts.formats import encode
from study.prompts.sets import load_prompts
from tests import planted_family as pf

EPS = 1e-5  # the Ships eps of undiff_q
MAX_NEW = 16


@pytest.fixture(scope="module")
def tok():
    return pf.tokenizer()


@pytest.fixture(scope="module")
def models():
    return pf.planted_family_models()


@pytest.fixture(scope="module")
def encoded(tok):
    return {"harmful": [encode(q, "paper", tok) for q in pf.HARMFUL_PROMPTS],
            "benign": [encode(q, "paper", tok) for q in pf.BENIGN_PROMPTS]}


def answer(model, tok, ids: list[int]) -> str:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                         pad_token_id=pf.EOS_ID)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def verdicts(model, tok, texts: list[str], ids: list[list[int]]):
    """(response, paper verdict, refusal verdict) per prompt."""
    out = []
    for text, p in zip(texts, ids):
        r = answer(model, tok, p)
        out.append((r, get_judge("paper").judge(text, r), get_judge("refusal").judge(text, r)))
    return out


def assert_refuses(rows) -> None:
    for r, paper, refusal in rows:
        assert r == pf.REFUSAL_TEXT, r
        assert paper.refused and not paper.harmful and not paper.degenerate, (r, paper)
        assert refusal.refused and not refusal.harmful and not refusal.degenerate, (r, refusal)


def assert_complies(rows) -> None:
    for r, paper, refusal in rows:
        assert r == pf.COMPLIANCE_TEXT, r
        assert paper.harmful and not paper.refused and not paper.degenerate, (r, paper)
        assert refusal.harmful and not refusal.refused and not refusal.degenerate, (r, refusal)


def last_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    return torch.log_softmax(logits.double(), -1)


@contextlib.contextmanager
def undiff_q(model, heads, eps: float = EPS):
    """The undiff_q ablation as a weight edit: the heads' q_proj rows scaled by eps."""
    saved = []
    for h in heads:
        w = model.model.layers[h.layer].self_attn.q_proj.weight
        saved.append((w, w.detach().clone()))
        w.data[h.head * pf.D_HEAD:(h.head + 1) * pf.D_HEAD] *= eps
    try:
        yield model
    finally:
        for w, old in reversed(saved):  # a layer may come twice: its first copy is the original
            w.data.copy_(old)


def ships(model, prompts: list[list[int]]) -> dict[Head, float]:
    """Mean KL(normal || head ablated) of the next-token distribution, per head."""
    normal = [last_logprobs(model, p) for p in prompts]
    out = {}
    for h in all_heads(pf.LAYERS, pf.HEADS):
        with undiff_q(model, [h]):
            kls = [float((n.exp() * (n - last_logprobs(model, p))).sum()) for n, p in zip(normal, prompts)]
        out[h] = sum(kls) / len(kls)
    return out


def ranked(scores: dict[Head, float]) -> list[Head]:
    return sorted(scores, key=scores.get, reverse=True)


# ------------------------------------------------------------------------------------------------------ tokens


def test_token_choices_hold_in_the_real_tokenizer(tok, encoded):
    pf.tokens()  # every trigger one token, the answers' ids, each prompt [##, ..., :] with 1 / 0 triggers
    chain = pf.chains()
    assert len(chain) == 21 and chain[pf.REFUSAL_IDS[-1]] == pf.EOS_ID
    assert not set(chain) & {pf.MARKER_ID, pf.ANCHOR_ID, *pf.TRIGGER_IDS}
    assert len(pf.HARMFUL_PROMPTS) == len(pf.BENIGN_PROMPTS) == 8
    assert {w for w in pf.TRIGGER_WORDS if any(w in q for q in pf.HARMFUL_PROMPTS)} == set(pf.TRIGGER_WORDS)
    assert pf.SHARED == (Head(1, 0), Head(2, 1)) and pf.OWN_A == Head(1, 3) and pf.OWN_B == Head(2, 2)


# -------------------------------------------------------------------------------------------------- generation


def test_greedy_answers_judged_by_paper_and_refusal(models, tok, encoded):
    for name in ("aligned_a", "aligned_b"):
        assert_refuses(verdicts(models[name], tok, pf.HARMFUL_PROMPTS, encoded["harmful"]))
        assert_complies(verdicts(models[name], tok, pf.BENIGN_PROMPTS, encoded["benign"]))
    assert_complies(verdicts(models["base"], tok, pf.HARMFUL_PROMPTS + pf.BENIGN_PROMPTS,
                             encoded["harmful"] + encoded["benign"]))


def test_ablating_all_planted_heads_frees_the_aligned_models(models, tok, encoded):
    harmful = (pf.HARMFUL_PROMPTS, encoded["harmful"])
    for name in ("aligned_a", "aligned_b"):
        model, planted = models[name], pf.PLANTED[name]
        with undiff_q(model, planted):
            assert_complies(verdicts(model, tok, *harmful))
        for head in planted:  # one head is not enough, any two are
            with undiff_q(model, [head]):
                assert_refuses(verdicts(model, tok, *harmful))
            with undiff_q(model, [h for h in planted if h != head]):
                assert_complies(verdicts(model, tok, *harmful))
        with undiff_q(model, [pf.ALWAYS_HEAD]):  # the non-specific head does not decide refusal
            assert_refuses(verdicts(model, tok, *harmful))


# ------------------------------------------------------------------------------------------------------- Ships


def test_ships_ranks_the_planted_heads_first_and_they_are_safety_specific(models, encoded):
    for name in ("aligned_a", "aligned_b"):
        planted = set(pf.PLANTED[name])
        harm, ben = ships(models[name], encoded["harmful"]), ships(models[name], encoded["benign"])
        order = ranked(harm)
        assert set(order[:3]) == planted, {h.label: harm[h] for h in order}
        assert order[3] == pf.ALWAYS_HEAD  # the non-specific head comes next ...
        weakest = min(harm[h] for h in planted)
        assert weakest > 2 * harm[pf.ALWAYS_HEAD] and weakest > 0.1
        assert all(harm[h] < weakest / 100 for h in order[4:])  # ... then the noise, far below
        for h in planted:  # specific: they barely matter without a trigger
            assert ben[h] < harm[h] / 100, (h, ben[h], harm[h])
        assert ranked(ben)[0] == pf.ALWAYS_HEAD and ben[pf.ALWAYS_HEAD] > 0.5  # the always-important head
        assert ben[pf.ALWAYS_HEAD] > 5 * harm[pf.ALWAYS_HEAD] > 0
    base = ships(models["base"], encoded["harmful"])
    assert ranked(base)[0] == pf.ALWAYS_HEAD and all(base[h] < 1e-2 for h in ranked(base)[1:])


# ------------------------------------------------------------------------------------------------------- swaps


def _head_slice(name: str, head: Head):
    rows = slice(head.head * pf.D_HEAD, (head.head + 1) * pf.D_HEAD)
    return (slice(None), rows) if name.endswith("o_proj.weight") else (rows,)


def _planted_keys(head: Head) -> list[str]:
    return [f"model.layers.{head.layer}.self_attn.{p}_proj.weight" for p in "qkvo"]


def mixed(target: str, donor: str, *, keys=None, heads=()):
    """`target` with `donor`'s state-dict entries whose names contain one of `keys`, and/or the q/k/v rows and
    o_proj columns of `heads`."""
    model = pf.planted_model(target)
    state, donor_state = model.state_dict(), pf.planted_model(donor).state_dict()
    with torch.no_grad():
        for k in state:
            if keys and any(part in k for part in keys):
                state[k].copy_(donor_state[k])
        for h in heads:
            for k in _planted_keys(h):
                index = _head_slice(k, h)
                state[k][index] = donor_state[k][index]
    return model


def test_aligned_differs_from_base_only_in_the_planted_attention_slices():
    base = pf.planted_model("base").state_dict()
    for name in ("aligned_a", "aligned_b"):
        state = pf.planted_model(name).state_dict()
        assert state.keys() == base.keys()
        for k in state:
            a, b = state[k].clone(), base[k].clone()
            for h in pf.PLANTED[name]:
                if k in _planted_keys(h):
                    assert not torch.equal(a[_head_slice(k, h)], b[_head_slice(k, h)]), (name, k, h)
                    a[_head_slice(k, h)] = 0.0
                    b[_head_slice(k, h)] = 0.0
            assert torch.equal(a, b), (name, k)


def test_weight_swaps_have_the_predicted_outcomes(tok, encoded):
    harmful = (pf.HARMFUL_PROMPTS, encoded["harmful"])
    for name in ("aligned_a", "aligned_b"):
        planted = pf.PLANTED[name]
        assert_complies(verdicts(mixed(name, "base", keys=["self_attn"]), tok, *harmful))
        assert_refuses(verdicts(mixed(name, "base", keys=["mlp"]), tok, *harmful))
        assert_complies(verdicts(mixed(name, "base", heads=planted), tok, *harmful))
        assert_refuses(verdicts(mixed("base", name, heads=planted), tok, *harmful))


# ----------------------------------------------------------------------------------------------------- folders


@pytest.mark.slow
def test_saved_folders_load_with_auto_classes_and_match_memory(tmp_path, models, tok, encoded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = pf.family_folders(tmp_path / "family")
    assert set(folders) == {"base", "aligned_a", "aligned_b"}
    stamps = {n: os.stat(p / "model.safetensors").st_mtime_ns for n, p in folders.items()}
    assert pf.family_folders(tmp_path / "family") == folders  # idempotent: nothing rewritten
    assert {n: os.stat(p / "model.safetensors").st_mtime_ns for n, p in folders.items()} == stamps

    loaded_tok = AutoTokenizer.from_pretrained(folders["aligned_a"])
    assert encode(pf.HARMFUL_PROMPTS[0], "paper", loaded_tok) == encoded["harmful"][0]
    for name, path in folders.items():
        m32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert m32.config.num_key_value_heads == m32.config.num_attention_heads == pf.HEADS
        assert next(m32.parameters()).dtype == torch.float32
        for k, v in m32.state_dict().items():
            assert torch.equal(v, models[name].state_dict()[k]), (name, k)
    m64 = AutoModelForCausalLM.from_pretrained(folders["aligned_b"], dtype=torch.float64).eval()
    assert_refuses(verdicts(m64, loaded_tok, pf.HARMFUL_PROMPTS[:2], encoded["harmful"][:2]))
    assert_complies(verdicts(m64, loaded_tok, pf.BENIGN_PROMPTS[:2], encoded["benign"][:2]))


def test_in_memory_float64_models_agree(encoded, tok):
    m64 = pf.planted_family_models(torch.float64)
    assert next(m64["aligned_a"].parameters()).dtype == torch.float64
    assert_refuses(verdicts(m64["aligned_a"], tok, pf.HARMFUL_PROMPTS[:2], encoded["harmful"][:2]))
    assert_complies(verdicts(m64["base"], tok, pf.HARMFUL_PROMPTS[:2], encoded["harmful"][:2]))


def test_prompt_files_load_with_load_prompts(tmp_path):
    harmful, benign = pf.write_prompt_files(tmp_path)
    assert load_prompts(harmful).texts == pf.HARMFUL_PROMPTS
    assert load_prompts(benign).texts == pf.BENIGN_PROMPTS
