"""Global batches bigger than one device: gradient accumulation, and torchrun's processes.

Each is checked against one process training the same global batch in the same order: the
loss history and the final weights must agree to float32 rounding. The multi-process runs
use Gloo on 127.0.0.1 (tests/distributed_worker.py is one rank).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

from course.instruction_data import ConfigError, custom_collate_fn
from distributed_worker import Recorder, tiny_training_setup
from helpers import REPO_ROOT, CharTokenizer, tiny_model, train_tiny
from previous_chapters import calc_loss_batch, train_model_simple
from runtime import distributed, engine, run_config, trainer
from runtime.run_config import check_settings, make_config

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = REPO_ROOT / "tests" / "distributed_worker.py"
TOLERANCE = dict(rtol=0, atol=1e-9)  # float64 rounding of differently ordered sums


def single_process_run(batch: int, grad_accum: int = 1, **setup) -> dict:
    """What one process trains (same shape as a worker's result)."""
    model, train_loader, val_loader, optimizer, loss_fn = tiny_training_setup(batch, **setup)
    recorder = Recorder({}, 0, loss_fn)
    state = train_tiny(model, train_loader, val_loader, optimizer, recorder, grad_accum=grad_accum)
    return {"state": asdict(state), "rows": recorder.rows, "weights": model.state_dict()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, world: int, **spec) -> list[dict]:
    """Run ``world`` worker processes, as torchrun would start them; their results by rank."""
    spec = {"out": str(tmp_path / "result"), **spec}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "GLOO_SOCKET_IFNAME": "lo",  # loopback only
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(spec_path)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    for proc, err in zip(procs, errors, strict=True):
        assert proc.returncode == 0, err
    return [torch.load(f"{spec['out']}.rank{r}.pt", weights_only=True) for r in range(world)]


def assert_same_training(result: dict, expected: dict) -> None:
    got, want = result["state"], expected["state"]
    assert got["initial_losses"] == pytest.approx(want["initial_losses"], abs=1e-12)
    history, history_ref = got["history"], want["history"]
    assert history["train_losses"] == pytest.approx(history_ref["train_losses"], abs=1e-10)
    assert history["val_losses"] == pytest.approx(history_ref["val_losses"], abs=1e-10)
    assert history["track_tokens_seen"] == history_ref["track_tokens_seen"]
    assert got["global_step"] == want["global_step"] and got["finished"]
    for name, value in expected["weights"].items():
        torch.testing.assert_close(result["weights"][name], value, **TOLERANCE, msg=name)


# --- the loss of a step -----------------------------------------------------------------------


def uneven_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows whose numbers of targets differ a lot (1 and 2 rows: 3 + 20 against 9 + 6)."""
    rows = [list(range(1, 4)), list(range(1, 21)), list(range(30, 39)), list(range(40, 46))]
    return custom_collate_fn(rows, pad_token_id=0)


class GradientTaker:
    """An optimizer stand-in that keeps the gradients ``step`` would have applied."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def zero_grad(self):
        self.model.zero_grad()

    def step(self):
        self.grads = [p.grad.clone() for p in self.model.parameters()]


def one_step(model, optimizer, batch, grad_accum: int = 1, loss_fn=engine.packed_loss_batch):
    """One step of the training loop (``train_model_simple`` with ``ResumableRun``'s pieces),
    on a loader that holds ``batch`` alone."""
    loader = [batch]
    settings = dict(num_epochs=1, eval_freq=1, eval_iter=1, start_context="!")  # (id 33)
    train_model_simple(
        model,
        loader,
        loader,
        optimizer,
        "cpu",
        **settings,
        tokenizer=CharTokenizer(),
        loss_fn=loss_fn,
        progress=False,
        run=trainer.ResumableRun(grad_accum=grad_accum),
    )


def step_gradients(grad_accum: int, batch) -> list[torch.Tensor]:
    model = tiny_model(0, vocab_size=64)
    taker = GradientTaker(model)
    one_step(model, taker, batch, grad_accum)
    return taker.grads


def test_accumulated_gradient_is_the_whole_batch_mean_over_targets():
    """The definition: a step's loss is the course's loss of the whole global batch, the mean
    over all its targets (token-weighted), not the mean of the micro-batches' means."""
    inputs, targets = uneven_batch()
    model = tiny_model(0, vocab_size=64)
    calc_loss_batch(inputs, targets, model, "cpu").backward()
    whole = [p.grad.clone() for p in model.parameters()]
    for got, want in zip(step_gradients(2, (inputs, targets)), whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    model.zero_grad()  # the batch-weighted alternative gives another gradient here
    halves = zip(inputs.split(2), targets.split(2), strict=True)
    sum(calc_loss_batch(x, y, model, "cpu") / 2 for x, y in halves).backward()
    other = [p.grad for p in model.parameters()]
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(other, whole, strict=True))


def test_loss_in_chunks_equals_the_loss_of_the_whole_batch():
    inputs, targets = uneven_batch()
    targets[1] = engine.IGNORE_INDEX  # a chunk may have no targets at all
    model = tiny_model(0, vocab_size=64).eval()
    whole = calc_loss_batch(inputs, targets, model, "cpu")
    for rows in (1, 2, 3, 4, 8):
        chunked = trainer.in_chunks(calc_loss_batch, rows)(inputs, targets, model, "cpu")
        torch.testing.assert_close(chunked, whole)
    nothing = torch.full_like(targets, engine.IGNORE_INDEX)
    with torch.no_grad():
        assert math.isnan(trainer.in_chunks(calc_loss_batch, 2)(inputs, nothing, model, "cpu"))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_grad_accum_2_equals_a_batch_twice_as_big(group_by_length):
    """batch 8 in 2 micro-batches of 4 (``--batch-size 4 --grad-accum 2``) = batch 8."""
    expected = single_process_run(8, group_by_length=group_by_length)
    accumulated = single_process_run(8, grad_accum=2, group_by_length=group_by_length)
    assert accumulated["rows"] == expected["rows"]
    assert_same_training(accumulated, expected)


def test_one_process_with_grad_accum_1_is_the_course_step_exactly():
    """No accumulation, one process: bit for bit the step of the course's loop."""
    model, train_loader, _, optimizer, loss_fn = tiny_training_setup(4)
    reference = tiny_model(0, vocab_size=128, context_length=192).double()
    reference_optimizer = engine.make_optimizer(reference, lr=1e-2, weight_decay=0.1)
    batch = next(iter(train_loader))
    one_step(model, optimizer, batch, loss_fn=loss_fn)
    reference_optimizer.zero_grad()
    loss_fn(*batch, reference, "cpu").backward()
    reference_optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


# --- helpers of distributed.py ---------------------------------------------------------------


def test_ranks_come_from_torchruns_environment():
    assert distributed.ranks_from_env({}) == distributed.Ranks(0, 1, 0)
    ranks = distributed.ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank) == (3, 4, 1)
    assert ranks.distributed and not ranks.is_main
    with pytest.raises(distributed.ConfigError, match="outside WORLD_SIZE"):
        distributed.ranks_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_each_rank_takes_an_equal_contiguous_share_of_a_global_batch():
    shares = [distributed.rank_rows(12, distributed.Ranks(r, 3, r)) for r in range(3)]
    assert shares == [slice(0, 4), slice(4, 8), slice(8, 12)]
    with pytest.raises(ValueError, match="does not split"):
        distributed.rank_rows(10, distributed.Ranks(0, 3, 0))


