"""A Ray head node for tests, started with `ray start` on 127.0.0.1 only, with token authentication and its
Jobs API (dashboard) on, and stopped afterwards. The token lives in the head's environment only."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Head:
    url: str  # the Jobs API
    gcs: str  # HOST:PORT for --address
    token: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
        except urllib.error.HTTPError:  # 401: up, and asking for the token
            return
        except OSError:
            time.sleep(1)
        else:
            return
    raise TimeoutError(f"no Ray dashboard at {url}")


@contextmanager
def token_head(num_cpus: int = 2) -> Iterator[Head]:
    """`ray start --head` as a user would start it on their own machine with `RAY_AUTH_MODE=token`."""
    gcs, dash = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    temp = tempfile.mkdtemp(prefix="hs-ray-")  # short: Ray's unix sockets live under it (107-byte path limit)
    # the head runs in this environment, as an activated one on a real head node (`python` is its python);
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a single-machine head, every port on 127.0.0.1
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(url, 120)
        yield Head(url, f"127.0.0.1:{gcs}", token)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
