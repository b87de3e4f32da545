"""The family's adapter format, its merge (against the direct sum and against peft) and the model cache."""

from __future__ import annotations

import os

import pytest
import torch

from study.core.errors import UsageError
from study.models import cache as model_cache
from study.models.adapters import FORMAT, read_adapter, write_merged
from tests.model_folders import tiny_llama_folder

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def _adapter(path, model, r=4, alpha=8.0, seed=3):
    """Random LoRA pairs (float64) for TARGETS of every layer, in the shipped layout."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(model.config.num_hidden_layers):
        for t in TARGETS:
            w = model.get_submodule(f"model.layers.{i}.{t}").weight
            tensors[f"model.layers.{i}.{t}.lora_A"] = torch.randn(r, w.shape[1], generator=g, dtype=torch.float64)
            tensors[f"model.layers.{i}.{t}.lora_B"] = torch.randn(w.shape[0], r, generator=g, dtype=torch.float64)
    save_file(tensors, str(path), metadata={"format": FORMAT, "r": str(r), "alpha": str(alpha), "base": "tiny"})
    return tensors, alpha / r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("family")
    base = tiny_llama_folder(root / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    tensors, scale = _adapter(root / "adapter.safetensors", model)
    write_merged(base, root / "adapter.safetensors", root / "merged")
    merged = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float64)
    return base, model, merged, tensors, scale, root


def test_merged_weights_equal_base_plus_adapter_in_float64(tiny):
    base, model, merged, tensors, scale, _ = tiny
    for name, weight in model.state_dict().items():
        module = name.removesuffix(".weight")
        want = weight
        if f"{module}.lora_A" in tensors:
            want = weight + scale * tensors[f"{module}.lora_B"] @ tensors[f"{module}.lora_A"]
        got = merged.state_dict()[name]
        assert got.dtype == torch.float64
        assert torch.equal(got, want), name
    # something did change, and only the targets did
    changed = [n for n, w in model.state_dict().items() if not torch.equal(w, merged.state_dict()[n])]
    assert len(changed) == len(tensors) // 2


def test_merged_model_computes_what_peft_computes(tiny):
    """The merged folder's logits equal peft's unmerged LoRA forward with the same factors (float64)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, _, merged, tensors, scale, _ = tiny
    r = next(iter(tensors.values())).shape[0]
    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    peft_model = get_peft_model(fresh, LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for key, value in peft_model.state_dict().items():
            if ".lora_" in key:
                module, part = key.removeprefix("base_model.model.").split(".lora_")
                value.copy_(tensors[f"{module}.lora_{part.split('.')[0]}"])
    ids = torch.tensor([[5, 17, 300, 9, 41, 7]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    with torch.no_grad(), peft_model.disable_adapter():
        assert not torch.allclose(peft_model(input_ids=ids).logits, want)  # the adapter mattered


def test_damaged_adapter_is_one_clear_error_and_writes_nothing(tiny, tmp_path):
    base, *_, root = tiny
    bad = tmp_path / "adapter.safetensors"
    bad.write_bytes((root / "adapter.safetensors").read_bytes()[:100])
    with pytest.raises(UsageError, match="adapter.safetensors is damaged"):
        read_adapter(bad)
    out = tmp_path / "cache"
    with pytest.raises(UsageError):
        model_cache.ensure(out, "k", lambda staging: write_merged(base, bad, staging), "a merge")
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]  # no entry, no staging left behind


def test_adapter_of_another_format_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    save_file({"x.lora_A": torch.zeros(2, 3)}, str(path), metadata={"r": "2", "alpha": "4", "format": "peft"})
    with pytest.raises(UsageError, match="format 'peft'"):
        read_adapter(path)


def test_cache_entry_is_built_once_and_rebuilt_when_damaged(tmp_path):
    builds = []

    def build(staging):
        builds.append(1)
        (staging / "weights.bin").write_bytes(b"x" * 1000)
        (staging / "config.json").write_text("{}")

    target = tmp_path / "entry"
    model_cache.ensure(target, "key1", build, "test")
    model_cache.ensure(target, "key1", build, "test")
    assert len(builds) == 1 and model_cache.problem(target, "key1") is None
    assert "not 'key2'" in model_cache.problem(target, "key2")
    # truncated (a crash mid-copy, a full disk)
    with open(target / "weights.bin", "r+b") as f:
        f.truncate(10)
    assert "10 bytes" in model_cache.problem(target, "key1")
    model_cache.ensure(target, "key1", build, "test")
    assert len(builds) == 2 and (target / "weights.bin").stat().st_size == 1000
    # same size, different bytes, newer mtime: the hash catches it
    (target / "weights.bin").write_bytes(b"y" * 1000)
    os.utime(target / "weights.bin", ns=(1, 1))
    assert "sha256 differs" in model_cache.problem(target, "key1")
    # no marker (an older build, or one interrupted before the marker)
    model_cache.ensure(target, "key1", build, "test")
    (target / model_cache.MARKER).unlink()
    assert "no readable" in model_cache.problem(target, "key1")
    model_cache.ensure(target, "key1", build, "test")
    assert len(builds) == 4 and model_cache.problem(target, "key1") is None
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no staging folder left


def test_failed_build_leaves_the_old_entry_alone(tmp_path):
    target = tmp_path / "entry"
    model_cache.ensure(target, "k", lambda s: (s / "a").write_text("1"), "test")

    def broken(staging):
        (staging / "a").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        model_cache.ensure(target, "k2", broken, "test")
    assert (target / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["entry"]
