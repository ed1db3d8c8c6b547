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

It also trains on global batches bigger than one device holds, and on several processes
(``distributed.py``): ``grad_accum`` steps of accumulated gradients and ``ranks.world_size``
processes under torchrun. The loss of a step is defined as the course defines it for one
batch: the mean cross-entropy over all non-ignored targets of the global batch. Each
micro-batch's mean is therefore weighted by its share of the global batch's targets (token-
weighted, not the mean of micro-batch means), so that accumulating K micro-batches, or
splitting a batch over N ranks, gives the very update of one K (or N) times larger batch.

Like the chapter's ``finetune`` it first measures and prints the losses before training.
"""

from __future__ import annotations

import contextlib
import math
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

from distributed import (
    SINGLE_PROCESS,
    Ranks,
    barrier,
    broadcast,
    data_parallel,
    rank_rows,
    sum_across,
    sync_generator,
)
from engine import IGNORE_INDEX
from instruction_data import ChapterError
from outputs import keep_previous, load_failure, verify_file, write_atomically
from previous_chapters import LossFn, calc_loss_batch, evaluate_model, generate_and_print_sample
from progress_bars import progress_bar


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
    world_size: int = 1  # processes that trained it (the global batch depends on it)


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
    """Write a checkpoint atomically: a crash while saving keeps the previous one whole.

    The checkpoint it replaces is kept as ``NAME.prev.pt``, and each has its checksum beside
    it (``outputs.checksum_path``), so that a damaged checkpoint can fall back on the one
    before it. A full disk raises ``outputs.OutputError``: the earlier checkpoints stay.
    """
    path = Path(path)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "shuffle": shuffle,
        "rng": _rng_states(),
    }
    keep_previous(path, path.with_name(f"{path.stem}.prev{path.suffix}"))
    return write_atomically(path, lambda tmp: torch.save(checkpoint, tmp), checksum=True)


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[TrainState, dict]:
    """Restore the model, optimizer and random states; returns (state, shuffle states).

    The file is checked first (its checksum, then its contents). A damaged checkpoint falls
    back on the previous one (``NAME.prev.pt``) when that one is whole, and says so;
    otherwise it raises ``ChapterError`` with one line that says what to do.
    """
    path = Path(path)
    previous = path.with_name(f"{path.stem}.prev{path.suffix}")
    defaults = asdict(TrainState())

    def restore(file: Path) -> tuple[TrainState, dict]:
        verify_file(file, "delete it (and its .sha256) to train from the start")
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            saved, shuffle = dict(checkpoint["state"]), dict(checkpoint["shuffle"])
            state = TrainState(**saved)
            wrong = [  # (a field's value of its default's type; a float may be an int)
                k
                for k, v in saved.items()
                if defaults[k] is not None
                and not isinstance(
                    v, (int, float) if isinstance(defaults[k], float) else type(defaults[k])
                )
            ]
            if wrong or not {"epoch_start", "now"} <= set(shuffle):
                raise ValueError(f"its training state is malformed ({(wrong or ['shuffle'])[0]})")
            _set_rng_states(checkpoint["rng"])
        except Exception as exc:  # pickle errors, a truncated zip, a wrong structure, ...
            raise ChapterError(
                f"{file} is not a usable checkpoint of this model ({load_failure(exc)}); "
                "delete it to train from the start"
            ) from None
        return state, shuffle

    try:
        return restore(path)
    except ChapterError as exc:
        if not previous.is_file():
            raise
        try:
            restored = restore(previous)
        except ChapterError:
            raise exc from None
        print(f"warning: {exc}; resuming from the previous checkpoint {previous} instead")
        return restored


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


def _count_targets(target_batch: torch.Tensor) -> int:
    return int((target_batch != IGNORE_INDEX).sum())


def in_chunks(loss_fn: LossFn, rows: int) -> LossFn:
    """``loss_fn`` computed ``rows`` rows of a batch at a time, the chunks' means weighted by
    their numbers of targets: the same mean over the batch's targets, in less memory."""

    def chunked_loss(input_batch, target_batch, model, device):
        if len(input_batch) <= rows:
            return loss_fn(input_batch, target_batch, model, device)
        total, n_targets = 0.0, _count_targets(target_batch)
        for inputs, targets in zip(input_batch.split(rows), target_batch.split(rows), strict=True):
            n = _count_targets(targets)
            if n:  # (a chunk without targets has a NaN mean and adds nothing)
                total = total + loss_fn(inputs, targets, model, device) * (n / n_targets)
        return total if n_targets else loss_fn(input_batch, target_batch, model, device)

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


