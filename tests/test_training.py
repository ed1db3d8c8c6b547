"""Losses, the training loop, the loss plot and the token helpers."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F

import previous_chapters as pc

matplotlib.use("Agg")


pytestmark = pytest.mark.usefixtures("one_thread")


CFG = {
    "vocab_size": 50257,  # the real tokenizer's vocabulary, so samples decode
    "context_length": 32,
    "emb_dim": 16,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def tiny_model(seed: int = 0, **overrides) -> pc.GPTModel:
    torch.manual_seed(seed)
    return pc.GPTModel({**CFG, **overrides})


def course_loss(input_batch, target_batch, model):
    """The course's calc_loss_batch, verbatim in maths."""
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def batch_with_ignored_targets(seed: int = 0, pattern: str = "ragged"):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 1000, (3, 10), generator=g)
    targets = torch.randint(0, 1000, (3, 10), generator=g)
    if pattern == "ragged":  # rows end at different places: packed without padding
        targets[0, 6:] = -100  # padding after the response
        targets[1, :4] = -100  # a masked instruction
        targets[2, 9] = -100
    elif pattern == "same-end":  # every row ends at 7: cropped
        targets[:, 7:] = -100
        targets[0, :3] = -100
    elif pattern == "row-without-targets":
        targets[1] = -100
        targets[2, 5:] = -100
    return inputs, targets


@pytest.mark.parametrize("pattern", ["ragged", "same-end", "row-without-targets", "none-ignored"])
def test_calc_loss_batch_equals_course_formula(pattern):
    model = tiny_model()
    inputs, targets = batch_with_ignored_targets(pattern=pattern)
    ours = pc.calc_loss_batch(inputs, targets, model, "cpu")
    ref = course_loss(inputs, targets, model)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    # same gradients too
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_packed_sequences_equal_separate_forwards():
    model = tiny_model()
    rows = [
        torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 2)
    ]
    packed = model.forward_hidden(torch.cat(rows)[None], seq_lens=[5, 9, 2])
    separate = torch.cat([model.forward_hidden(row[None]) for row in rows], dim=1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="seq_lens"):
        model.forward_hidden(torch.cat(rows)[None], seq_lens=[5, 9])


def test_calc_loss_batch_all_targets_ignored_is_nan_like_the_course():
    model = tiny_model()
    inputs, _ = batch_with_ignored_targets()
    targets = torch.full_like(inputs, -100)
    assert math.isnan(pc.calc_loss_batch(inputs, targets, model, "cpu").item())
    assert math.isnan(course_loss(inputs, targets, model).item())


def test_calc_loss_loader_means_first_batches_and_nan_when_empty():
    model = tiny_model()
    batches = [batch_with_ignored_targets(seed) for seed in range(4)]
    with torch.no_grad():
        losses = [course_loss(x, y, model).item() for x, y in batches]
    assert pc.calc_loss_loader(batches, model, "cpu") == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert pc.calc_loss_loader(batches, model, "cpu", num_batches=2) == pytest.approx(
        sum(losses[:2]) / 2, rel=1e-6
    )
    assert pc.calc_loss_loader(batches, model, "cpu", num_batches=10) == pytest.approx(
        sum(losses) / 4, rel=1e-6
    )
    assert math.isnan(pc.calc_loss_loader([], model, "cpu"))


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_model_restores_mode(training):
    model = tiny_model(drop_rate=0.5)
    model.train(training)
    batches = [batch_with_ignored_targets(seed) for seed in range(2)]
    train_loss, val_loss = pc.evaluate_model(model, batches, batches[:1], "cpu", eval_iter=5)
    assert model.training is training
    model.eval()
    with torch.no_grad():  # evaluated without dropout
        assert train_loss == pytest.approx(
            sum(course_loss(x, y, model).item() for x, y in batches) / 2
        )
        assert val_loss == pytest.approx(course_loss(*batches[0], model).item())


@pytest.fixture(scope="module")
def tokenizer():
    return pc.get_tokenizer(offline=True)


def test_token_helpers_round_trip(tokenizer):
    ids = pc.text_to_token_ids("Hello, world<|endoftext|>", tokenizer)
    assert ids.tolist() == [[15496, 11, 995, 50256]]
    assert pc.token_ids_to_text(ids, tokenizer) == "Hello, world<|endoftext|>"


def test_train_model_simple_learns_and_tracks(tokenizer, capsys):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    # a repeating sequence is easy to learn: each token predicts the next
    seq = torch.randint(0, 50257, (9,), generator=g).repeat(4)
    inputs = torch.stack([seq[i : i + 16] for i in range(8)])
    targets = torch.stack([seq[i + 1 : i + 17] for i in range(8)])
    targets[:, :2] = -100
    train_loader = [(inputs[i : i + 2], targets[i : i + 2]) for i in range(0, 8, 2)]  # 4 batches
    val_loader = train_loader[:1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_losses, val_losses, tokens_seen = pc.train_model_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        "cpu",
        num_epochs=3,
        eval_freq=5,
        eval_iter=2,
        start_context="Every effort moves you",
        tokenizer=tokenizer,
        progress=True,
        max_new_tokens_sample=5,
    )
    # 3 epochs x 4 batches = steps 0..11, evaluated at steps 0, 5 and 10
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 3
    assert tokens_seen == [2 * 16 * (s + 1) for s in (0, 5, 10)]
    assert train_losses[-1] < train_losses[0] - 1.0
    assert val_losses[-1] < val_losses[0] - 1.0
    out = capsys.readouterr().out
    assert (
        f"Ep 1 (Step 000000): Train loss {train_losses[0]:.3f}, Val loss {val_losses[0]:.3f}" in out
    )
    assert "Ep 3 (Step 000010)" in out
    assert out.count("Every effort moves you") == 3  # one sample per epoch


def test_plot_losses_writes_file(tmp_path):
    path = tmp_path / "loss.png"
    epochs = torch.linspace(0, 2, 5)
    fig = pc.plot_losses(
        epochs,
        [0, 10, 20, 30, 40],
        [3, 2.5, 2, 1.8, 1.7],
        [3.1, 2.7, 2.4, 2.3, 2.3],
        save_path=path,
    )
    assert path.stat().st_size > 1000
    ax1, ax2 = fig.axes
    assert ax1.get_xlabel() == "Epochs" and ax1.get_ylabel() == "Loss"
    assert ax2.get_xlabel() == "Tokens seen"
    assert [line.get_label() for line in ax1.get_lines()] == ["Training loss", "Validation loss"]
