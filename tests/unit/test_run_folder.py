"""A run folder has one writer at a time, and a commit is all or nothing: a commit cut off anywhere is finished
by the next writer, staging leftovers and temp files are removed, and a second writer is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from study.core.errors import UsageError
from study.runtime import runfolder
from study.runtime.runfolder import LOCK_FILE, FolderLock, recover
from study.runtime.schema import make_table
from study.runtime.store import MANIFEST, RunWriter, read_manifest, read_table


def ships_rows(model: str, kl: float) -> pa.Table:
    return make_table("ships", dict(
        run_id=["r"], model=[model], model_revision=[None], dataset=["d"], prompt_format=["direct"],
        code_version=["0"], prompt_id=["p"], prompt=["x"], layer=[0], head=[1], head_label=["L0H1"], op=["undiff_q"],
        eps=[1e-5], kl=[kl], rank=[1], exact=[True]))


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    with FolderLock(out):
        # another process (a real one: flock is per open file) is refused in one line naming host and pid
        code = textwrap.dedent(f"""
            from study.runtime.runfolder import FolderLock
            from study.core.errors import UsageError
            try:
                with FolderLock({str(out)!r}):
                    print("GOT IT")
            except UsageError as err:
                print("REFUSED", err)
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.stdout.startswith("REFUSED") and f"pid {os.getpid()}" in proc.stdout, proc.stdout + proc.stderr
        assert "another --out folder" in proc.stdout and len(proc.stdout.strip().splitlines()) == 1
    assert not (out / LOCK_FILE).exists() and not out.exists()  # a run that wrote nothing leaves no folder

    # a holder killed with the lock held: the kernel drops its flock, the next writer takes over
    code = f"import os, time\nfrom study.runtime.runfolder import FolderLock\nl = FolderLock({str(out)!r}).__enter__()\n" \
           "print('HELD', flush=True)\nos._exit(9)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HELD" in proc.stdout and (out / LOCK_FILE).exists()  # the stale file is still there
    with FolderLock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_commit_cut_off_between_two_files_is_finished_by_the_next_writer(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with RunWriter(out, "first") as w:
        w.write("ships", ships_rows("a", 1.0), part="ships-x")
        w.write("ships", ships_rows("b", 1.0), part="ships-x")
        w.set_manifest({"command": "first"})

    real_replace = os.replace
    calls = []

    def dies_after_one(src, dst):
        if str(dst).endswith(".parquet") and ".staging-" not in str(dst):  # a move into place
            calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped between two files of one commit
        real_replace(src, dst)

    monkeypatch.setattr(runfolder.os, "replace", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        with RunWriter(out, "second") as w:
            w.write("ships", ships_rows("a", 2.0), part="ships-x")
            w.write("ships", ships_rows("b", 2.0), part="ships-x")
            w.set_manifest({"command": "second"})
    monkeypatch.setattr(runfolder.os, "replace", real_replace)
    # half of the new tables sit beside the old manifest: exactly what must not stay
    assert read_manifest(out)["command"] == "first"
    assert sorted(read_table(out, "ships").to_pandas()["kl"]) == [1.0, 2.0]

    with FolderLock(out):
        done = recover(out)
    assert done == ["finished the interrupted commit of run second"]
    assert read_manifest(out)["command"] == "second" and read_manifest(out)["run_id"] == "second"
    assert sorted(read_table(out, "ships").to_pandas()["kl"]) == [2.0, 2.0]
    assert not list(out.glob(".commit-*")) and not list(out.glob(".staging-*"))


def test_a_run_stopped_before_its_commit_leaves_the_folder_as_it_was_and_its_leftovers_go(tmp_path):
    out = tmp_path / "run"
    with RunWriter(out, "first") as w:
        w.write("ships", ships_rows("a", 1.0), part="ships-x")
        w.set_manifest({"command": "first"})
    before = (out / MANIFEST).read_text()
    # what a kill leaves: a staging folder with a staged table, and temp files of interrupted writes
    staged = out / ".staging-dead" / "ships" / "a" / "ships-x.parquet"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"partial")
    (out / "shards").mkdir()
    (out / "shards" / ".abc.arrow.tmp-123").write_bytes(b"torn")
    assert (out / MANIFEST).read_text() == before
    with FolderLock(out):
        done = recover(out)
    assert "removed .staging-dead (a run stopped before its commit)" in done
    assert not (out / ".staging-dead").exists() and not (out / "shards" / ".abc.arrow.tmp-123").exists()
    assert read_table(out, "ships").to_pandas()["kl"].tolist() == [1.0]


def test_an_unreadable_journal_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".commit-x.json").write_text("{not json")
    with pytest.raises(UsageError, match="could not be finished"):
        recover(out)
