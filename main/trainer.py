"""Fine-tuning that loses nothing: checkpoints, resume, Ctrl-C, and a stop on a non-finite loss.

``train_resumable`` runs the course's loop, ``previous_chapters.train_model_simple``, step for
step (the same batches, evaluations and prints; a test checks the loss histories are equal),
and adds the fault handling, which the course function stays free of:

- a checkpoint every ``checkpoint_every`` steps and at the end of every epoch, written
  atomically: the model, the optimizer, where training stands in the epoch's data order,
  the random-number states, and the losses so far;
- Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and raises
  ``TrainingInterrupted``, whose message says how to resume;
- ``resume=True`` continues from the checkpoint; on the CPU the resumed run ends with the
  same weights and loss history as an uninterrupted one;
- a loss that is NaN or infinite stops training at once with ``NonFiniteLossError``, naming
  the step; the last checkpoint, written before it, stays as it was.

Like the chapter's ``finetune`` it first measures and prints the losses before training.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from instruction_data import ChapterError
from outputs import write_atomically
from previous_chapters import LossFn, calc_loss_batch, evaluate_model, generate_and_print_sample


class TrainingInterrupted(ChapterError):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint."""


class NonFiniteLossError(ChapterError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainState:
    """Where training stands; a checkpoint holds it next to the model and optimizer."""

    epoch: int = 0  # the epoch in progress
    batches_done: int = 0  # batches of that epoch already trained
    global_step: int = -1  # the course's counter: 0 after the first step
    tokens_seen: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)
    initial_losses: list[float] = field(default_factory=list)  # [train, val] before training
    seconds: float = 0.0  # training time, over all sessions
    finished: bool = False


def _shuffle_generator(loader: Any) -> torch.Generator | None:
    """The random generator that orders a training loader's batches (None: no shuffling)."""
    for owner in (getattr(loader, "batch_sampler", None), loader):
        generator = getattr(owner, "generator", None)
        if generator is not None:
            return generator
    return None


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    shuffle: dict,
) -> Path:
    """Write a checkpoint atomically: a crash while saving keeps the previous one whole."""
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "shuffle": shuffle,
        "rng": _rng_states(),
    }
    return write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[TrainState, dict]:
    """Restore the model, optimizer and random states; returns (state, shuffle states)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ChapterError(
            f"{path} is not a usable checkpoint of this model ({type(exc).__name__}: "
            f"{str(exc)[:200]}); delete it to train from the start"
        ) from None
    _set_rng_states(checkpoint["rng"])
    return TrainState(**checkpoint["state"]), checkpoint["shuffle"]


class StopRequests:
    """Turns SIGINT and SIGTERM into a flag that the loop checks after each step.

    A second Ctrl-C while the flag is set stops at once, as usual. Outside the main thread
    (where Python cannot install signal handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _epoch_batches(loader: Any, shuffle: dict, resumed: dict | None, skip: int) -> Iterator:
    """The training batches of an epoch, after the first ``skip`` of them.

    The epoch's order is drawn from the loader's generator when the epoch starts. So a
    resumed epoch (``resumed``: the shuffle states of the checkpoint) restores the generator
    as it was then, skips the batches already trained, and restores the generator as it was
    at the checkpoint. ``shuffle["epoch_start"]`` records the state for later checkpoints.
    """
    generator = _shuffle_generator(loader)
    if generator is not None and resumed is not None:
        generator.set_state(resumed["epoch_start"] if skip else resumed["now"])
    if generator is not None:
        shuffle["epoch_start"] = generator.get_state()
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    if generator is not None and resumed is not None and skip:
        generator.set_state(resumed["now"])
    return batches


def _train_step(model, optimizer, loss_fn: LossFn, batch, device, state: TrainState) -> None:
    """One optimizer step on ``batch``, as the course takes it; refuses a non-finite loss."""
    input_batch, target_batch = batch
    optimizer.zero_grad()
    loss = loss_fn(input_batch, target_batch, model, device)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"the training loss is {loss.item()} at step {state.global_step + 1} "
            f"(epoch {state.epoch + 1}); training stopped. Try a lower learning rate."
        )
    loss.backward()
    optimizer.step()
    state.tokens_seen += input_batch.numel()
    state.global_step += 1
    state.batches_done += 1


