"""Sections 7.5-7.7 (finetuning.py): building the model, fine-tuning, the responses."""

from __future__ import annotations

import json
import shutil

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch

import gpt_download as gd
import previous_chapters as pc
from course import finetuning as ft
from course import instruction_data as data
from helpers import TINY_CHECKPOINT, CharTokenizer, numbered_entries
from runtime.gpt2_tokenizer import get_tokenizer

matplotlib.use("Agg")

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"emb_dim": 32, "n_layers": 1, "n_heads": 2, "context_length": 128}


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(offline=True)


# --- 7.5 build_model -------------------------------------------------------------------------


def test_random_model_is_seeded_in_eval_mode_with_the_asked_config():
    model, cfg = ft.build_model("124M", pretrained=False, overrides=TINY, seed=7)
    assert cfg == pc.gpt2_config("124M", **TINY)
    assert not model.training and model.cfg == cfg
    again, _ = ft.build_model(cfg, pretrained=False, seed=7)
    other, _ = ft.build_model(cfg, pretrained=False, seed=8)
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(x), again(x)) and not torch.equal(model(x), other(x))


def test_a_config_dict_cannot_be_pretrained():
    with pytest.raises(ValueError, match="size name"):
        ft.build_model(pc.gpt2_config("124M", **TINY), pretrained=True)


def test_pretrained_path_loads_the_checkpoint_offline(tmp_path):
    """build_model(pretrained=True) through gpt_download, on the repo's tiny real TF checkpoint
    placed where a finished download would be (so nothing is fetched)."""
    shutil.copytree(TINY_CHECKPOINT, tmp_path / "gpt2" / "124M")
    model, cfg = ft.build_model("gpt2-small (124M)", models_dir=tmp_path / "gpt2")
    settings = json.loads((TINY_CHECKPOINT / "hparams.json").read_text())
    assert (cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]) == (
        settings["n_vocab"],
        settings["n_ctx"],
        settings["n_embd"],
    )
    assert (cfg["n_heads"], cfg["n_layers"]) == (settings["n_head"], settings["n_layer"])
    ckpt = str(tmp_path / "gpt2" / "124M" / "model.ckpt")
    wpe = torch.from_numpy(gd.load_variable(ckpt, "model/wpe"))
    assert torch.equal(model.pos_emb.weight.detach(), wpe)
    assert not model.training


def test_pretrained_download_failure_names_the_size_and_what_to_do(
    tmp_path, monkeypatch, download_sleeps
):
    monkeypatch.delenv("GPT2_BASE_URL", raising=False)
    with pytest.raises(gd.DownloadError) as err:
        ft.build_model("124M", models_dir=tmp_path / "gpt2")
    message = str(err.value)
    assert "124M" in message and gd.OPENAI_BASE_URL in message and gd.BACKUP_BASE_URL in message
    assert "GPT2_BASE_URL" in message
    assert not (tmp_path / "gpt2" / "124M" / "checkpoint").exists()
    assert (
        len(download_sleeps) == 4
    )  # 3 attempts at each of the two URLs of the first file, then stop


# --- 7.6 fine-tuning -------------------------------------------------------------------------


def test_training_result_final_losses():
    result = ft.TrainingResult(3.0, 3.1, [2.0, 1.5], [2.5, 2.2], [10, 20], 2, 0.5)
    assert (result.final_train_loss, result.final_val_loss) == (1.5, 2.2)
    empty = ft.TrainingResult(3.0, 3.1, [], [], [], 0, 0.0)
    assert empty.final_train_loss is None and empty.final_val_loss is None


@pytest.mark.parametrize("group_by_length", [False, True])
def test_restart_shuffling_makes_the_batch_order_depend_on_the_seed_only(group_by_length):
    entries = numbered_entries(24)
    loader, _, _ = data.create_dataloaders(
        entries, entries, entries, CharTokenizer(), batch_size=4, group_by_length=group_by_length
    )

    def epoch():
        return [x.tolist() for x, _ in loader]

    ft.restart_shuffling(loader, 5)
    first = epoch()
    epoch()  # the generator moved on
    ft.restart_shuffling(loader, 5)
    assert epoch() == first
    ft.restart_shuffling(loader, 6)
    assert epoch() != first


@pytest.mark.slow
def test_finetune_lowers_the_loss_and_reports(tokenizer, monkeypatch, capsys):
    entries = numbered_entries(16)
    train, val, test = entries[:12], entries[12:14], entries[14:]
    tl, vl, _ = data.create_dataloaders(
        train, val, test, tokenizer, batch_size=4, allowed_max_length=128
    )
    model, _ = ft.build_model("124M", pretrained=False, overrides=TINY)
    ft.restart_shuffling(tl, 123)
    before = pc.evaluate_model(model, tl, vl, "cpu", 1, loss_fn=pc.calc_loss_batch)
    result = ft.finetune(
        model, tl, vl, tokenizer, num_epochs=2, lr=3e-3, eval_freq=1, eval_iter=1, progress=False
    )
    assert len(result.train_losses) == len(result.val_losses) == len(result.tokens_seen) == 6
    # the initial losses are the course's losses of the untrained model
    assert (result.initial_train_loss, result.initial_val_loss) == pytest.approx(before, rel=1e-5)
    assert result.final_train_loss < result.initial_train_loss
    assert result.num_epochs == 2 and result.minutes > 0
    assert not model.training
    out = capsys.readouterr().out
    assert f"Initial training loss: {result.initial_train_loss:.3f}" in out
    assert f"Initial validation loss: {result.initial_val_loss:.3f}" in out
    assert f"Training completed in {result.minutes:.2f} minutes." in out
    # the sample after each epoch continues the first validation entry's prompt
    assert out.count(data.format_input(val[0]).replace("\n", " ")) == 2


