"""Ground truth for the cross-model path: a planted tiny family (a base and two fine-tunes that share two
safety heads plus one each of their own) run as one study from a spec, on Ray, then again locally.

Everything asserted is known from the planting (tests/planted_family.py): the Sahara group of two of each
fine-tune is the planted pair they share; the fine-tunes' top-3 Ships heads share exactly those two, with the exact hypergeometric p-value of two top-3 sets out of 24 heads sharing two; the planted
heads are safety-specific and the always-important head is not; and each swap recipe does what the
planting predicts.
"""

from __future__ import annotations

import json
import math

import duckdb
import pandas as pd
import pytest
import yaml

from analysis.derive import derive_run
from study.cli import main
from study.runner import run_study
from study.spec import load_study
from tests.planted_family import ALWAYS_HEAD, OWN_A, OWN_B, PLANTED, SHARED, family_folders, write_prompt_files

pytestmark = pytest.mark.slow

# what each recipe does to a fine-tune whose safety lives in its planted attention heads (ASR, paper judge)
PREDICTED_ASR = {"aligned": 0.0, "base": 1.0, "attn-from-base": 1.0, "mlp-from-base": 0.0, "heads-from-base": 1.0,
                 "heads-into-base": 0.0}


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    folders = {k: str(v) for k, v in family_folders(root / "models").items()}
    harmful, benign = write_prompt_files(root)
    spec = {
        "out": str(root / "run"),
        "models": [{"name": folders["base"], "role": "base", "experiments": []},
                   {"name": folders["aligned_a"], "base": folders["base"],
                    "planted_heads": ",".join(h.label for h in PLANTED["aligned_a"])},
                   {"name": folders["aligned_b"], "base": folders["base"]}],
        "execution": {"executor": "ray", "actors": 1},
        "defaults": {"prompts": str(harmful), "format": "paper", "op": "undiff_q", "eps": 1e-5, "dtype": "float32"},
        "ships": {},
        "specificity": {"prompts": str(benign)},
        "sahara": {"steps": 2},
        "asr": {"max_new_tokens": 16, "judges": ["paper", "refusal"], "benign": str(benign), "random_controls": 1},
        "swap": {"max_new_tokens": 16, "judges": ["paper"], "benign": str(benign)},
        "utility": {"limit": 6, "random_controls": 1},
        "surgery": {"heads": "L1H2,L0H3"},
        "overlap": {"k": 3},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = run_study(load_study(path), derive=derive_run)
    return root, folders, path, first


def _read(root, table):
    return pd.read_parquet(root / "run" / table)


def test_surgery_runs_on_the_models_actor_and_saves_the_edited_weights(family_run):
    """A study's surgery section is a shard like any other: the model's Ray actor writes the checkpoint (the driver
    loads no model) and its weights are the model's with the ablation written in."""
    import torch

    from study.core.ablation import Ablation
    from study.core.heads import parse_heads
    from study.core.interventions import weights_edited
    from study.models.loading import load_model

    root, folders, _, first = family_run
    jobs = [j for j in first.jobs if j.experiment == "surgery"]
    assert {j.cfg.model for j in jobs} == {folders["aligned_a"], folders["aligned_b"]}
    for job in jobs:
        assert job.saved["edited_parameters"] > 0 and job.checkpoint.parent == root / "run" / "checkpoints"
        saved = load_model(str(job.checkpoint)).model.state_dict()
        original = load_model(job.cfg.model).model
        # the section's own eps (the paper's 1e-10), not the study's scoring default
        assert job.cfg.ablation == Ablation(heads=parse_heads("L1H2,L0H3"), eps=1e-10)
        with weights_edited(original, job.cfg.ablation):
            want = original.state_dict()
            assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)


def test_sahara_finds_planted_heads(family_run):
    """Any two planted heads carry the refusal, so the greedy search's group of two is two planted heads of
    each fine-tune (a third step picks noise: once two are gone the paper's metric is flat)."""
    _, folders, _, first = family_run
    groups = {j.cfg.model: set(j.group) for j in first.jobs if j.experiment == "sahara"}
    for name in ("aligned_a", "aligned_b"):
        assert len(groups[folders[name]]) == 2 and groups[folders[name]] <= set(PLANTED[name])


def test_overlap_reports_the_shared_heads_with_their_p_value(family_run):
    root, folders, _, _ = family_run
    ov = _read(root, "overlap")
    harmful = ov["datasets"].map(lambda d: set(d) == {"harmful.txt"})
    rows = ov[(ov["axis"] == "models") & (ov["source"] == "ships") & (ov["k"] == 3) & harmful]
    assert len(rows) == 1
    row = rows.iloc[0]
    assert sorted(row["models"]) == sorted([folders["aligned_a"], folders["aligned_b"]])
    assert list(row["shared_heads"]) == [h.label for h in sorted(SHARED)] and row["shared"] == 2
    # P(two random 3-sets of 24 heads share >= 2) = (C(3,2) C(21,1) + C(3,3)) / C(24,3)
    p = (math.comb(3, 2) * math.comb(21, 1) + 1) / math.comb(24, 3)
    assert row["p_value"] == pytest.approx(p, rel=1e-12) and row["p_value"] < 0.05
    assert row["jaccard"] == pytest.approx(2 / 4)
    same = duckdb.sql(f"select shared, p_value from read_parquet('{root / 'run' / 'overlap'}/*/*.parquet') "
                      f"where axis = 'models' and source = 'ships' and k = 3 and datasets[1] = 'harmful.txt'").fetchall()
    assert same == [(2, row["p_value"])]