def test_a_gpu_rank_without_its_gpu_is_a_clear_error():
    if torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 GPUs")
    with pytest.raises(distributed.ConfigError, match="LOCAL_RANK 63 has no GPU"):
        distributed.rank_device(torch.device("cuda"), distributed.Ranks(63, 64, 63))
    assert distributed.rank_device(torch.device("cpu"), distributed.Ranks(1, 2, 1)).type == "cpu"


def test_the_command_says_which_rank_found_a_problem(monkeypatch, capsys):
    """Under torchrun every rank checks the settings; each error line names its rank (rank 0's
    line is the plain one), and environment variables torchrun would never set are an error."""
    import instruction_finetuning

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, prefix in (("0", "error: "), ("1", "[rank 1] error: ")):
        monkeypatch.setenv("RANK", rank)
        assert instruction_finetuning.main(["--smoke", "--epochs", "0"]) == 2
        assert capsys.readouterr().err.startswith(prefix + "epochs = 0 is out of range")
    monkeypatch.setenv("RANK", "one")
    assert instruction_finetuning.main(["--smoke"]) == 2
    assert (
        capsys.readouterr().err == "error: RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers\n"
    )


# --- two processes with Gloo -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "grad_accum"), [(8, 1), pytest.param(8, 2, marks=pytest.mark.slow)]
)
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, batch, grad_accum):
    """2 ranks x 4 rows (or 2 ranks x 2 micro-batches x 2 rows) = one process, batch 8: the
    same loss history and weights; each rank trains its own half of every global batch."""
    expected = single_process_run(batch)
    rank0, rank1 = launch(tmp_path, 2, batch=batch, grad_accum=grad_accum)
    assert_same_training(rank0, expected)
    assert rank1["state"] == rank0["state"]  # every rank returns rank 0's state
    half = batch // 2
    steps = len(expected["rows"]) // batch
    for s in range(steps):
        global_rows = expected["rows"][s * batch : (s + 1) * batch]
        assert rank0["rows"][s * half : (s + 1) * half] == global_rows[:half]
        assert rank1["rows"][s * half : (s + 1) * half] == global_rows[half:]


