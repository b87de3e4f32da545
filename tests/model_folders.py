"""Tiny models saved as real Hugging Face folders (config, weights, the embedded SmolLM2 tokenizer), so the
runner, workers and Ray actors load them by path exactly as they load any model. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tiny_llama_folder(path: Path, seed: int = 0, layers: int = 3, heads: int = 4) -> Path:
    """A random 3-layer Llama (GQA) with SmolLM2's vocabulary and tokenizer, saved in float64 at `path`."""
    from study.models.builtin import materialize_alias

    source = materialize_alias("smollm2-135m-instruct")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    return path


def broken_copy(folder: str | Path, to: Path) -> str:
    """The model at `folder` with its weights file cut short (a download that stopped, a full disk)."""
    shutil.copytree(folder, to)
    weights = to / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return str(to)
