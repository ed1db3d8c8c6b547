"""main/evaluation.ipynb: committed without outputs, and a headless smoke run (papermill)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from helpers import NotebookOutputs, run_notebook_offline

NOTEBOOK = Path(__file__).resolve().parents[1] / "main" / "evaluation.ipynb"


def test_notebook_is_committed_without_outputs_and_runs_the_real_thing_by_default() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and not [c for c in code if c.outputs or c.execution_count]
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "SMOKE = False" in tagged[0].source


@pytest.mark.slow
def test_smoke_run_draws_the_scatter_the_win_rates_and_the_reflection_table(tmp_path) -> None:
    nb = run_notebook_offline(NOTEBOOK, tmp_path, SMOKE=True, OUTPUT_DIR=str(tmp_path / "out"))
    outputs = NotebookOutputs(nb)
    assert not outputs.problems()
    assert len(outputs.images) >= 2  # the judges' scatter plot and the win-rate chart
    stdout = outputs.stream("stdout")
    assert "pearson" in stdout and "win rate of B" in stdout and "95% bootstrap interval" in stdout
    tables = [
        o["data"]["text/html"]
        for o in outputs.all
        if "text/html" in o.get("data", {}) and "instruction (reflected)" in o["data"]["text/html"]
    ]
    assert len(tables) == 1 and tables[0].count("<tr>") == 1 + 5
    generated = json.loads(
        (tmp_path / "out" / "evaluation-smoke" / "generated-instruction-data.json").read_text()
    )
    assert len(generated) == 5 and all("original" in e for e in generated)
