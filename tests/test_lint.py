"""The code base stays `ruff` clean (lint rules and formatting from pyproject.toml).

Only the project's own files are checked: in a git checkout, the files git tracks, so that
a notebook a user executed into the tree (or any other scratch file) cannot fail the suite.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import ruff

REPO_ROOT = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    """The tracked Python files and notebooks, or "." outside a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "*.py", "*.ipynb"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ["."]
    return [name for name in listed if (REPO_ROOT / name).is_file()] or ["."]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(args: list[str]) -> None:
    result = subprocess.run(
        [ruff.find_ruff_bin(), *args, *project_files()],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_stray_file_in_the_tree_is_not_linted() -> None:
    if project_files() == ["."]:
        pytest.skip("not a git checkout: every file is linted")
    stray = REPO_ROOT / "main" / "stray-executed-notebook.py"
    stray.write_text("x=1;y =2\n")  # fails both lint and format
    try:
        assert str(stray.relative_to(REPO_ROOT)) not in project_files()
        assert "course/instruction_data.py" in project_files()
    finally:
        stray.unlink()
