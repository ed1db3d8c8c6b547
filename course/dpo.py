"""Direct Preference Optimization (DPO) from scratch: the loss, the log-probabilities, training.

DPO fine-tunes a *policy* model, starting from the chapter's fine-tuned (SFT) model, to make
the ``chosen`` answer of each preference pair more likely than the ``rejected`` one, measured
against a frozen copy of the SFT model, the *reference*:

    loss = -log sigmoid(beta * [(log pi(chosen) - log ref(chosen))
                                - (log pi(rejected) - log ref(rejected))])

where ``log pi(answer)`` is the policy's log-probability of the whole answer given the
prompt, the sum of its tokens' log-probabilities. ``compute_logprobs`` and
``compute_dpo_loss`` are the course's functions (same names and arguments);
``train_model_dpo_simple`` is its training: the chapter's one loop (``train_model_simple``)
with DPO's loss, checkpoints and resume, and the reward margin and the preference accuracy
tracked as well (``DPOMetrics``, computed in one place, ``dpo_batch_metrics``). ``sequence_logprobs`` gives ``compute_logprobs``'s numbers for a
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
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from course.dpo_figures import (  # noqa: F401 (re-exported: the course's plots of DPO)
    LN2,
    plot_dpo_tracking,
    plot_loss_against_margin,
)
from course.pretraining import train_model_simple
from runtime.engine import ends_after_last
from runtime.trainer import ResumableRun

REDUCTIONS = ("sum", "mean")


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


@dataclass
class DPOMetrics:
    """DPO's numbers for a batch of pairs, or their means over batches."""

    loss: float
    chosen_reward: float  # mean log ratio of the chosen answers
    rejected_reward: float
    reward_margin: float  # chosen reward - rejected reward
    accuracy: float  # the share of pairs whose chosen reward is the larger (a tie is wrong)


