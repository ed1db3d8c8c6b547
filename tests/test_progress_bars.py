"""Progress bars are drawn on a terminal or in a notebook: a captured log holds the printed lines alone."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from tqdm import tqdm

from runtime.progress_bars import progress_bar

REPO_ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_bar_draws_nothing_but_counts(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(total=4, unit="step") as bar:
        for step in range(4):
            bar.update(1)
            tqdm.write(f"step {step}", file=log)
    assert bar.n == 4
    assert log.getvalue() == "step 0\nstep 1\nstep 2\nstep 3\n"
    assert list(progress_bar(range(3))) == [0, 1, 2]
    assert log.getvalue().count("\n") == 4


def test_on_a_terminal_the_bar_is_drawn(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    assert list(progress_bar(range(3), desc="generating")) == [0, 1, 2]
    assert re.search(r"generating: 100%.*3/3", screen.getvalue())


def test_a_bar_switched_off_draws_nothing_even_on_a_terminal(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    assert list(progress_bar(range(3), enabled=False)) == [0, 1, 2]
    assert screen.getvalue() == ""


class ZMQInteractiveShell:  # the name of the shell a Jupyter kernel runs
    pass


def test_in_a_notebook_the_bar_is_drawn(monkeypatch):
    """A Jupyter kernel's output is no terminal, but a reader watches it: the bar is drawn."""
    cell_output = io.StringIO()
    monkeypatch.setattr(sys, "stderr", cell_output)
    kernel = types.SimpleNamespace(get_ipython=ZMQInteractiveShell)
    monkeypatch.setitem(sys.modules, "IPython", kernel)
    assert list(progress_bar(range(3), desc="training")) == [0, 1, 2]
    assert re.search(r"training: 100%.*3/3", cell_output.getvalue())


def test_a_program_that_only_imported_ipykernel_is_no_notebook(monkeypatch):
    """papermill and nbclient import ipykernel in the process that runs a notebook: that
    process's own bars stay off a pipe (the full suite once drew them there)."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert list(progress_bar(range(3), desc="training")) == [0, 1, 2]
    assert log.getvalue() == ""


@pytest.mark.slow
def test_a_piped_smoke_run_logs_no_bars_and_says_where_its_outputs_went(tmp_path):
    """The issue's log: ``0%| | 0/8 ... Initial training loss`` must not appear in a pipe.
    Run from another folder (as from main/), the run names its folder by its absolute path."""
    script = REPO_ROOT / "main" / "instruction_finetuning.py"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", "--no-judge"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    log = run.stdout + run.stderr
    assert "Initial training loss" in log
    assert not re.search(r"\d+%\|", log), log[:2000]
    where = Path(re.search(r"This run's outputs go to (.+)", run.stdout)[1])
    assert where.is_absolute() and where.parent == (tmp_path / "outputs").resolve()
    assert (where / "run-summary.json").is_file()


def test_every_progress_bar_of_the_product_is_made_by_progress_bar():
    """One place decides where bars are drawn: no product module calls tqdm's bar itself."""
    product = [*REPO_ROOT.glob("*.py"), *(REPO_ROOT / "main").glob("*.py")]
    callers = [
        path.name
        for path in product
        if path.name != "progress_bars.py" and re.search(r"\btqdm\(", path.read_text())
    ]
    assert callers == []
