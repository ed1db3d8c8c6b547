"""The exercises 7.1-7.4 as variants (course/exercises.py), their command line, and
main/exercises.ipynb: its committed state and a headless smoke run of it (papermill)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import pytest
from notebook_sources import cell_definitions, differences, parameter_differences

import instruction_finetuning as ift
from course import exercises, figures, instruction_data, lora
from helpers import NotebookOutputs, run_notebook_offline
from previous_chapters import gpt2_config

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "main" / "exercises.ipynb"


def parse(*argv: str) -> ift.RunConfig:
    return ift.config_from_args(ift.build_arg_parser().parse_args(list(argv)))


# --- the variants --------------------------------------------------------------------------


def test_each_variant_changes_what_its_exercise_asks_for():
    base = parse()
    changed = {
        name: {k for k, v in vars(parse("--exercise", name)).items() if getattr(base, k) != v}
        for name in exercises.VARIANTS
    }
    assert changed == {
        "baseline": set(),
        "phi3_prompt": {"prompt_style"},
        "mask_instructions": {"mask_prompt"},
        "alpaca_52k": {"data", "batch_size", "allowed_max_length"},
        "lora": {"lora_rank"},  # lora_alpha 16 is also the default
    }
    cfg = parse("--exercise", "alpaca_52k")
    assert (cfg.data, cfg.batch_size, cfg.allowed_max_length) == (exercises.ALPACA_URL, 4, 512)
    assert (parse("--exercise", "lora").lora_rank, parse("--exercise", "lora").lora_alpha) == (
        16,
        16.0,
    )


def test_flags_given_override_the_variants_settings():
    cfg = parse("--exercise", "alpaca_52k", "--batch-size", "2", "--allowed-max-length", "256")
    assert (cfg.data, cfg.batch_size, cfg.allowed_max_length) == (exercises.ALPACA_URL, 2, 256)
    cfg = parse("--exercise", "lora", "--lora-rank", "8", "--lora-alpha", "4")
    assert (cfg.lora_rank, cfg.lora_alpha) == (8, 4.0)


def test_unknown_exercise_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--exercise", "lora2")
    assert exit_info.value.code == 2 and "invalid choice: 'lora2'" in capsys.readouterr().err
    with pytest.raises(ift.ConfigError, match="unknown exercise 'x'; choose one of: baseline"):
        exercises.variant_settings("x")


def test_smoke_alpaca_variant_uses_a_generated_stand_in(tmp_path):
    cfg = parse("--smoke", "--exercise", "alpaca_52k", "--output-dir", str(tmp_path))
    stand_in = tmp_path / exercises.STAND_IN_FILE
    assert cfg.data == str(stand_in) and cfg.batch_size == 4
    entries = instruction_data.load_instruction_data(stand_in)  # checks every entry
    assert entries == exercises.alpaca_stand_in() and len(entries) == 120
    assert len({e["instruction"] for e in entries}) > 10 and any(e["input"] for e in entries)
    assert entries != exercises.alpaca_stand_in(seed=1)
    stand_in.write_text(json.dumps(entries[:30]))  # an existing file is used as it is
    parse("--smoke", "--exercise", "alpaca_52k", "--output-dir", str(tmp_path))
    assert len(json.loads(stand_in.read_text())) == 30
    ift.check_settings(cfg)


def test_stand_in_answers_are_right():
    for e in exercises.alpaca_stand_in(300):
        if e["instruction"] == "Add the two numbers.":
            a, b = map(int, e["input"].split(" and "))
            assert e["output"] == f"{a} + {b} = {a + b}."
        if e["instruction"].startswith("Sort the numbers"):
            numbers = [int(n) for n in e["input"].split(", ")]
            assert e["output"] == ", ".join(map(str, sorted(numbers)))
        if e["instruction"].startswith("Reverse"):
            assert e["output"] == f"The word reversed is '{e['input'][::-1]}'."


def test_unwritable_stand_in_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ift.ConfigError, match="cannot write the Alpaca stand-in"):
        exercises.variant_settings("alpaca_52k", smoke=True, output_dir=tmp_path / "file")


# --- the comparison ----------------------------------------------------------------------------


def summary(lora_rank=None, judge=None, final=(1.0, 2.0)) -> dict:
    return {
        "config": {"lora_rank": lora_rank, "lora_alpha": 16.0},
        "model": {"config": gpt2_config("gpt2-medium (355M)")},
        "initial_losses": {"train": 3.5, "val": 3.25},
        "final_losses": {"train": final[0], "val": final[1]},
        "loss_history": {"train": [2.0, 1.0], "val": [2.5, 2.0], "tokens_seen": [10, 20]},
        "training_minutes": 1.5,
        "local_metrics": {"exact_match": 0.125, "rouge_l_f1": 0.5},
        "judge": None if judge is None else {"mean_score": judge},
    }


def test_comparison_table_has_each_runs_numbers_next_to_the_courses():
    rows = exercises.comparison_rows(
        {"baseline": summary(judge=51.5), "lora": summary(16, final=(float("nan"), 0.75))}
    )
    assert [r["trainable"] for r in rows] == [406_286_336, 7_898_384]
    table = exercises.markdown_table(rows).splitlines()
    assert len(table) == 4 and table[0].count("|") == table[1].count("|") == 12
    assert table[2] == (
        "| baseline | - | 406,286,336 | 3.500 / 3.250 | 1.000 / 2.000 | 1.50 | 0.125 | 0.500 "
        "| 51.50 | 0.299 / 0.657 | 49.45 |"
    )
    assert table[3].startswith("| lora | 7.4 | 7,898,384 |") and "| n/a / 0.750 |" in table[3]
    assert table[3].endswith("| n/a | 0.308 / 0.652 | 50.23 |")


def test_comparison_plot_shows_judge_scores_only_when_every_run_has_one():
    fig = exercises.plot_comparison({"baseline": summary(judge=50.0), "lora": summary(16, 40.0)})
    assert "LLM judge" in fig.axes[1].get_title()
    assert [b.get_height() for b in fig.axes[1].patches] == [50.0, 40.0]
    plt.close(fig)
    fig = exercises.plot_comparison({"baseline": summary(judge=50.0), "lora": summary(16)})
    assert "NOT its score" in fig.axes[1].get_title()
    assert [b.get_height() for b in fig.axes[1].patches] == [0.5, 0.5]
    assert len(fig.axes[0].lines) == 2
    plt.close(fig)


# --- the notebook ------------------------------------------------------------------------------


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_committed_without_outputs_and_with_one_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with_outputs = [i for i, c in enumerate(_code_cells(nb)) if c.outputs or c.execution_count]
    assert _code_cells(nb) and not with_outputs, f"code cells {with_outputs} carry outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "SMOKE = False" in tagged[0].source
    names = set(re.findall(r"^([A-Z_]+) = ", tagged[0].source, flags=re.M))
    assert {"SMOKE", "VARIANTS", "LORA_RANK", "LORA_ALPHA", "OUTPUT_DIR", "USE_JUDGE"} <= names
    # the shared ones as their one definition says (LoRA's: the lora variant's own defaults)
    lora = frozenset({"LORA_RANK", "LORA_ALPHA"})
    assert parameter_differences(nb, ift.RunConfig, ift.RunConfig.smoke_preset(), lora) == []


def test_the_cells_define_the_lora_layers_as_the_module_does():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    names = [d.name for d in cell_definitions(nb)]
    lora_names = ["LoRALayer", "_adapter", "WrapsLinear", "LinearWithLoRA"]
    lora_names += ["replace_linear_with_lora"]
    lora_names += ["QKVWithLoRA", "lora_layers", "apply_lora"]
    assert names == ["run_variant", *lora_names, "pairwise_against_baseline"]
    assert differences(NOTEBOOK) == []  # (python tests/notebook_sources.py --sync fixes it)
    code = "\n".join(c.source for c in _code_cells(nb))
    assert "lora.apply_lora(" not in code and "apply_lora(medium" in code


def test_notebook_has_a_section_per_exercise():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown"]
    for section in ("7.1 ", "7.2 ", "7.3 ", "7.4 "):
        assert any(h.startswith(f"## {section}") for h in headings), section
    assert any(h.startswith("## Comparing the variants") for h in headings)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[NotebookOutputs, Path]:
    """The notebook run headless in smoke mode, offline, with no judge listening."""
    tmp = tmp_path_factory.mktemp("exercises")
    nb = run_notebook_offline(NOTEBOOK, tmp, SMOKE=True, OUTPUT_DIR=str(tmp / "outputs"))
    return NotebookOutputs(nb), tmp / "outputs"


def _summaries(out_dir: Path) -> dict[str, dict]:
    """Each run's summary, by variant: the runs are made in the order of VARIANTS."""
    runs = sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name != "latest")
    assert len(runs) == len(exercises.VARIANTS)
    return {
        name: json.loads((run / "run-summary.json").read_text())
        for name, run in zip(exercises.VARIANTS, runs, strict=True)
    }


