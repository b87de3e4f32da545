"""`headstudy submit`: the same study as a Ray job on a cluster, through the Ray Jobs API.

The job carries the project with it (the `study`, `actors` and `analysis` packages and the built-in specs,
uploaded as the job's working directory) and the resolved spec, and runs `headstudy run` on the head node
against the cluster (`--address auto`), so its model actors spread over the cluster's GPUs. Tables go to
`--out`, a folder the head node writes (shared storage on a real cluster); actors only return batches. On a
cluster with token authentication the client sends the user's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token), and the job's driver uses the head node's.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from actors.cluster import TOKEN_HELP, check_reachable, restore_env, use_token_if_set
from study.core.errors import UsageError
from study.spec import StudyConfig

log = logging.getLogger(__name__)

PACKAGES = ("study", "actors", "analysis")  # study/configs carries the built-in specs
SPEC_NAME = "headstudy-job.yaml"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


@dataclass(frozen=True)
class Submitted:
    job_id: str
    address: str
    out: str

    def follow_lines(self) -> list[str]:
        a = shlex.quote(self.address)
        return [f"submitted job {self.job_id} to {self.address}",
                f"  follow its log:   ray job logs --address {a} --follow {self.job_id}",
                f"  its status:       ray job status --address {a} {self.job_id}",
                f"  stop it:          ray job stop --address {a} {self.job_id}",
                f"  its tables:       {self.out} (on the head node; `headstudy plan` with the same spec and --out "
                f"shows what is done, and submitting again resumes)"]


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def stage_project(study: StudyConfig, into: Path) -> Path:
    """Copy the project's packages and the resolved spec into `into` (the job's working directory)."""
    root = project_root()
    for name in PACKAGES:
        if (root / name).is_dir():
            shutil.copytree(root / name, into / name, ignore=IGNORED)
    spec = study.model_dump(mode="json", exclude_none=True)
    (into / SPEC_NAME).write_text(yaml.safe_dump(spec, sort_keys=False))
    return into


def submit(study: StudyConfig, address: str, out: str, *, force: bool = False) -> Submitted:
    """Submit the study; returns the job id. `out` must be an absolute folder the head node can write."""
    if not Path(out).is_absolute():
        raise UsageError(f"--out {out!r} must be an absolute path on storage the head node can write "
                         f"(a relative path would land in the job's temporary working directory)")
    check_reachable(address if "://" in address else f"http://{address}")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = use_token_if_set()  # the Jobs API of a cluster with token authentication wants the user's token

    entry = ["python", "-m", "study.cli", "run", SPEC_NAME, "--out", out, "--address", "auto"]
    if force:
        entry.append("--force")
    with tempfile.TemporaryDirectory(prefix="headstudy-job-") as tmp:
        workdir = stage_project(study, Path(tmp))
        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(entrypoint=shlex.join(entry),
                                       runtime_env={"working_dir": str(workdir)},  # env vars: connect() sets them
                                       metadata={"headstudy": "run", "out": out})
        except AuthenticationError:
            who = "the token" if token else "a client without a token"
            raise UsageError(f"the Ray Jobs API at {address!r} refused {who}: {TOKEN_HELP}") from None
        except Exception as err:  # connection refused, no job server (ray without [default]) ...
            raise UsageError(f"could not submit to the Ray Jobs API at {address!r}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
                             ) from None
        finally:
            restore_env()
    log.info("submitted %s", job_id)
    return Submitted(job_id, address, out)