def _evaluate(model, train_loader, val_loader, device, eval_iter, loss_fn, state) -> None:
    """The course's periodic evaluation: record and print both losses."""
    train_loss, val_loss = evaluate_model(
        model, train_loader, val_loader, device, eval_iter, loss_fn=loss_fn
    )
    state.train_losses.append(train_loss)
    state.val_losses.append(val_loss)
    state.track_tokens_seen.append(state.tokens_seen)
    tqdm.write(
        f"Ep {state.epoch + 1} (Step {state.global_step:06d}): "
        f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
    )


def train_resumable(
    model: torch.nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer: Any,
    *,
    loss_fn: LossFn = calc_loss_batch,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> TrainState:
    """``train_model_simple`` with checkpoints and resume (see the module's docstring).

    (Longer than our other functions on purpose: the loop stays in one piece, so that it
    reads side by side with the course's ``train_model_simple``.)

    Checkpoints go to ``checkpoint_path`` (none when None) every ``checkpoint_every`` steps
    (0: only at the end of each epoch and on an interrupt). ``resume=True`` continues from
    the checkpoint there, if any.
    """
    state, shuffle, resumed = TrainState(), {"epoch_start": None, "now": None}, None
    if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
        state, resumed = load_checkpoint(checkpoint_path, model, optimizer)
        print(
            f"Resuming from {checkpoint_path}: epoch {state.epoch + 1}, "
            f"step {state.global_step + 1}"
        )

    def checkpoint() -> None:
        if checkpoint_path is not None:
            generator = _shuffle_generator(train_loader)
            shuffle["now"] = None if generator is None else generator.get_state()
            save_checkpoint(checkpoint_path, model, optimizer, state, shuffle)

    def stop_here_if_asked(stop: StopRequests) -> None:
        if stop.requested:
            checkpoint()
            saved = f"; checkpoint saved to {checkpoint_path}" if checkpoint_path else ""
            raise TrainingInterrupted(
                f"{stop.requested}: training stopped after step {state.global_step}{saved}"
            )

    bar = tqdm(total=num_epochs * len(train_loader), unit="step", disable=not progress)
    bar.update(state.epoch * len(train_loader) + state.batches_done)
    started = time.monotonic()
    with StopRequests() as stop, contextlib.closing(bar):
        if not state.initial_losses:  # the losses before training, as the chapter prints them
            state.initial_losses = list(
                evaluate_model(model, train_loader, val_loader, device, eval_iter, loss_fn=loss_fn)
            )
            tqdm.write(f"Initial training loss: {state.initial_losses[0]:.3f}")
            tqdm.write(f"Initial validation loss: {state.initial_losses[1]:.3f}")
            stop_here_if_asked(stop)
        while state.epoch < num_epochs:
            model.train()
            batches = _epoch_batches(train_loader, shuffle, resumed, state.batches_done)
            resumed = None
            for batch in batches:
                _train_step(model, optimizer, loss_fn, batch, device, state)
                bar.update()
                if state.global_step % eval_freq == 0:
                    _evaluate(model, train_loader, val_loader, device, eval_iter, loss_fn, state)
                state.seconds, started = (
                    state.seconds + time.monotonic() - started,
                    time.monotonic(),
                )
                stop_here_if_asked(stop)
                if checkpoint_every and (state.global_step + 1) % checkpoint_every == 0:
                    checkpoint()
            generate_and_print_sample(model, tokenizer, device, start_context)
            state.epoch, state.batches_done = state.epoch + 1, 0
            state.seconds, started = state.seconds + time.monotonic() - started, time.monotonic()
            state.finished = state.epoch == num_epochs
            checkpoint()
    return state
