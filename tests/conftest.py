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


@pytest.fixture(autouse=True)
def fast_tests_stay_light(request, monkeypatch):
    """The fast subset (`-m "not slow"`) needs neither the embedded model nor Ray: a test not marked slow that
    converts or merges SmolLM2, or starts Ray, fails here instead of quietly making the subset slow."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(what: str):
        def _refused(*args, **kwargs):
            raise AssertionError(f"a test outside the slow subset {what}: mark it slow")
        return _refused

    import sys

    # import both before patching either: loading binds builtin's function at its import, and imported while
    # builtin's is patched it would keep the refusal after this test's teardown
    modules = [sys.modules.get(name) or __import__(name, fromlist=["_"])
               for name in ("study.models.builtin", "study.models.loading")]  # where the names are bound at import
    for module in modules:
        for attr, what in (("materialize_alias", "converts the embedded SmolLM2"),
                           ("materialize_member", "merges a family member")):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, refuse(what))
    try:
        import ray
    except ImportError:
        return
    monkeypatch.setattr(ray, "init", refuse("starts Ray"))
