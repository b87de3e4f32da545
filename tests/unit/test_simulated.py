"""The cluster simulation's cost-model worker: rows shaped as the real worker's, costs that follow the work (the
layer a row starts at, the model's size, decoding steps), and the arithmetic of the FLOP count itself."""

from __future__ import annotations

import json

import pytest

from study.core.ablation import Ablation
from study.core.heads import Head
from study.generation.decoding import Decoding
from study.prompts.formats import PromptFormat
from study.runtime.shards import GenShard, ModelRef, PromptBlock, Shard
from study.runtime.simulated import Accelerator, ModelCost, SimulatedWorker, fake_batch, load_seconds, shard_seconds

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000)
LLAMA70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000)
BLOCK = PromptBlock(ids=("p0", "p1"), texts=("x" * 80, "y" * 120), format=PromptFormat.CHAT)


@pytest.fixture()
def models(tmp_path):
    out = {}
    for name, cfg in (("7b", LLAMA7B), ("70b", LLAMA70B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        out[name] = ModelRef(name=str(tmp_path / name), dtype="bfloat16")
    return out


def test_parameter_counts_are_the_published_sizes():
    assert ModelCost.of(LLAMA7B).params == pytest.approx(6.74e9, rel=0.01)
    assert ModelCost.of(LLAMA70B).params == pytest.approx(68.98e9, rel=0.01)


def test_costs_follow_the_work(models):
    acc = Accelerator()
    at = {layer: shard_seconds(Shard(model=models["7b"], prompts=BLOCK, ablations=(Ablation(heads=(Head(layer, 0),)),)),
                               acc) for layer in (0, 16, 31)}
    assert at[0] > at[16] > at[31] > 0  # a row starts at its ablated layer
    tokens = (80 // 4 + 24) + (120 // 4 + 24)
    m = ModelCost.of(LLAMA7B)
    expected = 2 * (tokens * 32 * m.layer_params + 2 * m.head_params) / (acc.peak_flops * acc.scoring_efficiency)
    assert at[0] == pytest.approx(expected)
    big = Shard(model=models["70b"], prompts=BLOCK, ablations=(Ablation(heads=(Head(0, 0),)),))
    assert shard_seconds(big, acc) > 8 * at[0] and shard_seconds(big, acc, gpus=4) < shard_seconds(big, acc)
    gen = GenShard(model=models["7b"], prompts=BLOCK, ablations=(Ablation(), Ablation(heads=(Head(1, 1),))),
                   decoding=Decoding(max_new_tokens=100), backend="vllm")
    step = m.params * 2 / acc.memory_bw
    assert shard_seconds(gen, acc) == pytest.approx(2 * 100 * step, rel=0.05)  # two ablations, 100 steps each
    assert load_seconds(models["70b"], acc) > load_seconds(models["7b"], acc) > acc.load_fixed_s


def test_rows_are_shaped_as_the_real_workers_and_repeatable(models):
    shards = [Shard(model=models["7b"], prompts=BLOCK, ablations=(Ablation(heads=(Head(0, 1),)),), measure=measure)
              for measure in ("kl", "nll")]
    shards.append(GenShard(model=models["7b"], prompts=BLOCK, ablations=(Ablation(),), decoding=Decoding()))
    for shard in shards:
        batch = fake_batch(shard)
        assert batch.schema.equals(shard.schema) and batch.num_rows == shard.rows
        assert batch.equals(fake_batch(shard))
    worker = SimulatedWorker(models["7b"], scale=1e9)
    assert worker.run(shards[0]).schema.equals(shards[0].schema) and worker.loaded


def test_a_joint_search_is_simulated_link_by_link(models):
    """A joint search's links: each one's rows are its own steps, the next starts from its state, only the last
    carries the exact objective, and a link costs its own steps."""
    from study.core.joint_spec import JointSettings, JointState
    from study.runtime.shards import JointShard

    first = JointShard(model=models["7b"], prompts=BLOCK, settings=JointSettings(steps=5), k=3, stop=3)
    batch = fake_batch(first)
    assert batch.schema.equals(first.schema) and batch.column("step").to_pylist() == [1, 2, 3]
    state = JointState.model_validate_json(batch.column("state")[-1].as_py())
    assert state.step == 3 and len(state.theta) == 32 * 32 and batch.column("exact").null_count == 3
    last = JointShard(**{**dict(first), "start": 3, "stop": None, "state": state, "after": first.id})
    tail = fake_batch(last)
    assert tail.column("step").to_pylist() == [4, 5] and len(tail.column("exact")[-1].as_py()) == 3
    assert last.id != first.id and shard_seconds(last, Accelerator()) == pytest.approx(
        shard_seconds(first, Accelerator()) * 2 / 3)
    with pytest.raises(ValueError, match="needs the previous link's state"):
        JointShard(**{**dict(first), "start": 3, "stop": None})


def test_a_hosted_head_recipe_costs_a_read_of_its_layers_not_a_load(models):
    """A head recipe runs on its host's simulated worker: its first shard pays for reading the donor's attention
    weights of the heads' layers (once per recipe), not for loading a model."""
    from study.models.recipes import Recipe, Swap
    from study.runtime.simulated import donor_seconds

    host = models["7b"]
    swap = Swap(recipe=Recipe.HEADS_FROM_BASE, aligned=host.name, base=host.name + "-base",
                heads=(Head(3, 1), Head(3, 2), Head(9, 0)))
    hosted = host.model_copy(update={"swap": swap})
    acc = Accelerator()
    m = ModelCost.of(LLAMA7B)
    assert donor_seconds(hosted, acc) == pytest.approx(2 * 4 * 4096 * 4096 * 2 / acc.load_bytes_per_s)  # 2 layers
    assert donor_seconds(hosted, acc) < load_seconds(host, acc) / 100 and m.attention_params == 4 * 4096 * 4096
    worker = SimulatedWorker(host, scale=1.0, accelerator=Accelerator(load_fixed_s=0.0, load_bytes_per_s=1e15))
    shard = Shard(model=hosted, prompts=BLOCK, ablations=(Ablation(heads=(Head(3, 1),)),))
    worker.prepare(shard)
    assert worker.donors == {hosted}
    slept = []
    worker._sleep = slept.append
    worker.prepare(shard)  # read once per recipe
    assert slept == []
    with pytest.raises(ValueError, match="sent to the worker"):
        SimulatedWorker(models["70b"], scale=1e9).prepare(shard)
