"""LoRA adapters in the family's own file format: read, merged into a base state dict, written out as a folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from study.core.errors import UsageError

FORMAT = "headstudy-lora/1"  # the adapter files' metadata format


# ------------------------------------------------------------------------------------------ adapter math


def lora_delta(a, b, scale: float):
    """The weight change a LoRA pair stands for: scale * B @ A.  a: (r, d_in), b: (d_out, r) -> (d_out, d_in)."""
    return scale * (b @ a)


def read_adapter(path: Path) -> tuple[dict[str, tuple[Any, Any]], float, dict[str, str]]:
    """{module: (A, B)} as stored, the scale alpha/r, and the file's metadata; one clear line if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        r, alpha = int(meta["r"]), float(meta["alpha"])
    except Exception as err:  # a truncated header, bad JSON, missing r/alpha
        raise UsageError(f"adapter file {path} is damaged or not a headstudy adapter: {err}") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"adapter file {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    pairs: dict[str, tuple[Any, Any]] = {}
    for key in tensors:
        module, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B"):
            raise UsageError(f"adapter file {path}: unexpected tensor {key!r} (expected <module>.lora_A/lora_B)")
        if part == "lora_A":
            a, b = tensors[key], tensors.get(f"{module}.lora_B")
            if b is None or a.shape[0] != r or b.shape[1] != r:
                raise UsageError(f"adapter file {path}: {module} has no matching rank-{r} lora_A/lora_B pair")
            pairs[module] = (a, b)
    return pairs, alpha / r, meta


def merge_adapter(state: dict[str, Any], pairs: dict[str, tuple[Any, Any]], scale: float) -> None:
    """Add each pair's delta to `<module>.weight` of a base state dict, in place, computed in float32 (float64
    for a float64 base) and stored in the base's dtype."""
    import torch

    for module, (a, b) in pairs.items():
        key = f"{module}.weight"
        if key not in state:
            raise UsageError(f"the adapter targets {module!r}, which the base model does not have")
        weight = state[key]
        if tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise UsageError(f"the adapter's {module} is {b.shape[0]}x{a.shape[1]}, the base weight is "
                             f"{tuple(weight.shape)}")
        work = torch.promote_types(weight.dtype, torch.float32)
        state[key] = (weight.to(work) + lora_delta(a.to(work), b.to(work), scale)).to(weight.dtype)


def write_merged(base: Path, adapter: Path, out: Path) -> None:
    """A Hugging Face folder in `out`: the base folder's files with the adapter merged into its weights."""
    from safetensors.torch import load_file, save_file

    from study.models.cache import MARKER

    pairs, scale, _ = read_adapter(adapter)
    out.mkdir(parents=True, exist_ok=True)
    for src in base.iterdir():
        if src.is_file() and src.suffix != ".safetensors" and src.name != MARKER:
            shutil.copy2(src, out / src.name)
    remaining = dict(pairs)
    for src in sorted(base.glob("*.safetensors")):
        state = load_file(str(src))
        mine = {m: p for m, p in remaining.items() if f"{m}.weight" in state}
        merge_adapter(state, mine, scale)
        for m in mine:
            del remaining[m]
        save_file(state, str(out / src.name), metadata={"format": "pt"})
    if remaining:
        raise UsageError(f"adapter {adapter} targets modules its base lacks: {', '.join(sorted(remaining)[:3])}")
