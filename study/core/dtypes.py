"""The dtypes a model may be loaded in, and the low precisions a screen scores in. Light (no torch)."""

from __future__ import annotations

from study.core.errors import UsageError

DTYPES = ("float32", "bfloat16", "float16", "float64")
SCREEN_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # screening precision -> the dtype a screen loads in


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: valid dtypes are {', '.join(DTYPES)}")
    return dtype
