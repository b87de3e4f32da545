"""Connecting to Ray: a local cluster started in-process, or a running cluster at an address; and what the
cluster offers model actors.

Security (docs/cluster.md): a local cluster keeps Ray's token authentication on and binds every port Ray opens to
127.0.0.1; a cluster joined at an address, or a Jobs API submitted to, gets the user's token when one is set.
Ray's and vLLM's usage telemetry stay off unless the user's environment turns them on.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlparse

from study.core.errors import UsageError
from study.runtime.executor import ExecutionConfig
from study.runtime.stopping import keep_sigterm

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
# Ray's switch for machines where it runs local clusters only (its default on macOS and Windows): the node's IP is
# then 127.0.0.1, and every server Ray starts binds to it. Read by `ray._private.ray_constants` at import.
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# usage telemetry off unless the environment already says otherwise
TELEMETRY_OFF = {"RAY_USAGE_STATS_ENABLED": "0", "VLLM_NO_USAGE_STATS": "1"}
GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # the first call a driver makes; refused without the token
TOKEN_HELP = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's token "
              "(`ray get-auth-token` on its head node)")

_restore: dict[str, str | None] = {}  # environment this module changed for a local cluster, undone at shutdown


def telemetry_off() -> dict[str, str]:
    """Ray's and vLLM's usage reports off in this process and its children, unless the user set them."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in TELEMETRY_OFF}


def _set_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def refresh_auth() -> None:
    """Make Ray's C++ side read RAY_AUTH_MODE and the token again (it caches both)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def has_token() -> bool:
    """Whether the user has a Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    try:
        return loader.has_token(ignore_auth_mode=True)
    except AuthenticationError as err:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise UsageError(f"Ray's token could not be read: {str(err).split('. Note:')[0]}") from None


def use_token_if_set() -> bool:
    """For a cluster that is already running: send the user's token when they have one (Ray itself does this only
    for `--address auto`). An explicit RAY_AUTH_MODE is kept as it is. True when requests carry a token."""
    mode = os.environ.get(AUTH_MODE)
    if mode is not None:
        return mode.lower() == "token"
    if not has_token():
        return False
    _restore.setdefault(AUTH_MODE, mode)
    os.environ[AUTH_MODE] = "token"
    refresh_auth()
    return True


@contextmanager
def _local_only(on: bool = True) -> Iterator[None]:
    """While Ray starts or joins: this process takes 127.0.0.1 as its node's IP, and so do Ray's processes started
    meanwhile (they keep it; this process goes back to Ray's default afterwards)."""
    if not on:
        yield
        return
    from ray._private import ray_constants

    was_local, was_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(LOCAL_ONLY)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[LOCAL_ONLY] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was_local
        _set_env(LOCAL_ONLY, was_env)


def start_local(**init_kwargs: Any) -> None:
    """Start a Ray cluster on this machine, in this process: token authentication on and every port on 127.0.0.1.

    Without a token of the user's own, the cluster gets a new random one that lives only in this process's
    environment (and its children's): never written to a file, never logged. An explicit RAY_AUTH_MODE other than
    `token` is respected, with a warning."""
    import ray

    mode = os.environ.get(AUTH_MODE)
    if mode is not None and mode.lower() != "token":
        log.warning("%s=%s: the local Ray cluster runs without token authentication, so anyone who can reach its "
                    "ports on this machine can run code as you", AUTH_MODE, mode)
    else:
        _restore.setdefault(AUTH_MODE, mode)
        os.environ[AUTH_MODE] = "token"
        if not has_token():
            _restore.setdefault(AUTH_TOKEN, os.environ.get(AUTH_TOKEN))
            os.environ[AUTH_TOKEN] = secrets.token_urlsafe(32)
        refresh_auth()
    try:
        with _local_only(), keep_sigterm():
            ray.init(include_dashboard=False, **init_kwargs)
    except BaseException:
        shutdown()
        raise


def shutdown() -> None:
    """Stop (or leave) Ray and undo what this module set in this process's environment."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    restore_env()


def restore_env() -> None:
    """Undo what `start_local` or `use_token_if_set` set in this process's environment (mode, token)."""
    if _restore:
        for key, value in _restore.items():
            _set_env(key, value)
        _restore.clear()
        refresh_auth()


