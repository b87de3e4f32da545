"""A reused result is the same result: stored shards are keyed by the model's content and by the code that
computes them, so a checkpoint edited in place or a change to the scoring code is recomputed, and an unchanged
rerun computes nothing."""

from __future__ import annotations

import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from study.core.frozen import build
from study.models import fingerprint
from study.models.fingerprint import file_sha256, hub_commit, model_identity
from study.runner import run_study
from study.runtime.identity import _files_of, scoring_identity, source_digest
from study.runtime.store import read_table
from study.spec import StudyConfig
from tests.model_folders import tiny_llama_folder


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTUDY_CACHE", str(tmp_path / "cache"))  # the file-digest cache of this test only


def ships_spec(model: str, out) -> StudyConfig:
    return build(StudyConfig, dict(out=str(out), defaults=dict(model=model, dtype="float64", limit=2, shard_heads=6),
                                   ships={}, execution=dict(executor="local")))


@pytest.mark.slow  # a model folder with the embedded tokenizer
def test_a_weight_edited_in_place_is_recomputed_and_an_unchanged_rerun_is_not(tmp_path):
    folder = tiny_llama_folder(tmp_path / "model")
    out = tmp_path / "run"
    first = run_study(ships_spec(str(folder), out))
    assert first.computed > 0 and first.reused == 0
    before = read_table(out, "ships").to_pandas()

    again = run_study(ships_spec(str(folder), out))
    assert again.computed == 0 and again.reused == first.computed

    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight"))
    tensors[name] = tensors[name] * 3.0
    save_file(tensors, str(weights), metadata={"format": "pt"})

    edited = run_study(ships_spec(str(folder), out))
    assert edited.computed == first.computed and edited.reused == 0
    after = read_table(out, "ships").to_pandas()
    assert len(after) == len(before)  # replaced, not added beside the old rows
    assert not after.duplicated(["prompt_id", "head_label"]).any()
    merged = before.merge(after, on=["prompt_id", "head_label"], suffixes=("_before", "_after"))
    assert len(merged) == len(before)
    assert (merged["kl_before"] - merged["kl_after"]).abs().max() > 1e-6


def test_a_folder_fingerprint_covers_every_file_and_caches_by_size_and_mtime(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    base = model_identity(str(folder)).fingerprint
    assert base.startswith("files:")

    (folder / "chat_template.jinja").write_text("{{ messages | reverse }}")  # the template is content too
    templated = model_identity(str(folder)).fingerprint
    assert templated != base

    weights = folder / "model.safetensors"
    st = weights.stat()
    digest = file_sha256(weights)
    weights.write_bytes(b"\x01" * 64)  # same size; restore the old mtime: the cache answers without reading
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(weights) == digest
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a write in place moves the mtime
    assert file_sha256(weights) != digest
    assert model_identity(str(folder)).fingerprint != templated

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # a copy is the same content: the same identity
    assert model_identity(str(copy)).fingerprint == model_identity(str(folder)).fingerprint


def test_a_hub_revision_resolves_to_its_commit_and_is_pinned(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert hub_commit("org/model", commit) == commit
    # the local hub cache's layout: refs/<branch> holds the commit, snapshots/<commit>/ its files
    repo = tmp_path / "hub" / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    identity = model_identity("org/model")
    assert identity.fingerprint == f"commit:{commit}" and identity.revision == commit  # workers load this commit
    unknown = model_identity("org/other")
    assert unknown.fingerprint == "unknown" and unknown.revision is None


def test_code_identity_sees_code_not_comments_or_docstrings(tmp_path):
    a = tmp_path / "a.py"
    a.write_text('"""Doc."""\n\ndef f(x):\n    """Say why."""\n    return x + 1  # a comment\n')
    b = tmp_path / "b.py"
    b.write_text('"""Other words."""\n\n\ndef f(x):\n    # another comment\n    return x + 1\n')
    c = tmp_path / "c.py"
    c.write_text('"""Doc."""\n\ndef f(x):\n    """Say why."""\n    return x + 2  # a comment\n')
    assert source_digest(a) == source_digest(b) != source_digest(c)
    files = {p.name for p in _files_of("study.core")} | {p.name for p in _files_of("study.runtime.worker")}
    assert {"engine.py", "scores.py", "interventions.py", "worker.py"} <= files
    assert len(scoring_identity()) == 24


def test_shards_carry_the_model_content_and_the_code_identity(tmp_path, monkeypatch):
    from study.core.ablation import Ablation
    from study.core.heads import Head
    from study.prompts.formats import PromptFormat
    from study.runtime.shards import ModelRef, PromptBlock, Shard

    block = PromptBlock(ids=("a",), texts=("x",), format=PromptFormat.DIRECT)
    one = Shard(model=ModelRef(name="m", fingerprint="files:1"), prompts=block, ablations=(Ablation(heads=(Head(0, 0),)),))
    other_weights = one.model_copy(update={"model": ModelRef(name="m", fingerprint="files:2")})
    other_code = one.model_copy(update={"code_version": "another"})
    assert one.code_version == scoring_identity()
    assert len({one.id, other_weights.id, other_code.id}) == 3
    monkeypatch.setattr(fingerprint, "DIGESTS_FILE", "elsewhere.json")  # the cache file is not the identity
    assert one.id == Shard(**one.model_dump()).id
