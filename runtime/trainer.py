"""Fine-tuning that loses nothing: checkpoints, resume, Ctrl-C, and a stop on a non-finite loss.

There is one training loop, the course's ``train_model_simple`` (``course/pretraining.py``).
``ResumableRun`` is the set of pieces it calls for a real run (``train_model_simple(...,
run=ResumableRun(...))``; ``run.state`` is then where training stands), and the course's
loop stays as the course writes it:

- a checkpoint every ``checkpoint_every`` steps and at the end of every epoch, written
  atomically: the model, the optimizer, where training stands in the epoch's data order,
  the random-number states, and the losses so far;
- Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and raises
  ``TrainingInterrupted``, whose message says how to resume;
- ``resume=True`` continues from the checkpoint; on the CPU the resumed run ends with the
  same weights and loss history as an uninterrupted one;
- a loss that is NaN or infinite stops training at once with ``NonFiniteLossError``, naming
  the step; the last checkpoint, written before it, stays as it was.

It also trains on global batches bigger than one device holds, and on several processes
(``distributed.py``): ``grad_accum`` micro-batches of accumulated gradients and
``ranks.world_size`` processes under torchrun. The loss of a step is defined as the course
defines it for one batch: the mean cross-entropy over all non-ignored targets of the global
batch. Each micro-batch's mean is therefore weighted by its share of the global batch's
targets (token-weighted, not the mean of micro-batch means), so that accumulating K
micro-batches, or splitting a batch over N ranks, gives the very update of one K (or N)
times larger batch.

The loop waits for the device once per step (the non-finite check, and under torchrun the
one reduction of the loss and the stop requests) and once per evaluation. Like the
chapter's ``finetune`` it first measures and prints the losses before training.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from course.pretraining import (
    LossFn,
    TrainingRun,
    evaluate_model,
)
from runtime.checkpoints import TrainState, load_checkpoint, save_checkpoint
from runtime.distributed import (
    SINGLE_PROCESS,
    Ranks,
    barrier,
    broadcast,
    data_parallel,
    rank_rows,
    sum_across,
    sync_generator,
)
from runtime.engine import IGNORE_INDEX
from runtime.errors import (  # noqa: F401 (re-exported)
    ChapterError,
    NonFiniteLossError,
    TrainingInterrupted,
)


def _shuffle_generator(loader: Any) -> torch.Generator | None:
    """The random generator that orders a training loader's batches (None: no shuffling)."""
    for owner in (getattr(loader, "batch_sampler", None), loader):
        generator = getattr(owner, "generator", None)
        if generator is not None:
            return generator
    return None


STOP_SIGNALS = ("SIGINT", "SIGTERM")


class StopRequests:
    """Turns the ``STOP_SIGNALS`` into a flag that the loop checks after each step.

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
            for name in STOP_SIGNALS:
                signum = signal.Signals[name]
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def flags(self) -> list[float]:
        """1.0 for the signal that asked to stop, 0.0 for the others (in ``STOP_SIGNALS``)."""
        return [float(self.requested == name) for name in STOP_SIGNALS]


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


def _count_targets(target_batch: torch.Tensor) -> torch.Tensor:
    return (target_batch != IGNORE_INDEX).sum()


def in_chunks(loss_fn: LossFn, rows: int) -> LossFn:
    """``loss_fn`` computed ``rows`` rows of a batch at a time, the chunks' means weighted by
    their numbers of targets: the same mean over the batch's targets, in less memory."""

    def chunked_loss(input_batch, target_batch, model, device):
        if len(input_batch) <= rows:
            return loss_fn(input_batch, target_batch, model, device)
        chunks = list(zip(input_batch.split(rows), target_batch.split(rows), strict=True))
        *counts, n_targets = torch.stack(
            [_count_targets(t) for _, t in chunks] + [_count_targets(target_batch)]
        ).tolist()
        if not n_targets:  # nothing to predict: nan, like the course's loss
            return loss_fn(input_batch, target_batch, model, device)
        total = 0.0
        for (inputs, targets), n in zip(chunks, counts, strict=True):
            if n:  # (a chunk without targets has a NaN mean and adds nothing)
                total = total + loss_fn(inputs, targets, model, device) * (n / n_targets)
        return total

    return chunked_loss


