"""Chapter 5 of the course, pretraining: the losses, the training loop, the loss plot, and
loading OpenAI's GPT-2 weights into the model.

- ``calc_loss_batch``, ``calc_loss_loader``, ``evaluate_model``: the next-token loss,
- ``train_model_simple``: the only training loop; ``TrainingRun`` holds the pieces it calls,
  which real runs extend (``runtime.trainer.ResumableRun``, ``course.dpo.DPORun``),
- ``plot_losses`` and ``load_weights_into_gpt`` (chapter 5.5).

It builds on the model and ``generate`` of ``previous_chapters.py`` (chapters 2-4) and is
imported downwards only: this module imports ``previous_chapters``, never the other way at
import time. The book's readers still find every name here under ``previous_chapters``
(``from previous_chapters import train_model_simple``): that module serves them on first
use (PEP 562's module ``__getattr__``). The code of the library and of the course imports
them from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from previous_chapters import (
    CHAPTER_5_NAMES,
    GPTModel,
    generate,
    text_to_token_ids,
    token_ids_to_text,
)
from runtime.progress_bars import progress_bar

# ---------------------------------------------------------------------------
# Training (chapter 5)
# ---------------------------------------------------------------------------

LossFn = Callable[..., torch.Tensor]  # (input_batch, target_batch, model, device) -> loss


def calc_loss_batch(
    input_batch: torch.Tensor,
    target_batch: torch.Tensor,
    model: nn.Module,
    device: torch.device | str,
) -> torch.Tensor:
    """Mean cross-entropy of the next-token predictions; targets of -100 are ignored."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(
    data_loader: Iterable,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
    *,
    loss_fn: LossFn = calc_loss_batch,
) -> float:
    """Mean batch loss over the first ``num_batches`` batches (all when None; nan when empty).

    The batch losses stay on the device until all are computed: one wait for it, not one
    per batch (the sum is the course's, in Python floats).
    """
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    losses = []
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        losses.append(loss_fn(input_batch, target_batch, model, device))
    return sum(torch.stack(losses).tolist()) / num_batches


def evaluate_model(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    device: torch.device | str,
    eval_iter: int,
    *,
    loss_fn: LossFn = calc_loss_batch,
) -> tuple[float, float]:
    """(training loss, validation loss) over ``eval_iter`` batches each, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, loss_fn=loss_fn)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, loss_fn=loss_fn)
    model.train(was_training)
    return train_loss, val_loss


def generate_and_print_sample(
    model: nn.Module, tokenizer: Any, device: torch.device | str, start_context: str
) -> str:
    """Print (and return) 50 greedy tokens continuing ``start_context``, on one line."""
    was_training = model.training
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens=50, context_size=context_size)
    text = token_ids_to_text(token_ids, tokenizer).replace("\n", " ")
    tqdm.write(text)
    model.train(was_training)
    return text


@dataclass
class LossHistory:
    """What the course's loop records at each evaluation."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)


@dataclass
class LoopState:
    """Where ``train_model_simple`` stands: its counters and what it recorded so far."""

    epoch: int = 0  # the epoch in progress
    batches_done: int = 0  # batches of that epoch already trained
    global_step: int = -1  # 0 after the first step, as in the course
    tokens_seen: int = 0
    history: Any = field(default_factory=LossHistory)


