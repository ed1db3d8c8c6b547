"""Direct Preference Optimization (DPO) from scratch: the loss, the log-probabilities, training.

DPO fine-tunes a *policy* model, starting from the chapter's fine-tuned (SFT) model, to make
the ``chosen`` answer of each preference pair more likely than the ``rejected`` one, measured
against a frozen copy of the SFT model, the *reference*:

    loss = -log sigmoid(beta * [(log pi(chosen) - log ref(chosen))
                                - (log pi(rejected) - log ref(rejected))])

where ``log pi(answer)`` is the policy's log-probability of the whole answer given the
prompt, the sum of its tokens' log-probabilities. ``compute_logprobs`` and
``compute_dpo_loss`` are the course's functions (same names and arguments);
``train_model_dpo_simple`` is its training loop, with the reward margin and the preference
accuracy tracked as well. ``sequence_logprobs`` gives ``compute_logprobs``'s numbers for a
model's answers while running the output head only on the answers' tokens.

Two details follow the course: the "rewards" it reports are the log-probability ratios
``log pi(answer) - log ref(answer)`` without the factor ``beta`` of the DPO paper's implicit
reward; and its defaults (beta 0.1, AdamW with lr 5e-6 and weight decay 0.01, one epoch).
One differs on purpose: the course averages the answer's token log-probabilities, the DPO
paper (and this module, by default) sums them; ``reduction="mean"`` gives the course's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from engine import ends_after_last
from previous_chapters import generate_and_print_sample
from trainer import NonFiniteLossError

REDUCTIONS = ("sum", "mean")
METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy")
LN2 = math.log(2)  # the DPO loss while the policy equals the reference


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


def _reduce(token_logprobs: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per row: the sum (or mean) of the log-probabilities where ``mask`` is True."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    total = (token_logprobs * mask).sum(-1)
    if reduction == "mean":
        return total / mask.sum(-1).clamp(min=1)  # a row with no answer token gives 0
    return total


def compute_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    selection_mask: torch.Tensor | None = None,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """The log-probability of each row's tokens [batch], as the course computes it.

    ``logits`` [batch, n, vocab] are the model's outputs for ``labels`` [batch, n] (the token
    ids that went in); position t predicts token t + 1, so the first token is never scored.
    ``selection_mask`` [batch, n] picks the tokens that count (the answer's); None: all.
    ``reduction="sum"`` adds them up (the DPO paper), ``"mean"`` averages them (the course).
    """
    labels = labels[:, 1:]  # token t + 1 ...
    logprobs = F.log_softmax(logits[:, :-1, :], dim=-1)  # ... predicted at position t
    token_logprobs = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if selection_mask is None:
        return _reduce(token_logprobs, torch.ones_like(labels, dtype=torch.bool), reduction)
    return _reduce(token_logprobs, selection_mask[:, 1:], reduction)


def compute_dpo_loss(
    model_chosen_logprobs: torch.Tensor,
    model_rejected_logprobs: torch.Tensor,
    reference_chosen_logprobs: torch.Tensor,
    reference_rejected_logprobs: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of a batch of pairs, and the mean chosen and rejected rewards.

    Each argument holds one log-probability per pair [batch]. A pair's reward is how much
    more likely the policy makes an answer than the reference does (the log ratio); the
    loss is -log sigmoid(beta * (chosen reward - rejected reward)), averaged over the batch:
    ln 2 = 0.693 while the policy equals the reference, smaller as the margin grows.
    The rewards are returned detached (for tracking), as the course does.
    """
    chosen_rewards = model_chosen_logprobs - reference_chosen_logprobs
    rejected_rewards = model_rejected_logprobs - reference_rejected_logprobs
    losses = -F.logsigmoid(beta * (chosen_rewards - rejected_rewards))
    return losses.mean(), chosen_rewards.detach().mean(), rejected_rewards.detach().mean()


# --------------------------------------------------------------------------------------
# Log-probabilities of a model's answers
# --------------------------------------------------------------------------------------


def sequence_logprobs(
    model: nn.Module,
    token_ids: torch.Tensor,
    selection_mask: torch.Tensor | None = None,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """``compute_logprobs(model(token_ids), token_ids, selection_mask)``, with less work.

    Positions after the last selected token cannot change the result (attention is causal),
    so they are cut off; the output head and the softmax over the vocabulary, the largest
    steps, run only where a selected token is predicted. Same value, same gradients.
    """
    mask = (
        torch.ones_like(token_ids, dtype=torch.bool) if selection_mask is None else selection_mask
    )
    end = max(int(ends_after_last(mask).amax()), 1)  # 1 + the last selected position
    ids, mask = token_ids[:, :end], mask[:, 1:end]  # mask[:, t - 1]: is token t scored?
    predicts = F.pad(mask, (0, 1))  # position t predicts token t + 1; the last predicts none
    picked = model(ids, head_mask=predicts)  # [selected tokens, vocab]
    token_logprobs = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    chosen = F.log_softmax(picked, dim=-1).gather(-1, ids[:, 1:][mask].unsqueeze(-1))
    token_logprobs = token_logprobs.masked_scatter(mask, chosen.squeeze(-1))
    return _reduce(token_logprobs, mask, reduction)


def pair_logprobs(
    model: nn.Module, batch: dict[str, Any], *, reduction: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log-probabilities of each pair's chosen and of its rejected answer.

    Both halves of the batch go through the model together, in one forward pass.
    """
    token_ids = torch.cat([batch["chosen"], batch["rejected"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    logprobs = sequence_logprobs(model, token_ids, mask, reduction=reduction)
    return logprobs.split(batch["chosen"].shape[0])


def compute_dpo_loss_batch(
    batch: dict[str, Any],
    policy_model: nn.Module,
    reference_model: nn.Module,
    beta: float,
    *,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The course's DPO loss of one batch of pairs: (loss, chosen reward, rejected reward).

    The reference model runs without gradients: it is only the point of comparison.
    """
    policy_chosen, policy_rejected = pair_logprobs(policy_model, batch, reduction=reduction)
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logprobs(reference_model, batch, reduction=reduction)
    return compute_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def compute_dpo_metrics_loader(
    data_loader: Iterable,
    policy_model: nn.Module,
    reference_model: nn.Module,
    beta: float,
    num_batches: int | None = None,
    *,
    reduction: str = "sum",
) -> dict[str, float]:
    """Means over the first ``num_batches`` batches (all when None) of the loss, the chosen
    and rejected rewards, the reward margin (chosen - rejected) and the preference accuracy
    (the share of pairs whose chosen reward is the larger; a tie counts as wrong)."""
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    totals = dict.fromkeys(METRICS, 0.0)
    if num_batches == 0:
        return dict.fromkeys(METRICS, float("nan"))
    with torch.no_grad():
        for i, batch in enumerate(data_loader):
            if i >= num_batches:
                break
            policy_chosen, policy_rejected = pair_logprobs(policy_model, batch, reduction=reduction)
            ref_chosen, ref_rejected = pair_logprobs(reference_model, batch, reduction=reduction)
            loss, chosen, rejected = compute_dpo_loss(
                policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
            )
            wins = (policy_chosen - ref_chosen) > (policy_rejected - ref_rejected)
            values = (loss, chosen, rejected, chosen - rejected, wins.float().mean())
            for name, value in zip(METRICS, values, strict=True):
                totals[name] += float(value)
    return {name: total / num_batches for name, total in totals.items()}


def compute_dpo_loss_loader(
    data_loader: Iterable,
    policy_model: nn.Module,
    reference_model: nn.Module,
    beta: float,
    num_batches: int | None = None,
    *,
    reduction: str = "sum",
) -> tuple[float, float, float]:
    """The course's loader-level numbers: mean (loss, chosen reward, rejected reward)."""
    metrics = compute_dpo_metrics_loader(
        data_loader, policy_model, reference_model, beta, num_batches, reduction=reduction
    )
    return metrics["loss"], metrics["chosen_reward"], metrics["rejected_reward"]


def evaluate_dpo_loss_loader(
    policy_model: nn.Module,
    reference_model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    beta: float,
    eval_iter: int,
    *,
    reduction: str = "sum",
) -> dict[str, float]:
    """The metrics on ``eval_iter`` batches of each loader, in eval mode: the course's keys
    ("train_loss", "val_chosen_reward", ...) and ours ("train_reward_margin",
    "val_accuracy", ...)."""
    was_training = policy_model.training
    policy_model.eval()
    result = {}
    for split, loader in (("train", train_loader), ("val", val_loader)):
        metrics = compute_dpo_metrics_loader(
            loader, policy_model, reference_model, beta, eval_iter, reduction=reduction
        )
        result |= {f"{split}_{name}": value for name, value in metrics.items()}
    policy_model.train(was_training)
    return result


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def policy_and_reference(sft_model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The trainable policy (``sft_model`` itself) and a frozen copy of it, the reference:
    in eval mode, with ``requires_grad`` off, so that it gets no gradients and never changes."""
    reference = copy.deepcopy(sft_model).eval()
    reference.requires_grad_(False)
    return sft_model, reference


def new_tracking() -> dict[str, list]:
    """The history ``train_model_dpo_simple`` fills: each metric on train and validation
    (the course's "train_losses", "val_chosen_rewards", ... and the margins and accuracies),
    and the step and the number of tokens seen at each evaluation."""
    keys = [history_key(split, m) for split in ("train", "val") for m in METRICS]
    return {key: [] for key in [*keys, "tokens_seen", "steps"]}


def history_key(split: str, metric: str) -> str:
    """The course's name of a tracked list: ``"train_losses"`` for ("train", "loss")."""
    plural = {"loss": "losses", "accuracy": "accuracies"}
    return f"{split}_{plural.get(metric, metric + 's')}"


def _record(tracking: dict[str, list], metrics: dict[str, float], step: int, tokens: int) -> None:
    for key, value in metrics.items():  # "train_loss": 0.69, ...
        tracking[history_key(*key.split("_", 1))].append(value)
    tracking["steps"].append(step)
    tracking["tokens_seen"].append(tokens)


def train_model_dpo_simple(
    policy_model: nn.Module,
    reference_model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    num_epochs: int,
    beta: float,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer: Any,
    *,
    reduction: str = "sum",
    progress: bool = True,
) -> dict[str, list]:
    """The course's DPO training loop; returns the tracking history (see ``new_tracking``).

    As ``train_model_simple``: every ``eval_freq`` steps (from step 0) it measures the
    metrics on ``eval_iter`` batches of each loader and prints them; after each epoch it
    prints a sample continuing ``start_context``. A NaN or infinite loss stops training
    (``NonFiniteLossError``, naming the step).
    """
    tracking, tokens_seen, global_step = new_tracking(), 0, -1
    device = next(policy_model.parameters()).device
    bar = tqdm(total=num_epochs * len(train_loader), unit="step", disable=not progress)
    for epoch in range(num_epochs):
        policy_model.train()
        for batch in train_loader:
            optimizer.zero_grad()
            loss, _, _ = compute_dpo_loss_batch(
                batch, policy_model, reference_model, beta, reduction=reduction
            )
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"the DPO loss is {loss.item()} at step {global_step + 1} (epoch "
                    f"{epoch + 1}); training stopped. Try a lower learning rate."
                )
            loss.backward()
            optimizer.step()
            tokens_seen += batch["chosen"].numel() + batch["rejected"].numel()
            global_step += 1
            bar.update()
            if global_step % eval_freq == 0:
                metrics = evaluate_dpo_loss_loader(
                    policy_model,
                    reference_model,
                    train_loader,
                    val_loader,
                    beta,
                    eval_iter,
                    reduction=reduction,
                )
                _record(tracking, metrics, global_step, tokens_seen)
                tqdm.write(
                    f"Ep {epoch + 1} (Step {global_step:06d}): "
                    f"Train loss {metrics['train_loss']:.3f}, Val loss {metrics['val_loss']:.3f}, "
                    f"Train reward margin {metrics['train_reward_margin']:.3f}, "
                    f"Val reward margin {metrics['val_reward_margin']:.3f}, "
                    f"Val accuracy {metrics['val_accuracy']:.2f}"
                )
        generate_and_print_sample(policy_model, tokenizer, device, start_context)
    bar.close()
    return tracking


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def plot_dpo_tracking(tracking: dict[str, list], *, title: str | None = None):
    """Four panels over training steps: the loss, the chosen and rejected rewards, the
    reward margin and the preference accuracy; training solid, validation dashed."""
    import matplotlib.pyplot as plt

    steps = tracking["steps"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    panels = [
        ("DPO loss", [("losses", "loss", "C0")]),
        ("rewards", [("chosen_rewards", "chosen", "C2"), ("rejected_rewards", "rejected", "C3")]),
        ("reward margin (chosen - rejected)", [("reward_margins", "margin", "C1")]),
        ("preference accuracy", [("accuracies", "accuracy", "C4")]),
    ]
    for ax, (name, curves) in zip(axes, panels, strict=True):
        for key, label, colour in curves:
            ax.plot(steps, tracking[f"train_{key}"], color=colour, label=f"train {label}")
            ax.plot(steps, tracking[f"val_{key}"], color=colour, ls="--", label=f"val {label}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    axes[0].axhline(LN2, color="grey", lw=0.8, ls=":")  # the policy equals the reference
    axes[3].set_ylim(-0.05, 1.05)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_loss_against_margin(betas: Iterable[float] = (0.1, 0.5, 2.0)):
    """The DPO loss of one pair, -log sigmoid(beta * margin), against the reward margin,
    for several betas: where it stops pushing (flattens) is where training stops moving the
    policy away from the reference."""
    import matplotlib.pyplot as plt

    margins = torch.linspace(-10, 25, 300)
    fig, ax = plt.subplots(figsize=(6, 3))
    for beta in betas:
        ax.plot(margins, -F.logsigmoid(beta * margins), label=f"beta = {beta:g}")
    ax.axhline(LN2, color="grey", lw=0.8, ls=":")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("reward margin: chosen reward - rejected reward (nats)")
    ax.set_ylabel("DPO loss of the pair")
    ax.set_title("ln 2 at margin 0; the larger beta, the sooner the loss is flat", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