def with_precision(loss_fn: LossFn, device: torch.device | str, precision: str) -> LossFn:
    """``loss_fn`` under bf16 autocast (``precision="bf16"``), or as it is (``"fp32"``)."""
    if precision == "fp32":
        return loss_fn
    device_type = torch.device(device).type

    def bf16_loss(*args):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return loss_fn(*args)

    return bf16_loss


def _batch_rows(loader: Any) -> int | None:
    """The number of entries in a loader's batches (None when it does not say)."""
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        if getattr(owner, "batch_size", None):
            return owner.batch_size
    return None


class ResumableRun(TrainingRun):
    """The pieces of a real run, for ``train_model_simple``'s ``run`` (see the module).

    Checkpoints go to ``checkpoint_path`` (none when None) every ``checkpoint_every`` steps
    (0: only at the end of each epoch and on an interrupt); ``resume=True`` continues from
    the checkpoint there, if any. The loaders' batches are global batches: each step splits
    one over ``ranks`` and then into ``grad_accum`` micro-batches (also the chunks in which
    evaluation runs). Only rank 0 evaluates, prints and saves checkpoints.
    ``history_type`` is the class of ``state.history`` (what the evaluations record).
    """

    def __init__(
        self,
        *,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        grad_accum: int = 1,
        ranks: Ranks = SINGLE_PROCESS,
        history_type: type | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint_path, self.checkpoint_every = checkpoint_path, checkpoint_every
        self.resume, self.grad_accum, self.ranks = resume, grad_accum, ranks
        self.is_main = ranks.is_main
        self.history_type = history_type or type(self.state.history)
        self.state = TrainState(history=self.history_type(), world_size=ranks.world_size)
        self.stop, self.resumed = StopRequests(), None
        self.shuffle: dict = {"epoch_start": None, "now": None}
        self.step_flags: list[float] = []
        self.n_targets = 0  # of the global batch in progress

    def start(self, *pieces: Any) -> None:
        """``TrainingRun.start``: a step's loss on every rank (DDP: several ranks), and the
        evaluations' in chunks of a micro-batch (in a step's memory)."""
        super().start(*pieces)
        self.step_loss = data_parallel(self.model, self.loss_fn, self.device, self.ranks)
        rows = _batch_rows(self.train_loader)
        chunk = rows // (self.ranks.world_size * self.grad_accum) if rows else 0
        if 0 < chunk < rows:
            self.eval_loss_fn = in_chunks(self.loss_fn, chunk)

    # --- before and after the loop ---------------------------------------------------------

    def __enter__(self) -> TrainState:
        self.stop.__enter__()
        try:
            if self.resume:
                self._resume_state()
            self.before_training(self.state)
            self._stop_here_if_asked(sum_across(self.stop.flags(), self.ranks))
        except BaseException:
            self.stop.__exit__()
            raise
        self.started = time.monotonic()
        return self.state

    def __exit__(self, *exc: object) -> None:
        self.stop.__exit__()
        if exc[0] is None:  # every rank returns rank 0's state
            self.state = broadcast(self.state, self.ranks)

    def _resume_state(self) -> None:
        """Continue from the checkpoint at ``checkpoint_path``, if there is one (every rank
        reads the same file)."""
        path, ranks = self.checkpoint_path, self.ranks
        found = path is not None and Path(path).is_file()
        n_found = round(sum_across([float(found)], ranks)[0])
        if 0 < n_found < ranks.world_size:
            raise ChapterError(
                f"{path} is visible to {n_found} of {ranks.world_size} processes; resuming "
                "under torchrun needs the run folder on a filesystem that every machine shares"
            )
        if not found:
            return
        state, self.resumed = load_checkpoint(path, self.model, self.optimizer)
        if state.world_size != ranks.world_size:
            raise ChapterError(
                f"{path} was trained by {state.world_size} process(es) and this run has "
                f"{ranks.world_size}, which would change the global batch; resume it with "
                f"{state.world_size} process(es) in all (torchrun --nnodes x --nproc_per_node)"
            )
        state.history = self.history_type(**state.history)
        self.state = state
        if self.is_main:
            tqdm.write(
                f"Resuming from {path}: epoch {state.epoch + 1}, step {state.global_step + 1}"
            )

    def before_training(self, state: TrainState) -> None:
        """The losses before training, as the chapter prints them (once per run)."""
        if self.is_main and not state.initial_losses:
            state.initial_losses = list(
                evaluate_model(
                    self.model,
                    self.train_loader,
                    self.val_loader,
                    self.device,
                    self.eval_iter,
                    loss_fn=self.eval_loss_fn,
                )
            )
            tqdm.write(f"Initial training loss: {state.initial_losses[0]:.3f}")
            tqdm.write(f"Initial validation loss: {state.initial_losses[1]:.3f}")

    # --- the steps ---------------------------------------------------------------------------

    def batches(self, train_loader, state: TrainState) -> Iterator:
        sync_generator(_shuffle_generator(train_loader), self.ranks)  # one order for all ranks
        batches = _epoch_batches(train_loader, self.shuffle, self.resumed, state.batches_done)
        self.resumed = None
        return batches

    def micro_batches(self, batch) -> Iterator[tuple[tuple, float]]:
        """This rank's rows of the global batch, in ``grad_accum`` parts, each with its share
        of the global batch's targets (times the number of ranks, whose gradients
        ``DistributedDataParallel`` averages). One rank and ``grad_accum=1``: the whole batch,
        share 1, the course's step exactly. One process skips a part without targets (its
        share is 0; its mean, NaN, would spoil the gradients)."""
        input_batch, target_batch = batch
        mine = rank_rows(len(input_batch), self.ranks)
        parts = list(
            zip(
                input_batch[mine].tensor_split(self.grad_accum),
                target_batch[mine].tensor_split(self.grad_accum),
                strict=True,
            )
        )
        *counts, self.n_targets = torch.stack(
            [_count_targets(t) for _, t in parts] + [_count_targets(target_batch)]
        ).tolist()  # (the one wait for the device before the step)
        no_sync = getattr(self.step_loss, "no_sync", None)  # (DDP: average the gradients once)
        for i, (part, n) in enumerate(zip(parts, counts, strict=True)):
            if n == 0 and not self.ranks.distributed:
                continue
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                yield part, n * self.ranks.world_size / max(self.n_targets, 1)

    def check_loss(self, loss, state: TrainState) -> None:
        """Stop on a NaN or infinite loss (of the whole global batch, on any rank), before the
        optimizer applies it. The stop requests ride along in the same reduction."""
        values = torch.zeros(1 + len(STOP_SIGNALS), dtype=torch.float64)
        values[0] = loss if self.n_targets else math.nan
        values[1:] = torch.tensor(self.stop.flags(), dtype=torch.float64)
        total, *self.step_flags = sum_across(values, self.ranks)
        if not math.isfinite(total):
            raise NonFiniteLossError(
                f"the training loss is {total / self.ranks.world_size} at step "
                f"{state.global_step + 1} (epoch {state.epoch + 1}); training stopped. "
                "Try a lower learning rate."
            )

    def evaluate(self, model, train_loader, val_loader, device, eval_iter, state) -> None:
        if self.is_main:
            super().evaluate(model, train_loader, val_loader, device, eval_iter, state)

    def end_step(self, state: TrainState) -> None:
        self._count_time(state)
        self._stop_here_if_asked(self.step_flags)
        if self.checkpoint_every and (state.global_step + 1) % self.checkpoint_every == 0:
            self.checkpoint()

    def end_epoch(self, state: TrainState) -> None:
        self._count_time(state)
        state.finished = state.epoch == self.num_epochs
        self.checkpoint()

    # --- the small pieces -------------------------------------------------------------------

    def _count_time(self, state: TrainState) -> None:
        now = time.monotonic()
        state.seconds, self.started = state.seconds + now - self.started, now

    def checkpoint(self) -> None:
        if self.checkpoint_path is not None and self.is_main:
            generator = _shuffle_generator(self.train_loader)
            self.shuffle["now"] = None if generator is None else generator.get_state()
            state, shuffle = self.state, self.shuffle
            save_checkpoint(self.checkpoint_path, self.model, self.optimizer, state, shuffle)

    def _stop_here_if_asked(self, flags: list[float]) -> None:
        """Save and stop when a signal reached any rank (``flags``: summed over the ranks), so
        that all stop after the same step."""
        if any(flags):
            self.checkpoint()
            barrier(self.ranks)  # (no rank leaves before the checkpoint is saved)
            path = self.checkpoint_path
            saved = f"; checkpoint saved to {path}" if path else ""
            raise TrainingInterrupted(
                f"{STOP_SIGNALS[flags.index(max(flags))]}: training stopped after step "
                f"{self.state.global_step}{saved}"
            )
