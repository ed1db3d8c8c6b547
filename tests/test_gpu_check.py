"""The GPU check (benchmarks/gpu_check.py): its CPU mode end to end, its time budget, its data.

Its CUDA paths run only where a GPU is (they ran once on an H200: benchmarks/README.md); here
the same three parts run with ``--device cpu --tiny`` (Gloo instead of NCCL).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from benchmarks import gpu_check, worker_processes
from course.instruction_data import format_input, load_instruction_data, validate_instruction_data
from helpers import REPO_ROOT
from runtime.gpt2_tokenizer import get_tokenizer
from runtime.run_config import cpu_has_fast_bf16


def formatted_lengths(entries: list[dict]) -> np.ndarray:
    """GPT-2 tokens of each entry formatted with its response, as training sees it."""
    tokenizer = get_tokenizer(offline=True)
    return np.array(
        [
            len(tokenizer.encode(f"{format_input(e)}\n\n### Response:\n{e['output']}"))
            for e in entries
        ]
    )


def test_synthetic_entries_have_the_lengths_of_the_chapters_dataset(shared_dir):
    synthetic = gpu_check.chapter_like_entries()
    validate_instruction_data(synthetic)
    real = load_instruction_data(shared_dir / "data" / "instruction-data.json")
    assert len(synthetic) == len(real) == 1100
    ours, theirs = formatted_lengths(synthetic), formatted_lengths(real)
    assert ours.mean() == pytest.approx(theirs.mean(), rel=0.1)
    for q in (5, 50, 95):
        assert np.percentile(ours, q) == pytest.approx(np.percentile(theirs, q), rel=0.15)
    assert ours.max() <= 1.5 * theirs.max()
    share = np.mean([bool(e["input"]) for e in synthetic])
    assert share == pytest.approx(np.mean([bool(e["input"]) for e in real]), abs=0.05)
    assert gpu_check.chapter_like_entries(20) == gpu_check.chapter_like_entries(20)


def ends(pid: int, seconds: float = 5) -> bool:
    """Whether process ``pid`` ends (or is a zombie: killed, not yet reaped by its new
    parent) within ``seconds``."""
    for _ in range(int(seconds * 10)):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


CHILD = """import json, subprocess, sys, time
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(sys.argv[1] + json.dumps({"step": "train", "sleeper": sleeper.pid}), flush=True)
time.sleep(60)
"""


def test_a_process_past_its_deadline_is_stopped_and_keeps_what_it_reported(tmp_path):
    """The budget: a part still running at its deadline is stopped, with the processes it
    started, and the rows it printed before are kept."""
    log, start = tmp_path / "log", time.monotonic()
    command = [sys.executable, "-c", CHILD, worker_processes.ROW]
    part = worker_processes.run_process(command, start + 3, log, {})
    assert time.monotonic() - start < 20
    assert part["status"] == "stopped" and part["error"] == "the time budget ran out"
    (row,) = part["rows"]
    assert row["step"] == "train" and ends(row["sleeper"])
    command = [sys.executable, "-c", "raise RuntimeError('CUDA error: no kernel image')"]
    failed = worker_processes.run_process(command, time.monotonic() + 60, log, {})
    assert failed["status"] == "failed"
    assert failed["error"] == "exit status 1: RuntimeError: CUDA error: no kernel image"


def test_a_failure_is_told_by_its_own_line_not_by_torchruns_summary():
    torchrun = [
        "Traceback (most recent call last):",
        "RuntimeError: NCCL error: unhandled system error",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
        "main/instruction_finetuning.py FAILED",
    ]
    assert worker_processes.error_line("\n".join(torchrun)) == torchrun[1]
    chapter = ["Training set length: 34", "[rank 1] error: no such file", "Exception ignored"]
    assert worker_processes.error_line("\n".join(chapter)) == chapter[1]
    assert worker_processes.error_line("step 3\nKilled\n") == "Killed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_full_check_is_one_line(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: PyTorch sees no CUDA GPU (on a CPU: --device cpu --tiny)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_tiny_cpu_mode_runs_every_part(tmp_path):
    """``--device cpu --tiny``: the workload in fp32 and bf16, the chapter's smoke run under
    torchrun with 2 Gloo processes and their all_reduce, and bench.py, all reported."""
    out = tmp_path / "results"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py")]
    command += ["--device", "cpu", "--tiny", "--synthetic", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "gpu-cpu-tiny.json").read_text(encoding="utf-8"))
    assert {name: part["status"] for name, part in result["parts"].items()} == {
        "workload": "ok",
        "torchrun": "ok",
        "bench": "ok",
    }
    assert result["data"]["entries"] == gpu_check.TINY_ENTRIES
    assert result["data"]["source"].startswith("synthetic")
    rows = {(row["precision"], row["step"]): row for row in result["parts"]["workload"]["rows"]}
    assert list(rows) == [(p, s) for p in ("fp32", "bf16") for s in ("train", "responses")]
    for (precision, step), row in rows.items():
        if precision == "bf16" and not cpu_has_fast_bf16():
            assert row["status"] in ("refused", "not run")
            continue
        assert row["status"] == "ok" and row["seconds"] > 0
        if step == "train":
            assert row["steps"] == 2 * (row["entries"] // 8) and row["layers_emb_heads"][0] == 2
        else:
            assert row["responses"] == 4 and 0 < row["new_tokens"] <= 4 * row["max_new_tokens"]
    smoke, collective = result["parts"]["torchrun"]["rows"]
    assert result["parts"]["torchrun"]["processes"] == 2
    assert smoke["device"] == "cpu" and collective["sum_ok"] is True
    assert collective["backend"] == "gloo"
    table = (out / "gpu-cpu-tiny.md").read_text(encoding="utf-8")
    for name in (
        "train, fp32",
        "responses, bf16",
        "torchrun: chapter smoke",
        "torchrun: all_reduce",
    ):
        assert f"| {name} |" in table
    assert "| bench | ok: python benchmarks/bench.py --device cpu" in table
    assert table.count("| n/a |") == 4  # no goals for tiny shapes
    assert "| train, fp32 |" in done.stdout  # the table is printed too


@pytest.mark.slow
def test_when_the_budget_runs_out_the_check_stops_and_saves_what_it_measured(tmp_path):
    """A budget far too short for the whole check: it ends within the budget (and the 10 s a
    stopped process gets to finish), and its report holds every part and measurement, each
    measured, stopped or not run."""
    out = tmp_path / "results"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--budget", "10"]
    command += ["--device", "cpu", "--tiny", "--synthetic", "--out", str(out)]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert time.monotonic() - start < 10 + 25
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads((out / "gpu-cpu-tiny.json").read_text(encoding="utf-8"))
    statuses = {name: part["status"] for name, part in result["parts"].items()}
    assert list(statuses) == ["workload", "torchrun", "bench"]
    assert "stopped" in statuses.values() and set(statuses.values()) <= {"ok", "stopped"}
    rows = result["parts"]["workload"]["rows"]
    assert [(row["precision"], row["step"]) for row in rows] == [
        (p, s) for p in ("fp32", "bf16") for s in ("train", "responses")
    ]
    assert {row["status"] for row in rows} <= {"ok", "stopped", "not run", "refused"}
    assert "| bench | stopped: " in (out / "gpu-cpu-tiny.md").read_text(encoding="utf-8")