@pytest.mark.slow
def test_smoke_run_is_clean_and_shows_the_code_it_runs(executed) -> None:
    outputs, _ = executed
    assert not outputs.problems()
    for obj in (
        instruction_data.format_input,
        instruction_data.custom_collate_fn,
        exercises._stand_in_entry,
        lora.merge_lora,
        ift.run,
    ):
        assert figures.source_of(obj).rstrip("\n") in outputs.listings, obj.__name__
    stdout = outputs.stream("stdout")
    assert "7,898,384 trainable parameters of 414,184,720" in stdout  # gpt2-medium, rank 16
    assert "STAND-IN for the 52k Alpaca file" in stdout
    difference = float(re.search(r"merged file vs adapter on the base model: (\S+)", stdout)[1])
    assert difference < 1e-4
    assert outputs.images


@pytest.mark.slow
def test_smoke_run_compares_every_variant_in_one_table(executed) -> None:
    outputs, out_dir = executed
    tables = [
        o["data"]["text/markdown"] for o in outputs.all if "text/markdown" in o.get("data", {})
    ]
    assert len(tables) == 1
    lines = tables[0].splitlines()[2:]
    summaries = _summaries(out_dir)
    assert [line.split(" | ")[0].strip("| ") for line in lines] == list(summaries)
    for line, (name, s) in zip(lines, summaries.items(), strict=True):
        final = s["final_losses"]
        assert f"| {final['train']:.3f} / {final['val']:.3f} |" in line, name
        assert "| n/a |" in line  # no judge listening
        course = exercises.VARIANTS[name].course_score
        assert line.endswith(f"| {course:.2f} |")
    assert summaries["phi3_prompt"]["config"]["prompt_style"] == "phi3"
    assert summaries["mask_instructions"]["config"]["mask_prompt"] is True
    alpaca = summaries["alpaca_52k"]
    assert alpaca["data"]["source"].endswith(exercises.STAND_IN_FILE)
    assert alpaca["data"]["n_entries"] == 120 and alpaca["config"]["batch_size"] == 4
    assert summaries["lora"]["config"]["lora_rank"] == 16
    assert Path(summaries["lora"]["outputs"]["lora_adapter"]).is_file()
    for name in ("baseline", "phi3_prompt", "mask_instructions", "alpaca_52k"):
        assert "lora_adapter" not in summaries[name]["outputs"]


