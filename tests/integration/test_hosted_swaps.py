"""Head recipes hosted on their target's worker (`ModelRef.host`): the aligned model's worker (or the base's, for
heads-into-base) runs a head recipe's shards inside a scoped edit, with the same rows as a mixed model loaded on
its own, on the local executor and on Ray, and without a load of its own. Tiny Llama folders with SmolLM2's
tokenizer."""

from __future__ import annotations

import pytest
import ray

from actors.cluster import shutdown, start_local
from actors.ray_executor import RayExecutor
from study.core.ablation import Ablation, Op
from study.core.heads import Head
from study.generation.decoding import Decoding
from study.models.recipes import Recipe, Swap
from study.prompts.formats import PromptFormat
from study.runtime.executor import ExecutionConfig, LocalExecutor, WorkerOptions
from study.runtime.shards import GenShard, ModelRef, PromptBlock, Shard
from tests.model_folders import broken_copy, tiny_llama_folder

pytestmark = pytest.mark.slow

HEADS = (Head(1, 3), Head(2, 0))
BLOCK = PromptBlock(ids=("p0", "p1", "p2"), texts=("How do I pick a lock?", "Tell me a story.", "Name a colour."),
                    format=PromptFormat.CHAT)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return str(tiny_llama_folder(root / "aligned", seed=0)), str(tiny_llama_folder(root / "base", seed=1))


def _refs(aligned: str, base: str, recipe: Recipe) -> tuple[ModelRef, ModelRef]:
    """(the mixed model, its host) with float64 weights (the folders' own): exact comparisons."""
    ref = ModelRef(name=aligned, dtype="float64")
    mixed = ref.model_copy(update={"swap": Swap(recipe=recipe, aligned=aligned, base=base, heads=HEADS)})
    return mixed, mixed.host


def _shards(model: ModelRef) -> list:
    kl = Shard(model=model, prompts=BLOCK, ablations=tuple(Ablation(heads=(h,), op=Op.UNDIFF_Q) for h in HEADS),
               measure="kl")
    gen = GenShard(model=model, prompts=BLOCK, ablations=(Ablation(),), decoding=Decoding(max_new_tokens=6),
                   backend="hf")
    return [kl, gen]


def _rows(batch) -> list[dict]:
    return batch.to_pylist()


@pytest.mark.parametrize("recipe", [Recipe.HEADS_FROM_BASE, Recipe.HEADS_INTO_BASE])
def test_a_hosted_head_recipe_gives_the_mixed_models_rows_and_leaves_its_host_as_it_was(pair, recipe):
    from study.runtime.worker import Worker

    mixed, host = _refs(*pair, recipe)
    assert host.name == (pair[1] if recipe is Recipe.HEADS_INTO_BASE else pair[0]) and host.swap is None
    alone = Worker(mixed)  # the mixed model loaded on its own (load_mixed), as before hosting
    expected = [_rows(alone.run(s)) for s in _shards(mixed)]
    hosting = Worker(host)
    own_before = [_rows(hosting.run(s)) for s in _shards(host)]
    got = [_rows(hosting.run(s)) for s in _shards(mixed)]
    own_after = [_rows(hosting.run(s)) for s in _shards(host)]
    assert got == expected  # bit for bit: the same weights, the same computation
    assert own_after == own_before  # the edit was put back, and the host's kept passes are its own
    assert got[0] != own_before[0]  # the recipe is not the host: the heads moved
    other = pair[0] if host.name == pair[1] else pair[1]
    foreign, _ = _refs(other, host.name, Recipe.HEADS_FROM_BASE)  # hosted by the other model
    with pytest.raises(ValueError, match="sent to the worker"):
        hosting.run(_shards(foreign)[0])


def test_the_local_executor_runs_head_recipes_on_their_hosts_worker_without_a_load(pair):
    mixed, host = _refs(*pair, Recipe.HEADS_FROM_BASE)
    shards = _shards(host) + _shards(mixed)
    ex = LocalExecutor()
    with ex:
        got = {s.id: _rows(b) for s, b in ex.run(shards, {host: WorkerOptions(device="cpu")})}
        assert set(ex.workers) == {host}
    assert len(got) == 4
    assert ex.stats[host.label].loads == 1 and ex.stats[mixed.label].loads == 0
    assert ex.stats[mixed.label].shards == 2


def test_a_hosted_recipe_whose_donor_cannot_be_read_is_given_up_alone(pair, tmp_path):
    broken = broken_copy(pair[1], tmp_path / "broken")
    mixed, host = _refs(pair[0], broken, Recipe.HEADS_FROM_BASE)
    ex = LocalExecutor(max_retries=1)
    with ex:
        got = [s for s, _ in ex.run(_shards(mixed) + _shards(host), {})]
    assert sorted(s.model.label for s in got) == [host.label, host.label]  # the host's shards all ran
    assert mixed.label in ex.failed and host.label not in ex.failed


def test_ray_runs_head_recipes_on_their_hosts_actor_with_the_same_rows(pair, tmp_path):
    mixed, host = _refs(*pair, Recipe.HEADS_FROM_BASE)
    into, base = _refs(*pair, Recipe.HEADS_INTO_BASE)
    shards = _shards(host) + _shards(mixed) + _shards(into)
    options = {host: WorkerOptions(device="cpu"), base: WorkerOptions(device="cpu")}
    expected = {s.id: _rows(b) for s, b in LocalExecutor().run(shards, options)}
    broken = broken_copy(pair[1], tmp_path / "broken")
    bad, _ = _refs(pair[0], broken, Recipe.HEADS_FROM_BASE)
    start_local(num_cpus=2, logging_level="ERROR")
    try:
        ex = RayExecutor(ExecutionConfig(actors=2, max_retries=1))
        with ex:
            got = {s.id: _rows(b) for s, b in ex.run(shards + _shards(bad), options)}
            served = {label for label in ex.pids}
        assert got == expected  # the donor's bad folder cost its recipe alone
        assert served == {host.label, base.label}  # no actor ever held a head recipe as a model of its own
        assert bad.label in ex.failed and set(ex.failed) == {bad.label}
        assert ex.stats[mixed.label].loads == 0 and ex.stats[into.label].loads == 0
    finally:
        if ray.is_initialized():
            shutdown()
