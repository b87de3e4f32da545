"""The local Ray cluster of a run is not open to the network: during a run on the Ray executor, every port the
run's processes listen on is on 127.0.0.1 only, or refuses a client without the token; token authentication is
on (even on 127.0.0.1, other users of the machine reach those ports); the token is in no file Ray or the run
writes."""

from __future__ import annotations

import http.client
import ipaddress
import os
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from actors.ray_executor import RayExecutor
from study.runner import plan_study
from study.runtime.executor import ExecutionConfig
from tests.integration.test_runner import spec
from tests.model_folders import tiny_llama_folder

pytestmark = pytest.mark.slow

# a call each kind of Ray gRPC server serves (GCS, raylet, core worker: the driver and every actor, agents,
# object manager)
GRPC_METHODS = ("/ray.rpc.NodeInfoGcsService/GetClusterId", "/ray.rpc.NodeManagerService/GetNodeStats",
                "/ray.rpc.CoreWorkerService/NumPendingTasks", "/ray.rpc.ReporterService/HealthCheck",
                "/ray.rpc.ObjectManagerService/Pull")


def listeners() -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every TCP port this process and its descendants listen on."""
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _target(ip: str) -> str:
    """Where a client reaches a port bound to `ip` (a wildcard bind: through 127.0.0.1, as good as any address)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if addr.is_unspecified:
        return "127.0.0.1"
    return f"[{ip}]" if addr.version == 6 else ip


def grpc_status(host: str, port: int, token: str | None = None) -> set[str]:
    """The status codes of the gRPC calls above, without (or with) the token."""
    import grpc

    codes = set()
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in GRPC_METHODS:
            try:
                channel.unary_unary(method)(b"", timeout=5, metadata=metadata)
                codes.add("OK")
            except grpc.RpcError as err:
                codes.add(err.code().name)
    return codes


def refuses_without_token(ip: str, port: int) -> bool:
    """A client with no token is turned away: HTTP answers 401/403, or gRPC answers UNAUTHENTICATED (and
    serves none of the calls)."""
    host = _target(ip)
    try:
        urllib.request.urlopen(f"http://{host}:{port}/", timeout=5)
        return False  # served an HTTP page to anyone
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return True
    except (OSError, http.client.HTTPException):
        pass  # not HTTP/1.1: gRPC?
    codes = grpc_status(host, port)
    return "UNAUTHENTICATED" in codes and codes <= {"UNAUTHENTICATED", "UNIMPLEMENTED"}


def test_a_local_run_listens_on_loopback_only_and_asks_for_a_token(tmp_path, monkeypatch):
    tiny = str(tiny_llama_folder(tmp_path / "m"))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # a user with no token of their own
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    job = plan_study(spec(tiny, tmp_path / "x", heads=1, prompts=1)).jobs[0]
    shards = job.pending()
    seen: list[tuple[str, int, str]] = []
    with RayExecutor(ExecutionConfig(actors=2)) as ex:
        import ray

        session = Path(ray._private.worker._global_node.get_session_dir_path())
        token = os.environ.get("RAY_AUTH_TOKEN")  # the run's own: this test's user has none
        assert token is not None
        for i, _ in enumerate(ex.run(shards, {job.model: job.options})):
            if i == 1:  # mid-run: both actors are up and working
                seen = listeners()
                open_ports = [(ip, port, name) for ip, port, name in seen
                              if not loopback(ip) and not refuses_without_token(ip, port)]
                gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
                without, with_token = grpc_status("127.0.0.1", gcs_port), grpc_status("127.0.0.1", gcs_port, token)
        names = {name for _, _, name in seen}
        assert {"gcs_server", "raylet"} <= names and sum("ModelActor" in n for n in names) >= 1, seen
        assert not open_ports, f"listening beyond 127.0.0.1 without asking for a token: {open_ports}"
        assert "UNAUTHENTICATED" in without and "OK" in with_token  # token authentication on, and the token works
        ex.close()
        leaks = [p for p in session.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"
    assert "RAY_AUTH_TOKEN" not in os.environ or os.environ["RAY_AUTH_TOKEN"] != token  # undone at shutdown
    assert not (Path.home() / ".ray" / "auth_token").exists() or token not in (
        Path.home() / ".ray" / "auth_token").read_text()
