"""lm-eval's success path inside a real run, on tasks defined from local files: its values equal a naive
log-likelihood computation for the normal model and for the ablated one; a task that fails at run time is an
error row and a manifest entry, not a dropped result; what is checkable before a model loads is refused at plan
time with one line."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from study.core.errors import UsageError
from study.core.frozen import build
from study.core.interventions import ablated
from study.models.loading import load_model
from study.runner import plan_study, run_study
from study.runtime.store import read_table
from study.spec import StudyConfig
from tests.model_folders import tiny_llama_folder

pytestmark = pytest.mark.slow  # builds a model folder with the embedded tokenizer

QUESTIONS = ["Is the sun hot?", "Is ice hot?", "Do fish swim?", "Do stones fly?", "Is water wet?", "Can a cat read?",
             "Is snow white?", "Do trees walk?", "Is fire cold?", "Can birds fly?", "Is sugar sweet?", "Do cars eat?"]
LABELS = [0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 0, 1]  # index into ["yes", "no"]
HEADS = "L0H1,L1H2,L2H0"

_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
"""
TASKS = {
    "tiny_yesno": """output_type: multiple_choice
doc_to_choice: ["yes", "no"]
doc_to_target: label
metric_list:
  - metric: acc
""",
    "tiny_loglik": """output_type: loglikelihood
doc_to_target: " yes"
metric_list:
  - metric: perplexity
""",
    # passes every plan-time check and fails in generation (a negative temperature), on every head set
    "tiny_broken": """output_type: generate_until
doc_to_target: "yes"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 2
  do_sample: true
  temperature: -1.0
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model = tiny_llama_folder(root / "model", seed=3)
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "label": y}) + "\n" for q, y in zip(QUESTIONS, LABELS)))
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(_TASK.format(name=name, data=data) + body)
    return root, str(model), str(tasks)


def spec(root, model: str, tasks: str | None, names: list[str], executor: str = "local",
         out: str = "run") -> StudyConfig:
    return build(StudyConfig, dict(out=str(root / out), defaults=dict(model=model, dtype="float64"),
                                   utility=dict(heads=HEADS, limit=2, lm_eval_tasks=names, lm_eval_include=tasks),
                                   execution=dict(executor=executor, actors=1)))


def loglik(model, tok, context: str, continuation: str) -> tuple[float, int]:
    """Sum of log p(continuation | context) and its token count, split as lm-eval splits them."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0, :-1].double()  # (seq - 1, vocab)
    logp = torch.log_softmax(logits, -1)[len(ctx) - 1:]  # (len(cont), vocab)
    return float(logp.gather(1, torch.tensor(cont)[:, None]).sum()), len(cont)


def naive(model_path: str, ablation) -> dict[str, float]:
    """What the two tasks should give, computed directly with the model (ablated by hooks where asked)."""
    lm = load_model(model_path, device="cpu", dtype="float64")
    with ablated(lm.model, ablation):
        prompts = [f"Question: {q}\nAnswer:" for q in QUESTIONS]
        correct = [max(range(2), key=lambda c: loglik(lm.model, lm.tokenizer, p, " " + ["yes", "no"][c])[0]) == y
                   for p, y in zip(prompts, LABELS)]
        yes = [loglik(lm.model, lm.tokenizer, p, " yes")[0] for p in prompts]
    return {"lm_eval:tiny_yesno:acc": sum(correct) / len(correct),
            "lm_eval:tiny_loglik:perplexity": math.exp(-sum(yes) / len(yes))}


def test_tasks_from_local_files_run_and_failures_are_kept(setup):
    root, model, tasks = setup
    result = run_study(spec(root, model, tasks, list(TASKS)))
    util = read_table(result.out, "utility").to_pandas()
    got = util[util["metric"].str.startswith("lm_eval:tiny_") & util["value"].notna()]
    assert set(got["condition"]) == {"normal", "heads"}  # random controls get no lm-eval
    job = next(j for j in result.jobs if j.experiment == "utility")
    for arm in (a for a in job.arms if a.condition != "random"):
        rows = got[got["ablation"] == arm.label].set_index("metric")
        expected = naive(model, arm.ablation)
        assert set(rows.index) == set(expected)
        for metric, value in expected.items():
            assert rows.loc[metric, "value"] == pytest.approx(value, rel=1e-6), (arm.label, metric)
            assert rows.loc[metric, "n"] == len(QUESTIONS) and pd_isnull(rows.loc[metric, "error"])
    by = got.set_index(["condition", "metric"])["value"]
    assert by[("heads", "lm_eval:tiny_loglik:perplexity")] != by[("normal", "lm_eval:tiny_loglik:perplexity")]
    ratio = got[(got["condition"] == "heads") & (got["metric"] == "lm_eval:tiny_loglik:perplexity")]["ratio"].iloc[0]
    assert ratio == pytest.approx(by[("heads", "lm_eval:tiny_loglik:perplexity")]
                                  / by[("normal", "lm_eval:tiny_loglik:perplexity")])
    # the broken task: one error row per head set, with the reason, in the table and the manifest
    broken = util[util["metric"] == "lm_eval:tiny_broken"]
    assert sorted(broken["condition"]) == ["heads", "normal"]
    assert broken["value"].isna().all() and (broken["n"] == 0).all()
    assert broken["error"].str.contains("temperature").all()
    manifest = json.loads((result.out / "manifest.json").read_text())
    record = next(j["lm_eval"] for j in manifest["jobs"] if j["experiment"] == "utility")
    assert record["status"] == "failed" and {f["task"] for f in record["failed"]} == {"tiny_broken"}
    assert len(record["failed"]) == 2


def test_on_ray_lm_eval_runs_on_the_model_actor_and_a_rerun_reads_it_back(setup, monkeypatch):
    """The lm-eval shards cross to the model's actor (the driver loads no model) and give the local values; a
    rerun of the same study computes nothing, lm-eval included."""
    root, model, tasks = setup
    names = ["tiny_yesno"]
    on_ray = run_study(spec(root, model, tasks, names, executor="ray", out="ray-run"))
    local = run_study(spec(root, model, tasks, names, out="local-run"))
    for result in (on_ray, local):
        assert result.computed == 1 + 2  # one perplexity shard (2 passages x 2 head sets), an lm-eval one per set
    cols = ["condition", "metric", "value", "n"]
    got = [read_table(r.out, "utility").to_pandas()[cols].sort_values(cols[:2]).reset_index(drop=True)
           for r in (on_ray, local)]
    assert got[0].equals(got[1])

    def fail(*args, **kwargs):
        raise AssertionError("lm-eval ran again")

    monkeypatch.setattr("study.generation.lm_eval.run_lm_eval", fail)
    again = run_study(spec(root, model, tasks, names, out="local-run"))
    assert again.computed == 0 and again.reused == local.computed


def pd_isnull(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@pytest.mark.parametrize("names, include, message", [
    (["no_such_task"], "tasks", "unknown lm-eval task(s) no_such_task"),
    (["tiny_yesno"], "missing", "is not a folder"),
    (["tiny_gone"], "gone", "lm-eval task tiny_gone cannot load its data"),
])
def test_plan_time_refusals(setup, names, include, message):
    root, model, _ = setup
    gone = root / "gone"  # a task whose data file is not there
    gone.mkdir(exist_ok=True)
    (gone / "tiny_gone.yaml").write_text(_TASK.format(name="tiny_gone", data=root / "none.jsonl")
                                         + TASKS["tiny_loglik"])
    with pytest.raises(UsageError, match=re.escape(message)):
        plan_study(spec(root, model, str(root / include), names))