def test_specificity_separates_safety_heads_from_an_always_important_head(family_run):
    root, folders, _, _ = family_run
    spec = _read(root, "specificity")
    for name, own in (("aligned_a", OWN_A), ("aligned_b", OWN_B)):
        rows = spec[spec["model"] == folders[name]].set_index("head_label")
        for head in (*SHARED, own):
            assert rows.loc[head.label, "specificity"] > 0.9
        assert rows.loc[ALWAYS_HEAD.label, "specificity"] < 0.5
        assert rows.loc[ALWAYS_HEAD.label, "kl_benign"] > rows.loc[ALWAYS_HEAD.label, "kl_harmful"]
        top = rows.sort_values("rank_specific").index[:3]
        assert set(top) == {h.label for h in (*SHARED, own)}


def test_swaps_do_what_the_planting_predicts(family_run):
    root, folders, _, first = family_run
    groups = {j.cfg.model: j.group for j in first.jobs if j.experiment == "sahara"}
    sw = _read(root, "swaps")
    for name in ("aligned_a", "aligned_b"):
        rows = sw[(sw["model"] == folders[name])]
        asr = rows[(rows["kind"] == "harmful") & (rows["metric"] == "asr")].set_index("recipe")["value"]
        assert asr.to_dict() == PREDICTED_ASR
        benign = rows[(rows["kind"] == "benign") & (rows["metric"] == "refusal_rate")]
        assert (benign["value"] == 0).all() and len(benign) == len(PREDICTED_ASR)
        moved = rows[rows["recipe"] == "heads-from-base"]["heads"].iloc[0]
        assert sorted(moved) == sorted(h.label for h in groups[folders[name]])  # this run's Sahara group
        ships = rows[(rows["kind"] == "ships") & (rows["metric"] == "ships:group")].set_index("recipe")["value"]
        # the safety heads matter in the aligned model and in the base that received them, not where removed
        assert ships["aligned"] > 0.1 and ships["heads-into-base"] > 0.1
        assert ships["heads-from-base"] < 1e-3 and ships["attn-from-base"] < 1e-3


def test_asr_rises_when_the_group_goes(family_run):
    root, folders, _, _ = family_run
    asr = _read(root, "asr")
    rows = asr[(asr["model"] == folders["aligned_a"]) & (asr["kind"] == "harmful") & (asr["judge"].str.startswith("paper"))]
    by = {(r.condition, r.group_size): r.asr for r in rows.itertuples()}
    # two planted heads are enough to refuse: one removed keeps the refusal, two removed do not
    assert by[("normal", 0)] == 0 and by[("sahara", 1)] == 0 and by[("sahara", 2)] == 1.0
    curve = _read(root, "asr_curve")
    assert set(curve[curve["model"] == folders["aligned_a"]]["group_size"]) == {0, 1, 2, 3}  # 3: the planted heads


def test_the_known_answer_is_checked_first(family_run):
    """aligned_a's planted heads (given in the spec) are ablated as their own arm beside random heads of three,
    recorded in the manifest, and the report's first finding states what Ships, Sahara and ASR made of them."""
    from html import unescape

    from analysis.report import write_report

    root, folders, _, _ = family_run
    asr = _read(root, "asr")
    a = asr[(asr["model"] == folders["aligned_a"]) & (asr["kind"] == "harmful") & (asr["judge"].str.startswith("paper"))]
    planted = a[a["condition"] == "planted"]
    assert len(planted) == 1 and planted["asr"].iloc[0] == 1.0 and planted["group_size"].iloc[0] == 3
    assert ((a["condition"] == "random") & (a["group_size"] == 3)).sum() == 1
    assert "planted" not in set(asr[asr["model"] == folders["aligned_b"]]["condition"])
    jobs = json.loads((root / "run" / "manifest.json").read_text())["jobs"]
    labels = sorted(h.label for h in PLANTED["aligned_a"])
    assert all(sorted(j["planted_heads"]) == labels for j in jobs if j["model"] == folders["aligned_a"])
    assert not any("planted_heads" in j for j in jobs if j["model"] != folders["aligned_a"])
    html = unescape(write_report(root / "run").read_text(encoding="utf-8"))
    known = html[html.index('<li class="known">'):]
    known = known[:known.index("</li>")]
    assert "of 24 (all of them at the top: recovered)" in known
    assert "-head group" in known and "holds only planted heads (2 of 3)" in known
    assert "ablating them raises ASR from 0.00 to 1.00" in known


