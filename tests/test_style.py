"""The code's style is held by ruff (settings in pyproject.toml): formatted, imports sorted, no unused names,
lines within the length. `ruff format . && ruff check --fix .` repairs most of what this reports."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import ROOT, unavailable


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(command):
    if importlib.util.find_spec("ruff") is None:
        unavailable("ruff (a test dependency) is not installed: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
