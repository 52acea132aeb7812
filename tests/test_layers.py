"""The three floors stay physical: jobs over the Spark floor over a pure core.

The pure floor (``ctlake.core`` and the sample cohort's ``ctlake.cohort``)
must not import Spark, Delta, py4j, the configuration module, the command line
or anything of the Spark floor, at module level or inside a function; a job
file holds argument parsing and one ``run_job`` call, nothing else.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

LIB = ROOT / "lib" / "ctlake"
PURE_PACKAGES = ("core", "cohort")
#: What the pure floor may never import (prefixes of dotted module names).
FORBIDDEN_IN_PURE = ("pyspark", "delta", "py4j", "ctlake.spark", "ctlake.config", "ctlake.cli")
#: What the Spark floor may never import: the edges above it.
FORBIDDEN_IN_SPARK = ("ctlake.cli", "jobs")


def imported_modules(source: str) -> set[str]:
    """Every module a source file imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from ctlake import config` imports the module ctlake.config.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def violations(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(source)
                  if any(m == f or m.startswith(f + ".") for f in forbidden))


def job_logic(source: str) -> list[str]:
    """Statements of a job file beyond argument parsing and one ``run_job`` call."""
    problems = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            for statement in node.body:
                if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call):
                    continue  # parser = job_parser(...)
                if isinstance(statement, ast.Expr) and ast.unparse(statement.value.func).endswith("add_argument"):
                    continue
                if isinstance(statement, ast.Return) and ast.unparse(statement.value).startswith("run_job("):
                    continue
                problems.append(f"line {statement.lineno}: {ast.unparse(statement)[:60]}")
            continue
        problems.append(f"line {node.lineno}: {ast.unparse(node)[:60]}")
    return problems


def modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (LIB / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules(*PURE_PACKAGES), ids=lambda p: str(p.relative_to(LIB)))
def test_the_pure_floor_imports_no_spark_no_configuration_and_no_spark_floor(path):
    assert violations(path.read_text(), FORBIDDEN_IN_PURE) == []


@pytest.mark.parametrize("path", modules("spark"), ids=lambda p: str(p.relative_to(LIB)))
def test_the_spark_floor_does_not_import_the_edges_above_it(path):
    assert violations(path.read_text(), FORBIDDEN_IN_SPARK) == []


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_a_job_file_parses_arguments_and_calls_run_job_only(path):
    assert job_logic(path.read_text()) == []


def test_every_module_lives_on_a_floor():
    top = sorted(p.name for p in LIB.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "config.py", "errors.py"]
    assert {p.name for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__"} == {"core", "spark", "cohort"}


def test_the_checks_catch_what_they_guard_against():
    """The checkers themselves: a pyspark import in a function, a config import, logic in a job."""
    sneaky = "import numpy as np\n\ndef f():\n    from pyspark.sql import functions as F\n    return F\n"
    assert violations(sneaky, FORBIDDEN_IN_PURE) == ["pyspark.sql", "pyspark.sql.functions"]
    assert violations("from ctlake import config as cfg\n", FORBIDDEN_IN_PURE) == ["ctlake.config"]
    assert violations("from ctlake.core import slice_ops\n", FORBIDDEN_IN_PURE) == []
    busy_job = ("import sys\n\ndef main(argv=None):\n    parser = job_parser('x', '')\n"
                "    for i in range(3):\n        pass\n    return run_job(parser, f, argv)\n\n"
                "def helper():\n    return 1\n")
    assert job_logic(busy_job) == ["line 5: for i in range(3):\n    pass", "line 9: def helper():\n    return 1"]


@pytest.mark.parametrize("path", modules("spark"), ids=lambda p: str(p.relative_to(LIB)))
def test_no_orchestration_function_is_longer_than_a_screen(path):
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []
