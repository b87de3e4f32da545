"""Ctrl-C, or SIGTERM from a scheduler, ends a run with one line that says what was kept and how to resume, and
the rerun resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.model_folders import tiny_llama_folder

pytestmark = pytest.mark.slow  # a model folder with the embedded tokenizer

HEADSTUDY = str(Path(sys.executable).with_name("headstudy"))


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"),
                                           (signal.SIGTERM, 143, "terminated (SIGTERM)")], ids=["ctrl-c", "sigterm"])
def test_a_stop_is_one_line_keeps_finished_shards_and_the_rerun_resumes(tmp_path, sig, code, word):
    model = tiny_llama_folder(tmp_path / "m", layers=6, heads=8)
    out = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"out: {out}\ndefaults:\n  model: {model}\n  dtype: float64\n  limit: 8\n"
                    f"ships:\n  shard_heads: 1\n  shard_prompts: 1\nexecution:\n  executor: local\n")
    proc = subprocess.Popen([HEADSTUDY, "run", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "shards").glob("*.arrow"))) < 3:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == f"headstudy: {word}: finished shards are kept in {out}/shards and the same command " \
                   f"resumes from them"
    kept = len(list((out / "shards").glob("*.arrow")))
    assert kept >= 3 and not (out / "ships").exists() and not (out / ".headstudy.lock").exists()

    again = subprocess.run([HEADSTUDY, "run", str(spec)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{kept} reused" in again.stdout, again.stdout
    assert not list(out.rglob(".*.tmp-*")) and not list(out.glob(".staging-*"))
