"""trainer.ResumableRun: the course's loop with a real run's pieces (checkpoints, resume,
signals, NaN stops)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from course.instruction_data import create_dataloaders, custom_collate_fn
from helpers import REPO_ROOT, CharTokenizer, tiny_model, train_tiny, varied_entries
from previous_chapters import train_model_simple
from runtime import engine, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def loaders(group_by_length: bool = False, n: int = 40):
    data = varied_entries(n)
    train_loader, val_loader, _ = create_dataloaders(
        data, data[:12], data[:4], CharTokenizer(), batch_size=4, group_by_length=group_by_length
    )
    for loader in (train_loader, val_loader):  # pad with 0 (no character of the texts)
        loader.collate_fn = functools.partial(custom_collate_fn, pad_token_id=0)
    return train_loader, val_loader


def model_of(seed: int = 0) -> torch.nn.Module:
    # ASCII text with the character tokenizer: ids below 128; entries of up to ~140 tokens
    return tiny_model(seed, vocab_size=128, context_length=192)


def setup(seed: int = 0, **loader_kw):
    model = model_of(seed)
    train_loader, val_loader = loaders(**loader_kw)
    optimizer = engine.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    return model, train_loader, val_loader, optimizer


def run(model, train_loader, val_loader, optimizer, loss_fn=engine.packed_loss_batch, **kw):
    return train_tiny(model, train_loader, val_loader, optimizer, loss_fn, **kw)


def test_uninterrupted_run_is_train_model_simple_step_for_step(capsys):
    model, train_loader, val_loader, optimizer = setup()
    state = run(model, train_loader, val_loader, optimizer)
    reference, train_ref, val_ref, optimizer_ref = setup()
    # ResumableRun first measures the initial losses, which also iterates the loaders
    engine_eval = trainer.evaluate_model(reference, train_ref, val_ref, "cpu", 2)
    histories = train_model_simple(
        reference,
        train_ref,
        val_ref,
        optimizer_ref,
        "cpu",
        2,
        3,
        2,
        "i",
        CharTokenizer(),
        loss_fn=engine.packed_loss_batch,
        progress=False,
    )
    assert state.initial_losses == pytest.approx(list(engine_eval))
    history = state.history
    assert (history.train_losses, history.val_losses, history.track_tokens_seen) == histories
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert state.finished and state.epoch == 2 and state.global_step == 2 * len(train_loader) - 1
    assert "Initial training loss" in capsys.readouterr().out


class StopAfter:
    """A loss function that asks the trainer to stop (as Ctrl-C would) after ``n`` calls."""

    def __init__(self, n: int, signum: int = signal.SIGINT):
        self.n, self.calls, self.signum = n, 0, signum

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), self.signum)  # handled by StopRequests: a flag, not an error
        return engine.packed_loss_batch(*args)


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize(("stop_at", "signum"), [(4, signal.SIGINT), (14, signal.SIGTERM)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, group_by_length, stop_at, signum):
    reference, *rest = setup(group_by_length=group_by_length)
    expected = run(reference, *rest)

    path = tmp_path / "checkpoint.pt"
    model, train_loader, val_loader, optimizer = setup(group_by_length=group_by_length)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    # stop_at counts loss calls: 2+2 initial evaluation batches, then training and evaluations
    with pytest.raises(trainer.TrainingInterrupted, match="checkpoint saved to") as err:
        run(
            model,
            train_loader,
            val_loader,
            optimizer,
            checkpoint_path=path,
            loss_fn=StopAfter(stop_at, signum),
        )
    assert signal.Signals(signum).name in str(err.value) and path.is_file()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers

    model, train_loader, val_loader, optimizer = setup(seed=1, group_by_length=group_by_length)
    resumed = run(model, train_loader, val_loader, optimizer, checkpoint_path=path, resume=True)
    got, want = resumed.history, expected.history
    assert got.train_losses == pytest.approx(want.train_losses, abs=1e-6)
    assert got.val_losses == pytest.approx(want.val_losses, abs=1e-6)
    assert got.track_tokens_seen == want.track_tokens_seen
    assert resumed.initial_losses == expected.initial_losses
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_checkpoints_every_n_steps_and_after_each_epoch(tmp_path, monkeypatch):
    saved = []
    real = trainer.save_checkpoint
    monkeypatch.setattr(
        trainer, "save_checkpoint", lambda *a: saved.append(a[3].global_step) or real(*a)
    )
    model, train_loader, val_loader, optimizer = setup()
    run(
        model,
        train_loader,
        val_loader,
        optimizer,
        checkpoint_path=tmp_path / "c.pt",
        checkpoint_every=4,
    )
    steps = len(train_loader)  # 10 per epoch
    assert saved == [3, 7, steps - 1, 11, 15, 19, 2 * steps - 1]
    state, _ = trainer.load_checkpoint(
        tmp_path / "c.pt", model_of(), engine.make_optimizer(model_of())
    )
    assert state.finished and state.epoch == 2


def test_resuming_a_finished_checkpoint_trains_no_more(tmp_path):
    model, train_loader, val_loader, optimizer = setup()
    path = tmp_path / "c.pt"
    done = run(model, train_loader, val_loader, optimizer, checkpoint_path=path)
    model2, train2, val2, optimizer2 = setup(seed=5)
    counting = StopAfter(10**9)
    again = run(
        model2, train2, val2, optimizer2, checkpoint_path=path, resume=True, loss_fn=counting
    )
    assert again == done and counting.calls == 0
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_non_finite_loss_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    model, train_loader, val_loader, optimizer = setup()
    path = tmp_path / "c.pt"
    calls = {"n": 0}

    def loss_fn(*args):
        calls["n"] += 1
        loss = engine.packed_loss_batch(*args)
        return loss * float("nan") if calls["n"] == 12 else loss

    with pytest.raises(trainer.NonFiniteLossError, match=r"nan at step \d+.*lower learning rate"):
        run(
            model,
            train_loader,
            val_loader,
            optimizer,
            checkpoint_path=path,
            checkpoint_every=2,
            loss_fn=loss_fn,
        )
    state, _ = trainer.load_checkpoint(path, model_of(), engine.make_optimizer(model_of()))
    assert not state.finished and state.global_step >= 1  # the last good checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no NaN step was applied


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    model, train_loader, val_loader, optimizer = setup()
    run(model, train_loader, val_loader, optimizer, checkpoint_path=path)
    other = tiny_model(0, vocab_size=128, context_length=192, emb_dim=16)
    with pytest.raises(trainer.ChapterError, match="not a usable checkpoint"):
        trainer.load_checkpoint(path, other, engine.make_optimizer(other))


@pytest.mark.slow
def test_sigint_to_a_real_run_saves_a_checkpoint_and_resume_finishes_it(tmp_path):
    """The command line, interrupted by a real SIGINT during training, then resumed."""
    data = tmp_path / "data.json"
    data.write_text((REPO_ROOT / "main" / "data" / "sample-instruction-data.json").read_text())
    out = tmp_path / "out"
    base = [sys.executable, str(REPO_ROOT / "main" / "instruction_finetuning.py")]
    flags = [
        "--smoke",
        "--no-judge",
        "--output-dir",
        str(out),
        "--epochs",
        "6",
        "--checkpoint-every",
        "1",
    ]
    env = {**os.environ, "GPT2_TOKENIZER_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(base + flags, env=env, stdout=log[0], stderr=log[1], text=True)
    checkpoint = None
    for _ in range(600):  # wait (at most a minute) until training has written a checkpoint
        runs = list(out.glob("*-smoke/checkpoint.pt"))
        if runs:
            checkpoint = runs[0]
            break
        time.sleep(0.1)
    assert checkpoint is not None, proc.kill() or (tmp_path / "stderr.txt").read_text()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err
    assert "SIGINT" in err and "--resume" in err and "Traceback" not in err
    assert checkpoint.is_file() and not (checkpoint.parent / "run-summary.json").exists()

    done = subprocess.run(
        base + ["--resume", str(checkpoint.parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Resuming from" in done.stdout
    assert (checkpoint.parent / "run-summary.json").is_file()
    assert not checkpoint.exists()  # deleted once the model was saved
