"""Shared fixtures: the embedded SmolLM2 (loaded once per session), the shared data folder, CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def smollm():
    from study.models.loading import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (they sit beside the project on dev/CI machines)")
    return SHARED_DATA
