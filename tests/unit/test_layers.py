"""The layers of the code and the direction of their imports (docs/architecture.md), checked on the source.

Every import counts: module level, inside functions (lazy) and under `if TYPE_CHECKING:`, since a lazy import
is still a dependency and a cycle through one still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("study", "actors", "analysis")

# study's layers, lowest first: a module may import its own layer and the ones below it
LAYERS = ("study.core", "study.prompts", "study.models", "study.generation", "study.runtime", "study.experiments",
          "study.family", "study.spec", "study.runner", "study.cli")
# what analysis may read of study: the tables, their schemas, and the few pure helpers the tables need
ANALYSIS_MAY_IMPORT = {"study", "study.core.errors", "study.core.files", "study.core.stats", "study.runtime.schema",
                       "study.runtime.store"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module `name` refers to (a module, or the module an attribute lives in)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {r for a in node.names if (r := _resolve(a.name))}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            for alias in node.names:
                target = _resolve(f"{full}.{alias.name}")
                if target is None or target == module or target != f"{full}.{alias.name}":
                    target = _resolve(full)
                if target:
                    out.add(target)
    out.discard(module)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    return None


def test_the_walker_sees_lazy_and_type_checking_imports():
    """The checks below mean something only if imports inside functions and TYPE_CHECKING blocks count."""
    assert "study.models.loading" in GRAPH["study.generation.hf"]  # imported inside a function only
    assert "analysis.derive" in GRAPH["study.cli"]  # likewise


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_study_layers_import_only_downwards():
    bad = []
    for m, targets in GRAPH.items():
        mine = _layer(m)
        if mine is None:
            continue
        for t in targets:
            theirs = _layer(t)
            if theirs is not None and theirs > mine:
                bad.append(f"{m} -> {t}")
    assert not bad, "imports against the layer order " + " < ".join(LAYERS) + ": " + ", ".join(sorted(bad))


def test_every_study_module_is_in_a_layer():
    stray = [m for m in MODULES if m.startswith("study.") and _layer(m) is None]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_only_the_cli_picks_actors_and_analysis():
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if m.startswith("study") and m != "study.cli"
                 for t in ts if t.split(".")[0] in ("actors", "analysis"))
    assert not bad, bad


def test_study_finds_other_layers_only_through_entry_points():
    """No `importlib.import_module` or `__import__` with a name in study/: the Ray executor and the vLLM backend
    are entry points (study.core.plugins), so a string cannot hide an upward import either."""
    bad = []
    for m, path in MODULES.items():
        if not m.startswith("study"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("importlib.import_module", "import_module", "__import__"):
                    bad.append(f"{m}:{node.lineno}")
    assert not bad, bad


def test_analysis_reads_tables_only():
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if m.startswith("analysis")
                 for t in ts if t.startswith("study") and t not in ANALYSIS_MAY_IMPORT)
    assert not bad, bad
    assert not any(t.startswith("actors") for m, ts in GRAPH.items() if m.startswith("analysis") for t in ts)


def test_entry_points_name_real_objects():
    """The installed entry points (pyproject.toml) point at classes that exist (imported here, ray included)."""
    from study.core import plugins

    assert set(plugins.names(plugins.EXECUTORS)) >= {"local", "ray"}
    assert set(plugins.names(plugins.GENERATION_BACKENDS)) >= {"hf", "vllm"}
    for group in (plugins.EXECUTORS,):
        for name in plugins.names(group):
            assert hasattr(plugins.load(group, name, "executor"), "from_config")
    assert hasattr(plugins.load(plugins.GENERATION_BACKENDS, "hf", "backend"), "for_worker")
