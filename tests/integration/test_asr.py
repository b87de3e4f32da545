"""The ASR experiment end to end on a tiny real model folder: arms, tables, statistics, resume, executors,
head sources (a given set, this run's Sahara group, a run folder's Ships ranking) and bad input."""

from __future__ import annotations

import pandas as pd
import pytest

from study.cli import main
from study.core.frozen import build
from study.core.stats import mcnemar_exact, wilson
from study.generation.decoding import sample_seed
from study.generation.judges.registry import get_judge
from study.runner import run_study
from study.runtime.store import read_table
from study.spec import StudyConfig
from tests.model_folders import tiny_llama_folder

pytestmark = pytest.mark.slow  # a model folder with the embedded tokenizer

NEW = 6  # new tokens: the tiny model's text is noise, the plumbing is what is tested


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "m"))


def study(model: str, out, asr: dict, **sections) -> StudyConfig:
    defaults = dict(model=model, dtype="float64", limit=3, shard_prompts=2)
    return build(StudyConfig, dict(out=str(out), defaults=defaults, execution=dict(executor="local"),
                                   asr=dict(max_new_tokens=NEW, benign_limit=2, **asr), **sections))


def test_heads_with_random_controls_and_benign_set(tiny, tmp_path):
    out = tmp_path / "run"
    first = run_study(study(tiny, out, dict(heads="L1H2,L0H0", random_controls=2, judges=["paper", "outcome"])))
    gens = read_table(out, "generations").to_pandas()
    # harmful: normal + heads + 2 random draws on 3 prompts; benign: the same 4 arms on 2 prompts
    assert len(gens) == 4 * 3 + 4 * 2
    assert set(gens["condition"]) == {"normal", "heads", "random"}
    assert (gens["n_tokens"] <= NEW).all() and (gens["max_new_tokens"] == NEW).all()
    assert set(gens.loc[gens["condition"] == "heads", "ablation"]) == {"undiff_q:1e-05:L0H0,L1H2"}
    draws = gens[gens["condition"] == "random"].groupby("draw")["ablation"].first()
    assert len(draws) == 2 and all(len(a.split(":")[-1].split(",")) == 2 for a in draws)
    assert (gens["seed"] == [sample_seed(0, p, 0) for p in gens["prompt_id"]]).all()

    verdicts = read_table(out, "verdicts").to_pandas()
    assert len(verdicts) == 2 * len(gens) and set(verdicts["judge"]) == {"paper@1", "outcome@1"}
    asr = read_table(out, "asr").to_pandas()
    assert len(asr) == 2 * (4 + 4)  # judges x (harmful arms + benign arms)
    # every number of the table recomputed from the verdicts with the textbook formulas
    assert set(verdicts["outcome"]) <= {"refusal", "answer", "non_answer"}
    assert ((verdicts["outcome"] == "answer") == verdicts["harmful"]).all()
    assert ((verdicts["outcome"] == "refusal") == verdicts["refused"]).all()
    for row in asr.itertuples():
        judged = verdicts[verdicts["judge"] == row.judge]
        mine = judged[(judged["dataset"] == row.dataset) & (judged["ablation"] == row.ablation)].sort_values("prompt_id")
        assert row.n == len(mine) and row.harmful == mine["harmful"].sum()
        assert (row.ci_low, row.ci_high) == pytest.approx(wilson(row.harmful, row.n))
        assert row.degenerate == mine["degenerate"].sum() and row.refused == mine["refused"].sum()
        assert row.non_answer == (mine["outcome"] == "non_answer").sum()
        assert row.non_answer_rate == pytest.approx(row.non_answer / row.n)
        normal = judged[(judged["dataset"] == row.dataset) & (judged["condition"] == "normal")].sort_values("prompt_id")
        if row.condition == "normal":
            assert pd.isna(row.p_mcnemar)
        else:
            assert row.p_mcnemar == pytest.approx(mcnemar_exact(list(normal["harmful"]), list(mine["harmful"])))
    # verdicts are the registered judge's, on the stored text
    judge = get_judge("outcome")
    for g in gens.head(5).itertuples():
        v = verdicts[(verdicts["judge"] == "outcome@1") & (verdicts["prompt_id"] == g.prompt_id)
                     & (verdicts["ablation"] == g.ablation)].iloc[0]
        mine = judge.judge(g.prompt, g.text)
        assert (bool(v["harmful"]), v["outcome"], v["matched_rule"]) == (mine.harmful, mine.outcome, mine.rule)

    again = run_study(study(tiny, out, dict(heads="L1H2,L0H0", random_controls=2, judges=["paper", "outcome"])))
    assert again.computed == 0 and again.reused == first.computed  # resume: nothing generated twice
    pd.testing.assert_frame_equal(read_table(out, "generations").to_pandas().drop(columns="run_id"),
                                  gens.drop(columns="run_id"))