@pytest.mark.slow
def test_a_stop_on_one_rank_stops_both_and_the_resumed_run_equals_one_process(tmp_path):
    """SIGINT reaches rank 1 only: both ranks stop after the same step, rank 0 saves a
    checkpoint, and resuming with 2 processes ends as an uninterrupted single process."""
    checkpoint = tmp_path / "checkpoint.pt"
    # rank 1's loss calls: one per training step (no evaluations there), so call 4 = step 3
    stopped = launch(tmp_path, 2, batch=8, checkpoint=str(checkpoint), stop_rank=1, stop_call=4)
    for result in stopped:
        assert result["error"].startswith(
            "TrainingInterrupted: SIGINT: training stopped after step 3"
        )
    assert stopped[0]["error"].endswith(f"checkpoint saved to {checkpoint}")
    assert checkpoint.is_file()
    resumed = launch(tmp_path, 2, batch=8, checkpoint=str(checkpoint), resume=True)
    assert_same_training(resumed[0], single_process_run(8))


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_at_the_same_step(tmp_path):
    results = launch(tmp_path, 2, batch=8, nan_rank=1, nan_call=3)
    for result in results:
        assert result["error"].startswith("NonFiniteLossError: the training loss is nan at step 2")


# --- the command line --------------------------------------------------------------------------


def test_grad_accum_and_precision_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="grad_accum = 0 is out of range"):
        check_settings(make_config(smoke=True, grad_accum=0))
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        check_settings(make_config(smoke=True, precision="fp16"))