def _train_step(
    step_loss, optimizer, batch, state: TrainState, grad_accum: int, ranks: Ranks
) -> None:
    """One optimizer step on a global batch; refuses a non-finite loss.

    This rank's rows of the batch run as ``grad_accum`` micro-batches, each loss weighted by
    its share of the global batch's targets (times the number of ranks, whose gradients
    ``DistributedDataParallel`` averages). With one rank and ``grad_accum=1`` this is the
    course's step exactly. ``step_loss(inputs, targets)`` is ``distributed.data_parallel``.
    """
    input_batch, target_batch = batch
    optimizer.zero_grad()
    n_targets = _count_targets(target_batch)  # of the whole global batch
    mine = rank_rows(len(input_batch), ranks)
    micro = zip(
        input_batch[mine].tensor_split(grad_accum),
        target_batch[mine].tensor_split(grad_accum),
        strict=True,
    )
    loss_sum = 0.0  # of this rank's targets
    for i, (inputs, targets) in enumerate(micro):
        last = i == grad_accum - 1
        no_sync = getattr(step_loss, "no_sync", None)  # (DDP: average the gradients once)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            loss = step_loss(inputs, targets)
            n = _count_targets(targets)
            (loss * (n * ranks.world_size / max(n_targets, 1))).backward()
        loss_sum += loss.item() * n if n else 0.0
    batch_loss = sum_across([loss_sum], ranks)[0] / n_targets if n_targets else math.nan
    if not math.isfinite(batch_loss):
        raise NonFiniteLossError(
            f"the training loss is {batch_loss} at step {state.global_step + 1} "
            f"(epoch {state.epoch + 1}); training stopped. Try a lower learning rate."
        )
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


def _resume_state(
    path: str | os.PathLike | None, model, optimizer, ranks: Ranks
) -> tuple[TrainState, dict | None]:
    """The state to continue from: the checkpoint at ``path`` if there is one (every rank
    reads the same file), else a fresh start."""
    found = path is not None and Path(path).is_file()
    n_found = round(sum_across([float(found)], ranks)[0])
    if 0 < n_found < ranks.world_size:
        raise ChapterError(
            f"{path} is visible to {n_found} of {ranks.world_size} processes; resuming under "
            "torchrun needs the run folder on a filesystem that every machine shares"
        )
    if not found:
        return TrainState(world_size=ranks.world_size), None
    state, shuffle = load_checkpoint(path, model, optimizer)
    if state.world_size != ranks.world_size:
        raise ChapterError(
            f"{path} was trained by {state.world_size} process(es) and this run has "
            f"{ranks.world_size}, which would change the global batch; resume it with "
            f"{state.world_size} process(es) in all (torchrun --nnodes x --nproc_per_node)"
        )
    return state, shuffle


