"""The package lists every module: an installed wheel imports what the repository does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from helpers import REPO_ROOT

PACKAGES = ("course", "runtime")  # the library: chapter 7's course layer, the machinery

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")


def test_the_wheel_includes_every_module_and_ruff_knows_them_as_first_party() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    included = set(config["tool"]["hatch"]["build"]["targets"]["wheel"]["only-include"])
    modules = {p.name for p in REPO_ROOT.glob("*.py")}
    for folder in ("main", *PACKAGES):
        modules |= {f"{folder}/{p.name}" for p in (REPO_ROOT / folder).glob("*.py")}
    assert included == modules
    first_party = set(config["tool"]["ruff"]["lint"]["isort"]["known-first-party"])
    top_level = {name.removesuffix(".py") for name in modules if name.count("/") == 0}
    commands = {name[5:].removesuffix(".py") for name in modules if name.startswith("main/")}
    assert top_level | commands | set(PACKAGES) <= first_party


def test_every_command_line_script_has_a_console_script_that_runs_its_main_guarded(
    monkeypatch,
) -> None:
    """Each console script calls a function of ``runtime.console_scripts`` that runs its
    command's module through ``run`` (the start-up guard, then ``interrupts.run_command``),
    as ``python main/X.py`` does; and every main/ script has one."""
    from runtime import console_scripts

    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    ran = []
    monkeypatch.setattr(console_scripts, "run", lambda module: ran.append(module) or 0)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert module == "runtime.console_scripts", name
        assert getattr(console_scripts, function)() == 0, name
    with_main = {
        p.stem
        for p in (REPO_ROOT / "main").glob("*.py")
        if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")
    }
    assert sorted(ran) == sorted(with_main)  # each script's own module, each once


def _entry_point(function: str, *args: str, **popen: Any) -> subprocess.Popen:
    """A process running what the installed console script runs."""
    code = f"import sys; from runtime.console_scripts import {function} as c; sys.exit(c())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "main")])}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_an_installed_command_answers_ctrl_c_while_it_starts_with_one_line() -> None:
    """The console scripts' start-up is guarded as ``python main/X.py``'s is: Ctrl-C while
    PyTorch loads is one line and 130, not a traceback."""
    child = _entry_point(
        "instruction_finetuning",
        "--help",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.3)  # (importing PyTorch alone takes longer)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["interrupted (SIGINT) while starting; nothing was done"]


def test_an_installed_command_runs_its_main_with_the_command_line() -> None:
    child = _entry_point("ollama_evaluate", "--file_path", "missing.json")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 2, (out, err)
    assert err.startswith("error: ") and "missing.json" in err and "Traceback" not in err
