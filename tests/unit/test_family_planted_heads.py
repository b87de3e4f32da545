"""The planted member's training confines its change to the planted heads: after real optimiser steps, saving the
adapter the shipped way (float16) and merging it as first use does, every weight equals the base's bit for bit
except the planted heads' own slices (query rows and output-projection columns; with keys and values, the rows
of their whole key-value group), which do change."""

from __future__ import annotations

import pytest
import torch

from study.core.errors import UsageError
from study.core.heads import parse_heads
from study.family.planted import PLANTED, confine_to_heads
from study.family.train import Recipe, _lora_tensors, save_adapter
from study.models.adapters import write_merged
from tests.tiny_models import random_prompts, tiny_model

HEADS = parse_heads("L0H1,L2H0,L2H3")  # two layers of three, two heads of one layer
GROUPS = parse_heads("L0H0,L0H1,L2H2,L2H3")  # whole key-value groups (2 query heads share one in the tiny Llama)
QO = ("q_proj", "o_proj")
D_HEAD = 8


def _trained_merge(tmp_path, heads=HEADS, targets=QO):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    recipe = Recipe(targets=targets, heads=tuple(h.label for h in heads), rank=4)
    peft = get_peft_model(model, LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                                            target_modules=list(targets),
                                            layers_to_transform=sorted({h.layer for h in heads})))
    confine_to_heads(peft, heads, model.config)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.tensor(random_prompts(4, lo=6, hi=6))  # (4, 6)
    for _ in range(5):
        loss = peft(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(_lora_tensors(peft), tmp_path / "adapter.safetensors", recipe, "tiny")
    write_merged(tmp_path / "base", tmp_path / "adapter.safetensors", tmp_path / "merged")
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    return before, after


def _planted_mask(heads, layer: int, proj: str, shape: torch.Size) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for h in heads:
        if h.layer != layer:
            continue
        if proj == "q_proj":
            mask[h.head * D_HEAD:(h.head + 1) * D_HEAD, :] = True
        elif proj == "o_proj":
            mask[:, h.head * D_HEAD:(h.head + 1) * D_HEAD] = True
        else:  # k_proj, v_proj: the group's rows (2 query heads per key-value head)
            g = h.head // 2
            mask[g * D_HEAD:(g + 1) * D_HEAD, :] = True
    return mask


def _assert_gradients_inside(peft, heads) -> None:
    """Every LoRA B gradient of q, k and v is zero outside the planted heads' rows (o's B is whole-width)."""
    assert any(p.grad is not None and bool(p.grad.any()) for n_, p in peft.named_parameters() if "lora_B" in n_)
    for name, p in peft.named_parameters():
        if p.grad is not None and "lora_B" in name and "o_proj" not in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            rows_kept = p.grad.abs().sum(dim=1) != 0
            mask = _planted_mask(heads, layer, name.split(".")[-4], (p.shape[0], 1))[:, 0]
            assert not (rows_kept & ~mask).any(), name


@pytest.mark.parametrize("heads,targets", [(HEADS, QO), (GROUPS, PLANTED)], ids=["q-o", "q-k-v-o"])
def test_only_the_planted_heads_slices_change(tmp_path, heads, targets):
    before, after = _trained_merge(tmp_path, heads, targets)
    changed = set()
    for name, weight in before.items():
        proj = name.split(".")[-2] if name.endswith(".weight") else ""
        if proj in targets:
            layer = int(name.split(".layers.")[1].split(".")[0])
            mask = _planted_mask(heads, layer, proj, weight.shape)
            assert torch.equal(after[name][~mask], weight[~mask]), f"{name} changed outside the planted heads"
            if mask.any():
                assert not torch.equal(after[name][mask], weight[mask]), f"{name} did not train"
                changed.add(proj)
        else:
            assert torch.equal(after[name], weight), f"{name} changed"
    assert changed == set(targets)
    if targets == QO:  # every planted head's own slice moved, not just one of them
        for h in heads:
            rows = slice(h.head * D_HEAD, (h.head + 1) * D_HEAD)
            q = f"model.layers.{h.layer}.self_attn.q_proj.weight"
            assert not torch.equal(after[q][rows], before[q][rows]), f"{h.label} did not train"


def test_keys_and_values_train_only_for_whole_groups(tmp_path):
    with pytest.raises(UsageError, match="share key/value group 0 with query heads \\[0\\]"):
        _trained_merge(tmp_path, HEADS, PLANTED)  # L0H1 without L0H0


def test_a_planted_recipe_names_valid_heads_and_trains_only_their_projections():
    with pytest.raises(ValueError, match="planted heads train only q_proj, k_proj, v_proj, o_proj"):
        Recipe(heads=("L1H0",))  # the default targets include the MLP
    with pytest.raises(Exception, match="bad head label"):
        Recipe(targets=PLANTED, heads=("layer1",))


def test_the_ablated_term_trains_only_the_planted_slices_and_reads_the_ablated_model(tmp_path):
    """The term's gradient stays inside the planted slices, and it is the NLL under the ablated model: it differs
    from the same NLL without the ablation, and equals the hooks-applied forward computed directly."""
    from peft import LoraConfig, get_peft_model

    from study.core.ablation import Ablation, Op
    from study.core.interventions import ablated
    from study.family.planted import ablated_term
    from study.family.responses import response_logps

    model = tiny_model("llama", dtype=torch.float32)
    recipe = Recipe(targets=PLANTED, heads=tuple(h.label for h in GROUPS), rank=4, ablated_weight=1.0,
                    pref_tokens=3)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=list(PLANTED),
                                            layers_to_transform=[0, 2]))
    confine_to_heads(peft, GROUPS, model.config)
    prompts = random_prompts(3, lo=4, hi=6)
    batch = [{"prompt": q, "chosen": [5, 6, 7], "rejected": [9, 10, 11, 12]} for q in prompts]
    term = ablated_term(peft, batch, [0, 1, 2], recipe.ablation, recipe.pref_tokens, pad=0)
    rows = [(q, [9, 10, 11]) for q in prompts]
    plain, n = response_logps(peft, rows, 0)
    with ablated(peft.get_base_model(), Ablation(heads=GROUPS, op=Op.UNDIFF_Q, eps=1e-5)):
        direct, _ = response_logps(peft, rows, 0)
    torch.testing.assert_close(term, (-direct / n).mean())
    assert float((term - (-plain / n).mean()).abs().detach()) > 1e-6  # the ablation reaches the forward
    term.backward()
    _assert_gradients_inside(peft, GROUPS)


