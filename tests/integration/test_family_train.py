"""The family's training script on the real base: deterministic given its seed, and what it ships merges and
loads like the packaged members."""

from __future__ import annotations

import json

import pytest
import torch

from study.core.errors import UsageError
from study.family.data import Splits, build_splits
from study.family.train import Recipe, kept, save_adapter, train

pytestmark = pytest.mark.slow

MAIN = "smollm2-135m-safe"


def _small(data_dir, seed):
    full = build_splits(data_dir, seed)
    pick = lambda xs, harmful, n: tuple([e for e in xs if e.harmful == harmful][:n])  # noqa: E731
    return Splits(pick(full.train, True, 4) + pick(full.train, False, 4), pick(full.val, True, 1) + pick(full.val, False, 1))


def test_training_is_deterministic_given_the_seed_and_ships_a_loadable_adapter(shared_data, tmp_path):
    from study.models.adapters import read_adapter, write_merged
    from study.models.builtin import materialize_alias
    from study.models.loading import load_model

    recipe = Recipe(steps=2, eval_every=2, harmful_per_batch=2, harmless_per_batch=2, answer_tokens=4)
    splits = _small(shared_data, 0)
    a, record, _ = train(MAIN, shared_data, tmp_path / "work", recipe, splits)
    b, _, _ = train(MAIN, shared_data, tmp_path / "work", recipe, splits)
    c, _, _ = train(MAIN, shared_data, tmp_path / "work", recipe.model_copy(update={"seed": 1}), splits)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("lora_B"))
    assert len(a) == 2 * 7 * 30 and record["selected_step"] == 2 and len(record["loss_per_step"]) == 2
    assert record["history"][0]["step"] == 2 and 0 <= record["history"][0]["harmful_refused"] <= 1
    # the best adapter so far is on disk as soon as it is found (the last training here: seed 1)
    from safetensors.torch import load_file
    on_disk = load_file(str(tmp_path / "work" / f"best-{MAIN}.safetensors"))
    assert on_disk.keys() == c.keys() and all(torch.equal(on_disk[k], c[k].half()) for k in c)
    assert json.loads((tmp_path / "work" / f"best-{MAIN}.json").read_text())["step"] == 2
    # a member can be built from what a training kept (one stopped early), with the recipe it was trained with
    seed1 = recipe.model_copy(update={"seed": 1})
    tensors, kept_record, _ = kept(MAIN, tmp_path / "work", seed1, shared_data)
    assert tensors.keys() == c.keys() and all(torch.equal(tensors[k], on_disk[k]) for k in c)
    assert kept_record["selected_step"] == 2 and kept_record["stopped_after_step"] == 2
    assert len(kept_record["loss_per_step"]) == 2
    with pytest.raises(UsageError, match="trained with another recipe"):
        kept(MAIN, tmp_path / "work", recipe, shared_data)
    save_adapter(a, tmp_path / "adapter.safetensors", recipe, "smollm2-135m-instruct")
    pairs, scale, meta = read_adapter(tmp_path / "adapter.safetensors")
    assert len(pairs) == 210 and scale == recipe.alpha / recipe.rank and meta["base"] == "smollm2-135m-instruct"
    write_merged(materialize_alias("smollm2-135m-instruct"), tmp_path / "adapter.safetensors", tmp_path / "merged")
    lm = load_model(str(tmp_path / "merged"))
    assert lm.model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_a_resumed_training_ends_where_an_unbroken_one_does(shared_data, tmp_path, monkeypatch):
    """A training stopped after its first validation goes on from the checkpoint it wrote there (`--resume`) and
    ends with the same adapter, record and kept best, bit for bit; a checkpoint of another recipe is refused."""
    import study.family.train as family_train

    recipe = Recipe(steps=4, eval_every=2, harmful_per_batch=2, harmless_per_batch=2, answer_tokens=4)
    splits = _small(shared_data, 0)
    whole, whole_record, _ = train(MAIN, shared_data, tmp_path / "whole", recipe, splits)

    validate, calls = family_train._validate, []

    def stop_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the session ends after the step-2 checkpoint
        return validate(*args, **kwargs)

    monkeypatch.setattr(family_train, "_validate", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        train(MAIN, shared_data, tmp_path / "split", recipe, splits)
    monkeypatch.setattr(family_train, "_validate", validate)
    with pytest.raises(UsageError, match="another recipe"):
        train(MAIN, shared_data, tmp_path / "split", recipe.model_copy(update={"lr": 2e-4}), splits, resume=True)
    step_loss, steps = family_train.step_loss, []
    monkeypatch.setattr(family_train, "step_loss", lambda *a, **k: steps.append(a[-1]) or step_loss(*a, **k))
    resumed, record, _ = train(MAIN, shared_data, tmp_path / "split", recipe, splits, resume=True)
    assert steps == [3, 4]  # it went on from step 2, not from the start
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert record["history"] == whole_record["history"] and record["loss_per_step"] == whole_record["loss_per_step"]
    assert record["selected_step"] == whole_record["selected_step"]
    with pytest.raises(UsageError, match="no checkpoint"):
        train(MAIN, shared_data, tmp_path / "none", recipe, splits, resume=True)
