"""dpo.py: the DPO loss and log-probabilities by hand, the fast path against the course's,
the frozen reference, beta's direction, and a short run that raises the reward margin."""

from __future__ import annotations

import math
import os
import signal
from dataclasses import astuple, fields

import pytest
import torch

from course import dpo
from helpers import tiny_model
from preference_data import (
    SAMPLE_PREFERENCE_PATH,
    create_preference_loaders,
    load_preference_data,
)
from runtime.gpt2_tokenizer import get_tokenizer
from runtime.trainer import NonFiniteLossError, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add hand-offs

LN2 = math.log(2)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(offline=True)


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return load_preference_data(SAMPLE_PREFERENCE_PATH)


def gpt2_vocab_model(seed: int = 0) -> torch.nn.Module:
    """A tiny GPTModel with GPT-2's vocabulary (the pairs end in token 50256)."""
    return tiny_model(seed, vocab_size=50257, context_length=128)


# --- the loss by hand ---------------------------------------------------------------------------


def test_dpo_loss_equals_a_hand_computed_value():
    # pair 1: the policy likes chosen 1 nat more than the reference does, rejected 0.5 nat
    # less: margin 1.5. Pair 2: chosen 1 nat less, rejected 1 nat more: margin -2.
    model_chosen = torch.tensor([-1.0, -4.0])
    model_rejected = torch.tensor([-3.0, -2.0])
    ref_chosen = torch.tensor([-2.0, -3.0])
    ref_rejected = torch.tensor([-2.5, -3.0])
    loss, chosen, rejected = dpo.compute_dpo_loss(
        model_chosen, model_rejected, ref_chosen, ref_rejected, beta=0.1
    )
    # -log sigmoid(x) = log(1 + e^-x), at x = 0.1 * 1.5 and x = 0.1 * -2
    by_hand = (math.log(1 + math.exp(-0.15)) + math.log(1 + math.exp(0.2))) / 2
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    assert by_hand == pytest.approx(0.70955, abs=1e-5)
    assert chosen.item() == pytest.approx((1.0 + -1.0) / 2)  # mean of the log ratios
    assert rejected.item() == pytest.approx((-0.5 + 1.0) / 2)


def test_dpo_loss_is_ln2_at_the_start_and_pushes_chosen_up_and_rejected_down():
    logprobs = torch.tensor([-5.0, -7.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -2.0], requires_grad=True)
    loss, chosen_reward, rejected_reward = dpo.compute_dpo_loss(
        logprobs, rejected, logprobs.detach(), rejected.detach(), beta=0.1
    )
    assert loss.item() == pytest.approx(LN2)
    assert chosen_reward.item() == 0 and rejected_reward.item() == 0
    loss.backward()
    # d/dx -log sigmoid(beta x) at x = 0 is -beta/2; averaged over 2 pairs: -beta/4
    assert logprobs.grad.tolist() == pytest.approx([-0.025, -0.025])
    assert rejected.grad.tolist() == pytest.approx([0.025, 0.025])
    assert not chosen_reward.requires_grad and not rejected_reward.requires_grad


