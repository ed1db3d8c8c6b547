"""Chapter 7, sections 7.5-7.7: the pretrained model, fine-tuning, and the test-set responses.

    build_model (GPT-2's weights into GPTModel) -> finetune (the course's training loop)
    -> generate_responses (batched, greedy) -> extract_response

The training and generation themselves are the course's (``course/pretraining.py``,
``previous_chapters.py``); this module chooses the fast engine for them explicitly:
``engine.packed_loss_batch`` as the loss, fused AdamW, and ``engine.generate_batch`` for the
responses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import gpt_download
from course.instruction_data import (
    EOS_TOKEN_ID,
    PromptStyle,
    first_few,
    format_input,
    get_prompt_style,
)
from course.pretraining import LossFn, load_weights_into_gpt, plot_losses, train_model_simple
from previous_chapters import GPTModel, gpt2_config, gpt2_config_from_hparams, resolve_model_name
from runtime.engine import generate_batch, in_precision, make_optimizer, packed_loss_batch
from runtime.trainer import ResumableRun, with_precision

# --------------------------------------------------------------------------------------
# 7.5 Loading a pretrained LLM
# --------------------------------------------------------------------------------------


def build_model(
    model_size: str | dict = "gpt2-medium (355M)",
    *,
    pretrained: bool = True,
    models_dir: str | os.PathLike = "gpt2",
    overrides: dict | None = None,
    device: str | torch.device = "cpu",
    seed: int = 123,
) -> tuple[GPTModel, dict]:
    """A ``GPTModel`` in eval mode, and its config.

    ``pretrained=True`` downloads OpenAI's GPT-2 weights of ``model_size`` once into
    ``models_dir/<size>`` and loads them; the model's shapes come from the checkpoint's
    hparams.json. Otherwise the weights are random (seeded by ``seed``), and ``model_size``
    may also be a full config dict.
    """
    if isinstance(model_size, dict):
        if pretrained:
            raise ValueError("pretrained=True needs a GPT-2 size name, not a config dict")
        cfg = {**model_size, **(overrides or {})}
    else:
        cfg = gpt2_config(model_size, **(overrides or {}))
    params = None
    if pretrained:  # fetch the weights before building anything
        tag = resolve_model_name(model_size).split(" ")[1].strip("()")  # "355M"
        settings, params = gpt_download.download_and_load_gpt2(tag, models_dir)
        # the checkpoint fixes the shapes; dropout and the qkv bias stay as configured
        cfg = gpt2_config_from_hparams(
            settings, drop_rate=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"]
        )
    torch.manual_seed(seed)  # the random initialisation (overwritten by GPT-2's weights)
    model = GPTModel(cfg)
    if params is not None:
        load_weights_into_gpt(model, params)
    return model.to(device).eval(), cfg


# --------------------------------------------------------------------------------------
# 7.6 Fine-tuning
# --------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    """What ``finetune`` reports: the losses before, during and after training; its time."""

    initial_train_loss: float
    initial_val_loss: float
    train_losses: list[float]
    val_losses: list[float]
    tokens_seen: list[int]
    num_epochs: int
    minutes: float

    @property
    def final_train_loss(self) -> float | None:
        return self.train_losses[-1] if self.train_losses else None

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[-1] if self.val_losses else None

    @classmethod
    def of_state(cls, state: Any, num_epochs: int) -> TrainingResult:
        """The result of a finished ``trainer.TrainState``."""
        history = state.history
        losses = (history.train_losses, history.val_losses, history.track_tokens_seen)
        return cls(*state.initial_losses, *losses, num_epochs, state.seconds / 60)


def restart_shuffling(loader: Any, seed: int) -> None:
    """Reseed a loader's shuffling, so the batch order depends only on ``seed``, not on
    whatever iterated the loader before."""
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        generator = getattr(owner, "generator", None)
        if generator is not None:
            generator.manual_seed(seed)


def start_training(
    model: torch.nn.Module,
    train_loader: Any,
    val_loader: Any,
    lr: float,
    weight_decay: float,
    seed: int,
    start_context: str | None = None,
) -> tuple[torch.optim.Optimizer, str]:
    """7.6's start: the seed, the loader's order restarted from it, and AdamW; returns the
    optimizer and the prompt continued after each epoch (by default the first validation
    entry's, as in the course)."""
    if start_context is None:
        start_context = format_input(val_loader.dataset.data[0], val_loader.dataset.style)
    torch.manual_seed(seed)
    restart_shuffling(train_loader, seed)
    return make_optimizer(model, lr=lr, weight_decay=weight_decay), start_context


def finetune(
    model: torch.nn.Module,
    train_loader: Any,
    val_loader: Any,
    tokenizer: Any,
    *,
    num_epochs: int = 2,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    eval_freq: int = 5,
    eval_iter: int = 5,
    start_context: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 123,
    progress: bool = True,
    loss_fn: LossFn = packed_loss_batch,
    precision: str = "fp32",
    **resumable: Any,
) -> TrainingResult:
    """Section 7.6: AdamW on the chapter's settings, trained by the course's loop.

    The loop is the course's ``train_model_simple``, with ``trainer.ResumableRun``'s
    pieces (``resumable``: its keywords): the losses before training,
    checkpoints at ``checkpoint_path`` every ``checkpoint_every`` steps, and ``resume``.
    The fast engine is chosen here: ``loss_fn`` is ``engine.packed_loss_batch`` (the
    course's ``calc_loss_batch`` gives the same numbers, slower) and AdamW is fused.
    The loaders' batches are global batches: ``grad_accum`` micro-batches on each of the
    ``ranks`` (torchrun's processes) make one step, the same step as one batch that size
    (see ``trainer``); ``precision="bf16"`` runs the losses under bf16 autocast.
    """
    optimizer, start_context = start_training(
        model, train_loader, val_loader, lr, weight_decay, seed, start_context
    )
    run = ResumableRun(**resumable)
    train_model_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        device,
        num_epochs=num_epochs,
        eval_freq=eval_freq,
        eval_iter=eval_iter,
        start_context=start_context,
        tokenizer=tokenizer,
        loss_fn=with_precision(loss_fn, device, precision),
        progress=progress,
        run=run,
    )
    result = TrainingResult.of_state(run.state, num_epochs)
    print(f"Training completed in {result.minutes:.2f} minutes.")
    model.eval()
    return result


