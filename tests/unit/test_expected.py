"""The work a job will submit later (`Job.expected`), which the runner tells the executor so that pools are sized
before that work is queued: Sahara's later steps, ASR's searched arms, the swaps' head recipes on their hosts."""

from __future__ import annotations

import json

from study.core.frozen import build
from study.runner import plan_study
from study.runtime.executor import Executor
from study.runtime.rounds import Rounds
from study.runtime.store import ShardStore
from study.spec import StudyConfig

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
              max_position_embeddings=256, rms_norm_eps=1e-5)


def _study(tmp_path):
    names = []
    for name in ("base", "tune"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(CONFIG))
        names.append(str(tmp_path / name))
    base, tune = names
    spec = dict(out=str(tmp_path / "run"),
                models=[{"name": base, "role": "base", "experiments": []}, {"name": tune, "base": base}],
                defaults=dict(prompts="builtin:harmful", limit=5, dtype="float32", device="cpu"),
                sahara=dict(steps=3, limit=4), asr=dict(random_controls=2, judges=["refusal"], backend="hf"),
                swap=dict(k=2, recipes=["heads-from-base", "heads-into-base", "attn-from-base"], benign=None))
    return {j.experiment: j for j in plan_study(build(StudyConfig, spec)).jobs}, base, tune


def test_each_job_expects_what_its_later_rounds_will_submit(tmp_path):
    jobs, base, tune = _study(tmp_path)
    sahara, asr, swap = jobs["sahara"], jobs["asr"], jobs["swap"]
    # 8 heads: steps 2 and 3 score 7 and 6 candidates on 4 prompts; step 1 is queued with the first round
    assert sahara.expected() == {(sahara.model, "row"): (7 + 6) * 4}
    asr_texts = asr.expected()
    prompts = 5 + (len(asr.benign) if asr.benign is not None else 0)  # the searched arms run on benign too
    assert asr_texts == {(asr.model, "text"): prompts * (1 + 2) * asr.decoding.samples}
    want = swap.expected()
    base_ref = next(ref for ref in want if ref[0].name == base)[0]
    texts = len(swap.prompts) + (len(swap.benign) if swap.benign is not None else 0)
    ships = (2 + 1) * 5  # each of the 2 heads alone and the group, on 5 prompts
    assert want[(swap.model, "text")] == texts and want[(base_ref, "text")] == texts  # a head recipe on each host
    attn = next(key for key in want if key[0].swap is not None)  # the whole-module recipe: a model of its own
    assert want[attn] == ships and attn[1] == "row"
    assert want[(swap.model, "row")] == 2 * ships and want[(base_ref, "row")] == 2 * ships  # itself + its recipe
    sahara.search.steps.extend([None, None, None])  # a search at its end expects nothing more
    assert sahara.expected() == {}


class Told(Executor):
    """Records what the runner expects; runs nothing (the first round's shards stay queued)."""

    name = "told"

    def __init__(self):
        super().__init__()
        self.told: list[dict] = []
        self.queued = 0

    def _submit(self, shards, options, urgent):
        self.queued += len(shards)

    def expect(self, rows):
        self.told.append(dict(rows))
        raise StopIteration  # enough: the first report is what this test reads

    @property
    def pending(self):
        return self.queued

    def poll(self):
        return []


def test_the_runner_tells_the_executor_the_sum_over_jobs(tmp_path):
    jobs, _, _ = _study(tmp_path)
    told = Told()
    rounds = Rounds(list(jobs.values()), ShardStore(tmp_path / "store"), {}, lambda: told)
    try:
        rounds.run()
    except StopIteration:
        pass
    [first] = told.told
    total: dict = {}
    for job in jobs.values():
        for key, rows in job.expected().items():
            total[key] = total.get(key, 0) + rows
    assert first == total and first


def test_the_ray_executor_counts_expected_work_in_a_models_remaining_time(tmp_path):
    """What is to come is priced like queued rows of its kind, on the model that will run it (a head recipe's
    host); a new report replaces the last."""
    from actors.ray_executor import RayExecutor

    jobs, base, _ = _study(tmp_path)
    swap = jobs["swap"]
    ex = object.__new__(RayExecutor)  # its pool arithmetic alone: no cluster
    ex._rows, ex._expected, ex.row_seconds, ex._kind_mean = {}, {}, {}, {"row": 0.5, "text": 2.0}
    assert ex.remaining(swap.model) == 0
    ex.expect(swap.expected())
    want = swap.expected()
    assert ex.remaining(swap.model) == want[(swap.model, "row")] * 0.5 + want[(swap.model, "text")] * 2.0
    [shard] = [s for s in jobs["sahara"].pending()][:1]
    ex._count(shard, +1)
    assert ex.remaining(swap.model) == (want[(swap.model, "row")] + shard.rows) * 0.5 + want[(swap.model, "text")] * 2.0
    ex.expect({})
    assert ex.remaining(swap.model) == shard.rows * 0.5
