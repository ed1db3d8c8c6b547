"""main/main.ipynb: its committed state, and a headless smoke run of it (papermill).

The smoke run checks what a reader sees: the code listings are the modules' own source, at
least six figures, no errors and no warnings; and that the notebook computes the same
losses as the command line for the same settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

import collate_drafts
import figures
import finetuning
import instruction_data
import instruction_finetuning as ift
import ollama_evaluate
import previous_chapters as pc
from helpers import NotebookOutputs, closed_port, run_notebook_offline

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "main" / "main.ipynb"

# What the notebook must show, each as its module's own source, in the chapter's order.
LISTED = [
    instruction_data.format_input,
    instruction_data.InstructionDataset,
    collate_drafts.collate_draft_1,
    collate_drafts.collate_draft_2,
    collate_drafts.collate_draft_3,
    instruction_data.custom_collate_fn,
    instruction_data.create_dataloaders,
    finetuning.build_model,
    pc.load_weights_into_gpt,
    pc.generate,
    pc.train_model_simple,
    finetuning.finetune,
    finetuning.extract_response,
    ollama_evaluate.judge_prompt,
    ollama_evaluate.query_model,
]


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with_outputs = [i for i, c in enumerate(_code_cells(nb)) if c.outputs or c.execution_count]
    assert _code_cells(nb) and not with_outputs, f"code cells {with_outputs} carry outputs"


def test_notebook_has_a_papermill_parameters_cell() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    assert "SMOKE = False" in tagged[0].source, "the committed default is the chapter's real run"
    # every parameter is a setting of make_config, so the notebook and the CLI share defaults
    names = re.findall(r"^([A-Z_]+) = ", tagged[0].source, flags=re.M)
    assert {"SMOKE", "MODEL_SIZE", "NUM_EPOCHS", "LEARNING_RATE", "MASK_PROMPT"} <= set(names)


def test_notebook_sections_follow_the_chapter() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown"]
    for section in ("7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "7.7", "7.8", "7.9"):
        assert any(h.startswith(f"## {section} ") for h in headings), f"section {section} missing"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[NotebookOutputs, Path]:
    """The notebook run headless in smoke mode, offline, with no judge listening."""
    tmp = tmp_path_factory.mktemp("notebook")
    nb = run_notebook_offline(NOTEBOOK, tmp, SMOKE=True, OUTPUT_DIR=str(tmp / "outputs"))
    return NotebookOutputs(nb), tmp / "outputs"


@pytest.mark.slow
def test_smoke_run_shows_the_code_it_runs(executed) -> None:
    outputs, _ = executed
    positions = []
    for obj in LISTED:
        source = figures.source_of(obj).rstrip("\n")
        assert source in outputs.listings, (
            f"the notebook does not show the source of {obj.__name__}"
        )
        positions.append(outputs.listings.index(source))
    assert positions == sorted(positions), "the listings are not in the chapter's order"


@pytest.mark.slow
def test_smoke_run_is_clean_and_has_figures(executed) -> None:
    outputs, _ = executed
    assert not outputs.problems()
    assert len(outputs.images) >= 6
    stdout = outputs.stream("stdout")
    assert "identical to draft 3: True" in stdout
    assert "ollama serve" in stdout and "NOT the judge's score" in stdout  # says there is no judge


@pytest.mark.slow
def test_smoke_run_writes_the_outputs_and_matches_the_command_line(
    executed, tmp_path, monkeypatch
) -> None:
    _, out_dir = executed
    out_dir = (out_dir / "latest").resolve()  # the run's own folder
    sample = instruction_data.read_instruction_file(instruction_data.SAMPLE_DATA_PATH)
    _, test_data, _ = instruction_data.split_data(sample)
    responses = json.loads((out_dir / "instruction-data-with-response.json").read_text())
    assert [e["instruction"] for e in responses] == [e["instruction"] for e in test_data]
    assert all(isinstance(e["model_response"], str) for e in responses)
    assert (out_dir / "loss-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "gpt-random-init-sft.pth").is_file()
    notebook = json.loads((out_dir / "run-summary.json").read_text())
    assert notebook["judge"] is None and "NOT the LLM judge" in notebook["local_metrics"]["note"]

    cli_out = tmp_path / "cli"
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{closed_port()}")
    assert ift.main(["--smoke", "--output-dir", str(cli_out)]) == 0
    cli = json.loads((cli_out / "latest" / "run-summary.json").read_text())
    for key in ("initial_losses", "final_losses", "loss_history", "data", "model"):
        assert notebook[key] == cli[key], key
    ignore = {"output_dir": None, "run_name": None}
    assert notebook["config"] | ignore == cli["config"] | ignore
