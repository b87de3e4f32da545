"""The joint head-group search (study.core.gates, study.core.joint): gates at 0 are the normal model and gates
at 1 the hook ablation, bit for bit; on the planted family (tests/planted_family.py) the search finds the
planted safety heads; its exact objective is generalized Ships."""

from __future__ import annotations

import pytest
import torch

from study.core.ablation import Ablation, Op
from study.core.engine import naive_scan
from study.core.errors import UsageError
from study.core.gates import gated
from study.core.heads import Head
from study.core.interventions import ablated
from study.core.joint import group_objective, joint_search, top_group
from study.core.joint_spec import JointSettings, Objective
from study.core.scores import generalized_ships
from study.core.subspace import SubspaceSpec
from study.prompts.formats import encode
from tests import planted_family as pf
from tests.tiny_models import MHA, random_prompts, tiny_model

GROUP = (Head(0, 1), Head(2, 3))


def _logits(model, ids):
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma2", "qwen3", "olmo2"])
@pytest.mark.parametrize("op", [Op.UNDIFF_Q, Op.SCALE_V, Op.MEAN, Op.UNDIFF_K])
def test_gates_at_zero_are_the_normal_model_and_at_one_the_ablation_bit_for_bit(arch, op):
    model = tiny_model(arch, dtype=torch.float32)
    s = model.config
    n_layers, n_heads = s.num_hidden_layers, s.num_attention_heads
    if op is Op.UNDIFF_K and arch not in MHA:
        with pytest.raises(UsageError, match="ambiguous under GQA"):
            with gated(model, torch.zeros(n_layers, n_heads), op, 1e-5):
                pass
        return
    ids = random_prompts(1, lo=7, hi=7)[0]
    normal = _logits(model, ids)
    with gated(model, torch.zeros(n_layers, n_heads, requires_grad=True), op, 1e-5):
        assert torch.equal(_logits(model, ids), normal)
    g = torch.zeros(n_layers, n_heads)
    for h in GROUP:
        g[h.layer, h.head] = 1.0
    with ablated(model, Ablation(heads=GROUP, op=op, eps=1e-5)):
        want = _logits(model, ids)
    assert not torch.equal(want, normal)
    with gated(model, g, op, 1e-5):
        assert torch.equal(_logits(model, ids), want)
    assert torch.equal(_logits(model, ids), normal)  # the hooks are gone


def test_gates_are_differentiable_and_in_between_lies_between():
    model = tiny_model("llama", dtype=torch.float64)
    ids = random_prompts(1, lo=6, hi=6)[0]
    g = torch.full((3, 4), 0.5, dtype=torch.float64, requires_grad=True)
    with gated(model, g, Op.UNDIFF_Q, 1e-5):
        out = _logits(model, ids)[0, -1].square().sum()
    out.backward()
    assert g.grad is not None and bool((g.grad != 0).all())
    with pytest.raises(UsageError, match=r"gates must be \(layers, heads\) = \(3, 4\)"):
        with gated(model, torch.zeros(4, 3), Op.UNDIFF_Q, 1e-5):
            pass


@pytest.fixture(scope="module")
def aligned():
    tok = pf.tokenizer()
    model = pf.planted_model("aligned_a")
    harmful = [encode(q, "paper", tok) for q in pf.HARMFUL_PROMPTS]
    return model, tok, harmful


@pytest.mark.parametrize("sparsity,init,l1,seed", [("l1", 0.1, 0.01, 0), ("l1", 0.5, 0.05, 1),
                                                    ("hard_concrete", 0.5, 0.05, 0)])
def test_the_refusal_objective_finds_the_planted_safety_heads(aligned, sparsity, init, l1, seed):
    """aligned_a's safety heads are SHARED + OWN_A; its refusal opening is REFUSAL_IDS. The three largest gates
    are the three planted heads (L0H1, the head every answer needs, is not among them), clearly apart from the
    rest."""
    model, tok, harmful = aligned
    targets = [list(pf.REFUSAL_IDS[:3])] * len(harmful)
    settings = JointSettings(objective=Objective.REFUSAL, steps=60, lr=0.1, l1=l1, init=init, sparsity=sparsity,
                             seed=seed)
    result = joint_search(model, harmful, tok.pad_token_id or 0, settings, targets)
    top = top_group(result.gates, 4)
    assert set(top[:3]) == set(pf.PLANTED["aligned_a"]), result.gates
    assert min(float(result.gates[h.layer, h.head]) for h in top[:3]) > 0.85
    assert len(result.history) == 60 and result.forward_passes == 61 and result.backward_passes == 60
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_the_exact_refusal_objective_is_the_drop_of_the_openings_probability(aligned):
    """Ablating the planted group takes the refusal opening's probability from near 1 to near 0; three heads
    that include L0H1 (every answer's head) move it far less."""
    model, tok, harmful = aligned
    targets = [list(pf.REFUSAL_IDS[:3])] * len(harmful)
    settings = JointSettings(objective=Objective.REFUSAL)
    found = group_objective(model, harmful, 0, settings, pf.PLANTED["aligned_a"], targets)
    other = group_objective(model, harmful, 0, settings, (pf.ALWAYS_HEAD, Head(0, 0), Head(2, 0)), targets)
    assert found > 0.9 and abs(other) < 0.3, (found, other)


