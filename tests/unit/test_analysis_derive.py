"""`derive` over a run folder: which tables it builds, the manifest's benign sets and run id, and a round
trip of the derived tables through the store into pandas and DuckDB. Also: analysis never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from analysis.derive import benign_datasets_of, derive
from study.runtime.schema import TABLES, make_table
from study.runtime.store import ACROSS_MODELS, RunWriter, read_table

MODELS = ["org/model-a", "org/model-b"]
HEADS = ["L0H0", "L0H1", "L1H0", "L1H1"]


def _ships(model: str, dataset: str, kls: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = []
    for pid, values in kls.items():
        order = sorted(range(4), key=lambda i: (-values[i], i))
        for rank, i in enumerate(order, start=1):
            rows.append(dict(run_id="r1", model=model, model_revision=None, dataset=dataset, prompt_format="paper",
                             code_version="0", prompt_id=pid, prompt="q", layer=i // 2, head=i % 2,
                             head_label=HEADS[i], op="undiff_q", eps=1e-5, kl=values[i], rank=rank, exact=True))
    return rows


SHIPS = (_ships(MODELS[0], "harm", {"p1": [0.75, 0.5, 0.25, 0.0], "p2": [0.25, 0.5, 0.25, 0.0]})
         + _ships(MODELS[0], "ben", {"b1": [0.5, 0.0, 0.25, 0.0]})
         + _ships(MODELS[1], "harm", {"p1": [0.0, 0.5, 0.25, 1.0]}))
# model-a harm means: .5 .5 .25 0 -> ranks L0H0 1, L0H1 2; benign: .5 0 .25 0 -> specificity .5 1 .5 .5
# model-b harm: L1H1 1, L0H1 2 -> top-2 overlap with model-a's {L0H0, L0H1}: {L0H1}


def _asr() -> list[dict[str, Any]]:
    def row(condition: str, size: int, harmful: int) -> dict[str, Any]:
        return dict(run_id="r1", model=MODELS[0], model_revision=None, dataset="harm", prompt_format="paper",
                    code_version="0", kind="harmful", condition=condition, group_size=size, draw=0,
                    ablation=f"a{size}", op="undiff_q", eps=1e-5, decoding="greedy", judge="rules@1", n=4,
                    harmful=harmful, asr=harmful / 4, ci_low=0.0, ci_high=1.0,
                    p_mcnemar=None if condition == "normal" else 0.5, refused=4 - harmful,
                    refusal_rate=(4 - harmful) / 4, degenerate=0, degenerate_frac=0.0,
                    non_answer=0, non_answer_rate=0.0)
    return [row("normal", 0, 1), row("sahara", 1, 3), row("random", 1, 2)]


MANIFEST = {"jobs": [
    {"experiment": "ships", "model": MODELS[0], "prompts": {"set": "harm"}},
    {"experiment": "specificity", "model": MODELS[0], "prompts": {"set": "ben", "limit": None}},
    {"experiment": "surgery", "model": MODELS[0]},
]}


def _run(out: Path, tables: dict[str, list[dict[str, Any]]], manifest: bool = True) -> None:
    with RunWriter(out, "r1") as w:
        for name, rows in tables.items():
            w.write(name, make_table(name, rows))
        if manifest:
            w.set_manifest(MANIFEST)
    if not manifest:
        (out / "manifest.json").unlink()


def _records(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    return sorted(rows, key=lambda r: repr(sorted(r.items())))


def test_derive_builds_tables_from_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, {"ships": SHIPS, "asr": _asr()})
    got = derive(out, k=2)
    assert set(got) == {"rankings", "specificity", "overlap", "asr_curve"}
    for name, t in got.items():
        assert t.schema.equals(TABLES[name]) and set(t["run_id"].to_pylist()) == {"r1"}
    a = {r["head_label"]: r for r in got["rankings"].to_pylist() if r["model"] == MODELS[0] and r["dataset"] == "harm"}
    assert [a[h]["rank"] for h in HEADS] == [1, 2, 3, 4]
    assert [a[h]["specificity"] for h in HEADS] == pytest.approx([0.5, 1.0, 0.5, 0.5])
    assert [a[h]["topk_frac"] for h in HEADS] == [1.0, 1.0, 0.0, 0.0]  # p2 ranks: L0H1 1, L0H0 2 (tie by index)
    spec = got["specificity"].to_pylist()
    assert {(r["dataset"], r["benign_dataset"]) for r in spec} == {("harm", "ben")} and len(spec) == 4
    ov = {(r["axis"], tuple(r["models"]), tuple(r["datasets"])): r for r in got["overlap"].to_pylist()}
    assert set(ov) == {("models", tuple(MODELS), ("harm", "harm")), ("datasets", (MODELS[0],) * 2, ("ben", "harm"))}
    assert ov[("models", tuple(MODELS), ("harm", "harm"))]["shared_heads"] == ["L0H1"]
    curve = got["asr_curve"].to_pylist()
    assert [(r["condition"], r["asr"], r["normal_asr"], r["random_asr_mean"]) for r in curve] == [
        ("normal", 0.25, 0.25, None), ("sahara", 0.75, 0.25, 0.5)]
    explicit = derive(out, benign_datasets=[], k=2)  # an explicit empty list overrides the manifest
    assert "specificity" not in explicit
    assert all(r["specificity"] is None for r in explicit["rankings"].to_pylist())


def test_derived_tables_round_trip_through_the_store(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    out = tmp_path / "run"
    _run(out, {"ships": SHIPS, "asr": _asr()})
    got = derive(out, k=2)
    with RunWriter(out, "d1") as w:
        for name, t in got.items():
            w.write(name, t, part="derived")
        w.set_manifest({"derived_from": "r1"})
    assert (out / "overlap" / ACROSS_MODELS / "derived.parquet").is_file()
    for name, t in got.items():
        want = _records(t)
        assert _records(read_table(out, name)) == want
        files = str(out / name / "*" / "*.parquet")
        db = duckdb.sql(f"select * from read_parquet('{files}')").to_arrow_table()
        assert _records(db.select(t.schema.names)) == want, name
        if name != "overlap":  # see test_table_across_models_reads_with_plain_pandas
            assert _records(_pandas(out / name, t.schema.names)) == want, name


def _pandas(path: Path, names: list[str]) -> pa.Table:
    return pa.Table.from_pandas(pd.read_parquet(path), preserve_index=False).select(names)


def test_table_across_models_reads_with_plain_pandas(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, {"ships": SHIPS})
    overlap = derive(out, k=2)["overlap"]
    with RunWriter(out, "d1") as w:
        w.write("overlap", overlap)
    assert _records(_pandas(out / "overlap", overlap.schema.names)) == _records(overlap)


def test_missing_tables_and_manifest(tmp_path: Path) -> None:
    assert derive(tmp_path / "empty") == {}
    only_asr = tmp_path / "asr"
    _run(only_asr, {"asr": _asr()}, manifest=False)
    got = derive(only_asr)
    assert set(got) == {"asr_curve"} and set(got["asr_curve"]["run_id"].to_pylist()) == {"r1"}
    no_bench = tmp_path / "ships"
    _run(no_bench, {"ships": SHIPS[:8]})  # one condition: no overlap, no benign rows
    assert set(derive(no_bench)) == {"rankings"}
    with pytest.raises(ValueError, match="bad k"):
        derive(no_bench, k=-1)


def test_benign_datasets_of_manifest() -> None:
    assert benign_datasets_of(MANIFEST) == {"ben"}
    assert benign_datasets_of({}) == set()
    assert benign_datasets_of({"jobs": [{"experiment": "specificity"}]}) == set()


def test_analysis_does_not_import_torch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, {"ships": SHIPS, "asr": _asr()})
    code = ("import sys, analysis, analysis.rankings, analysis.overlap, analysis.specificity, analysis.curves, "
            "analysis.derive\n"
            f"tables = analysis.derive.derive({str(out)!r}, k=2)\n"
            "assert set(tables) == {'rankings', 'specificity', 'overlap', 'asr_curve'}, tables\n"
            "bad = {'torch', 'transformers', 'ray', 'vllm', 'scipy'} & set(sys.modules)\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
