"""Validating a spec or a command line and planning its shards imports neither torch, transformers, ray nor
vllm: checked in a fresh interpreter where importing them fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKER = """
import importlib.abc, sys
BLOCKED = ("torch", "transformers", "ray", "vllm")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked heavy import: {name}")
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_plan_and_validation_import_no_heavy_module(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_layer=2, n_head=3, n_embd=12)))
    proc = run_blocked(f"""
        from study.cli import main
        from study.core.frozen import build
        from study.spec import StudyConfig
        from study.runner import plan_study
        assert main(["plan"]) == 0                      # the built-in quickstart, from another directory
        assert main(["plan", "quickstart", "--out", "o"]) == 0
        assert main(["ships", "--eps", "2", "--out", "o"]) == 2
        assert main(["sahara", "--actors", "0", "--out", "o"]) == 2
        study = build(StudyConfig, dict(out="o", defaults=dict(model={str(folder)!r}, limit=3, shard_heads=4),
                                        ships={{}}, sahara={{}}, surgery=dict(heads="L1H2")))
        plan = plan_study(study)
        ships, sahara, surgery = plan.jobs
        assert surgery.checkpoint.parts[-2:] == ("checkpoints", "tiny-" + surgery.checkpoint.name.split("-")[-1])
        bad = build(StudyConfig, dict(out="o", defaults=dict(model={str(folder)!r}), surgery=dict(heads="L2H0")))
        try:
            plan_study(bad)
            raise AssertionError("an out-of-range head was planned")
        except Exception as err:
            assert "out of range" in str(err)
        assert (ships.shape.n_layers, ships.shape.n_heads) == (2, 3)
        assert len(ships.pending()) == 2 and len(sahara.pending()) == 2   # 6 heads in blocks of 4
        ids = {{s.id for s in ships.pending()}}
        assert len(ids) == 2 and all(len(i) == 24 for i in ids)
        import sys
        heavy = [m for m in ("torch", "transformers", "ray", "vllm") if m in sys.modules]
        assert not heavy, heavy
        print("LIGHT OK")
    """, cwd=tmp_path)
    assert "LIGHT OK" in proc.stdout, proc.stdout + proc.stderr
    assert "quickstart" in proc.stdout and "already done" in proc.stdout
    assert not (tmp_path / "o").exists()  # planning writes nothing


def test_shard_ids_are_stable_and_cover_what_changes_a_value():
    from study.core.ablation import Ablation, Op
    from study.core.heads import Head
    from study.prompts.formats import PromptFormat
    from study.prompts.sets import load_prompts
    from study.runtime.shards import ModelRef, PromptBlock, Shard

    prompts = load_prompts("builtin:harmful", limit=2)
    block = PromptBlock.of(prompts, PromptFormat.PAPER, None)
    base = Shard(model=ModelRef(name="m"), prompts=block, ablations=(Ablation(heads=(Head(0, 1),)),))
    same = Shard.model_validate(json.loads(base.model_dump_json()))
    assert same.id == base.id  # survives a round trip (a Ray hop, a restart)
    variants = [
        base.model_copy(update=dict(model=ModelRef(name="m", dtype="bfloat16"))),
        base.model_copy(update=dict(model=ModelRef(name="m", revision="v2"))),
        base.model_copy(update=dict(prompts=PromptBlock.of(prompts, PromptFormat.DIRECT, None))),
        base.model_copy(update=dict(prompts=PromptBlock.of(prompts, PromptFormat.PAPER, None, slice(1)))),
        base.model_copy(update=dict(ablations=(Ablation(heads=(Head(0, 1),), eps=1e-4),))),
        base.model_copy(update=dict(ablations=(Ablation(heads=(Head(0, 1),), op=Op.SCALE_V),))),
        base.model_copy(update=dict(code_version="0.0.0")),
    ]
    assert len({v.id for v in variants} | {base.id}) == len(variants) + 1


@pytest.mark.parametrize("spec,needle", [
    ({"models": [], "ships": {}}, "models"),
    ({"models": ["a/b"], "ships": {"model": "c/d"}}, "model"),
    ({"execution": {"executor": "dask"}, "ships": {}}, "dask"),
    ({"execution": {"actrs": 2}, "ships": {}}, "actrs"),
    ({"defaults": {"limit": 2}}, "runs nothing"),
])
def test_bad_study_specs(spec, needle):
    from study.core.errors import UsageError
    from study.core.frozen import build
    from study.spec import StudyConfig

    with pytest.raises(UsageError, match=needle):
        build(StudyConfig, spec)


def test_sigterm_becomes_an_interrupt_only_over_the_default_handler_and_is_put_back():
    """The CLI's stop path: SIGTERM raises Terminated (a KeyboardInterrupt) inside the block, the default handler
    comes back after it, a process's own handler is left alone, and a replaced handler is restored."""
    import signal

    earlier = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a test before may have left Ray's handler
    try:
        _check_sigterm_handling()
    finally:
        signal.signal(signal.SIGTERM, earlier)


def _check_sigterm_handling():
    import os
    import signal

    from study.runtime.stopping import Terminated, keep_sigterm, sigterm_as_interrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
    assert isinstance(caught.value, Terminated)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    seen = []
    own = signal.signal(signal.SIGTERM, lambda *_: seen.append(1))
    try:
        mine = signal.getsignal(signal.SIGTERM)
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is mine  # not replaced
            with keep_sigterm():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what ray.init does with its own handler
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, own)