class TrainingRun:
    """The pieces ``train_model_simple`` calls, as the course's loop has them: a fresh start,
    one whole batch per step, no checks, nothing saved. Real runs extend them:
    ``trainer.ResumableRun`` (checkpoints, resume, stop requests, the non-finite-loss stop,
    gradient accumulation, torchrun) and ``dpo.DPORun`` (DPO's batches and metrics)."""

    is_main = True  # (under torchrun only rank 0 evaluates and prints)

    def __init__(self) -> None:
        self.state = LoopState()

    def start(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Iterable,
        val_loader: Iterable,
        device: torch.device | str,
        eval_iter: int,
        num_epochs: int,
        loss_fn: LossFn,
    ) -> None:
        """Take the loop's pieces, which a real run also uses between the loop's calls (to
        save, resume, evaluate). ``step_loss(*inputs)`` is the loss of a training step,
        ``eval_loss_fn`` the loss function of the evaluations."""
        self.model, self.optimizer, self.device = model, optimizer, device
        self.train_loader, self.val_loader, self.eval_iter = train_loader, val_loader, eval_iter
        self.num_epochs, self.loss_fn, self.eval_loss_fn = num_epochs, loss_fn, loss_fn
        self.step_loss: Callable = lambda *inputs: loss_fn(*inputs, model, device)

    def __enter__(self) -> LoopState:
        return self.state

    def __exit__(self, *exc: object) -> None:
        pass

    def batches(self, train_loader: Iterable, state: LoopState) -> Iterable:
        return train_loader

    def micro_batches(self, batch: Any) -> Iterable[tuple[Any, float]]:
        """The parts of a batch that each get a backward pass, with their shares of the loss."""
        yield batch, 1.0

    def check_loss(self, loss: torch.Tensor, state: LoopState) -> None:
        pass

    def count_tokens(self, batch: Any) -> int:
        return batch[0].numel()

    def evaluate(self, model, train_loader, val_loader, device, eval_iter, state) -> None:
        """The course's periodic evaluation: record and print both losses."""
        train_loss, val_loss = evaluate_model(
            model, train_loader, val_loader, device, eval_iter, loss_fn=self.eval_loss_fn
        )
        state.history.train_losses.append(train_loss)
        state.history.val_losses.append(val_loss)
        state.history.track_tokens_seen.append(state.tokens_seen)
        tqdm.write(
            f"Ep {state.epoch + 1} (Step {state.global_step:06d}): "
            f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
        )

    def end_step(self, state: LoopState) -> None:
        pass

    def end_epoch(self, state: LoopState) -> None:
        pass