# --- against the baseline, pairwise, over seeds ----------------------------------------------


def _summary(val: float, rouge: float, judge: float | None) -> dict:
    return {
        "final_losses": {"train": 0.1, "val": val},
        "local_metrics": {"rouge_l_f1": rouge},
        "judge": None if judge is None else {"mean_score": judge},
    }


def test_seed_spreads_give_each_metrics_mean_and_spread_across_seeds():
    import statistics

    runs = {
        seed: {
            "baseline": _summary(1.0 + d, 0.3, None),
            "lora": _summary(1.2 + d, 0.2 + d, 50 + 10 * d),
        }
        for seed, d in ((123, 0.0), (124, 0.1), (125, 0.3))
    }
    rate = lambda v: {"value": v}  # noqa: E731
    pairwise = {
        seed: {
            "lora": {
                "win_rate": rate(w),
                "length_controlled_win_rate": rate(None),
                "position_bias": rate(0.6),
            }
        }
        for seed, w in ((123, 0.4), (124, 0.5), (125, 0.7))
    }
    spreads = exercises.seed_spreads(runs, pairwise)
    lora_val = spreads["lora"]["final_val_loss"]
    assert lora_val["mean"] == pytest.approx(statistics.mean([1.2, 1.3, 1.5]))
    assert lora_val["std"] == pytest.approx(statistics.stdev([1.2, 1.3, 1.5]))
    assert spreads["lora"]["win_rate"]["std"] == pytest.approx(statistics.stdev([0.4, 0.5, 0.7]))
    assert spreads["lora"]["length_controlled_win_rate"] == {
        "mean": None,
        "std": None,
        "n_seeds": 0,
    }
    assert (
        spreads["baseline"]["judge_mean"]["n_seeds"] == 0 and "win_rate" not in spreads["baseline"]
    )


@pytest.mark.slow
def test_notebook_compares_each_variant_with_the_baseline_pairwise_over_seeds(
    tmp_path, judge_server
):
    judge = judge_server(lambda p: "A" if "Response A:" in p else "50")
    nb = run_notebook_offline(
        NOTEBOOK,
        tmp_path,
        SMOKE=True,
        OUTPUT_DIR=str(tmp_path / "outputs"),
        VARIANTS=["baseline", "lora"],
        SEEDS=[123, 124],
        JUDGE_URL=judge.base,
    )
    outputs = NotebookOutputs(nb)
    assert not outputs.problems()
    stdout = outputs.stream("stdout")
    for seed in (123, 124):
        assert f"--- seed {seed}: lora against the baseline ---" in stdout
    # this judge always names the first-shown answer: every pair a tie, a full position bias
    assert stdout.count("win rate of B               0.500") == 2
    assert re.search(r"lora +position_bias +1\.000 \+- 0\.000 +\(2 seeds\)", stdout)
    assert re.search(r"lora +judge_mean +50\.000 \+- 0\.000 +\(2 seeds\)", stdout)
    runs = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir() and p.name != "latest"]
    summaries = [json.loads((r / "run-summary.json").read_text()) for r in runs]
    assert sorted(s["config"]["seed"] for s in summaries) == [123, 123, 124, 124]
    n_test = summaries[0]["data"]["n_test"]
    asked = [b for b in judge.bodies if "Response A:" in b["messages"][0]["content"]]
    assert len(asked) == 2 * n_test * 2  # 2 seeds, each test entry in both orders
