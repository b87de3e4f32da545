"""Declared schemas, `make_table` validation, and the atomic Parquet store (round trip, rollback, layout)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from study.core.errors import UsageError
from study.runtime import schema
from study.runtime.columns import constant, pick
from study.runtime.schema import TABLES, compact_schema, make_table
from study.runtime.store import (
    RunWriter,
    config_hash,
    model_slug,
    new_run_id,
    package_versions,
    read_manifest,
    read_table,
)

DESIGN_COLUMNS = {
    "ships": "model, prompt_id, prompt, prompt_format, layer, head, head_label, op, eps, kl, rank",
    "head_scores": "model, dataset, layer, head, head_label, op, eps, subspace, rank_r, angle_deg, rank",
    "sahara": "model, dataset, step, layer, head, head_label, group, score, chosen",
    "generations": "model, prompt_id, prompt, ablation, backend, decoding, seed, sample, text, n_tokens",
    "asr": "model, dataset, ablation, decoding, judge, n, harmful, asr, ci_low, ci_high, p_mcnemar",
}
META = "run_id, model, model_revision, dataset, prompt_format, code_version"

HF = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOCAL = "/tmp/ckpts/llama-ablated/final"


def _meta(run_id: str = "r1", model: str = HF) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "model": model,
        "model_revision": None,
        "dataset": "builtin:harmful",
        "prompt_format": "paper",
        "code_version": "0.1.0",
    }


def _ships_rows(model: str = HF, n: int = 3, run_id: str = "r1") -> list[dict[str, Any]]:
    return [
        {
            **_meta(run_id, model),
            "prompt_id": f"p{i}",
            "prompt": f"question {i}",
            "layer": i,
            "head": 2 * i,
            "head_label": f"L{i}H{2 * i}",
            "op": "undiff_q",
            "eps": 1e-5,
            "kl": 0.5 / (i + 1),
            "rank": i + 1,
            "exact": True,
        }
        for i in range(n)
    ]


def _sahara_rows() -> list[dict[str, Any]]:
    return [
        {
            **_meta(),
            "op": "undiff_q",
            "eps": 1e-5,
            "subspace": "left",
            "rank_r": 1,
            "centered": False,
            "step": step,
            "layer": 2,
            "head": head,
            "head_label": f"L2H{head}",
            "group": group,
            "score": float(head),
            "chosen": head == 1,
            "exact": True,
        }
        for step, group in [(1, []), (2, ["L2H26"])]
        for head in (0, 1)
    ]


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize("name", sorted(DESIGN_COLUMNS))
def test_schemas_have_design_columns(name: str) -> None:
    names = set(TABLES[name].names)
    wanted = {c.strip() for c in (DESIGN_COLUMNS[name] + ", " + META).split(",")}
    assert wanted <= names, wanted - names


def test_table_registry_and_types() -> None:
    assert set(TABLES) == {"ships", "head_scores", "sahara", "joint", "joint_steps", "generations", "verdicts",
                           "asr", "swaps", "rankings", "overlap", "specificity", "asr_curve", "utility"}
    for s in TABLES.values():
        meta = [c.strip() for c in META.split(",")]
        if "model" not in s.names:  # a table whose rows span models (overlap) keeps the rest of the metadata
            meta = [c for c in meta if c in ("run_id", "code_version")]
        assert s.names[:len(meta)] == meta
        assert len(set(s.names)) == len(s.names)
        if "layer" in s.names:
            assert s.field("layer").type == pa.int32() and s.field("head").type == pa.int32()
    assert schema.SAHARA.field("group").type == pa.list_(pa.string())
    assert schema.ASR.field("p_mcnemar").nullable and not schema.ASR.field("asr").nullable
    assert schema.SHIPS.field("model_revision").nullable


def test_schema_module_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, study.runtime.schema; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_make_table_from_rows_and_columns() -> None:
    rows = _ships_rows()
    t = make_table("ships", rows)
    assert t.schema.equals(compact_schema(schema.SHIPS))
    assert t.num_rows == 3
    cols = {k: [r[k] for r in rows] for k in reversed(list(rows[0]))}  # column order does not matter
    assert make_table("ships", cols).equals(t)
    assert make_table("ships", []).schema.equals(compact_schema(schema.SHIPS))
    plain = make_table("ships", rows, compact=False)
    assert plain.schema.equals(schema.SHIPS) and plain.to_pylist() == t.to_pylist() == rows
    s = make_table("sahara", _sahara_rows())
    assert s["group"].to_pylist() == [[], [], ["L2H26"], ["L2H26"]]


def test_make_table_rejects_missing_and_extra_columns() -> None:
    rows = _ships_rows()
    for r in rows:
        del r["kl"]
        r["klx"] = 1.0
    with pytest.raises(ValueError, match=r"'ships'.*missing \['kl'\].*extra \['klx'\]"):
        make_table("ships", rows)
    with pytest.raises(ValueError, match="missing"):
        make_table("asr", {"model": ["m"]})
    with pytest.raises(ValueError, match="unknown table"):
        make_table("shipz", [])


def test_make_table_rejects_bad_values() -> None:
    rows = _ships_rows()
    rows[0]["layer"] = 1.5  # would be truncated silently by pa.array(type=int32)
    with pytest.raises(ValueError, match="layer"):
        make_table("ships", rows)
    rows = _ships_rows()
    rows[0]["prompt"] = None
    with pytest.raises(ValueError, match="non-nullable"):
        make_table("ships", rows)
    rows = _ships_rows()
    rows[0]["kl"] = "big"
    with pytest.raises(ValueError, match="kl"):
        make_table("ships", rows)
    rows = _ships_rows()
    rows[0]["layer"] = 2**40
    with pytest.raises(ValueError, match="layer"):
        make_table("ships", rows)


# ---------------------------------------------------------------- store


def test_round_trip_two_tables_two_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_id = new_run_id()
    a = make_table("ships", _ships_rows(n=3, run_id=run_id))
    b = make_table("ships", _ships_rows(n=2, run_id=run_id))
    s = make_table("sahara", _sahara_rows())
    with RunWriter(out, run_id) as w:
        w.write("ships", a)
        w.write("ships", b)
        w.write("sahara", s)
        w.set_manifest({"config": {"steps": 2}, "config_hash": config_hash({"steps": 2})})
        assert not (out / "ships").exists()  # nothing visible before commit
    assert not list(out.glob(".staging-*"))
    parts = sorted(p.name for p in (out / "ships" / model_slug(HF)).iterdir())
    assert parts == [f"part-{run_id}-00000.parquet", f"part-{run_id}-00001.parquet"]
    got = read_table(out, "ships")  # written compact, read back in the declared schema: plain strings
    assert got.schema.equals(schema.SHIPS)
    assert got.equals(pa.concat_tables([a, b]).cast(schema.SHIPS))
    got_s = read_table(out, "sahara")
    assert got_s.schema.equals(schema.SAHARA)
    assert got_s.equals(s.cast(schema.SAHARA))


def test_compact_form_holds_each_repeated_string_once() -> None:
    """Every top-level string column but a generation's text is dictionary-encoded in memory; built from
    study.runtime.columns the arrays go in as they are, and equal the same table built from Python rows."""
    assert compact_schema(schema.SHIPS).field("prompt").type == pa.dictionary(pa.int32(), pa.string())
    assert compact_schema(schema.GENERATIONS).field("text").type == pa.string()
    assert compact_schema(schema.SAHARA).field("group").type == pa.list_(pa.string())
    assert compact_schema(schema.SHIPS).field("model_revision").nullable
    prompts, heads = ["how to a", "how to b", "how to a"], ["L0H0", "L0H1"]
    n = len(prompts) * len(heads)
    by_prompt, by_head = np.repeat(np.arange(3), 2), np.tile(np.arange(2), 3)
    cols = dict(run_id=constant("r1", n), model=constant(HF, n), model_revision=constant(None, n),
                dataset=constant("advbench", n), prompt_format=constant("chat", n), code_version=constant("0", n),
                prompt_id=pick(["p0", "p1", "p2"], by_prompt), prompt=pick(prompts, by_prompt),
                layer=np.zeros(n, np.int32), head=np.array([0, 1] * 3, np.int32), head_label=pick(heads, by_head),
                op=constant("undiff_q", n), eps=np.full(n, 1e-5), kl=np.arange(n, dtype=float),
                rank=np.array([2, 1] * 3, np.int32), exact=np.ones(n, bool))
    t = make_table("ships", cols)
    assert len(t["prompt"].chunk(0).dictionary) == 2  # "how to a" stored once for two prompts
    assert t["model_revision"].null_count == n
    rows = [{k: (v[i].as_py() if isinstance(v, pa.Array) else v[i].item()) for k, v in cols.items()}
            for i in range(n)]
    assert t.to_pylist() == make_table("ships", rows).to_pylist() == rows
    assert rows[4]["prompt"] == "how to a" and rows[4]["prompt_id"] == "p2" and rows[5]["head_label"] == "L0H1"


def test_write_rejects_wrong_schema(tmp_path: Path) -> None:
    t = make_table("ships", _ships_rows())
    with pytest.raises(ValueError, match="schema"), RunWriter(tmp_path / "o", "r1") as w:
        wide = t.schema.set(t.schema.get_field_index("layer"), pa.field("layer", pa.int64(), nullable=False))
        w.write("ships", t.cast(wide))
    with pytest.raises(ValueError, match="schema"), RunWriter(tmp_path / "o", "r1") as w:
        w.write("ships", t.drop_columns(["rank"]))
    with pytest.raises(ValueError, match="schema"), RunWriter(tmp_path / "o", "r1") as w:
        w.write("sahara", t)
    assert not (tmp_path / "o").exists()


def test_failure_leaves_no_out_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="boom"), RunWriter(out, "r1") as w:
        w.write("ships", make_table("ships", _ships_rows()))
        w.set_manifest({"x": 1})
        raise RuntimeError("boom")
    assert not out.exists()
    assert not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == []


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_failure_leaves_existing_out_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with RunWriter(out, "r1") as w:
        w.write("ships", make_table("ships", _ships_rows()))
        w.set_manifest({"run": 1})
    before = _snapshot(out)
    dirs_before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(KeyError), RunWriter(out, "r2") as w:
        w.write("ships", make_table("ships", _ships_rows(n=1, run_id="r2")))
        w.write("sahara", make_table("sahara", _sahara_rows()))
        raise KeyError("interrupted")
    assert _snapshot(out) == before
    assert sorted(str(p) for p in out.rglob("*")) == dirs_before
    assert read_manifest(out)["run"] == 1


def test_model_filter_and_partitions(tmp_path: Path) -> None:
    out = tmp_path / "out"
    both = make_table("ships", _ships_rows(HF, 3) + _ships_rows(LOCAL, 2))
    with RunWriter(out, "r1") as w:
        w.write("ships", both)
    dirs = sorted(p.name for p in (out / "ships").iterdir())
    assert dirs == sorted([model_slug(HF), model_slug(LOCAL)])
    assert read_table(out, "ships").num_rows == 5
    local = read_table(out, "ships", model=LOCAL)
    assert local.num_rows == 2 and set(local["model"].to_pylist()) == {LOCAL}
    assert read_table(out, "ships", model=HF).num_rows == 3
    with pytest.raises(UsageError, match="other/model"):
        read_table(out, "ships", model="other/model")


def test_model_slug() -> None:
    assert model_slug("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB--SmolLM2-135M"
    assert model_slug("smollm2-135m-instruct") == "smollm2-135m-instruct"
    a, b = model_slug("/data/run1/final"), model_slug("/data/run2/final")
    assert re.fullmatch(r"final-[0-9a-f]{8}", a) and a != b
    assert model_slug("/data/run1/final/") == a
    assert model_slug("./ckpt") != model_slug("ckpt")
    for m in ("/x/we ird:name", "C:\\models\\llama", "~/m", "../up/one"):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", model_slug(m)), m
    with pytest.raises(UsageError):
        model_slug("")


def test_manifest_content(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = {"model": HF, "eps": 1e-5, "heads": ["L2H26"]}
    with RunWriter(out, "r1") as w:
        w.write("ships", make_table("ships", _ships_rows()))
        w.write("asr", make_table("asr", []))  # an empty table still exists
        w.set_manifest({"config": cfg, "config_hash": config_hash(cfg), "versions": package_versions()})
    m = read_manifest(out)
    assert m["run_id"] == "r1"
    assert m["config"] == cfg
    assert m["config_hash"] == config_hash(cfg)
    assert m["versions"]["pyarrow"] == pa.__version__
    assert m["files"]["ships"] == [f"ships/{model_slug(HF)}/part-r1-00000.parquet"]
    assert read_manifest(out, "r1") == m
    assert read_table(out, "asr").num_rows == 0
    with RunWriter(out, "r2") as w:
        w.set_manifest({"config": {}})
    assert read_manifest(out)["run_id"] == "r2"
    assert read_manifest(out, "r1") == m  # earlier runs keep their manifest


def test_read_missing_table_raises_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no table 'ships'"):
        read_table(tmp_path, "ships")
    with pytest.raises(UsageError, match="unknown table"):
        read_table(tmp_path, "nope")
    with pytest.raises(UsageError, match="manifest"):
        read_manifest(tmp_path)


def test_run_ids_hashes_versions() -> None:
    ids = [new_run_id() for _ in range(20)]
    assert len(set(ids)) == 20
    stamps = [i[:23] for i in ids]  # 20250101T120000.123456Z
    assert stamps == sorted(stamps)
    assert all(re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}", i) for i in ids)
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert re.fullmatch(r"[0-9a-f]{16}", config_hash({}))
    v = package_versions()
    assert set(v) == {"python", "torch", "transformers", "pyarrow", "ray", "headstudy"}
    assert v["python"].count(".") == 2
    with pytest.raises(UsageError):
        RunWriter("x", "../escape")
