"""The one runner on the local executor: shard cuts never change a value, results equal the naive strategy,
an interrupted run resumes computing only the missing shards, and a rerun never duplicates rows."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from study.core.ablation import Ablation
from study.core.engine import naive_scan
from study.core.frozen import build
from study.core.heads import all_heads
from study.core.scores import generalized_ships
from study.core.subspace import SubspaceSpec
from study.models.loading import load_model
from study.prompts.formats import PromptFormat, encode_all
from study.prompts.sets import load_prompts
from study.runner import run_study
from study.runtime.executor import LocalExecutor
from study.runtime.store import ShardStore, read_table
from study.spec import StudyConfig
from tests.model_folders import broken_copy, tiny_llama_folder

pytestmark = pytest.mark.slow  # builds model folders with the embedded tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "m"))


def spec(model: str, out, *, heads: int = 3, prompts: int = 2, steps: int = 2, executor: str = "local",
         models: list[str] | None = None, **execution) -> StudyConfig:
    defaults = dict(dtype="float64", limit=4, shard_heads=heads, shard_prompts=prompts)
    if models is None:
        defaults["model"] = model
    return build(StudyConfig, dict(out=str(out), models=models, defaults=defaults, ships={},
                                   sahara=dict(steps=steps), execution=dict(executor=executor, **execution)))


def frame(out, table: str) -> pd.DataFrame:
    df = read_table(out, table).to_pandas().drop(columns=["run_id"])
    keys = [c for c in ("model", "prompt_id", "step", "layer", "head") if c in df.columns]
    return df.sort_values(keys).reset_index(drop=True)


def assert_same_tables(a, b, rtol: float) -> None:
    for table in ("ships", "head_scores", "sahara"):
        x, y = frame(a, table), frame(b, table)
        value = {"ships": "kl", "head_scores": "angle_deg", "sahara": "score"}[table]
        pd.testing.assert_frame_equal(x.drop(columns=[value, "rank"], errors="ignore"),
                                      y.drop(columns=[value, "rank"], errors="ignore"))
        np.testing.assert_allclose(x[value], y[value], rtol=rtol, atol=0)


def test_shard_cut_does_not_change_values_and_equals_naive(tiny, tmp_path):
    small = run_study(spec(tiny, tmp_path / "small", heads=1, prompts=1))
    big = run_study(spec(tiny, tmp_path / "big", heads=64, prompts=64))
    assert small.computed > big.computed  # really cut differently
    assert_same_tables(tmp_path / "small", tmp_path / "big", rtol=1e-10)

    lm = load_model(tiny, dtype="float64")
    ids = encode_all(load_prompts("builtin:harmful", limit=4), PromptFormat.PAPER, lm.tokenizer)
    heads = all_heads(3, 4)
    ref = naive_scan(lm.model, ids, [Ablation(heads=(h,)) for h in heads])  # kl: (heads, prompts)
    ships = read_table(tmp_path / "small", "ships").to_pandas()
    got = ships.pivot(index="head_label", columns="prompt_id", values="kl")
    order = [p.id for p in load_prompts("builtin:harmful", limit=4)]
    expect = ref.kl.numpy()  # (heads, prompts)
    np.testing.assert_allclose(got.loc[[h.label for h in heads], order].to_numpy(), expect, rtol=1e-9, atol=1e-12)
    assert expect.max() > 1e-3

    normal = naive_scan(lm.model, ids, [Ablation()]).hidden[0]
    step1 = read_table(tmp_path / "small", "head_scores").to_pandas().set_index("head_label")
    alone = naive_scan(lm.model, ids, [Ablation(heads=(h,)) for h in heads]).hidden
    slow = [generalized_ships(normal, alone[i], SubspaceSpec.paper()) for i in range(len(heads))]
    np.testing.assert_allclose(step1.loc[[h.label for h in heads], "angle_deg"], slow, rtol=1e-7, atol=1e-9)


class _Killed(BaseException):
    """Stands for the driver dying: nothing after it runs (not even `except Exception`)."""


class DyingExecutor(LocalExecutor):
    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.seen = after, 0

    def poll(self):
        if self.seen == self.after:
            raise _Killed()
        out = super().poll()
        self.seen += len(out)
        return out


def test_interrupted_run_resumes_with_only_missing_shards(tiny, tmp_path):
    clean = run_study(spec(tiny, tmp_path / "clean", heads=2))
    total = clean.computed
    # ships: 6 head blocks x 2 prompt blocks = 12; sahara: 6 shards per step
    assert total == 12 + 6 + 6
    out = tmp_path / "resumed"
    killed_after = 12 + 6 + 2  # inside Sahara's second step
    with pytest.raises(_Killed):
        run_study(spec(tiny, out, heads=2), executor=DyingExecutor(killed_after))
    assert len(ShardStore(out).ids()) == killed_after  # every finished shard is on disk
    assert not (out / "ships").exists()  # tables are written only by a run that finished

    again = run_study(spec(tiny, out, heads=2))
    assert again.computed == total - killed_after and again.reused == killed_after
    assert_same_tables(tmp_path / "clean", out, rtol=0)

    # a third run computes nothing, and rewriting the same experiment leaves no duplicate rows
    third = run_study(spec(tiny, out, heads=2))
    assert third.computed == 0
    ships = read_table(out, "ships").to_pandas()
    assert not ships.duplicated(["prompt_id", "head_label"]).any() and len(ships) == 4 * 12
    assert pd.read_parquet(out / "ships").shape == ships.shape

    forced = run_study(spec(tiny, out, heads=2), force=True)
    assert forced.computed == total

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == {"computed": total, "reused": 0}
    assert manifest["code"]["version"] and "commit" in manifest["code"]
    job = manifest["jobs"][0]
    assert job["prompts"]["count"] == 4 and job["prompts"]["limit"] == 4 and len(job["prompts"]["ids_sha256"]) == 64
    builtin = importlib.resources.files("study").joinpath("data", "harmful.txt").read_bytes()
    assert job["prompts"]["file_sha256"] == hashlib.sha256(builtin).hexdigest()
    assert job["model_fingerprint"].startswith("files:")


def test_a_model_that_fails_to_load_locally_is_retried_then_named_while_the_others_land(tiny, tmp_path, capsys):
    """The local executor's bound is Ray's: `max_retries` + 1 loads, then one line and exit 1, the other kept."""
    from study.cli import main

    bad = broken_copy(tiny, tmp_path / "bad")
    out = tmp_path / "run"
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(dict(out=str(out), models=[bad, tiny], ships={},
                                    defaults=dict(dtype="float64", limit=2, shard_heads=6),
                                    execution=dict(executor="local", max_retries=1))))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "could not be loaded" in line]) == 1
    assert f"model {bad} could not be loaded" in err[-1] and "(2 tries)" in err[-1] and tiny not in err[-1]
    ships = read_table(out, "ships").to_pandas()
    assert set(ships["model"]) == {tiny} and len(ships) == 2 * 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["failed"]) == [bad] and manifest["models"][bad]["retries"] == 1


def test_tables_read_back_with_pandas_pyarrow_and_duckdb(tiny, tmp_path):
    import duckdb
    import polars as pl
    import pyarrow.dataset as ds

    out = tmp_path / "run"
    run_study(spec(tiny, out, heads=6))
    for table in ("ships", "head_scores", "sahara"):
        ref = read_table(out, table).to_pandas()
        keys = [c for c in ("prompt_id", "step", "layer", "head") if c in ref.columns]
        ref = ref.sort_values(keys).reset_index(drop=True)
        readers = {
            "pandas": pd.read_parquet(out / table),
            "pyarrow.dataset": ds.dataset(out / table, format="parquet", partitioning="hive").to_table().to_pandas(),
            "duckdb": duckdb.sql(f"select * from read_parquet('{out / table}/**/*.parquet', "
                                 f"hive_partitioning=true)").df(),
            "polars": pl.read_parquet(out / table / "**" / "*.parquet", hive_partitioning=True).to_pandas(),
        }
        for name, df in readers.items():
            assert list(df.columns) == list(ref.columns), name
            df = df.sort_values(keys).reset_index(drop=True)
            if table == "sahara":  # list column: compare as Python lists
                df["group"], ref["group"] = df["group"].map(list), ref["group"].map(list)
            for frame_ in (df, ref):  # a missing revision is None in one reader and NaN in another
                frame_["model_revision"] = frame_["model_revision"].astype(object).where(
                    frame_["model_revision"].notna(), None)
            pd.testing.assert_frame_equal(df, ref, check_dtype=False, obj=f"{table} via {name}")
            assert df["model"].iloc[0] == tiny  # the model id, not a folder slug


def test_surgery_through_the_runner_saves_a_checkpoint_equal_to_hook_ablation(tiny, tmp_path, capsys):
    from study.cli import main
    from study.core.heads import parse_heads
    from study.core.interventions import ablated

    ckpt = tmp_path / "ckpt"
    assert main(["surgery", "--model", tiny, "--heads", "L2H1,L0H3", "--dtype", "float64", "--out", str(ckpt)]) == 0
    assert "parameters edited" in capsys.readouterr().out
    assert (ckpt / "manifest.json").is_file() and (ckpt / "headstudy_surgery.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert ckpt.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by colleagues as the user's files are
    ids = torch.tensor([[1, 5, 9, 200, 3000, 17]])
    edited = load_model(str(ckpt), dtype="float64").model
    original = load_model(tiny, dtype="float64").model
    with ablated(original, Ablation(heads=parse_heads("L2H1,L0H3"), eps=1e-10)):
        expect = original(input_ids=ids).logits
    got = edited(input_ids=ids).logits
    torch.testing.assert_close(got, expect, atol=1e-10, rtol=0)
    assert (got - original(input_ids=ids).logits).abs().max() > 1e-4  # the edit changed the model

    saved = (ckpt / "model.safetensors").stat().st_mtime_ns
    # the same surgery again (a study rerun): kept, not refused and not redone; another one: refused
    assert main(["surgery", "--model", tiny, "--heads", "L2H1,L0H3", "--dtype", "float64", "--out", str(ckpt)]) == 0
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == saved
    assert main(["surgery", "--model", tiny, "--heads", "L0H1", "--out", str(ckpt)]) == 2  # not empty
    assert main(["surgery", "--model", tiny, "--heads", "L3H0", "--out", str(tmp_path / "c2")]) == 2
    assert "out of range" in capsys.readouterr().err and not (tmp_path / "c2").exists()


def test_screened_ships_rescores_each_prompts_top_heads_exactly_and_resumes(tiny, tmp_path):
    """--screen bf16: every head scored on a bfloat16 copy, then the union of each prompt's top 2 re-scored at
    the model's dtype; those rows equal the naive strategy and say so, the others say they are screened."""
    cfg = build(StudyConfig, dict(out=str(tmp_path / "s"), defaults=dict(model=tiny, dtype="float64", limit=4),
                                  ships=dict(screen="bf16", verify_top=2), execution=dict(executor="local")))
    first = run_study(cfg)
    ships = read_table(tmp_path / "s", "ships").to_pandas()
    lm = load_model(tiny, dtype="float64")
    prompts = load_prompts("builtin:harmful", limit=4)
    heads = all_heads(3, 4)
    ref = naive_scan(lm.model, encode_all(prompts, PromptFormat.PAPER, lm.tokenizer),
                     [Ablation(heads=(h,)) for h in heads]).kl.numpy()  # (heads, prompts)
    expect = pd.DataFrame(ref, index=[h.label for h in heads], columns=[p.id for p in prompts])
    ships["naive"] = [expect.loc[h, p] for h, p in zip(ships["head_label"], ships["prompt_id"])]
    exact, screened = ships[ships["exact"]], ships[~ships["exact"]]
    np.testing.assert_allclose(exact["kl"], exact["naive"], rtol=1e-9, atol=1e-12)
    assert len(screened) and (abs(screened["kl"] - screened["naive"]) / screened["naive"]).max() > 1e-4
    verified = set(exact["head_label"])
    assert 2 <= len(verified) < len(heads)
    assert exact.groupby("prompt_id").size().eq(len(verified)).all()  # a re-scored head is exact on every prompt
    top = ships.loc[ships.groupby("prompt_id")["kl"].idxmax()]
    assert top["exact"].all()
    assert sorted(top["head_label"]) == sorted(expect.idxmax(axis=0))  # the exact winner of every prompt
    assert run_study(cfg).computed == 0 and first.computed > 0  # both rounds resume from their shards


