"""The course's chapter-5 layer: losses, evaluation, the training loop, samples, the plot,
and the token helpers."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F

import previous_chapters as pc
from helpers import IGN, tiny_model
from runtime import progress_bars
from runtime.gpt2_tokenizer import get_tokenizer

matplotlib.use("Agg")

pytestmark = pytest.mark.usefixtures("one_thread")

GPT2_VOCAB = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2}


def batch_with_ignored_targets(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 97, (3, 10), generator=g)
    targets = torch.randint(0, 97, (3, 10), generator=g)
    targets[0, 6:] = IGN
    targets[1, :4] = IGN
    return inputs, targets


def course_loss(input_batch, target_batch, model):
    """The course's calc_loss_batch, written out: mean cross-entropy over the kept targets."""
    logits = model(input_batch)
    kept = target_batch != IGN
    return F.cross_entropy(logits[kept], target_batch[kept])


def test_calc_loss_batch_is_the_mean_over_kept_targets():
    model = tiny_model()
    inputs, targets = batch_with_ignored_targets()
    with torch.no_grad():
        torch.testing.assert_close(
            pc.calc_loss_batch(inputs, targets, model, "cpu"), course_loss(inputs, targets, model)
        )
        targets = torch.full_like(inputs, IGN)
        assert math.isnan(pc.calc_loss_batch(inputs, targets, model, "cpu").item())


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


def test_calc_loss_loader_uses_the_given_loss_fn():
    model = tiny_model()
    batches = [batch_with_ignored_targets(seed) for seed in range(3)]
    seen = []

    def loss_fn(x, y, m, device):
        seen.append((x, m, device))
        return torch.tensor(float(len(seen)))

    assert pc.calc_loss_loader(batches, model, "cpu", num_batches=2, loss_fn=loss_fn) == 1.5
    assert [x for x, _, _ in seen] == [batches[0][0], batches[1][0]]
    assert all(m is model and d == "cpu" for _, m, d in seen)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_model_restores_mode(training):
    model = tiny_model(drop_rate=0.5)
    model.train(training)
    batches = [batch_with_ignored_targets(seed) for seed in range(2)]
    modes = []

    def loss_fn(x, y, m, device):
        modes.append((m.training, torch.is_grad_enabled()))
        return pc.calc_loss_batch(x, y, m, device)

    train_loss, val_loss = pc.evaluate_model(
        model, batches, batches[:1], "cpu", eval_iter=5, loss_fn=loss_fn
    )
    assert model.training is training
    assert modes == [(False, False)] * 3  # eval mode (no dropout), no gradients
    model.eval()
    with torch.no_grad():
        assert train_loss == pytest.approx(
            sum(course_loss(x, y, model).item() for x, y in batches) / 2
        )
        assert val_loss == pytest.approx(course_loss(*batches[0], model).item())


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(offline=True)


def test_token_helpers_round_trip(tokenizer):
    ids = pc.text_to_token_ids("Hello, world<|endoftext|>", tokenizer)
    assert ids.tolist() == [[15496, 11, 995, 50256]]
    assert pc.token_ids_to_text(ids, tokenizer) == "Hello, world<|endoftext|>"
    assert pc.token_ids_to_text(ids[0], tokenizer) == "Hello, world<|endoftext|>"


def test_generate_and_print_sample_prints_50_greedy_tokens_on_one_line(tokenizer, capsys):
    model = tiny_model(**GPT2_VOCAB).train()
    text = pc.generate_and_print_sample(model, tokenizer, "cpu", "Every effort moves you")
    assert model.training  # the mode is restored
    model.eval()
    expected = pc.generate(model, pc.text_to_token_ids("Every effort moves you", tokenizer), 50, 64)
    assert text == pc.token_ids_to_text(expected, tokenizer).replace("\n", " ")
    assert capsys.readouterr().out == text + "\n"


def test_train_model_simple_learns_and_tracks(tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(progress_bars, "on_terminal", lambda stream=None: True)  # (draw the bar)
    model = tiny_model(**GPT2_VOCAB)
    g = torch.Generator().manual_seed(0)
    # a repeating sequence is easy to learn: each token predicts the next
    seq = torch.randint(0, 50257, (9,), generator=g).repeat(4)
    inputs = torch.stack([seq[i : i + 16] for i in range(8)])
    targets = torch.stack([seq[i + 1 : i + 17] for i in range(8)])
    targets[:, :2] = IGN
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
    )
    # 3 epochs x 4 batches = steps 0..11, evaluated at steps 0, 5 and 10
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 3
    assert tokens_seen == [2 * 16 * (s + 1) for s in (0, 5, 10)]
    assert train_losses[-1] < train_losses[0] - 1.0
    assert val_losses[-1] < val_losses[0] - 1.0
    captured = capsys.readouterr()
    out = captured.out
    assert (
        f"Ep 1 (Step 000000): Train loss {train_losses[0]:.3f}, Val loss {val_losses[0]:.3f}" in out
    )
    assert "Ep 3 (Step 000010)" in out
    assert out.count("Every effort moves you") == 3  # one sample per epoch
    assert "12/12" in captured.err  # the progress bar counted every step


def test_train_model_simple_without_progress_bar(tokenizer, capsys):
    model = tiny_model(**GPT2_VOCAB)
    batches = [batch_with_ignored_targets(seed) for seed in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pc.train_model_simple(
        model, batches, batches, optimizer, "cpu", 1, 1, 1, "Hi", tokenizer, progress=False
    )
    captured = capsys.readouterr()
    assert "step/s" not in captured.err and "Ep 1 (Step 000001)" in captured.out


def test_a_run_that_fails_to_start_draws_no_progress_bar(tokenizer, capsys, monkeypatch):
    """A run whose start fails (a checkpoint that cannot be loaded, say) ends in its one-line
    error, with no empty 0/N bar drawn before it."""
    monkeypatch.setattr(progress_bars, "on_terminal", lambda stream=None: True)  # (draw bars)

    class FailingStart(pc.TrainingRun):
        def __enter__(self):
            raise RuntimeError("checkpoint.pt is corrupt")

    model = tiny_model(**GPT2_VOCAB)
    batches = [batch_with_ignored_targets(seed) for seed in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(RuntimeError, match="corrupt"):
        pc.train_model_simple(
            model, batches, batches, optimizer, "cpu", 1, 1, 1, "Hi", tokenizer,
            run=FailingStart(),
        )  # fmt: skip
    assert capsys.readouterr().err == ""


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
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax1, ax2 = fig.axes
    assert ax1.get_xlabel() == "Epochs" and ax1.get_ylabel() == "Loss"
    assert ax2.get_xlabel() == "Tokens seen"
    assert [line.get_label() for line in ax1.get_lines()] == ["Training loss", "Validation loss"]
    assert list(ax1.get_lines()[1].get_ydata()) == [3.1, 2.7, 2.4, 2.3, 2.3]