def test_bf16_on_a_cpu_without_bf16_instructions_is_refused(monkeypatch):
    monkeypatch.setattr(run_config, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(ConfigError, match="emulated and slower than fp32.*--precision fp32"):
        check_settings(make_config(smoke=True, device="cpu", precision="bf16"))
    monkeypatch.setattr(run_config, "cpu_has_fast_bf16", lambda: True)
    assert check_settings(make_config(smoke=True, device="cpu", precision="bf16")).type == "cpu"


def test_bf16_losses_run_under_autocast_and_stay_close_to_fp32():
    inputs, targets = uneven_batch()
    model = tiny_model(0, vocab_size=64).eval()
    seen = []
    model.out_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    fp32 = calc_loss_batch(inputs, targets, model, "cpu")
    bf16 = trainer.with_precision(calc_loss_batch, "cpu", "bf16")(inputs, targets, model, "cpu")
    assert seen == [torch.float32, torch.bfloat16]
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def _cli(
    args: list[str], cwd, *, world: int = 1, timeout: int = 600
) -> subprocess.CompletedProcess:
    """The command line, as one process or through torchrun with ``world`` processes."""
    script = str(REPO_ROOT / "main" / "instruction_finetuning.py")
    launcher = [sys.executable]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1"]
        launcher += [f"--nproc_per_node={world}"]
    env = {
        **os.environ,
        "GPT2_TOKENIZER_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    return subprocess.run(
        launcher + [script, "--smoke", "--no-judge", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run_outputs(out) -> tuple[dict, dict]:
    (run,) = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    summary = json.loads((run / "run-summary.json").read_text(encoding="utf-8"))
    weights = torch.load(run / "gpt-random-init-sft.pth", weights_only=True)
    return summary, weights


def _assert_same_run(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    """The smoke model is float32: equal to float32 rounding (see tiny_training_setup)."""
    (summary, weights), (summary_ref, weights_ref) = got, want
    for key in ("train", "val"):
        history = summary["loss_history"][key]
        assert history == pytest.approx(summary_ref["loss_history"][key], abs=1e-5)
    assert summary["loss_history"]["tokens_seen"] == summary_ref["loss_history"]["tokens_seen"]
    for name, value in weights_ref.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-4, msg=name)


@pytest.mark.slow
def test_torchrun_and_grad_accum_runs_equal_the_single_process_run(tmp_path):
    """The command line: batch 4 = torchrun with 2 processes x batch 2 = --grad-accum 2 x 2.
    Rank 0 alone prints and writes; the global batch is printed at the start."""
    single = _cli(["--batch-size", "4", "--output-dir", "single"], tmp_path)
    assert single.returncode == 0, single.stderr
    assert "Global batch: 4 entries (batch 4 x 1 process(es) x 1 accumulation" in single.stdout
    two = _cli(["--batch-size", "2", "--output-dir", "two"], tmp_path, world=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Global batch: 4 entries (batch 2 x 2 process(es)") == 1
    assert two.stdout.count("Run summary saved") == 1
    accumulated = _cli(["--batch-size", "2", "--grad-accum", "2", "--output-dir", "acc"], tmp_path)
    assert accumulated.returncode == 0, accumulated.stderr
    reference = _run_outputs(tmp_path / "single")
    _assert_same_run(_run_outputs(tmp_path / "two"), reference)
    _assert_same_run(_run_outputs(tmp_path / "acc"), reference)


@pytest.mark.slow
def test_torchrun_interrupted_then_resumed_under_torchrun_equals_one_process(tmp_path):
    """Ctrl-C to torchrun (which passes SIGINT on to both processes): both stop after the same
    step, rank 0 saves a checkpoint and prints the resume hint; the run resumed under torchrun
    ends as an uninterrupted single-process run."""
    flags = ["--batch-size", "2", "--epochs", "3", "--checkpoint-every", "1"]
    reference = _cli(["--batch-size", "4", "--epochs", "3", "--output-dir", "single"], tmp_path)
    assert reference.returncode == 0, reference.stderr
    script = str(REPO_ROOT / "main" / "instruction_finetuning.py")
    env = {**os.environ, "GPT2_TOKENIZER_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["GLOO_SOCKET_IFNAME"] = "lo"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--local-addr", "127.0.0.1", "--nproc_per_node=2"]
    command = launcher + [script, "--smoke", "--no-judge", *flags, "--output-dir", "two"]
    err = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    checkpoints = []
    for _ in range(1200):  # wait (at most 2 minutes) for the first checkpoint
        checkpoints = list((tmp_path / "two").glob("*-smoke/checkpoint.pt"))
        if checkpoints or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert checkpoints, (proc.kill(), (tmp_path / "stderr.txt").read_text())
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    log = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode != 0
    assert log.count("training stopped after step") == 1, log  # rank 0 speaks for both
    assert "the same torchrun command with --resume" in log
    run = checkpoints[0].parent
    assert checkpoints[0].is_file() and not (run / "run-summary.json").exists()

    resumed = _cli(["--resume", str(run)], tmp_path, world=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    _assert_same_run(_run_outputs(tmp_path / "two"), _run_outputs(tmp_path / "single"))