def test_the_subspace_search_raises_its_objective(aligned):
    """On this family the subspace objective does not single out the planted heads when optimised jointly
    (docs/joint.md: a head that attends sharply does nothing until its gate is near 1, so the gradient favours
    diffuse heads); what must hold is that the optimisation does what it says: the objective rises."""
    model, _, harmful = aligned
    settings = JointSettings(objective=Objective.SUBSPACE, steps=20, lr=0.1, l1=0.0)
    result = joint_search(model, harmful, 0, settings)
    assert result.history[-1]["objective"] > result.history[0]["objective"] + 1.0


def test_the_exact_subspace_objective_is_generalized_ships(aligned):
    """group_objective (a right-padded batch) against one forward per prompt (naive_scan), the Sahara score."""
    model, _, harmful = aligned
    spec = SubspaceSpec.paper()
    group = pf.PLANTED["aligned_a"]
    scan = naive_scan(model, harmful, [Ablation(), Ablation(heads=group)], kl=False)
    want = generalized_ships(scan.hidden[0], scan.hidden[1], spec)
    got = group_objective(model, harmful, 0, JointSettings(objective=Objective.SUBSPACE, subspace=spec), group)
    assert want > 0.1 and got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("objective", [Objective.REFUSAL, Objective.SUBSPACE])
def test_a_search_in_chunks_of_prompts_has_the_whole_batchs_gradient(aligned, objective):
    """`batch_prompts` (prompts per forward pass, what lets a large model's search fit its memory) changes no number:
    the gates' gradient in chunks of 3 equals the gradient of all 8 prompts at once (float64)."""
    from study.core.architectures import Arch
    from study.core.joint import _Measure

    _, _, harmful = aligned
    model = pf.planted_model("aligned_a", dtype=torch.float64)
    targets = [list(pf.REFUSAL_IDS[:3])] * len(harmful) if objective is Objective.REFUSAL else None
    grads, values = [], []
    for batch_prompts in (None, 3):
        settings = JointSettings(objective=objective, batch_prompts=batch_prompts)
        measure = _Measure(model, Arch.of(model), harmful, 0, settings, targets)
        theta = torch.linspace(-3, 1, 24, dtype=torch.float64).reshape(3, 8).requires_grad_(True)
        values.append(measure.ascend(lambda: torch.sigmoid(theta)))
        grads.append(theta.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-9, abs=1e-12)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("objective,sparsity", [(Objective.REFUSAL, "hard_concrete"), (Objective.SUBSPACE, "l1")])
def test_a_search_run_as_links_ends_bit_for_bit_where_one_search_does(aligned, objective, sparsity):
    """What a chain of shards does (progress and resume mid-search): 2 steps, then 1 from a state that went through
    JSON (the store), then 3, equal one 6-step search in every step's numbers and gates; hard concrete's noise
    included (the generator's state is carried)."""
    from study.core.joint_spec import JointState

    _, _, harmful = aligned
    model = pf.planted_model("aligned_a", dtype=torch.float64)
    targets = [list(pf.REFUSAL_IDS[:3])] * len(harmful) if objective is Objective.REFUSAL else None
    settings = JointSettings(objective=objective, sparsity=sparsity, steps=6, lr=0.3, init=0.5, seed=3)
    whole = joint_search(model, harmful, 0, settings, targets)
    history, gates, state = [], [], None
    for until in (2, 3, 6):
        link = joint_search(model, harmful, 0, settings, targets, state=state, until=until)
        history += link.history
        gates += link.gate_history
        state = JointState.model_validate_json(link.state.model_dump_json())
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert history == list(whole.history) and gates == list(whole.gate_history)
    assert torch.equal(link.gates, whole.gates) and state == whole.state
    assert len(set(gates)) == 6  # the gates moved at every step
    with pytest.raises(ValueError, match="steps 7..6, outside 1..6"):
        joint_search(model, harmful, 0, settings, targets, state=state, until=6)


def test_bad_settings_are_refused_before_any_step(aligned):
    model, _, harmful = aligned
    with pytest.raises(UsageError, match="one non-empty answer opening per prompt"):
        joint_search(model, harmful, 0, JointSettings(objective=Objective.REFUSAL))
    with pytest.raises(UsageError, match="one non-empty answer opening per prompt"):
        joint_search(model, harmful, 0, JointSettings(objective=Objective.REFUSAL), [[]] * len(harmful))
    with pytest.raises(UsageError, match="subspace rank 9 needs at least 9 prompts"):
        joint_search(model, harmful[:8], 0, JointSettings(objective=Objective.SUBSPACE, subspace=SubspaceSpec(rank=9)))
    with pytest.raises(ValueError, match="init"):
        JointSettings(init=1.0)
    with pytest.raises(UsageError, match="eps 0.0 is invalid for undiff_q"):
        JointSettings(eps=0.0)
