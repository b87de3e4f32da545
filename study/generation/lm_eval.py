"""The paper's zero-shot accuracy tasks (BoolQ, RTE, WinoGrande, ARC-Challenge, OpenBookQA) through lm-eval, or
your own tasks from a folder of lm-eval task YAMLs.

Checked at plan time (lm-eval installed, every task known, its data loadable), run by the worker that holds the
model (an `EvalShard` per head set: on a cluster, on the model's actor, and kept like every shard), each
ablation scoped by hooks. Every (head set, task) that fails at run time is kept as an error row, never dropped.
Light at import (lm-eval is imported when used).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from study.core.ablation import Ablation
from study.core.errors import UsageError, one_line

log = logging.getLogger(__name__)

INSTALL = "pip install 'headstudy[lm-eval]'"


@dataclass
class LmEvalResult:
    """Per ablation label: {metric: (value, n examples)} for what ran, {task: message} for what failed."""

    values: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)

    def record(self, tasks: Sequence[str]) -> dict[str, Any]:
        """What the manifest says: the tasks, and each failure with its head set."""
        failed = [{"ablation": label, "task": task, "error": msg}
                  for label, by_task in self.errors.items() for task, msg in by_task.items()]
        return {"tasks": list(tasks), "status": "failed" if failed else "ran", "failed": failed}

    def columns(self) -> dict[str, list[Any]]:
        """The rows of an `lm_eval` shard: one per (ablation, metric) that ran, one per (ablation, task) that
        failed (metric `lm_eval:<task>`, no value, the error)."""
        rows = [(label, metric, value, n, None) for label, by_metric in self.values.items()
                for metric, (value, n) in by_metric.items()]
        rows += [(label, f"lm_eval:{task}", None, 0, msg) for label, by_task in self.errors.items()
                 for task, msg in by_task.items()]
        return {name: [r[i] for r in rows] for i, name in enumerate(("ablation", "metric", "value", "n", "error"))}

    def add(self, table: pa.Table) -> None:
        """Take in an `lm_eval` shard's rows (what `columns` wrote)."""
        for r in table.to_pylist():
            if r["error"] is None:
                self.values.setdefault(r["ablation"], {})[r["metric"]] = (r["value"], r["n"])
            else:
                self.errors.setdefault(r["ablation"], {})[r["metric"].removeprefix("lm_eval:")] = r["error"]


def tasks_digest(tasks: Sequence[str], include: str | None) -> str:
    """What an lm-eval result depends on besides the model and the ablation: the task names, lm-eval's version
    and every file of the include folder (a task YAML or its data edited there is computed again)."""
    h = hashlib.sha256(f"{sorted(tasks)}|{importlib.metadata.version('lm_eval')}".encode())
    if include is not None:
        root = Path(include)
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:24]


def task_manager(tasks: Sequence[str], include: str | None) -> Any:
    """An lm-eval TaskManager that knows `tasks`: the include folder alone when it holds them all (indexing the
    thousands of built-in tasks takes seconds), else the built-ins too."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        own = TaskManager(include_path=include, include_defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    return TaskManager(include_path=include)


def check_tasks(tasks: Sequence[str], include: str | None, where: str) -> None:
    """At plan time, before any model loads: UsageError unless lm-eval is installed, `include` is a folder,
    every task is known and its data loads (offline, data not in the cache, is caught here)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError(f"{where}: lm_eval_tasks {', '.join(tasks)} need lm-eval, which is not installed ({INSTALL})")
    if include is not None and not Path(include).is_dir():
        raise UsageError(f"{where}: lm_eval_include {include!r} is not a folder (give a folder of lm-eval task YAMLs)")
    manager = task_manager(tasks, include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"{where}: unknown lm-eval task(s) {', '.join(unknown)} (a built-in task such as boolq, rte, "
                         f"winogrande, arc_challenge, openbookqa, or one defined in lm_eval_include)")
    for task in tasks:
        try:
            manager.load([task])
        except Exception as err:  # lm-eval raises what datasets raises: offline, missing file, bad YAML
            raise UsageError(f"{where}: lm-eval task {task} cannot load its data: {one_line(err)}") from None


def metric_name(task: str, key: str) -> str | None:
    """`lm_eval:<task>:<metric>` for a result key `metric,filter` ("acc,none"), the filter kept when it is not
    "none"; None for what is not a metric (alias, name, sample_len, the stderrs)."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    if metric.endswith("_stderr"):
        return None
    return f"lm_eval:{task}:{metric}" + ("" if filt == "none" else f":{filt}")


def run_lm_eval(model: Any, tokenizer: Any, ablations: Sequence[Ablation], tasks: Sequence[str],
                include: str | None, limit: int | None) -> LmEvalResult:
    """Each task under each ablation, one (ablation, task) at a time so that one failure costs only its own rows;
    results keyed by the ablation's label."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    from study.core.interventions import ablated

    manager = task_manager(tasks, include)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    result = LmEvalResult()
    for ablation in ablations:
        label = ablation.label
        for task in tasks:
            try:
                with ablated(model, ablation):
                    out = evaluator.simple_evaluate(model=wrapped, tasks=[task], task_manager=manager, limit=limit,
                                                    bootstrap_iters=0, log_samples=False)
            except Exception as err:  # a failure of one task on one head set: say which, keep the rest
                msg = one_line(err)
                log.warning("lm-eval task %s with %s failed: %s", task, label, msg)
                result.errors.setdefault(label, {})[task] = msg
                continue
            for name, metrics in out["results"].items():
                n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
                for key, value in metrics.items():
                    metric = metric_name(name, key)
                    if metric is not None and isinstance(value, (int, float)):
                        result.values.setdefault(label, {})[metric] = (float(value), n)
    return result
