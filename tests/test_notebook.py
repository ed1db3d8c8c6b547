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
from notebook_sources import cell_definitions, differences, parameter_differences, sync

import instruction_finetuning as ift
import ollama_evaluate
import previous_chapters as pc
from course import figures, finetuning, instruction_data
from helpers import NotebookOutputs, closed_port, run_notebook_offline
from runtime import engine
from runtime.run_config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "main" / "main.ipynb"

# What the notebook defines in its cells, as its modules do, in the chapter's order ...
DEFINED = [
    "format_input",
    "format_response",
    "InstructionDataset",
    "collate_draft_1",
    "collate_draft_2",
    "collate_draft_3",
    "custom_collate_fn",
    "create_dataloaders",
    "generate",
    "calc_loss_batch",
    "train_model_simple",
    "query_model",
]
# ... and what it shows from the modules, each as its module's own source
LISTED = [
    instruction_data.split_data,
    finetuning.build_model,
    pc.load_weights_into_gpt,
    engine.packed_loss_batch,
    finetuning.extract_response,
    finetuning.generate_responses,
    ollama_evaluate.judge_prompt,
]
# the run's bookkeeping, which the notebook may call from instruction_finetuning; the
# chapter's steps it runs in its own cells
BOOKKEEPING = {"Splits", "allowed_max_length", "prepare_model", "start_run", "save_training"}
BOOKKEEPING |= {"model_config", "write_summary"}


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
    names = re.findall(r"^([A-Z_]+) = ", tagged[0].source, flags=re.M)
    assert {"SMOKE", "MODEL_SIZE", "NUM_EPOCHS", "LEARNING_RATE", "MASK_PROMPT"} <= set(names)
    # each parameter is declared as its setting's one definition says (run_settings)
    assert parameter_differences(nb, RunConfig, RunConfig.smoke_preset()) == []
    assert "notebook_settings(globals(), RunConfig)" in "".join(c.source for c in _code_cells(nb))


def test_the_cells_define_the_chapters_functions_as_the_modules_do() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert [d.name for d in cell_definitions(nb)] == DEFINED
    assert differences(NOTEBOOK) == []  # (python tests/notebook_sources.py --sync fixes it)


def test_no_wrapper_hides_a_step_of_the_chapter() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in _code_cells(nb))
    assert set(re.findall(r"\bift\.(\w+)", code)) <= BOOKKEEPING
    for name in ("train_model_simple", "create_dataloaders", "generate", "query_model"):
        assert re.search(rf"(?<!def ){name}\(", code), f"the notebook never calls {name}"
    assert "finetune(" not in code and "ResumableRun(" not in code


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
    """The functions the cells do not define are shown from their modules, in order."""
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


@pytest.mark.slow
def test_an_edited_format_input_cell_changes_what_the_loaders_make(tmp_path) -> None:
    """A learner's edit of the ``format_input`` cell reaches the batches further down."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (fmt,) = [c for c in nb.cells if c.source.startswith("def format_input(")]
    edited = 'text = "EDITED " + s.header + entry["instruction"]'
    assert 'text = s.header + entry["instruction"]' in fmt.source
    fmt.source = fmt.source.replace('text = s.header + entry["instruction"]', edited)
    (loaders,) = [i for i, c in enumerate(nb.cells) if "= create_dataloaders(" in c.source]
    nb.cells = nb.cells[: loaders + 1]  # the notebook up to the loaders, then a look at them
    show = "print('BATCH:', repr(tokenizer.decode(next(iter(val_loader))[0][0].tolist())))"
    nb.cells.append(nbformat.v4.new_code_cell(show))
    path = tmp_path / "edited.ipynb"
    nbformat.write(nb, path)
    outputs = NotebookOutputs(
        run_notebook_offline(path, tmp_path, SMOKE=True, OUTPUT_DIR=str(tmp_path / "out"))
    )
    (shown,) = re.findall(r"BATCH: '(.*)'", outputs.stream("stdout"))
    assert shown.startswith("EDITED Below is an instruction")

    # the modules' loaders, unedited, start the same entry without it
    cfg = RunConfig.smoke_preset()
    from runtime.gpt2_tokenizer import get_tokenizer

    tokenizer = get_tokenizer(offline=True)
    _, test, val = instruction_data.split_data(instruction_data.read_instruction_file(cfg.data))
    _, val_loader, _ = instruction_data.create_dataloaders(val, val, test, tokenizer)
    plain = tokenizer.decode(next(iter(val_loader))[0][0].tolist())
    assert plain.startswith("Below is an instruction")


def test_a_cell_that_drifts_from_its_module_is_found_and_synced(tmp_path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if c.source.startswith("def format_input(")]
    cell.source = cell.source.replace('if entry["input"]:', 'if entry.get("input"):')
    path = tmp_path / "drifted.ipynb"
    nbformat.write(nb, path)
    assert differences(path) == [
        f"drifted.ipynb cell {nb.cells.index(cell)}: format_input differs from "
        "course.instruction_data.format_input"
    ]
    assert sync(path) == [
        f"drifted.ipynb cell {nb.cells.index(cell)}: course.instruction_data.format_input"
    ]
    assert differences(path) == []
    synced = nbformat.read(path, as_version=4)
    assert (
        synced.cells[nb.cells.index(cell)].source
        == nbformat.read(NOTEBOOK, 4).cells[nb.cells.index(cell)].source
    )
