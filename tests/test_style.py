"""The code's shape is checked, not hoped for: ruff's formatter and linter are clean (the test environment's ruff,
configured in pyproject.toml), no module of sae_cache over 400 lines and no function over 60, and every test file
that a module docstring cites exists."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["sae_cache", "tests", "scripts", "examples", "benchmark"]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["ruff-format", "ruff-check"])
def test_ruff_is_clean(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *CHECKED], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"ruff {' '.join(command)} {' '.join(CHECKED)}:\n{result.stdout}{result.stderr}"


def test_no_module_of_sae_cache_is_over_400_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in python_files("sae_cache")}
    assert {path: n for path, n in lengths.items() if n > MAX_MODULE_LINES} == {}
    assert len(lengths) > 20  # the package was found


def test_no_function_of_sae_cache_is_over_60_lines():
    lengths = {}
    for path in python_files("sae_cache"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lengths[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = node.end_lineno - first + 1
    assert {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES} == {}
    assert len(lengths) > 100


def test_every_test_file_a_module_docstring_cites_exists():
    cited = {}
    for path in python_files(*CHECKED):
        docstring = ast.get_docstring(ast.parse(path.read_text(), filename=str(path))) or ""
        for name in re.findall(r"\b(test_\w+\.py)\b", docstring):
            cited.setdefault(name, []).append(str(path.relative_to(ROOT)))
    missing = {name: where for name, where in cited.items() if not (ROOT / "tests" / name).is_file()}
    assert missing == {}
    assert "test_arrow_format.py" in cited  # sae_cache/arrow_format.py cites its round-trip test