def _batch_rows(loader: Any) -> int | None:
    """The number of entries in a loader's batches (None when it does not say)."""
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        if getattr(owner, "batch_size", None):
            return owner.batch_size
    return None


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
    grad_accum: int = 1,
    ranks: Ranks = SINGLE_PROCESS,
    precision: str = "fp32",
) -> TrainState:
    """``train_model_simple`` with checkpoints and resume (see the module's docstring).

    (Longer than our other functions on purpose: the loop stays in one piece, so that it
    reads side by side with the course's ``train_model_simple``.)

    Checkpoints go to ``checkpoint_path`` (none when None) every ``checkpoint_every`` steps
    (0: only at the end of each epoch and on an interrupt). ``resume=True`` continues from
    the checkpoint there, if any.

    The loaders' batches are global batches: each step splits one over ``ranks`` (this
    process's place under torchrun) and then into ``grad_accum`` micro-batches, which are
    also the chunks in which evaluation runs. ``precision="bf16"`` computes the losses
    under bf16 autocast. Only rank 0 evaluates, prints and saves checkpoints; every rank
    returns rank 0's state.
    """
    main = ranks.is_main
    state, resumed = TrainState(world_size=ranks.world_size), None
    if resume:
        state, resumed = _resume_state(checkpoint_path, model, optimizer, ranks)
        if resumed is not None and main:
            print(
                f"Resuming from {checkpoint_path}: epoch {state.epoch + 1}, "
                f"step {state.global_step + 1}"
            )
    shuffle = {"epoch_start": None, "now": None}
    loss_fn = with_precision(loss_fn, device, precision)
    step_loss = data_parallel(model, loss_fn, device, ranks)  # DDP with several ranks
    rows = _batch_rows(train_loader)
    eval_loss = in_chunks(loss_fn, rows // (ranks.world_size * grad_accum)) if rows else loss_fn

    def checkpoint() -> None:
        if checkpoint_path is not None and main:
            generator = _shuffle_generator(train_loader)
            shuffle["now"] = None if generator is None else generator.get_state()
            save_checkpoint(checkpoint_path, model, optimizer, state, shuffle)

    def stop_here_if_asked(stop: StopRequests) -> None:
        # a signal to any rank stops them all, after the same step
        asked = sum_across([float(stop.requested == name) for name in STOP_SIGNALS], ranks)
        if any(asked):
            checkpoint()
            barrier(ranks)  # (no rank leaves before the checkpoint is saved)
            saved = f"; checkpoint saved to {checkpoint_path}" if checkpoint_path else ""
            raise TrainingInterrupted(
                f"{STOP_SIGNALS[asked.index(max(asked))]}: training stopped after step "
                f"{state.global_step}{saved}"
            )

    bar = progress_bar(total=num_epochs * len(train_loader), unit="step", enabled=progress and main)
    bar.update(state.epoch * len(train_loader) + state.batches_done)
    started = time.monotonic()
    with StopRequests() as stop, contextlib.closing(bar):
        if main and not state.initial_losses:  # the losses before training, as the chapter
            state.initial_losses = list(
                evaluate_model(
                    model, train_loader, val_loader, device, eval_iter, loss_fn=eval_loss
                )
            )
            tqdm.write(f"Initial training loss: {state.initial_losses[0]:.3f}")
            tqdm.write(f"Initial validation loss: {state.initial_losses[1]:.3f}")
        stop_here_if_asked(stop)
        while state.epoch < num_epochs:
            model.train()
            sync_generator(_shuffle_generator(train_loader), ranks)  # one order for all ranks
            batches = _epoch_batches(train_loader, shuffle, resumed, state.batches_done)
            resumed = None
            for batch in batches:
                _train_step(step_loss, optimizer, batch, state, grad_accum, ranks)
                bar.update()
                if main and state.global_step % eval_freq == 0:
                    _evaluate(model, train_loader, val_loader, device, eval_iter, eval_loss, state)
                state.seconds, started = (
                    state.seconds + time.monotonic() - started,
                    time.monotonic(),
                )
                stop_here_if_asked(stop)
                if checkpoint_every and (state.global_step + 1) % checkpoint_every == 0:
                    checkpoint()
            if main:
                generate_and_print_sample(model, tokenizer, device, start_context)
            state.epoch, state.batches_done = state.epoch + 1, 0
            state.seconds, started = state.seconds + time.monotonic() - started, time.monotonic()
            state.finished = state.epoch == num_epochs
            checkpoint()
    return broadcast(state, ranks)
