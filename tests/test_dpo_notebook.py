"""main/dpo.ipynb: its committed state, and a headless smoke run of it (papermill).

The smoke run checks what a reader sees: the modules' own source for every function the
notebook explains, in order; the figures; no errors and no warnings; and the same training
numbers as the command line for the same settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from notebook_sources import cell_definitions, differences, parameter_differences

import dpo_finetuning as dft
import preference_data as pdata
from course import dpo
from course.figures import source_of
from helpers import NotebookOutputs, closed_port, run_notebook_offline
from runtime.dpo_config import DPOConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "main" / "dpo.ipynb"

# What the notebook defines in its cells, as its modules do, in this order ...
DEFINED = [
    "compute_logprobs",
    "compute_dpo_loss",
    "compute_dpo_loss_batch",
    "train_model_dpo_simple",
]
# ... and what it shows from the modules, each as its module's own source, in this order.
LISTED = [
    dft.load_sft,
    pdata.rewrite_prompt,
    pdata.keep_rewrite,
    pdata.PreferenceDataset,
    pdata.preference_collate_fn,
    dpo.policy_and_reference,
    dpo.sequence_logprobs,
    dpo.pair_logprobs,
]


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with_outputs = [i for i, c in enumerate(_code_cells(nb)) if c.outputs or c.execution_count]
    assert _code_cells(nb) and not with_outputs, f"code cells {with_outputs} carry outputs"


def test_notebook_has_one_parameters_cell_whose_default_is_the_real_run() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    assert "SMOKE = False" in tagged[0].source
    names = set(re.findall(r"^([A-Z_]+) = ", tagged[0].source, flags=re.M))
    assert {"SMOKE", "MODEL", "PREFERENCES", "MAKE_PREFERENCES", "BETA", "REDUCTION"} <= names
    # each parameter is declared as its setting's one definition says (run_settings)
    assert parameter_differences(nb, DPOConfig, DPOConfig.smoke_preset()) == []
    assert "notebook_settings(globals(), DPOConfig)" in "".join(c.source for c in _code_cells(nb))


def test_the_cells_define_the_dpo_functions_as_the_module_does() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert [d.name for d in cell_definitions(nb)] == DEFINED
    assert differences(NOTEBOOK) == []  # (python tests/notebook_sources.py --sync fixes it)
    code = "\n".join(c.source for c in _code_cells(nb))
    assert "train_dpo(" not in code and "dpo.compute_" not in code
    assert re.search(r"(?<!def )train_model_dpo_simple\(", code)


def test_notebook_derives_the_loss_in_prose() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for step in ("Bradley and Terry", "KL", "Z(x)", "cancels", r"\mathcal{L}_\text{DPO}"):
        assert step in prose, step


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[NotebookOutputs, Path]:
    """The notebook run headless in smoke mode, offline, with no judge listening."""
    tmp = tmp_path_factory.mktemp("dpo-notebook")
    nb = run_notebook_offline(NOTEBOOK, tmp, SMOKE=True, OUTPUT_DIR=str(tmp / "outputs"))
    return NotebookOutputs(nb), tmp / "outputs"


@pytest.mark.slow
def test_smoke_run_shows_the_code_it_runs_in_order(executed) -> None:
    outputs, _ = executed
    positions = []
    for obj in LISTED:
        source = source_of(obj).rstrip("\n")
        assert source in outputs.listings, (
            f"the notebook does not show the source of {obj.__name__}"
        )
        positions.append(outputs.listings.index(source))
    assert positions == sorted(positions), "the listings are out of order"


@pytest.mark.slow
def test_smoke_run_is_clean_and_draws_its_figures(executed) -> None:
    outputs, _ = executed
    assert not outputs.problems()
    assert (
        len(outputs.images) == 3
    )  # the masked batch, the loss against the margin, the training plot
    stdout = outputs.stream("stdout")
    assert "before training: loss 0.6931" in stdout  # the policy starts as the reference
    difference = re.search(r"fast path against compute_logprobs: (\S+)", stdout)
    assert float(difference[1]) < 1e-3  # nats, over answers of tens of tokens
    assert "parameters requiring gradients: 0" in stdout
    assert "ollama serve" in stdout and "NOT the LLM judge's score" in stdout


@pytest.mark.slow
def test_smoke_run_writes_the_outputs_and_matches_the_command_line(
    executed, tmp_path, monkeypatch
) -> None:
    _, out_dir = executed
    run = (out_dir / "latest-dpo").resolve()
    for name in ("gpt-random-init-dpo.pth", "dpo-plot.png", "sft-responses.json"):
        assert (run / name).is_file(), name
    notebook = json.loads((run / "dpo-summary.json").read_text())
    cli_out = tmp_path / "cli"
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{closed_port()}")
    assert dft.main(["--smoke", "--output-dir", str(cli_out)]) == 0
    cli = json.loads((cli_out / "latest-dpo" / "dpo-summary.json").read_text())
    assert notebook["tracking"] == cli["tracking"]
    assert notebook["data"] == cli["data"]
    ignore = {"output_dir": None, "run_name": None}
    assert notebook["config"] | ignore == cli["config"] | ignore
