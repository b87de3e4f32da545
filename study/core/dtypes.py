"""The dtypes a model may be loaded in, and the low precisions a screen scores in. Light (no torch)."""

from __future__ import annotations

from study.core.errors import UsageError

DTYPES = ("float32", "bfloat16", "float16", "float64")
AUTO = "auto"  # bfloat16 where the workers hold a GPU, float32 on CPUs: resolved at plan time
ACCELERATOR_DTYPE, CPU_DTYPE = "bfloat16", "float32"
SCREEN_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # screening precision -> the dtype a screen loads in


def check_dtype(dtype: str, auto: bool = False) -> str:
    valid = (AUTO, *DTYPES) if auto else DTYPES
    if dtype not in valid:
        raise UsageError(f"unknown dtype {dtype!r}: valid dtypes are {', '.join(valid)}")
    return dtype
