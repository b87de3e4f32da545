"""The joint search as a study section on the planted family (tests/planted_family.py): its group is the planted
heads, it resumes, and asr (in the study and with --from-run) and swap read its group like a Sahara group.

Everything asserted is known from the planting: aligned_a refuses every harmful prompt through L1H0, L1H3 and
L2H1 (any two of them carry the refusal), the base complies with everything."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from study.core.errors import UsageError
from study.runner import run_study
from study.spec import load_study
from tests.planted_family import PLANTED, family_folders, write_prompt_files

pytestmark = pytest.mark.slow

PLANTED_A = {h.label for h in PLANTED["aligned_a"]}


def _spec(root, folders, harmful, benign, **joint):
    return {
        "out": str(root / "run"),
        "models": [{"name": folders["base"], "role": "base", "experiments": []},
                   {"name": folders["aligned_a"], "base": folders["base"]}],
        "execution": {"executor": "local"},
        "defaults": {"prompts": str(harmful), "format": "paper", "op": "undiff_q", "eps": 1e-5, "dtype": "float32",
                     "steps": 2},  # Sahara's two steps; the joint section does not take `steps` from defaults
        "sahara": {},
        "joint": {"steps": 40, "k": 3, "seeds": [0, 1], "opening_tokens": 3, "answer_tokens": 12, **joint},
        "asr": {"max_new_tokens": 12, "judges": ["refusal"], "benign": str(benign), "random_controls": 1,
                "groups": ["sahara", "joint"]},
        "swap": {"max_new_tokens": 12, "judges": ["refusal"], "benign": None, "search": "joint",
                 "recipes": "heads-from-base"},
    }


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    folders = {k: str(v) for k, v in family_folders(root / "models").items()}
    harmful, benign = write_prompt_files(root)
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(_spec(root, folders, harmful, benign)))
    first = run_study(load_study(path))
    return root, folders, path, first, harmful


def _read(root, table):
    return pd.read_parquet(root / "run" / table)


def test_the_joint_group_is_the_planted_heads_and_every_step_is_kept(joint_run):
    root, folders, _, first, _ = joint_run
    job = next(j for j in first.jobs if j.experiment == "joint")
    assert job.cfg.steps == 40  # not the defaults' Sahara steps
    assert {h.label for h in job.group} == PLANTED_A
    t = _read(root, "joint")
    assert len(t) == 2 * 24 and set(t["seed"]) == {0, 1} and t["gate"].between(0, 1).all()
    for seed, g in t.groupby("seed"):
        top = g[g["in_group"]].sort_values("rank")
        assert set(top["head_label"]) == PLANTED_A  # every seed finds them
        assert top["score"].notna().all() and g[~g["in_group"]]["score"].isna().all()
        # the prefixes' exact objective: two planted heads remove the refusal, one does not
        assert top["score"].iloc[0] < 0.6 and top["score"].iloc[1] > 0.8 and top["score"].iloc[2] > 0.8
        assert (g["prompts_used"] == 8).all()  # aligned_a refuses all 8 harmful prompts
    assert t[t["selected"]]["seed"].nunique() == 1
    steps = _read(root, "joint_steps")
    assert len(steps) == 2 * 40 and sorted(steps["step"].unique()) == list(range(1, 41))
    for _, g in steps.groupby("seed"):
        assert g.sort_values("step")["loss"].iloc[-1] < g.sort_values("step")["loss"].iloc[0]


def test_asr_compares_the_sahara_and_joint_groups_on_the_same_prompts(joint_run):
    root, *_ = joint_run
    asr = _read(root, "asr")
    harmful = asr[asr["kind"] == "harmful"]
    by = {(r.condition, r.group_size): r.asr for r in harmful.itertuples() if r.condition != "random"}
    assert by[("normal", 0)] == 0.0
    assert by[("joint", 1)] == 0.0 and by[("joint", 2)] == 1.0 and by[("joint", 3)] == 1.0
    assert by[("sahara", 2)] == 1.0
    assert set(harmful[harmful["condition"] == "random"]["asr"]) == {0.0}  # noise heads leave the refusal
    assert set(harmful["n"]) == {8}


def test_swap_moves_the_joint_group(joint_run):
    root, *_ = joint_run
    swaps = _read(root, "swaps")
    moved = swaps[(swaps["recipe"] == "heads-from-base") & (swaps["metric"] == "asr") & (swaps["kind"] == "harmful")]
    assert set(moved["heads"].iloc[0]) == PLANTED_A and moved["value"].iloc[0] == 1.0


def test_a_second_run_reuses_the_joint_shards(joint_run):
    _, _, path, first, _ = joint_run
    again = run_study(load_study(path))
    assert again.computed == 0 and again.reused == first.computed + first.reused
    job = next(j for j in again.jobs if j.experiment == "joint")
    assert {h.label for h in job.group} == PLANTED_A


def test_asr_from_run_reads_the_joint_group(joint_run, tmp_path):
    root, folders, _, _, harmful = joint_run
    out = tmp_path / "asr"
    done = subprocess.run([sys.executable, "-m", "study.cli", "asr", "--from-run", str(root / "run"), "--groups",
                           "joint", "--model", folders["aligned_a"], "--prompts", str(harmful), "--format", "paper",
                           "--max-new-tokens", "12", "--judge", "refusal", "--benign", "none", "--executor", "local",
                           "--dtype", "float32", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    asr = pd.read_parquet(out / "asr")
    joint = asr[asr["condition"] == "joint"].sort_values("group_size")
    assert joint["group_size"].tolist() == [1, 2, 3]
    assert set(joint["ablation"].iloc[-1].split(":")[-1].split(",")) == PLANTED_A


def test_bad_joint_settings_stop_at_plan_time(joint_run, tmp_path):
    root, folders, _, _, harmful = joint_run
    for joint, message in (({"seeds": [0, 0]}, "repeat a seed"), ({"k": 25}, "more than the model's 24 heads"),
                           ({"objective": "subspace", "rank": 9}, "subspace rank 9 needs at least 9 prompts"),
                           ({"sparsity": "l0"}, "sparsity")):
        spec = _spec(tmp_path, folders, harmful, None, **joint)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(UsageError, match=message):
            run_study(load_study(path))
        assert not (tmp_path / "run").exists()  # nothing half-written


def test_the_joint_command_prints_each_seeds_group_and_writes_the_tables(joint_run, tmp_path):
    _, folders, _, _, harmful = joint_run
    out = tmp_path / "joint"
    done = subprocess.run([sys.executable, "-m", "study.cli", "joint", "--model", folders["aligned_a"], "--prompts",
                           str(harmful), "--format", "paper", "--steps", "30", "--seeds", "0,1", "--l1", "0.01",
                           "--executor", "local", "--dtype", "float32", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("joint search on") and "refusal objective" in line and "8 prompts" in line
               for line in lines), done.stdout
    seeds = [line for line in lines if line.strip().startswith("seed ")]
    assert len(seeds) == 2 and sum("(selected)" in line for line in seeds) == 1, done.stdout
    group = next(line for line in lines if line.startswith("group: "))
    assert set(group[len("group: "):].split(", ")) == PLANTED_A
    assert len(pd.read_parquet(out / "joint_steps")) == 60


def test_a_model_that_refuses_nothing_is_one_line_for_the_refusal_objective(joint_run, tmp_path):
    """The base complies with every prompt: the refusal objective has nothing to remove, and says so."""
    _, folders, _, _, harmful = joint_run
    done = subprocess.run([sys.executable, "-m", "study.cli", "joint", "--model", folders["base"], "--prompts",
                           str(harmful), "--format", "paper", "--steps", "5", "--executor", "local", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("headstudy: error: joint:") and "refuses none of the 8 prompts" in last
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_a_search_in_shards_of_steps_resumes_mid_search_and_changes_no_number(tmp_path):
    """A search runs as a chain of shards (`shard_steps`): each shows as progress and is stored as it ends, so a run
    stopped mid-search starts again from its last finished link. The numbers are those of one unbroken search."""
    import pyarrow as pa

    folders = {k: str(v) for k, v in family_folders(tmp_path / "models").items()}
    harmful, _ = write_prompt_files(tmp_path)

    def run(out, shard_steps):
        spec = {"out": str(out), "models": [{"name": folders["aligned_a"]}], "execution": {"executor": "local"},
                "defaults": {"prompts": str(harmful), "format": "paper", "op": "undiff_q", "eps": 1e-5,
                             "dtype": "float32"},
                "joint": {"steps": 10, "k": 3, "seeds": [0], "opening_tokens": 3, "answer_tokens": 12,
                          "shard_steps": shard_steps}}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return run_study(load_study(path))

    linked = run(tmp_path / "linked", 4)
    links = {}
    for f in (tmp_path / "linked" / "shards").iterdir():
        with pa.memory_map(str(f)) as source:
            t = pa.ipc.open_file(source).read_all()
        links[f] = t
    assert sorted(t["step"].to_pylist() for t in links.values()) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert all(t["state"][-1].as_py() and t["state"].null_count == t.num_rows - 1 for t in links.values())
    assert sum(t["exact"].null_count < t.num_rows for t in links.values()) == 1  # the search's last link only

    whole = run(tmp_path / "whole", 10)
    assert linked.computed == 3 and whole.computed == 1
    for table, columns in (("joint_steps", ["step", "loss", "value", "penalty", "open"]),
                           ("joint", ["head_label", "gate", "rank", "score"])):
        a = pd.read_parquet(tmp_path / "linked" / table).sort_values(columns[0])[columns].reset_index(drop=True)
        b = pd.read_parquet(tmp_path / "whole" / table).sort_values(columns[0])[columns].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=True)

    last = next(f for f, t in links.items() if t["step"][0].as_py() == 9)
    last.unlink()  # a run stopped after its second link
    again = run(tmp_path / "linked", 4)
    assert again.computed == 1 and again.reused == 2
    assert {h.label for h in next(j for j in again.jobs if j.experiment == "joint").group} == \
        {h.label for h in next(j for j in linked.jobs if j.experiment == "joint").group}
