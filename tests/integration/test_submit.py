"""`headstudy submit` through the Ray Jobs API, against a head node this test starts on 127.0.0.1 (with its
dashboard's job server) and stops afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from study.cli import main
from study.runtime.store import read_table

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url}")


@pytest.fixture
def head(tmp_path):
    try:
        import aiohttp  # noqa: F401  the Jobs API server needs ray[default]
    except ImportError:
        pytest.skip("ray[default] is not installed: the Jobs API server needs it (pip install -e '.[test]')")
    gcs, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="hs-ray-")  # short: Ray's unix sockets live under it (107-byte path limit)
    # the head runs in this environment, as an activated one on a real head node (`python` is its python)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats",
                             f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(url, 120)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_runs_the_study_as_a_ray_job(head, tmp_path, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = tmp_path / "s.yaml"
    spec.write_text("defaults: {limit: 1}\nships: {}\n")
    out = tmp_path / "tables"
    assert main(["submit", str(spec), "--address", head, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    job_id = printed.split("submitted job ")[1].split()[0]
    assert f"ray job logs --address {head} --follow {job_id}" in printed and str(out) in printed
    client = JobSubmissionClient(head)
    deadline = time.time() + 480
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED):
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "wrote" in logs and "actor(s)" in logs
    ships = read_table(out, "ships").to_pandas()
    assert len(ships) == 270 and ships["model"].iloc[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_submit_bad_inputs(tmp_path, capsys):
    assert main(["submit", "--address", "http://127.0.0.1:9", "--out", str(tmp_path / "o")]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:9", "--out", "relative/o"]) == 2
    assert "absolute" in capsys.readouterr().err