def test_plot_training_draws_the_history():
    result = ft.TrainingResult(3.0, 3.1, [2.0, 1.5, 1.2], [2.5, 2.2, 2.1], [10, 20, 30], 2, 0.5)
    fig = ft.plot_training(result)
    ax1, ax2 = fig.axes
    train_line, val_line = ax1.get_lines()
    assert list(train_line.get_xdata()) == pytest.approx([0.0, 1.0, 2.0])
    assert list(train_line.get_ydata()) == [2.0, 1.5, 1.2]
    assert list(val_line.get_ydata()) == [2.5, 2.2, 2.1]
    assert list(ax2.get_lines()[0].get_xdata()) == [10, 20, 30]
    plt.close(fig)


# --- 7.7 responses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "generated", "expected"),
    [
        ("alpaca", "### Response:\nShe walked home.  ", "She walked home."),
        ("alpaca", "\n  She walked home.", "She walked home."),
        ("alpaca", "She said ### Response: no", "She said ### Response: no"),
        ("phi3", "<|assistant|>:\nRed.\n", "Red."),
    ],
)
def test_extract_response_strips_marker_and_space(style, generated, expected):
    assert ft.extract_response(generated, style) == expected


def test_generate_responses_equal_the_course_generate_one_by_one(tokenizer):
    model, cfg = ft.build_model("124M", pretrained=False, overrides=TINY, seed=1)
    entries = numbered_entries(5)
    before = json.dumps(entries)
    kwargs = dict(context_size=cfg["context_length"], max_new_tokens=6, progress=False)
    batched = ft.generate_responses(model, entries, tokenizer, batch_size=4, **kwargs)
    assert json.dumps(entries) == before  # copies; the input is untouched
    assert [{k: e[k] for k in data.REQUIRED_KEYS} for e in batched] == entries
    for entry, got in zip(entries, batched, strict=True):
        prompt = pc.text_to_token_ids(data.format_input(entry), tokenizer)
        out = pc.generate(model, prompt, 6, cfg["context_length"], eos_id=data.EOS_TOKEN_ID)
        text = tokenizer.decode(out[0, prompt.shape[1] :].tolist())
        assert got["model_response"] == ft.extract_response(text)
    single = ft.generate_responses(model, entries, tokenizer, batch_size=1, **kwargs)
    assert single == batched


def test_generate_responses_key_and_style(tokenizer):
    model, cfg = ft.build_model("124M", pretrained=False, overrides=TINY, seed=2)
    entries = numbered_entries(2)
    common = dict(context_size=cfg["context_length"], max_new_tokens=3, progress=False)
    alpaca = ft.generate_responses(model, entries, tokenizer, json_key="answer", **common)
    assert all("answer" in e and "model_response" not in e for e in alpaca)
    phi3 = ft.generate_responses(model, entries, tokenizer, style="phi3", **common)
    prompt = pc.text_to_token_ids(data.format_input(entries[0], "phi3"), tokenizer)
    out = pc.generate(model, prompt, 3, cfg["context_length"], eos_id=data.EOS_TOKEN_ID)
    expected = ft.extract_response(tokenizer.decode(out[0, prompt.shape[1] :].tolist()), "phi3")
    assert phi3[0]["model_response"] == expected


# --- prompts that do not fit -------------------------------------------------------------------


def test_a_prompt_that_fits_is_left_alone(tokenizer):
    entry = {"instruction": "Name a color.", "input": "sky", "output": "Blue."}
    ids, cut = ft.fit_prompt(entry, tokenizer, "alpaca", budget=200)
    assert ids == tokenizer.encode(data.format_input(entry)) and not cut


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_a_long_input_is_shortened_and_the_instruction_kept(tokenizer, style):
    entry = {"instruction": "Summarize the text.", "input": "word " * 300, "output": "x"}
    head = data.format_input({**entry, "input": ""}, style)
    ids, cut = ft.fit_prompt(entry, tokenizer, style, budget=80)
    text = tokenizer.decode(ids)
    assert cut and len(ids) <= 80
    assert text.startswith(head) and "Summarize the text." in text
    assert "word word" in text  # the start of the input stays


def test_a_long_instruction_alone_is_cut_at_its_end(tokenizer):
    entry = {"instruction": "Explain " + "this " * 200, "input": "", "output": "x"}
    ids, cut = ft.fit_prompt(entry, tokenizer, "alpaca", budget=50)
    assert cut and len(ids) == 50
    assert tokenizer.decode(ids).startswith(data.PROMPT_STYLES["alpaca"].header + "Explain")


def test_generate_responses_report_shortened_prompts(tokenizer, capsys):
    model, cfg = ft.build_model("124M", pretrained=False, overrides=TINY, seed=1)
    entries = numbered_entries(3)
    entries[1] = {**entries[1], "input": "seven " * 200}
    responses = ft.generate_responses(
        model,
        entries,
        tokenizer,
        context_size=cfg["context_length"],
        max_new_tokens=8,
        progress=False,
    )
    out = capsys.readouterr().out
    assert "1 of 3 prompts are longer than 120 tokens" in out and "entries 1" in out
    assert len(responses) == 3 and all(isinstance(e["model_response"], str) for e in responses)