def test_compute_logprobs_by_hand():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(1, 4, 4)  # every position predicts with these probabilities
    labels = torch.tensor([[0, 3, 1, 2]])  # tokens 1, 2, 3 have probability 0.4, 0.2, 0.3
    mask = torch.tensor([[True, False, True, True]])  # score tokens 2 and 3 (token 0 never is)
    total = dpo.compute_logprobs(logits, labels, mask)
    assert total.item() == pytest.approx(math.log(0.2 * 0.3), rel=1e-6)
    mean = dpo.compute_logprobs(logits, labels, mask, reduction="mean")
    assert mean.item() == pytest.approx(math.log(0.2 * 0.3) / 2, rel=1e-6)
    everything = dpo.compute_logprobs(logits, labels)
    assert everything.item() == pytest.approx(math.log(0.4 * 0.2 * 0.3), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        dpo.compute_logprobs(logits, labels, reduction="max")


# --- the fast path equals the course's computation ----------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logprobs_equals_compute_logprobs_in_value_and_gradient(reduction):
    model = tiny_model(3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (4, 20), generator=g)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    mask[0, 5:20] = True  # to the end
    mask[1, 3:9] = True  # stops early: the rest is padding
    mask[2, 12:14] = True
    # row 3 has no selected token: its log-probability is 0
    expected = dpo.compute_logprobs(model(ids), ids, mask, reduction=reduction)
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast = dpo.sequence_logprobs(model, ids, mask, reduction=reduction)
    fast.sum().backward()
    assert torch.allclose(fast, expected, atol=1e-5)
    assert fast[3].item() == 0
    for grad, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(p.grad, grad, atol=1e-5)


def test_sequence_logprobs_without_a_mask_scores_every_token():
    model = tiny_model(1)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(
            dpo.sequence_logprobs(model, ids), dpo.compute_logprobs(model(ids), ids), atol=1e-5
        )


def test_pair_logprobs_scores_chosen_and_rejected_in_one_pass(pairs, tokenizer):
    model = gpt2_vocab_model()
    loader, _ = create_preference_loaders(pairs[:4], pairs[:1], tokenizer, batch_size=4)
    batch = next(iter(loader))
    with torch.no_grad():
        chosen, rejected = dpo.pair_logprobs(model, batch)
        for key, got in (("chosen", chosen), ("rejected", rejected)):
            ids, mask = batch[key], batch[f"{key}_mask"]
            assert torch.allclose(got, dpo.compute_logprobs(model(ids), ids, mask), atol=1e-4)


# --- the reference model --------------------------------------------------------------------


def test_the_reference_runs_without_gradients(pairs, tokenizer):
    policy = gpt2_vocab_model()
    reference = gpt2_vocab_model()  # NOT frozen: compute_dpo_loss_batch must not need that
    loader, _ = create_preference_loaders(pairs[:4], pairs[:1], tokenizer, batch_size=4)
    loss, _, _ = dpo.compute_dpo_loss_batch(next(iter(loader)), policy, reference, beta=0.1)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_the_frozen_reference_gets_no_gradients_and_never_changes(pairs, tokenizer):
    policy, reference = dpo.policy_and_reference(gpt2_vocab_model())
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    train_loader, val_loader = create_preference_loaders(
        pairs[:8], pairs[8:10], tokenizer, batch_size=4
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    dpo.train_model_dpo_simple(
        policy,
        reference,
        train_loader,
        val_loader,
        optimizer,
        1,
        0.1,
        1,
        1,
        "Hi",
        tokenizer,
        progress=False,
    )
    assert not reference.training
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in policy.state_dict().items())


# --- training ---------------------------------------------------------------------------------


def _train(pairs, tokenizer, beta: float, epochs: int, lr: float):
    policy, reference = dpo.policy_and_reference(gpt2_vocab_model())
    train_loader, val_loader = create_preference_loaders(
        pairs, pairs[:4], tokenizer, batch_size=4, seed=1
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    tracking = dpo.train_model_dpo_simple(
        policy,
        reference,
        train_loader,
        val_loader,
        optimizer,
        epochs,
        beta,
        100,
        1,
        "Hi",
        tokenizer,
        progress=False,
    )
    return policy.eval(), reference, train_loader, tracking


def _distance(policy, reference, loader) -> tuple[float, float]:
    """How far the policy moved: the mean |log ratio| of the answers, and the weights' L2."""
    ratios = []
    with torch.no_grad():
        for batch in loader:
            policy_lp, ref_lp = (
                dpo.pair_logprobs(policy, batch),
                dpo.pair_logprobs(reference, batch),
            )
            ratios += [(p - r).abs() for p, r in zip(policy_lp, ref_lp, strict=True)]
        weights = sum(
            (p - q).pow(2).sum()
            for p, q in zip(policy.parameters(), reference.parameters(), strict=True)
        )
    return torch.cat(ratios).mean().item(), weights.sqrt().item()


def test_a_larger_beta_keeps_the_policy_closer_to_the_reference(pairs, tokenizer):
    # The loss saturates once beta * margin is large, so a larger beta stops pushing sooner.
    small = _distance(*_train(pairs[:8], tokenizer, beta=0.05, epochs=6, lr=1e-3)[:3])
    large = _distance(*_train(pairs[:8], tokenizer, beta=2.0, epochs=6, lr=1e-3)[:3])
    assert large[0] < 0.7 * small[0], (small, large)
    assert large[1] < 0.7 * small[1], (small, large)


def test_a_short_run_raises_the_reward_margin_on_its_own_training_pairs(pairs, tokenizer):
    policy, reference = dpo.policy_and_reference(gpt2_vocab_model())
    train_loader, val_loader = create_preference_loaders(
        pairs[:16], pairs[16:18], tokenizer, batch_size=4
    )
    before = dpo.compute_dpo_metrics_loader(train_loader, policy, reference, beta=0.1)
    assert before.loss == pytest.approx(LN2) and before.reward_margin == 0
    assert before.accuracy == 0  # a tie is not a win
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.01)
    tracking = dpo.train_model_dpo_simple(
        policy,
        reference,
        train_loader,
        val_loader,
        optimizer,
        3,
        0.1,
        2,
        2,
        "Hi",
        tokenizer,
        progress=False,
    )
    after = dpo.compute_dpo_metrics_loader(train_loader, policy.eval(), reference, beta=0.1)
    assert after.reward_margin > 0.5
    assert after.chosen_reward > 0 > after.rejected_reward
    assert after.loss < LN2 - 0.03
    assert after.accuracy >= 0.9
    # the history: one entry per evaluation (every 2 of 12 steps), the course's names and ours
    assert tracking.steps == [0, 2, 4, 6, 8, 10]
    for values in astuple(tracking):
        assert len(values) == 6
    margins = tracking.train_reward_margins
    assert margins[-1] > margins[0]


def test_loader_metrics_match_the_course_triple_and_accuracy_counts_wins(pairs, tokenizer):
    policy, reference = dpo.policy_and_reference(gpt2_vocab_model())
    loader, _ = create_preference_loaders(pairs[:8], pairs[:1], tokenizer, batch_size=4)
    with torch.no_grad():  # move the policy a little, in a known direction
        policy.out_head.weight[50256] += 0.5
    metrics = dpo.compute_dpo_metrics_loader(loader, policy, reference, beta=0.1)
    triple = dpo.compute_dpo_loss_loader(loader, policy, reference, beta=0.1)
    assert triple == (metrics.loss, metrics.chosen_reward, metrics.rejected_reward)
    wins, n = 0, 0
    with torch.no_grad():
        for batch in loader:
            pc, pr = dpo.pair_logprobs(policy, batch)
            rc, rr = dpo.pair_logprobs(reference, batch)
            wins += int(((pc - rc) > (pr - rr)).sum())
            n += len(pc)
    assert metrics.accuracy == pytest.approx(wins / n)
    margin = metrics.chosen_reward - metrics.rejected_reward
    assert metrics.reward_margin == pytest.approx(margin, abs=1e-6)
    # the course's dict of both splits holds the same numbers
    both = dpo.evaluate_dpo_loss_loader(policy, reference, loader, loader, 0.1, None)
    assert both["train_accuracy"] == both["val_accuracy"] == metrics.accuracy
    assert both["train_loss"] == metrics.loss


def test_a_non_finite_loss_stops_training_naming_the_step(pairs, tokenizer):
    policy, reference = dpo.policy_and_reference(gpt2_vocab_model())
    with torch.no_grad():
        policy.out_head.weight[0, 0] = float("nan")
    loader, _ = create_preference_loaders(pairs[:4], pairs[:1], tokenizer, batch_size=4)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    with pytest.raises(NonFiniteLossError, match="step 0"):
        dpo.train_model_dpo_simple(
            policy,
            reference,
            loader,
            loader,
            optimizer,
            1,
            0.1,
            1,
            1,
            "Hi",
            tokenizer,
            progress=False,
        )


def test_the_plot_has_four_panels_with_train_and_validation():
    tracking = dpo.DPOHistory(*[[0.0, 0.1, 0.2] for _ in fields(dpo.DPOHistory)])
    tracking.steps = [0, 5, 10]
    fig = dpo.plot_dpo_tracking(tracking)
    assert [len(ax.lines) for ax in fig.axes] == [3, 4, 2, 2]  # (+ the ln 2 line on the loss)
    import matplotlib.pyplot as plt

    plt.close(fig)


# --- checkpoints and resume -------------------------------------------------------------------


def _train_with_checkpoints(pairs, tokenizer, path, *, resume: bool = False):
    """Two epochs of DPO on 16 pairs (8 steps), dropout on, checkpoints at ``path``."""
    sft = tiny_model(0, vocab_size=50257, context_length=128, drop_rate=0.1)
    policy, reference = dpo.policy_and_reference(sft)
    train_loader, val_loader = create_preference_loaders(
        pairs[:16], pairs[16:18], tokenizer, batch_size=4, seed=1
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.01)
    history = dpo.train_model_dpo_simple(
        policy,
        reference,
        train_loader,
        val_loader,
        optimizer,
        2,
        0.1,
        3,
        1,
        "Hi",
        tokenizer,
        progress=False,
        checkpoint_path=path,
        resume=resume,
    )
    return policy, history


class TrainingCalls:
    """Counts DPO's training losses (not the evaluations'); at the ``stop_at``-th it sends
    this process a SIGINT, as Ctrl-C would."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.calls, self.real = stop_at, 0, dpo.dpo_batch_metrics

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.stop_at:
                os.kill(os.getpid(), signal.SIGINT)
        return self.real(*args, **kwargs)


def test_interrupted_by_ctrl_c_then_resumed_ends_bitwise_as_an_uninterrupted_run(
    pairs, tokenizer, tmp_path, monkeypatch
):
    expected, expected_history = _train_with_checkpoints(pairs, tokenizer, None)
    path = tmp_path / "checkpoint.pt"
    monkeypatch.setattr(dpo, "dpo_batch_metrics", TrainingCalls(stop_at=6))  # epoch 2, step 5
    with pytest.raises(TrainingInterrupted, match="SIGINT: training stopped after step 5"):
        _train_with_checkpoints(pairs, tokenizer, path)
    assert path.is_file()

    counting = TrainingCalls()
    monkeypatch.setattr(dpo, "dpo_batch_metrics", counting)
    torch.manual_seed(999)  # (the checkpoint restores the random state dropout draws from)
    resumed, history = _train_with_checkpoints(pairs, tokenizer, path, resume=True)
    assert counting.calls == 2  # steps 6 and 7 only
    assert history == expected_history
    for (name, got), want in zip(
        resumed.state_dict().items(), expected.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
