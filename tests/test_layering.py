"""The layering rule: jobs → pipeline → vae, never the other way; vae/ stays pure PyTorch; inside
pipeline/ each subpackage imports only the ones below it (the order in pipeline/__init__.py), and no
modules import each other in a circle."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "vae": {"ray", "mlflow", "fsspec", "s3fs", "pipeline", "jobs"},
    "pipeline": {"jobs"},
}
# What each subpackage of pipeline/ may import (besides itself and vae). pipeline/demo.py, the one loose
# orchestrator, may import any of them.
MAY_IMPORT = {
    "runtime": set(),
    "table": {"runtime"},
    "models": {"table", "runtime"},
    "search": {"table", "runtime"},
    "training": {"models", "table", "runtime"},
    "batch": {"search", "models", "table", "runtime"},
    "serving": {"search", "models", "table", "runtime"},
    "evaluation": {"models", "table", "runtime"},
    "measure": {"evaluation", "batch", "training", "search", "models", "table", "runtime"},
}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every absolute module an import statement names, at any depth of the file (lazy imports too)."""
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module)
            mods |= {f"{node.module}.{a.name}" for a in node.names}   # `from pipeline.models import registry`
    return mods


def imported_roots(path: pathlib.Path) -> set[str]:
    return {m.split(".")[0] for m in imported_modules(path)}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, pathlib.Path]:
    return {module_name(f): f for pkg in ("vae", "pipeline", "jobs") for f in sorted((ROOT / pkg).rglob("*.py"))}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_lower_layers(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found under {package}/"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert {f: b for f, b in bad.items() if b} == {}


def test_every_pipeline_subpackage_is_in_the_layer_map():
    subpackages = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(MAY_IMPORT)


@pytest.mark.parametrize("sub", sorted(MAY_IMPORT))
def test_pipeline_subpackage_imports_only_the_ones_below(sub):
    bad = {}
    for f in sorted((ROOT / "pipeline" / sub).rglob("*.py")):
        used = {m.split(".")[1] for m in imported_modules(f) if m.startswith("pipeline.")}
        if used - MAY_IMPORT[sub] - {sub}:
            bad[str(f.relative_to(ROOT))] = sorted(used - MAY_IMPORT[sub] - {sub})
    assert bad == {}


def import_graph() -> dict[str, set[str]]:
    mods = source_modules()
    return {m: {t for t in imported_modules(f) if t in mods and t != m} for m, f in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_modules_import_each_other_in_a_circle():
    assert circles(import_graph()) == []


def test_the_circle_finder_sees_a_circle():
    # so the test above is not vacuous: a → b → c → a is one circle, d alone is none
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_checker_sees_a_forbidden_import(tmp_path):
    # a file that breaks the rule must be caught, so the test above is not vacuous
    f = tmp_path / "x.py"
    f.write_text("import ray.train\nfrom mlflow import MlflowClient\nfrom . import sibling\n")
    assert imported_roots(f) == {"ray", "mlflow"}
