"""The code base stays `ruff` clean (lint rules and formatting from pyproject.toml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(args: list[str]) -> None:
    ruff = pytest.importorskip("ruff", reason="ruff is a development requirement")
    result = subprocess.run(
        [ruff.find_ruff_bin(), *args, "."],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