def train_model_simple(
    model: nn.Module,
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
    progress: bool = True,
    run: TrainingRun | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """The course's training loop; returns (train_losses, val_losses, track_tokens_seen).

    Every ``eval_freq`` steps (from step 0) it measures the loss on ``eval_iter`` batches of
    each loader and prints it; after each epoch it prints a sample continuing
    ``start_context``. Additions to the course: a progress bar (``progress``), ``loss_fn``
    (any function with ``calc_loss_batch``'s signature and value), and ``run``, the pieces
    a real run adds (see ``TrainingRun``; None: the course's loop as it is).
    """
    run = run or TrainingRun()
    run.start(model, optimizer, train_loader, val_loader, device, eval_iter, num_epochs, loss_fn)
    steps = num_epochs * len(train_loader)
    # (the bar appears once the run has started: a checkpoint that fails to load draws none)
    enabled = progress and run.is_main
    with run as state, progress_bar(total=steps, unit="step", enabled=enabled) as bar:
        bar.update(state.epoch * len(train_loader) + state.batches_done)
        while state.epoch < num_epochs:
            model.train()
            for batch in run.batches(train_loader, state):
                optimizer.zero_grad()
                batch_loss = 0.0  # (on the device: the loop never waits for it)
                for inputs, share in run.micro_batches(batch):
                    loss = run.step_loss(*inputs)
                    (loss * share).backward()
                    batch_loss += loss.detach() * share
                run.check_loss(batch_loss, state)
                optimizer.step()
                state.tokens_seen += run.count_tokens(batch)
                state.global_step += 1
                state.batches_done += 1
                bar.update()
                if state.global_step % eval_freq == 0:
                    run.evaluate(model, train_loader, val_loader, device, eval_iter, state)
                run.end_step(state)
            if run.is_main:
                generate_and_print_sample(model, tokenizer, device, start_context)
            state.epoch, state.batches_done = state.epoch + 1, 0
            run.end_epoch(state)
    history = state.history
    return history.train_losses, history.val_losses, history.track_tokens_seen


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[int],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    *,
    save_path: str | os.PathLike | None = None,
):
    """Training and validation loss against epochs, with tokens seen on a second x-axis."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # the same curve against tokens seen, drawn invisibly to set the top axis
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if save_path is not None:
        fig.savefig(save_path)
    return fig


# ---------------------------------------------------------------------------
# Loading OpenAI's GPT-2 weights (chapter 5)
# ---------------------------------------------------------------------------


def _lookup(params: Mapping[str, Any], name: str) -> torch.Tensor:
    """params["blocks"][3]["attn"]["c_attn"]["w"] for the name "blocks[3].attn.c_attn.w"."""
    node: Any = params
    for part in name.replace("[", ".").replace("]", "").split("."):
        try:
            node = node[int(part) if part.isdigit() else part]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"GPT-2 params lack {name!r}") from None
    return torch.as_tensor(node)


def load_weights_into_gpt(gpt: GPTModel, params: Mapping[str, Any]) -> None:
    """Copy OpenAI's GPT-2 weights (the course's ``params`` layout) into ``gpt``.

    Every tensor's shape is checked before anything is copied, so on a mismatch the
    ValueError names the tensor and the model is left untouched. OpenAI stores matrices as
    [in, out] and ``nn.Linear`` as [out, in], hence the transposes (``.T``); the output head
    shares the token embedding's weights, as in GPT-2.
    """
    n_blocks = len(params.get("blocks", []))
    if n_blocks != len(gpt.trf_blocks):
        raise ValueError(
            f"params have {n_blocks} blocks but the model has n_layers={len(gpt.trf_blocks)}; "
            "build the model with the config of the checkpoint's size"
        )
    if gpt.trf_blocks[0].att.qkv.bias is None:
        raise ValueError("GPT-2 has query/key/value biases: build the model with qkv_bias=True")
    pairs = [(gpt.tok_emb.weight, "wte"), (gpt.pos_emb.weight, "wpe")]
    for i, block in enumerate(gpt.trf_blocks):
        p = f"blocks[{i}]"
        pairs += [
            (block.att.qkv.weight, f"{p}.attn.c_attn.w.T"),
            (block.att.qkv.bias, f"{p}.attn.c_attn.b"),
            (block.att.out_proj.weight, f"{p}.attn.c_proj.w.T"),
            (block.att.out_proj.bias, f"{p}.attn.c_proj.b"),
            (block.ff.layers[0].weight, f"{p}.mlp.c_fc.w.T"),
            (block.ff.layers[0].bias, f"{p}.mlp.c_fc.b"),
            (block.ff.layers[2].weight, f"{p}.mlp.c_proj.w.T"),
            (block.ff.layers[2].bias, f"{p}.mlp.c_proj.b"),
            (block.norm1.weight, f"{p}.ln_1.g"),
            (block.norm1.bias, f"{p}.ln_1.b"),
            (block.norm2.weight, f"{p}.ln_2.g"),
            (block.norm2.bias, f"{p}.ln_2.b"),
        ]
    pairs += [
        (gpt.final_norm.weight, "g"),
        (gpt.final_norm.bias, "b"),
        (gpt.out_head.weight, "wte"),
    ]

    values = []
    for param, name in pairs:
        key, transposed = name.removesuffix(".T"), name.endswith(".T")
        raw = _lookup(params, key)
        value = raw.T if transposed else raw  # OpenAI's [in, out] -> nn.Linear's [out, in]
        if value.shape != param.shape:
            wanted = param.T.shape if transposed else param.shape
            raise ValueError(f"{key}: expected {tuple(wanted)}, got {tuple(raw.shape)}")
        values.append(value)
    with torch.no_grad():
        for (param, _), value in zip(pairs, values, strict=True):
            param.copy_(value)


__all__ = list(CHAPTER_5_NAMES)  # (previous_chapters serves these names from here)