def check_reachable(address: str) -> None:
    """Fail in seconds, with one line, on an address nothing listens at (ray.init would wait much longer)."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise UsageError(f"bad Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise UsageError(f"no Ray cluster reachable at {address!r} ({err.strerror or err}): start one with "
                         f"`ray start --head` or drop --address to run on a local cluster") from None


def _gcs(address: str) -> tuple[str, int] | None:
    """HOST, PORT of a GCS address (not `auto`, not a ray:// client address)."""
    if address == "auto" or "://" in address:
        return None
    parsed = urlparse(f"gcs://{address}")
    return (parsed.hostname, parsed.port) if parsed.hostname and parsed.port else None


def check_token(address: str, token: bool) -> None:
    """One line, before ray.init, for a cluster that refuses this driver's token (or its lack of one); ray.init
    itself would retry for a minute and print a warning per try."""
    gcs = _gcs(address)
    if gcs is None:
        return
    import grpc
    from ray._raylet import AuthenticationTokenLoader

    header = AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True) if token else {}
    with grpc.insecure_channel(f"{gcs[0]}:{gcs[1]}") as channel:
        try:
            channel.unary_unary(GCS_PROBE)(b"", timeout=CONNECT_TIMEOUT_S, metadata=list(header.items()) or None)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise UsageError(join_refused(address, token)) from None
            # anything else (TLS, a slow head): ray.init says what it is


def _loopback_only(address: str) -> bool:
    """A cluster on this machine whose GCS listens on 127.0.0.1 only (a head started with Ray's local-only
    switch): the driver must then take 127.0.0.1 as its node's IP too, where Ray would pick the network's."""
    gcs = _gcs(address)
    if gcs is None or gcs[0] not in ("127.0.0.1", "localhost", "::1"):
        return False
    from ray._private.services import get_node_ip_address

    try:
        with socket.create_connection((get_node_ip_address(), gcs[1]), timeout=CONNECT_TIMEOUT_S):
            return False
    except OSError:
        return True


def connect(cfg: ExecutionConfig) -> bool:
    """Connect to (or start) Ray; True when this call started or joined it (and should shut it down)."""
    import ray

    if cfg.address:
        check_reachable(cfg.address)
    if ray.is_initialized():
        return False
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **telemetry_off()}}
    if not cfg.address:
        start_local(logging_level=logging.WARNING, runtime_env=env)
        return True
    token = use_token_if_set()
    check_token(cfg.address, token)
    try:
        with _local_only(_loopback_only(cfg.address)), keep_sigterm():
            ray.init(address=cfg.address, logging_level=logging.WARNING, runtime_env=env)
    except Exception as err:  # ConnectionError, RuntimeError from the GCS client, AuthenticationError
        raise UsageError(join_error(cfg.address, err, token)) from None
    return True


def join_refused(address: str, token: bool) -> str:
    return (f"the Ray cluster at {address!r} refused {'the token' if token else 'a client without a token'}: "
            f"{TOKEN_HELP}")


def join_error(address: str, err: Exception, token: bool) -> str:
    """One line for a cluster that would not let this driver in."""
    from ray.exceptions import AuthenticationError

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, AuthenticationError) or "authentication" in text.lower() or "unauthenticated" in text.lower():
        return join_refused(address, token)
    return f"could not join the Ray cluster at {address!r}: {text}"


@dataclass(frozen=True)
class Slots:
    """How many model actors the cluster can hold at once, and what each asks for."""

    count: int
    num_cpus: int
    num_gpus: int  # 0 on a cluster without GPUs


def actor_slots(cfg: ExecutionConfig) -> Slots:
    """The slots of the cluster as it is now (`slots_of` over Ray's live nodes)."""
    import ray

    return slots_of([n["Resources"] for n in ray.nodes() if n.get("Alive")], cfg)


def slots_of(nodes: list[dict[str, float]], cfg: ExecutionConfig) -> Slots:
    """One actor per `gpus_per_actor` GPUs where the cluster has GPUs, else per `cpus_per_actor` CPUs.

    A GPU actor asks for `cpus_per_actor` CPUs (its torch threads, for the float64 SVDs of generalized Ships);
    by default the CPUs a GPU node has per actor slot, on the GPU node with the fewest, so every slot can be
    placed."""
    gpus = [int(n.get("GPU", 0)) for n in nodes]
    cpus = [int(n.get("CPU", 0)) for n in nodes]
    per_actor = cfg.gpus_per_actor or 1
    if cfg.gpus_per_actor and per_actor > max(gpus, default=0):
        raise UsageError(f"--gpus-per-actor {per_actor} is more than any node has (at most {max(gpus, default=0)} "
                         f"GPUs on one node): use --gpus-per-actor <= {max(gpus, default=0)}"
                         + ("" if any(gpus) else " or leave it out to run one actor per CPU slot"))
    if any(gpus):
        slots = [(c, g // per_actor) for c, g in zip(cpus, gpus) if g // per_actor]
        threads = cfg.cpus_per_actor or max(1, min(c // n for c, n in slots))
        return Slots(sum(n for _, n in slots), threads, per_actor)
    per_cpu = cfg.cpus_per_actor or 1
    if per_cpu > max(cpus, default=0):
        raise UsageError(f"--cpus-per-actor {per_cpu} is more than any node has (at most "
                         f"{max(cpus, default=0)} CPUs on one node): use --cpus-per-actor <= {max(cpus, default=0)}")
    return Slots(sum(c // per_cpu for c in cpus), per_cpu, 0)