def test_screened_sahara_picks_each_head_among_exact_scores(tiny, tmp_path):
    """sahara --screen bf16: each step screens every candidate, re-scores its top 3 exactly and picks among
    those; same group and same exact scores as the unscreened search on this model."""
    def study(out, **sahara):
        return build(StudyConfig, dict(out=str(out), defaults=dict(model=tiny, dtype="float64", limit=4),
                                       sahara=dict(steps=2, **sahara), execution=dict(executor="local")))
    run_study(study(tmp_path / "exact"))
    run_study(study(tmp_path / "screened", screen="bf16", verify_top=3))
    exact, screened = frame(tmp_path / "exact", "sahara"), frame(tmp_path / "screened", "sahara")
    assert screened.groupby("step")["exact"].sum().eq(3).all()  # 3 re-scored per step
    assert screened.loc[screened["chosen"], "exact"].all()
    pd.testing.assert_series_equal(screened.loc[screened["chosen"], "head_label"].reset_index(drop=True),
                                   exact.loc[exact["chosen"], "head_label"].reset_index(drop=True))
    mine = screened[screened["exact"]].merge(exact, on=["step", "head_label"], suffixes=("", "_ref"))
    np.testing.assert_allclose(mine["score"], mine["score_ref"], rtol=1e-9)
    other = screened[~screened["exact"]].merge(exact, on=["step", "head_label"], suffixes=("", "_ref"))
    assert (abs(other["score"] - other["score_ref"]) / other["score_ref"]).max() > 1e-4  # really screened
    steps = frame(tmp_path / "screened", "head_scores")
    assert steps["exact"].sum() == 3 and len(steps) == 12
