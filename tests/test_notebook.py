"""main/main.ipynb, executed headless in smoke mode, and the state it is committed in."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "main" / "main.ipynb"


def _closed_loopback_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, "the notebook has no code cells"
    with_outputs = [i for i, c in enumerate(code_cells) if c.outputs or c.execution_count]
    assert not with_outputs, (
        f"code cells {with_outputs} carry outputs; clear them before committing"
    )


def test_notebook_has_a_papermill_parameters_cell_with_smoke() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    assert "SMOKE = False" in tagged[0].source, "the committed default is the chapter's real run"


def test_notebook_sections_follow_the_chapter() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown"]
    for section in ("7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "7.7", "7.8", "7.9"):
        assert any(h.startswith(f"## {section} ") for h in headings), f"section {section} missing"


@pytest.mark.slow
def test_notebook_runs_in_smoke_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    papermill = pytest.importorskip("papermill", reason="papermill runs the notebook headless")
    out_dir = tmp_path / "outputs"
    # The kernel is another process: give it the modules, keep it off the network, and
    # point the judge at a closed loopback port so the run takes its no-judge path.
    pythonpath = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "main")])
    monkeypatch.setenv("PYTHONPATH", pythonpath + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("GPT2_TOKENIZER_OFFLINE", "1")
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{_closed_loopback_port()}")

    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(executed),
        parameters={"SMOKE": True, "OUTPUT_DIR": str(out_dir)},
        cwd=str(NOTEBOOK.parent),
        kernel_name="python3",
        progress_bar=False,
    )

    sample = json.loads((NOTEBOOK.parent / "data" / "sample-instruction-data.json").read_text())
    n_test = int(len(sample) * 0.10)
    responses = json.loads((out_dir / "instruction-data-with-response.json").read_text())
    assert len(responses) == n_test
    assert all(isinstance(e.get("model_response"), str) for e in responses)
    assert [e["instruction"] for e in responses] == [
        e["instruction"] for e in sample[int(len(sample) * 0.85) :][:n_test]
    ]
    plot = out_dir / "loss-plot.png"
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out_dir.glob("*.pth")), "the fine-tuned model was not saved"

    summary = json.loads((out_dir / "run-summary.json").read_text())
    assert summary["smoke"] is True and summary["judge"] is None
    assert summary["final_losses"]["train"] < summary["initial_losses"]["train"]
    assert "NOT the LLM judge" in summary["local_metrics"]["note"]

    # What a reader sees: the batch with -100 targets, the judge note, the plots.
    nb = nbformat.read(executed, as_version=4)
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "-100" in text and "Initial training loss" in text
    assert "ollama serve" in text
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2, "the loss plot and the metrics histogram should be shown"
