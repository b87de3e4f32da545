"""`headstudy submit` and `headstudy run --address` against a head node this test starts on 127.0.0.1 with token
authentication and its Jobs API on (as `RAY_AUTH_MODE=token ray start --head` would), and stops afterwards: with
the token the job runs to the end; without it, or with a wrong one, one line and exit code 2."""

from __future__ import annotations

import time

import pytest
import ray

from study.cli import main
from study.runtime.store import read_table
from tests.ray_head import token_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    try:
        import aiohttp  # noqa: F401  the Jobs API server needs ray[default]
    except ImportError:
        pytest.skip("ray[default] is not installed: the Jobs API server needs it (pip install -e '.[test]')")
    with token_head() as h:
        yield h


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """A user with no Ray token: none in the environment, none in ~/.ray."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def with_token(no_token, monkeypatch, head):
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)


def test_submit_runs_the_study_as_a_ray_job(head, with_token, monkeypatch, tmp_path, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = tmp_path / "s.yaml"
    spec.write_text("defaults: {limit: 1}\nships: {}\n")
    out = tmp_path / "tables"
    assert main(["submit", str(spec), "--address", head.url, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    job_id = printed.split("submitted job ")[1].split()[0]
    assert f"ray job logs --address {head.url} --follow {job_id}" in printed and str(out) in printed
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    from actors.cluster import refresh_auth

    refresh_auth()
    client = JobSubmissionClient(head.url)  # sends the token
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


@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_without_the_token_submit_and_run_are_refused_with_one_line(head, no_token, monkeypatch, token, tmp_path,
                                                                     capsys):
    if token:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    spec = tmp_path / "s.yaml"
    spec.write_text("defaults: {limit: 1}\nships: {}\n")
    out = tmp_path / "tables"
    t0 = time.time()
    for argv in (["submit", str(spec), "--address", head.url, "--out", str(out)],
                 ["run", str(spec), "--address", head.gcs, "--out", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "refused" in err and "RAY_AUTH_TOKEN" in err, err
        assert not token or token not in err  # a token is never echoed
    assert time.time() - t0 < 60  # refused at once, not after ray.init's minute of retries
    assert not out.exists()


def test_run_address_joins_the_token_cluster(head, with_token, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("defaults: {limit: 1}\nships: {}\n")
    out = tmp_path / "tables"
    assert main(["run", str(spec), "--address", head.gcs, "--out", str(out)]) == 0
    assert len(read_table(out, "ships").to_pandas()) == 270
    assert head.token not in capsys.readouterr().err
    # nothing stays joined: a driver still joined when the cluster stops is ended by Ray (exit 1, mid-test-run)
    assert not ray.is_initialized()


def test_submit_bad_inputs(tmp_path, capsys):
    assert main(["submit", "--address", "http://127.0.0.1:9", "--out", str(tmp_path / "o")]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:9", "--out", "relative/o"]) == 2
    assert "absolute" in capsys.readouterr().err
