"""The layering rule: jobs → pipeline → vae, never the other way; vae/ stays pure PyTorch."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "vae": {"ray", "mlflow", "fsspec", "s3fs", "pipeline", "jobs"},
    "pipeline": {"jobs"},
}


def imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_lower_layers(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found under {package}/"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert {f: b for f, b in bad.items() if b} == {}


def test_the_checker_sees_a_forbidden_import(tmp_path):
    # a file that breaks the rule must be caught, so the test above is not vacuous
    f = tmp_path / "x.py"
    f.write_text("import ray.train\nfrom mlflow import MlflowClient\nfrom . import sibling\n")
    assert imported_roots(f) == {"ray", "mlflow"}
