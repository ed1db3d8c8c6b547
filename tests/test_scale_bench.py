"""benchmarks/scale.py and its synthetic Alpaca data, checked small (the real run is 52k)."""

from __future__ import annotations

import json

import pytest

import find_near_duplicates as fnd
from benchmarks import scale, synthetic_alpaca
from course.instruction_data import read_instruction_file, validate_instruction_data


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale") / "alpaca-300.json"
    assert synthetic_alpaca.main(["--out", str(path), "--entries", "300"]) == 0
    return path


def test_synthetic_entries_have_alpacas_shape_and_repeat_for_a_seed(small_file):
    entries = read_instruction_file(small_file)
    validate_instruction_data(entries)
    assert len(entries) == 300
    assert 0.3 < sum(bool(e["input"]) for e in entries) / 300 < 0.5  # about 40% with an input
    assert synthetic_alpaca.make_entries(50, seed=7) == synthetic_alpaca.make_entries(50, seed=7)
    assert synthetic_alpaca.make_entries(50, seed=7) != synthetic_alpaca.make_entries(50, seed=8)


def test_planted_near_duplicates_are_found():
    entries = synthetic_alpaca.make_entries(400, dup_rate=0.05)
    kept = fnd.find_print_and_remove_near_duplicates(entries, True, 0.9, progress=False)
    assert 0 < len(entries) - len(kept) <= 0.05 * 400 * 2


def test_tokenize_and_dedup_measure_in_subprocesses(small_file):
    tokenize = scale.bench_tokenize(small_file, rounds=1)
    assert tokenize["ours"]["tokens"] > 300 * 30  # the template alone is ~30 tokens
    assert tokenize["ours"]["seconds"] > 0 and tokenize["course"]["peak_mb"] >= 0
    dedup = scale.bench_dedup(small_file)
    assert dedup["entries"] == 300 and dedup["kept"] <= 300
    result = {"entries": 300, "tokenize": tokenize, "dedup": dedup}
    rows = scale.table_rows(result)
    assert rows[0][0] == "Tokenizing 300 entries: seconds" and len(rows) == 6
    assert scale.markdown_table(rows).count("\n") == len(rows) + 1


def test_report_files(tmp_path):
    result = {
        "command": "python benchmarks/scale.py --only bf16",
        "entries": 10,
        "machine": scale.machine(),
        "bf16": {"fp32": 2.0, "bf16": 1.0, "speedup": 2.0},
        "wall_seconds": 3.0,
    }
    scale.save(result, tmp_path / "scale-cpu")
    assert json.loads((tmp_path / "scale-cpu.json").read_text())["bf16"]["speedup"] == 2.0
    assert "| Training step on the CPU" in (tmp_path / "scale-cpu.md").read_text()
    assert (tmp_path / "scale-cpu.png").stat().st_size > 0


@pytest.mark.slow
def test_alpaca_shaped_data_is_cleaned_trained_on_and_answered_one_command_each(tmp_path):
    """Exercise 7.3's path on synthetic Alpaca-shaped data (600 entries, not 52k, to fit a
    test): one command removes the near-duplicates, one trains and answers the test split."""
    import subprocess
    import sys

    raw, clean = tmp_path / "alpaca.json", tmp_path / "alpaca-clean.json"
    raw.write_text(json.dumps(synthetic_alpaca.make_entries(600, dup_rate=0.05)))

    def command(*argv: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    command("main/find_near_duplicates.py", "--json_file", str(raw), "--remove_duplicates",
            "--json_output_file", str(clean))  # fmt: skip
    kept = read_instruction_file(clean)
    assert 500 < len(kept) < 600  # the planted duplicates are gone, the rest stays

    out = tmp_path / "runs"
    command("main/instruction_finetuning.py", "--smoke", "--data", str(clean), "--epochs", "1",
            "--batch-size", "16", "--max-new-tokens", "4", "--no-judge", "--output-dir", str(out))  # fmt: skip
    run = out / "latest"
    summary = json.loads((run / "run-summary.json").read_text())
    assert summary["data"]["n_entries"] == len(kept)
    answered = json.loads((run / "instruction-data-with-response.json").read_text())
    assert len(answered) == summary["data"]["n_test"] == int(len(kept) * 0.1)  # course's split
    assert all("model_response" in entry for entry in answered)
