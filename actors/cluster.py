"""Connecting to Ray: a local cluster started in-process (dashboard off, bound to 127.0.0.1, no auth-token
noise), or a running cluster at an address; and what the cluster offers model actors.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from study.core.errors import UsageError
from study.runtime.executor import ExecutionConfig

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


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


def connect(cfg: ExecutionConfig) -> bool:
    """Connect to (or start) Ray; True when this call started or joined it (and should shut it down)."""
    import ray

    if cfg.address:
        check_reachable(cfg.address)
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters: no token warning
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if cfg.address:
        try:
            ray.init(address=cfg.address, logging_level=logging.WARNING, runtime_env=env)
        except Exception as err:  # ConnectionError, RuntimeError from the GCS client
            raise UsageError(f"could not join the Ray cluster at {cfg.address!r}: {str(err).splitlines()[0]}") from None
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, runtime_env=env,
                 _node_ip_address="127.0.0.1")
    return True


@dataclass(frozen=True)
class Slots:
    """How many model actors the cluster can hold at once, and what each asks for."""

    count: int
    num_cpus: int
    num_gpus: int  # 0 on a cluster without GPUs


def actor_slots(cfg: ExecutionConfig) -> Slots:
    """One actor per `gpus_per_actor` GPUs where the cluster has GPUs, else per `cpus_per_actor` CPUs."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = [int(n["Resources"].get("GPU", 0)) for n in nodes]
    cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes]
    per_actor = cfg.gpus_per_actor or 1
    if cfg.gpus_per_actor and per_actor > max(gpus, default=0):
        raise UsageError(f"--gpus-per-actor {per_actor} is more than any node has (at most {max(gpus, default=0)} "
                         f"GPUs on one node): use --gpus-per-actor <= {max(gpus, default=0)}"
                         + ("" if any(gpus) else " or leave it out to run one actor per CPU slot"))
    if any(gpus):
        return Slots(sum(g // per_actor for g in gpus), cfg.cpus_per_actor or 1, per_actor)
    per_cpu = cfg.cpus_per_actor or 1
    if per_cpu > max(cpus, default=0):
        raise UsageError(f"--cpus-per-actor {per_cpu} is more than any node has (at most "
                         f"{max(cpus, default=0)} CPUs on one node): use --cpus-per-actor <= {max(cpus, default=0)}")
    return Slots(sum(c // per_cpu for c in cpus), per_cpu, 0)