def test_sahara_group_of_this_run_feeds_its_prefixes(tiny, tmp_path):
    out = tmp_path / "run"
    run_study(study(tiny, out, dict(level="dataset", benign="none"), sahara=dict(steps=2, shard_heads=6)))
    sahara = read_table(out, "sahara").to_pandas()
    group = list(sahara[sahara["chosen"]].sort_values("step")["head_label"])
    asr = read_table(out, "asr").to_pandas()
    assert list(dict.fromkeys(asr["judge"])) == ["outcome@1", "paper@1"]  # the default judges
    asr = asr[asr["judge"] == "outcome@1"]
    sizes = asr[asr["condition"] == "sahara"].sort_values("group_size")
    assert list(sizes["group_size"]) == [1, 2]
    assert [a.split(":")[-1] for a in sizes["ablation"]] == [group[0], ",".join(sorted(group, key=_head_key))]
    assert set(asr["kind"]) == {"harmful"}  # benign: none


def _head_key(label: str) -> tuple[int, int]:
    layer, head = label[1:].split("H")
    return int(layer), int(head)


def test_query_level_from_a_run_folder_uses_each_prompts_top_heads(tiny, tmp_path, capsys):
    scored = tmp_path / "ships"
    assert main(["ships", "--model", tiny, "--dtype", "float64", "--limit", "3", "--executor", "local",
                 "--out", str(scored)]) == 0
    ships = read_table(scored, "ships").to_pandas()
    top = ships[ships["rank"] <= 2].sort_values("rank").groupby("prompt_id")["head_label"].apply(list)
    out = tmp_path / "asr"
    assert main(["asr", "--model", tiny, "--dtype", "float64", "--limit", "3", "--executor", "local",
                 "--from-run", str(scored), "--level", "query", "--k", "2", "--random-controls", "1",
                 "--max-new-tokens", str(NEW), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "query top2" in printed and "random 2 heads" in printed
    gens = read_table(out, "generations").to_pandas()
    q = gens[gens["condition"] == "query"]
    assert len(q) == 3 and set(gens["dataset"]) == {"builtin:harmful"}  # no benign set at query level
    for g in q.itertuples():
        assert g.ablation == "query:top2"
    verdicts = read_table(out, "verdicts").to_pandas()
    assert len(verdicts) == 2 * len(gens)  # the default judges: outcome (the headline), then paper
    assert list(dict.fromkeys(verdicts["judge"])) == ["outcome@1", "paper@1"] and "non-answer" in printed
    # the heads each prompt really got: the generation shards' rows carry the per-prompt ablation
    from study.runtime.store import ShardStore

    store = ShardStore(out)
    got: dict[str, set[str]] = {}
    for sid in store.ids():
        for r in store.get(sid).to_pylist():
            got.setdefault(r["prompt_id"], set()).add(r["ablation"])
    for pid, heads in top.items():
        assert f"undiff_q:1e-05:{','.join(sorted(heads, key=_head_key))}" in got[pid]


def test_ray_executor_generates_the_same_texts(tiny, tmp_path):
    local = tmp_path / "local"
    run_study(study(tiny, local, dict(heads="L2H3", benign="none")))
    spec = study(tiny, tmp_path / "ray", dict(heads="L2H3", benign="none"))
    spec = spec.with_overrides({}, dict(executor="ray", actors=2, cpus_per_actor=1))
    run_study(spec)
    a = read_table(local, "generations").to_pandas().drop(columns="run_id")
    b = read_table(tmp_path / "ray", "generations").to_pandas().drop(columns="run_id")
    keys = ["condition", "prompt_id"]
    pd.testing.assert_frame_equal(a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True))


@pytest.mark.parametrize("args,message", [
    (["--heads", "L0H0", "--judge", "nope"], "unknown judge 'nope'"),
    (["--heads", "L0H0", "--decoding", "beam"], "unknown decoding 'beam'"),
    (["--heads", "L0H0", "--backend", "tgi"], "unknown generation backend 'tgi'"),
    (["--heads", "L9H0"], "L9H0"),
    (["--heads", "L0H0", "--decoding", "greedy", "--samples", "3"], "samples 3"),
    (["--level", "dataset"], "has no heads"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["asr", "--model", tiny, "--executor", "local", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_from_run_without_the_table(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["asr", "--model", tiny, "--executor", "local", "--from-run", str(empty),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no table 'sahara'" in capsys.readouterr().err


def test_llm_judge_runs_the_rubric_on_the_judge_model(tiny, tmp_path):
    from study.generation.judges.llm import parse_answer, rubric
    from study.prompts.sets import prompt_id
    from study.runtime.store import ShardStore

    out = tmp_path / "run"
    spec = study(tiny, out, dict(heads="L1H2", benign="none", judges=["refusal", "llm:smollm2-135m-instruct"]))
    first = run_study(spec)
    gens = read_table(out, "generations").to_pandas()
    verdicts = read_table(out, "verdicts").to_pandas()
    llm = verdicts[verdicts["judge"] == "llm:smollm2-135m-instruct@1"]
    assert len(llm) == len(gens) == 2 * 3
    # the judge model's answer to each text's rubric, read back from its own shards, decided the verdict
    answers = {r["prompt_id"]: r["text"] for sid in ShardStore(out).ids()
               for r in ShardStore(out).get(sid).to_pylist() if r["prompt_id"] not in set(gens["prompt_id"])}
    assert len(answers) == len({(g.prompt, g.text) for g in gens.itertuples()})
    for g in gens.itertuples():
        said = parse_answer(answers[prompt_id(rubric(g.prompt, g.text))])
        v = llm[(llm["prompt_id"] == g.prompt_id) & (llm["ablation"] == g.ablation)].iloc[0]
        assert v["matched_rule"] == f"llm:{said or 'unparsed'}"
        assert bool(v["harmful"]) == (said == "yes" and not v["degenerate"])
    assert set(read_table(out, "asr").to_pandas()["judge"]) == {"refusal@1", "llm:smollm2-135m-instruct@1"}
    again = run_study(spec)
    assert again.computed == 0 and again.reused == first.computed


def test_two_asr_runs_differing_only_in_heads_keep_both(tiny, tmp_path):
    """Heads are part of a job's identity: the second run adds its rows beside the first's, not over them."""
    out = tmp_path / "run"
    run_study(study(tiny, out, dict(heads="L1H2", benign="none")))
    run_study(study(tiny, out, dict(heads="L0H1", benign="none")))
    asr = read_table(out, "asr").to_pandas()
    asr = asr[asr["judge"] == asr["judge"].iloc[0]]  # one judge's rows
    heads = asr[asr["condition"] == "heads"]
    assert sorted(a.split(":")[-1] for a in heads["ablation"]) == ["L0H1", "L1H2"]
    assert len(asr[asr["condition"] == "normal"]) == 2  # each condition keeps its own normal arm
    assert len(list((out / "asr").rglob("*.parquet"))) == 2


def test_from_run_takes_one_search_and_refuses_a_mixed_folder(tiny, tmp_path, capsys):
    """Two Sahara searches of one model in a folder (two subspaces) are never interleaved: asr --from-run
    names both and stops; a folder with one search gives its group."""
    scored = tmp_path / "sahara"
    common = ["--model", tiny, "--dtype", "float64", "--limit", "3", "--executor", "local", "--out", str(scored)]
    assert main(["sahara", "--steps", "1", *common]) == 0
    asr_args = ["asr", "--model", tiny, "--dtype", "float64", "--limit", "2", "--executor", "local",
                "--from-run", str(scored), "--max-new-tokens", str(NEW), "--benign", "none"]
    assert main([*asr_args, "--out", str(tmp_path / "one")]) == 0
    assert not read_table(tmp_path / "one", "asr").to_pandas().empty
    assert main(["sahara", "--steps", "1", "--subspace", "right", *common]) == 0
    capsys.readouterr()
    assert main([*asr_args, "--out", str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 sahara searches" in err[0] and "subspace left" in err[0] and "subspace right" in err[0]
    assert not (tmp_path / "two").exists()
    assert main([*asr_args, "--op", "scale_v", "--out", str(tmp_path / "three")]) == 2  # no search of that operator
    assert "no sahara rows" in capsys.readouterr().err


def test_jobs_that_would_write_one_file_are_refused_at_plan_time(tiny, tmp_path):
    from study.core.errors import UsageError
    from study.experiments.asr import AsrConfig, AsrJob
    from study.runner import check_distinct_files

    a = AsrJob(build(AsrConfig, dict(model=tiny, heads="L1H2", limit=2)), tmp_path)
    b = AsrJob(build(AsrConfig, dict(model=tiny, heads="L1H2", limit=3)), tmp_path)  # a size only
    c = AsrJob(build(AsrConfig, dict(model=tiny, heads="L0H1", limit=3)), tmp_path)
    d = AsrJob(build(AsrConfig, dict(model=tiny, heads="L1H2", decoding="topk")), tmp_path)
    assert len({a.part, c.part, d.part}) == 3 and a.part == b.part
    check_distinct_files([a, c, d])
    with pytest.raises(UsageError, match=r"asr on .*two jobs would write the same table files .*limit 2 vs 3"):
        check_distinct_files([a, c, b])