def plot_training(result: TrainingResult):
    """The chapter's loss plot: training and validation loss over epochs and tokens seen."""
    epochs_seen = torch.linspace(0, result.num_epochs, len(result.train_losses))
    return plot_losses(epochs_seen, result.tokens_seen, result.train_losses, result.val_losses)


# --------------------------------------------------------------------------------------
# 7.7 Extracting and saving responses
# --------------------------------------------------------------------------------------


def extract_response(generated: str, style: str | PromptStyle = "alpaca") -> str:
    """The answer in generated text: without the response marker and surrounding space."""
    marker = get_prompt_style(style).response_marker
    text = generated.strip()
    if text.startswith(marker):
        text = text[len(marker) :]
    return text.strip()


def fit_prompt(
    entry: dict, tokenizer: Any, style: str | PromptStyle, budget: int
) -> tuple[list[int], bool]:
    """The prompt's token ids, at most ``budget`` of them; and whether it had to be shortened.

    A prompt that is too long loses the end of its input field, never the header or the
    instruction (only an instruction that alone is too long is cut, at its end).
    """
    ids = tokenizer.encode(format_input(entry, style))
    if len(ids) <= budget:
        return ids, False
    input_ids = tokenizer.encode(entry["input"])
    keep = len(input_ids) - (len(ids) - budget)
    while keep > 0:
        shortened = {**entry, "input": tokenizer.decode(input_ids[:keep])}
        ids = tokenizer.encode(format_input(shortened, style))
        if len(ids) <= budget:  # (tokens can merge differently at the cut: re-check)
            return ids, True
        keep -= 1
    return tokenizer.encode(format_input({**entry, "input": ""}, style))[:budget], True


def generate_responses(
    model: torch.nn.Module,
    test_data: Sequence[dict],
    tokenizer: Any,
    *,
    context_size: int,
    style: str | PromptStyle = "alpaca",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    eos_id: int = EOS_TOKEN_ID,
    json_key: str = "model_response",
    progress: bool = True,
    precision: str = "fp32",
) -> list[dict]:
    """Greedy responses to every entry; copies of the entries with ``json_key`` added.

    The course generates one entry at a time with ``generate``; ``engine.generate_batch``
    gives each entry the same tokens, ``batch_size`` entries at a time, each stopping at its
    own end-of-text token. A prompt longer than the context minus ``max_new_tokens`` would
    lose its beginning, the instruction, as generation goes on; its input is shortened to
    fit instead (``fit_prompt``), and reported. ``precision="bf16"``: generated by a bf16
    copy of the model (``engine.in_precision``).
    """
    budget = max(context_size - max_new_tokens, context_size // 2)
    fitted = [fit_prompt(entry, tokenizer, style, budget) for entry in test_data]
    shortened = [i for i, (_, cut) in enumerate(fitted) if cut]
    if shortened:
        print(
            f"{len(shortened)} of {len(test_data)} prompts are longer than {budget} tokens (the "
            "context minus max_new_tokens); their input was shortened to fit: entries "
            + first_few(shortened)
        )
    model.eval()
    new_tokens = generate_batch(
        in_precision(model, precision),
        [ids for ids, _ in fitted],
        max_new_tokens,
        context_size,
        eos_id=eos_id,
        batch_size=batch_size,
        progress=progress,
    )
    responses = [extract_response(tokenizer.decode(tokens), style) for tokens in new_tokens]
    return [{**entry, json_key: text} for entry, text in zip(test_data, responses, strict=True)]


def generate_test_responses(
    cfg: Any,
    model: torch.nn.Module,
    test_data: list[dict],
    tokenizer: Any,
    *,
    progress: bool = True,
    precision: str = "fp32",
) -> list[dict]:
    """``generate_responses`` with a run's settings (``RunConfig`` or ``DPOConfig``): its
    prompt style, ``max_new_tokens`` and ``gen_batch_size``, in the model's context."""
    return generate_responses(
        model,
        test_data,
        tokenizer,
        context_size=model.context_length,
        style=cfg.prompt_style,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.gen_batch_size,
        progress=progress,
        precision=precision,
    )