def dpo_batch_metrics(
    batch: dict[str, Any],
    policy_model: nn.Module,
    reference_model: nn.Module,
    beta: float,
    *,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DPO loss of one batch of pairs (with gradients), and all of ``DPOMetrics`` as one
    detached tensor [5], left on the device. The only place that computes them.

    The reference model runs without gradients: it is only the point of comparison.
    """
    policy_chosen, policy_rejected = pair_logprobs(policy_model, batch, reduction=reduction)
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logprobs(reference_model, batch, reduction=reduction)
    loss, chosen, rejected = compute_dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
    )
    wins = (policy_chosen - ref_chosen) > (policy_rejected - ref_rejected)
    metrics = torch.stack([loss.detach(), chosen, rejected, chosen - rejected, wins.float().mean()])
    return loss, metrics


def compute_dpo_loss_batch(
    batch: dict[str, Any],
    policy_model: nn.Module,
    reference_model: nn.Module,
    beta: float,
    *,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The course's DPO loss of one batch of pairs: (loss, chosen reward, rejected reward)."""
    loss, metrics = dpo_batch_metrics(
        batch, policy_model, reference_model, beta, reduction=reduction
    )
    return loss, metrics[1], metrics[2]


def compute_dpo_metrics_loader(
    data_loader: Iterable,
    policy_model: nn.Module,
    reference_model: nn.Module,
    beta: float,
    num_batches: int | None = None,
    *,
    reduction: str = "sum",
) -> DPOMetrics:
    """``DPOMetrics``, each the mean over the first ``num_batches`` batches (all when None;
    NaN when there are none). One wait for the device, at the end."""
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    per_batch = []
    with torch.no_grad():
        for i, batch in enumerate(data_loader):
            if i >= num_batches:
                break
            _, metrics = dpo_batch_metrics(
                batch, policy_model, reference_model, beta, reduction=reduction
            )
            per_batch.append(metrics)
    if not per_batch:
        return DPOMetrics(*[math.nan] * len(fields(DPOMetrics)))
    columns = zip(*torch.stack(per_batch).tolist(), strict=True)
    return DPOMetrics(*[sum(column) / num_batches for column in columns])


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
    m = compute_dpo_metrics_loader(
        data_loader, policy_model, reference_model, beta, num_batches, reduction=reduction
    )
    return m.loss, m.chosen_reward, m.rejected_reward


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
    """``DPOMetrics`` on ``eval_iter`` batches of each loader, in eval mode, as the course
    returns them: a dict with the course's keys ("train_loss", "val_chosen_reward", ...) and
    ours ("train_reward_margin", "val_accuracy", ...)."""
    was_training = policy_model.training
    policy_model.eval()
    res = {}
    for split, loader in (("train", train_loader), ("val", val_loader)):
        metrics = compute_dpo_metrics_loader(
            loader, policy_model, reference_model, beta, eval_iter, reduction=reduction
        )
        res.update({f"{split}_{name}": value for name, value in asdict(metrics).items()})
    policy_model.train(was_training)
    return res


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def policy_and_reference(sft_model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The trainable policy (``sft_model`` itself) and a frozen copy of it, the reference:
    in eval mode, with ``requires_grad`` off, so that it gets no gradients and never changes."""
    reference = copy.deepcopy(sft_model).eval()
    reference.requires_grad_(False)
    return sft_model, reference


@dataclass
class DPOHistory:
    """What DPO training records at each evaluation: every metric on the training and the
    validation pairs (the course's names), the tokens seen and the step."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    train_chosen_rewards: list[float] = field(default_factory=list)
    val_chosen_rewards: list[float] = field(default_factory=list)
    train_rejected_rewards: list[float] = field(default_factory=list)
    val_rejected_rewards: list[float] = field(default_factory=list)
    train_reward_margins: list[float] = field(default_factory=list)
    val_reward_margins: list[float] = field(default_factory=list)
    train_accuracies: list[float] = field(default_factory=list)
    val_accuracies: list[float] = field(default_factory=list)

    def record(self, res: dict[str, float], step: int, tokens_seen: int) -> None:
        """Append one evaluation: ``res`` as ``evaluate_dpo_loss_loader`` returns it."""
        self.steps.append(step)
        self.track_tokens_seen.append(tokens_seen)
        self.train_losses.append(res["train_loss"])
        self.val_losses.append(res["val_loss"])
        self.train_chosen_rewards.append(res["train_chosen_reward"])
        self.val_chosen_rewards.append(res["val_chosen_reward"])
        self.train_rejected_rewards.append(res["train_rejected_reward"])
        self.val_rejected_rewards.append(res["val_rejected_reward"])
        self.train_reward_margins.append(res["train_reward_margin"])
        self.val_reward_margins.append(res["val_reward_margin"])
        self.train_accuracies.append(res["train_accuracy"])
        self.val_accuracies.append(res["val_accuracy"])


def dpo_loss(reference_model: nn.Module, beta: float, *, reduction: str = "sum") -> Callable:
    """DPO's loss as the training loop calls a loss: ``loss(batch, policy_model, device)``."""

    def loss(batch: dict[str, Any], policy_model: nn.Module, device: Any) -> torch.Tensor:
        return dpo_batch_metrics(batch, policy_model, reference_model, beta, reduction=reduction)[0]

    return loss


class DPORun(ResumableRun):
    """``ResumableRun``'s pieces for DPO (one process, whole batches): batches of pairs,
    DPO's metrics at each evaluation, and no losses measured before training."""

    def __init__(
        self, reference_model, beta: float, *, reduction: str = "sum", **resumable: Any
    ) -> None:
        super().__init__(history_type=DPOHistory, **resumable)
        self.reference, self.beta, self.reduction = reference_model, beta, reduction

    def before_training(self, state) -> None:
        pass

    def micro_batches(self, batch):
        self.n_targets = len(batch["chosen"])  # (pairs: the loss is their mean)
        yield (batch,), 1.0

    def count_tokens(self, batch) -> int:
        return batch["chosen"].numel() + batch["rejected"].numel()

    def evaluate(self, model, train_loader, val_loader, device, eval_iter, state) -> None:
        res = evaluate_dpo_loss_loader(
            model,
            self.reference,
            train_loader,
            val_loader,
            self.beta,
            eval_iter,
            reduction=self.reduction,
        )
        state.history.record(res, state.global_step, state.tokens_seen)
        tqdm.write(
            f"Ep {state.epoch + 1} (Step {state.global_step:06d}): "
            f"Train loss {res['train_loss']:.3f}, Val loss {res['val_loss']:.3f}, "
            f"Train reward margin {res['train_reward_margin']:.3f}, "
            f"Val reward margin {res['val_reward_margin']:.3f}, "
            f"Val accuracy {res['val_accuracy']:.2f}"
        )


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
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> DPOHistory:
    """The course's DPO training: ``train_model_simple`` with DPO's loss and ``DPORun``.

    As the course: every ``eval_freq`` steps (from step 0) it measures the metrics on
    ``eval_iter`` batches of each loader and prints them; after each epoch it prints a
    sample continuing ``start_context``. As the chapter's runs: a NaN or infinite loss
    stops training (``NonFiniteLossError``); checkpoints go to ``checkpoint_path`` every
    ``checkpoint_every`` steps and after each epoch, Ctrl-C saves one and stops
    (``TrainingInterrupted``), and ``resume=True`` continues from it.
    """
    run = DPORun(
        reference_model,
        beta,
        reduction=reduction,
        checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    train_model_simple(
        policy_model,
        train_loader,
        val_loader,
        optimizer,
        next(policy_model.parameters()).device,
        num_epochs,
        eval_freq,
        eval_iter,
        start_context,
        tokenizer,
        loss_fn=dpo_loss(reference_model, beta, reduction=reduction),
        progress=progress,
        run=run,
    )
    return run.state.history
