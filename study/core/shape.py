"""What a model config says about its attention: layers, heads, their widths, and the sites of a head
(the slices of q, k and the o_proj input an operator acts on). Light (no torch): read before any weight loads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any

from study.core.errors import UsageError


class Site(str, enum.Enum):
    """Where an operator acts: a projection output (q, k) or the o_proj input (the head outputs)."""

    Q = "q"
    K = "k"
    O_IN = "o_in"


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry of a model, read from its config (a few KB) before any weight is loaded."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    model_type: str = ""  # the config's model_type (the text model's, inside a multimodal wrapper)
    vocab_size: int = 0

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers config object or a parsed config.json dict (GPT-2's n_layer/n_head/n_embd too)."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
            get = config["text_config"].get  # multimodal wrappers keep the language model's config inside
        n_layers = get("num_hidden_layers") or get("n_layer")
        n_heads = get("num_attention_heads") or get("n_head")
        d_model = get("hidden_size") or get("n_embd")
        if not (n_layers and n_heads and d_model):
            raise UsageError("the model config has no layer/head/hidden size (num_hidden_layers, "
                             "num_attention_heads, hidden_size): not a supported causal LM")
        d_head = get("head_dim") or d_model // n_heads
        return cls(int(n_layers), int(n_heads), int(get("num_key_value_heads") or n_heads), int(d_head),
                   int(d_model), str(get("model_type") or ""), int(get("vocab_size") or 0))

    def differences(self, other: "ModelShape") -> str:
        """What differs from `other`, as `field a vs b` items ('' when nothing does)."""
        return ", ".join(f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}" for f in fields(self)
                         if getattr(self, f.name) != getattr(other, f.name))

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def n_site_heads(self, site: Site) -> int:
        return self.n_kv_heads if site is Site.K else self.n_heads