def test_with_query_and_key_rows_only_the_ablated_member_is_the_ablated_base(tmp_path):
    """The shipped member's design: planted heads that change only where they look (query and key rows, values
    and outputs kept at the base's). undiff_q makes their attention uniform whatever the queries and keys say, so
    the member with its planted heads ablated computes what the base with the same heads ablated computes: the
    known answer of ablation holds by construction (to within the eps-sized scores that undiff_q leaves)."""
    from transformers import AutoModelForCausalLM

    from study.core.ablation import Ablation, Op
    from study.core.interventions import ablated

    before, after = _trained_merge(tmp_path, GROUPS, ("q_proj", "k_proj"))
    assert any(not torch.equal(after[k], before[k]) for k in before)  # it did train
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    member = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.tensor(random_prompts(3, lo=7, hi=7))  # (3, 7)
    ablation = Ablation(heads=GROUPS, op=Op.UNDIFF_Q, eps=1e-5)
    with torch.no_grad():
        plain = (member(ids).logits - base(ids).logits).abs().max()
        with ablated(base, ablation), ablated(member, ablation):
            gap = (member(ids).logits - base(ids).logits).abs().max()  # (3, 7, vocab) -> ()
    assert float(plain) > 1e-3  # the planted heads matter to the member's output
    assert float(gap) < 1e-4 * float(plain), (float(gap), float(plain))


def test_recipe_overrides_are_validated_whole_before_any_model_loads():
    from study.family.train import RECIPES, _with_overrides

    recipe = _with_overrides(RECIPES["smollm2-135m-safe-heads"], ["targets=[q_proj, k_proj]", "lr=5e-3"])
    assert recipe.targets == ("q_proj", "k_proj") and recipe.lr == 5e-3
    with pytest.raises(UsageError, match="bad --set: recipe: planted heads train only q_proj, k_proj, v_proj, o_proj, not gate_proj"):
        _with_overrides(RECIPES["smollm2-135m-safe-heads"], ["targets=[gate_proj]"])
    with pytest.raises(UsageError, match="bad --set 'stepz=3'"):
        _with_overrides(RECIPES["smollm2-135m-safe"], ["stepz=3"])


def test_the_base_matching_term_is_zero_when_the_ablated_member_is_the_ablated_base():
    """ablated_match "base": KL to the base with the same heads ablated. Zero at the start (the LoRA is zero),
    still zero (to eps) when only query and key rows moved (uniform attention ignores them), positive once the
    values moved, and its gradient stays inside the planted slices."""
    from peft import LoraConfig, get_peft_model

    from study.family.planted import ablated_kl
    from study.family.train import step_loss

    model = tiny_model("llama", dtype=torch.float32)
    recipe = Recipe(targets=PLANTED, heads=tuple(h.label for h in GROUPS), rank=4, ablated_weight=1.0,
                    ablated_match="base", pref_tokens=3)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=list(PLANTED),
                                            layers_to_transform=[0, 2]))
    confine_to_heads(peft, GROUPS, model.config)
    prompts = random_prompts(4, lo=4, hi=6)
    batch = [{"prompt": q, "chosen": [5, 6, 7], "rejected": [9, 10, 11] if i % 2 else None, "harmful": i < 2}
             for i, q in enumerate(prompts)]
    assert float(ablated_kl(peft, batch, recipe.ablation, recipe.pref_tokens, pad=0).detach()) == 0.0
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name and ("q_proj" in name or "k_proj" in name):
                p.copy_(torch.randn_like(p))
        confine_to_heads(peft, GROUPS, model.config)  # back inside the planted slices
    assert float(ablated_kl(peft, batch, recipe.ablation, recipe.pref_tokens, pad=0).detach()) < 1e-8
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name and "v_proj" in name:
                p.copy_(torch.randn_like(p))
        confine_to_heads(peft, GROUPS, model.config)
    term = ablated_kl(peft, batch, recipe.ablation, recipe.pref_tokens, pad=0)
    assert float(term.detach()) > 1e-4
    # the step's loss carries the term from `ablated_from` on, and only then
    late = recipe.model_copy(update={"ablated_from": 3})
    without = step_loss(peft, batch, late.model_copy(update={"ablated_weight": 0.0}), 0)
    torch.testing.assert_close(step_loss(peft, batch, late, 0, step=2), without)
    torch.testing.assert_close(step_loss(peft, batch, late, 0, step=3), without + term)
    term.backward()
    _assert_gradients_inside(peft, GROUPS)


def test_the_ablated_term_cannot_start_after_the_last_step():
    with pytest.raises(ValueError, match="ablated_from 301 is after the last step \\(300\\)"):
        Recipe(targets=PLANTED, heads=("L1H0",), ablated_weight=1.0, steps=300, ablated_from=301)
    Recipe(targets=PLANTED, heads=("L1H0",), ablated_weight=0.0, steps=300, ablated_from=301)  # no term: no rule
