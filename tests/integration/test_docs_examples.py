"""Every Python example in the docs runs, against what the main job writes.

The main job (`headstudy run`, configs/quickstart.yaml) runs here as written except for its sizes (fewer
prompts, one Sahara step, a few new tokens, one swap recipe, in this process): the same models, sections,
tables and file layout. Each ```python block of README.md and docs/*.md then runs in order, one namespace per
page, with the run folder in place of `runs/quickstart`; every table an example reads must hold rows. The
example that runs the main job itself runs it into that same folder, where every shard is already stored.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # the embedded family, a small main job

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
SMALL = {"ships": {"limit": 2}, "specificity": {"limit": 2}, "sahara": {"limit": 3, "steps": 1},
         "asr": {"limit": 2, "max_new_tokens": 4, "benign_limit": 2}, "swap": {"limit": 2, "max_new_tokens": 4,
         "benign_limit": 2, "recipes": ["attn-from-base"]}, "utility": {"limit": 2}}


def small_main_job(out: Path):
    """configs/quickstart.yaml with its sizes cut (nothing else), local executor."""
    from study.core.frozen import build
    from study.spec import StudyConfig, find_config

    spec = yaml.safe_load(find_config("quickstart").read_text(encoding="utf-8"))
    for section, sizes in SMALL.items():
        spec[section] = {**spec.get(section, {}), **sizes}
    spec["out"] = str(out)
    spec["execution"] = {**spec.get("execution", {}), "executor": "local"}
    return build(StudyConfig, spec)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    from analysis.derive import derive_run
    from study.runner import run_study

    out = tmp_path_factory.mktemp("quickstart") / "run"
    run_study(small_main_job(out), derive=derive_run)
    return out


def test_the_docs_have_examples():
    assert sum(len(BLOCK.findall(p.read_text(encoding="utf-8"))) for p in PAGES) >= 5


@pytest.mark.parametrize("page", [p for p in PAGES if BLOCK.search(p.read_text(encoding="utf-8"))],
                         ids=lambda p: p.name)
def test_every_example_of_the_page_runs_on_the_main_jobs_output(page, main_job, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"small_main_job": small_main_job}
    for i, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8"))):
        code = code.replace("runs/quickstart", str(main_job))
        # the whole-study example runs the main job itself: here at the small size, into the folder that holds
        # its shards (so it computes nothing again)
        code = code.replace('load_study("quickstart"), "runs/q"', f'small_main_job({str(main_job)!r}), {str(main_job)!r}')
        code = code.replace('"runs/q"', repr(str(main_job)))
        exec(compile(code, f"{page.name}[{i}]", "exec"), namespace)  # noqa: S102
        for name, value in namespace.items():
            if type(value).__name__ in ("DataFrame", "Table") and not name.startswith("_"):  # pandas, polars, arrow
                assert len(value) > 0, f"{page.name} example {i}: {name} is empty"