def test_planted_heads_outside_the_model_are_refused_at_plan_time(family_run, tmp_path, capsys):
    root, folders, path, _ = family_run
    spec = yaml.safe_load(path.read_text())
    spec["models"][1]["planted_heads"] = "L1H0,L7H0"  # the tiny family has 3 layers
    spec["out"] = str(tmp_path / "out")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    assert main(["plan", str(bad)]) == 2
    assert "head L7H0 is out of range" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_utility_and_resume_through_the_command_line(family_run, capsys):
    root, folders, path, first = family_run
    util = _read(root, "utility")
    normal = util[(util["condition"] == "normal") & (util["metric"] == "perplexity")]
    assert len(normal) == 2 and (normal["ratio"] == 1.0).all() and normal["value"].map(math.isfinite).all()
    assert set(util["condition"]) == {"normal", "sahara", "random"}
    # the same spec again, through the command line on the local executor: nothing is computed
    assert main(["run", str(path), "--executor", "local"]) == 0
    out = capsys.readouterr().out
    saves = sum(j.experiment == "surgery" for j in first.jobs)  # a kept checkpoint is no shard to read back
    assert f"shards: 0 computed, {first.computed + first.reused - saves} reused" in out
    swaps = out[out.index("base-weight swaps: " + folders["aligned_a"]):]
    assert all(recipe in swaps for recipe in PREDICTED_ASR)
    assert "shared top heads across models" in out and "top-3" in out
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    assert set(manifest["derived"]) == {"rankings", "overlap", "specificity", "asr_curve"}


def test_generations_that_need_no_heads_start_while_sahara_searches(tmp_path):
    """The swaps' references and whole-module recipes are models of their own to load and generate with, and
    ASR's normal model starts its generation engine: they are submitted with Sahara's first step, not after its
    last; the head recipes and the group's ASR arms wait for the group, and nothing is generated twice."""
    from study.core.frozen import build
    from study.runtime.executor import LocalExecutor
    from study.spec import StudyConfig

    folders = {k: str(v) for k, v in family_folders(tmp_path / "models").items()}

    class Recording(LocalExecutor):
        def __init__(self) -> None:
            super().__init__()
            self.log: list[tuple[str, str]] = []  # (what, recipe or experiment) per submitted shard, in order
            self.ablations: list[tuple[str, str, tuple[str, ...]]] = []  # (asr or other, model, labels), in order

        def _submit(self, shards, options, urgent) -> None:
            self.log += [(type(s).__name__, s.model.swap.recipe.value if s.model.swap
                          else "base" if s.model.name == folders["base"] else "aligned") for s in shards]
            # Sahara's steps; ASR's generations (3 tokens; the swap's take 4)
            self.ablations += [("sahara" if getattr(s, "measure", None) == "angle"
                                else "asr" if type(s).__name__ == "GenShard" and not s.model.swap
                                and s.model.name == folders["aligned_a"] and s.decoding.max_new_tokens == 3
                                else "other", s.model.name, tuple(a.label for a in s.ablations)) for s in shards]
            super()._submit(shards, options, urgent)

    harmful, _ = write_prompt_files(tmp_path)
    study = build(StudyConfig, {
        "out": str(tmp_path / "run"),
        "models": [{"name": folders["base"], "role": "base", "experiments": []},
                   {"name": folders["aligned_a"], "base": folders["base"]}],
        "defaults": {"prompts": str(harmful), "format": "paper", "limit": 4, "dtype": "float32"},
        "sahara": {"steps": 2},
        "swap": {"max_new_tokens": 4, "judges": ["paper"], "k": 2,
                 "recipes": ["attn-from-base", "heads-from-base"]},
        "asr": {"max_new_tokens": 3, "judges": ["paper"], "random_controls": 1}})
    executor = Recording()
    result = run_study(study, executor=executor)
    last_sahara = max(i for i, (kind, _, _) in enumerate(executor.ablations) if kind == "sahara")  # its last step
    swap_log = [e if kind == "other" else None for e, (kind, _, _) in zip(executor.log, executor.ablations)]
    early = set(swap_log[:last_sahara]) - {None}
    assert early == {("GenShard", "aligned"), ("GenShard", "base"), ("GenShard", "attn-from-base")}
    late = set(swap_log[last_sahara + 1:]) - {None}
    assert ("GenShard", "heads-from-base") in late and not late & early  # each generation computed once
    assert ("Shard", "base") in late  # the references' Ships rows need the group
    swaps = next(t for t in result.job_tables if "swaps" in t)["swaps"].to_pandas()
    assert set(swaps["recipe"]) == {"aligned", "base", "attn-from-base", "heads-from-base"}
    # ASR: the normal model generates beside the search (its engine starts then); the group's arms after it
    asr_early = {a for kind, who, abl in executor.ablations[:last_sahara] if kind == "asr" for a in abl}
    asr_late = [a for kind, who, abl in executor.ablations[last_sahara + 1:] if kind == "asr" for a in abl]
    assert asr_early == {"none"} and "none" not in asr_late
    assert any(a.startswith("undiff_q") for a in asr_late)
    asr = next(t for t in result.job_tables if "asr" in t)["asr"].to_pandas()
    assert set(asr["condition"]) == {"normal", "sahara", "random"} and set(asr["n"]) == {4}
