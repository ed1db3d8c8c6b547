"""The pipeline with the real tokenizer and a tiny GPT, and the command line end to end:
``--smoke`` writes every output; the default run without internet fails fast and clearly."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

import instruction_finetuning as ift

previous_chapters = pytest.importorskip("previous_chapters")
from test_judge import FakeJudge  # noqa: E402  (the loopback Ollama server)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = {"emb_dim": 32, "n_layers": 1, "n_heads": 2, "context_length": 128}


@pytest.fixture(scope="module")
def tokenizer():
    return previous_chapters.get_tokenizer(offline=True)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_entries(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Repeat the number {i}.",
            "input": "" if i % 2 else f"{i}",
            "output": f"{i}",
        }
        for i in range(n)
    ]


# --- pieces with the real GPT-2 tokenizer ------------------------------------------------------


def test_prompt_tokens_are_a_prefix_of_the_full_text(tokenizer, shared_dir):
    """The masking design assumes encode(prompt) is a prefix of encode(prompt + response)."""
    data = ift.load_instruction_data(shared_dir / "data" / "instruction-data.json")
    for style in ift.PROMPT_STYLES:
        ds = ift.InstructionDataset(data, tokenizer, style=style)
        for i, entry in enumerate(data):
            prompt_ids = tokenizer.encode(ift.format_input(entry, style))
            assert ds[i][: ds.prompt_lengths[i]] == prompt_ids, (style, i)


def test_prompt_ending_in_whitespace_masks_only_shared_tokens(tokenizer):
    entry = {"instruction": "Echo.", "input": "trailing newline\n", "output": "ok"}
    ds = ift.InstructionDataset([entry], tokenizer)
    prompt_ids = tokenizer.encode(ift.format_input(entry))
    n = ds.prompt_lengths[0]
    assert n == len(prompt_ids) - 1  # the prompt's "\n" and the response's "\n\n" merge
    assert ds[0][:n] == prompt_ids[:n] and ds[0][n] != prompt_ids[n]


def test_masked_batch_covers_exactly_the_response(tokenizer):
    data = ift.load_instruction_data(ift.SAMPLE_DATA_PATH)[:4]
    ds = ift.InstructionDataset(data, tokenizer, return_prompt_length=True)
    _, targets = ift.custom_collate_fn([ds[i] for i in range(4)], mask_prompt=True)
    for row, entry in zip(targets.tolist(), data, strict=True):
        kept = [t for t in row if t != ift.IGNORE_INDEX]
        assert kept[-1] == ift.EOS_TOKEN_ID
        assert tokenizer.decode(kept[:-1]) == ift.format_response(entry)


def test_generate_responses_batched_equals_one_by_one(tokenizer):
    model, cfg = ift.build_model("124M", pretrained=False, overrides=TINY, seed=1)
    data = tiny_entries(5)
    before = json.dumps(data)
    kwargs = dict(context_size=cfg["context_length"], max_new_tokens=6, progress=False)
    batched = ift.generate_responses(model, data, tokenizer, batch_size=4, **kwargs)
    single = ift.generate_responses(model, data, tokenizer, batch_size=1, **kwargs)
    assert json.dumps(data) == before  # copies; the input is untouched
    assert [e["model_response"] for e in batched] == [e["model_response"] for e in single]
    assert [{k: e[k] for k in ift.REQUIRED_KEYS} for e in batched] == data
    assert all(isinstance(e["model_response"], str) for e in batched)


def test_finetune_lowers_the_loss_and_saves_a_loadable_state_dict(tokenizer, tmp_path):
    data = tiny_entries(16)
    train, val, test = data[:12], data[12:14], data[14:]
    tl, vl, _ = ift.create_dataloaders(
        train, val, test, tokenizer, batch_size=4, allowed_max_length=128
    )
    model, cfg = ift.build_model("124M", pretrained=False, overrides=TINY)
    result = ift.finetune(
        model, tl, vl, tokenizer, num_epochs=2, lr=3e-3, eval_freq=1, eval_iter=1, progress=False
    )
    assert len(result.train_losses) == len(result.val_losses) == len(result.tokens_seen) == 6
    assert result.final_train_loss < result.initial_train_loss
    assert result.minutes > 0
    path = ift.save_model(model, tmp_path / "m.pth")
    state = torch.load(path, weights_only=True)
    fresh, _ = ift.build_model(cfg, pretrained=False, seed=99)
    fresh.load_state_dict(state)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(x), model(x))


def test_pretrained_path_loads_the_checkpoint_offline(tmp_path):
    """build_model(pretrained=True) through gpt_download, on the repo's tiny real TF checkpoint
    placed where a finished download would be (so nothing is fetched)."""
    gpt_download = pytest.importorskip("gpt_download")
    fixture = REPO_ROOT / "tests" / "fixtures" / "gpt2-tiny"
    if not fixture.is_dir():
        pytest.skip(f"{fixture} is absent")
    shutil.copytree(fixture, tmp_path / "gpt2" / "124M")
    model, cfg = ift.build_model("gpt2-small (124M)", models_dir=tmp_path / "gpt2")
    settings = json.loads((fixture / "hparams.json").read_text())
    assert (cfg["vocab_size"], cfg["emb_dim"], cfg["n_layers"]) == (
        settings["n_vocab"],
        settings["n_embd"],
        settings["n_layer"],
    )
    ckpt = str(tmp_path / "gpt2" / "124M" / "model.ckpt")
    wpe = torch.from_numpy(gpt_download.load_variable(ckpt, "model/wpe"))
    assert torch.equal(model.pos_emb.weight.detach(), wpe)
    assert not model.training


def test_pretrained_download_failure_points_to_smoke(tmp_path, monkeypatch):
    gpt_download = pytest.importorskip("gpt_download")
    monkeypatch.setattr(gpt_download.time, "sleep", lambda s: None)  # skip retry back-off
    with pytest.raises(ift.DownloadError, match="--smoke") as err:
        ift.build_model("124M", models_dir=tmp_path / "gpt2")
    assert "124M" in str(err.value)


def test_model_names():
    assert ift.RunConfig().model_file_name() == "gpt2-medium355M-sft.pth"
    assert ift.RunConfig(model_size="124M").model_file_name() == "gpt2-small124M-sft.pth"
    assert ift.model_config("gpt2-medium")["emb_dim"] == 1024
    with pytest.raises(ift.ConfigError, match="gpt2-small"):
        ift.model_config("gpt5")


def test_run_phi3_with_prompt_masking(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_entries(24)))
    cfg = ift.RunConfig.smoke_preset(
        data=str(path),
        output_dir=str(tmp_path / "out"),
        model_overrides=TINY,
        prompt_style="phi3",
        mask_prompt=True,
        epochs=1,
        batch_size=4,
        max_new_tokens=4,
        use_judge=False,
    )
    summary = ift.run(cfg, progress=False)
    assert summary["data"] == {
        "source": str(path),
        "n_entries": 24,
        "n_train": 20,
        "n_val": 2,
        "n_test": 2,
    }
    assert summary["config"]["prompt_style"] == "phi3" and summary["config"]["mask_prompt"]
    assert summary["judge"] is None and summary["local_metrics"]["n"] == 2
    assert "<|user|>" in capsys.readouterr().out  # the training sample prints the phi3 prompt


# --- the command line ----------------------------------------------------------------------


def test_cli_smoke_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    judge = FakeJudge(lambda prompt: "Score: 42")
    out = tmp_path / "out"
    try:
        start = time.monotonic()
        rc = ift.main(["--smoke", "--output-dir", str(out), "--judge-url", judge.base])
        seconds = time.monotonic() - start
    finally:
        judge.close()
    assert rc == 0
    assert seconds < 60

    sample = ift.load_instruction_data(ift.SAMPLE_DATA_PATH)
    _, test_data, _ = ift.split_data(sample)
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert len(responses) == len(test_data) > 0
    for entry, original in zip(responses, test_data, strict=True):
        assert isinstance(entry["model_response"], str)
        assert {k: entry[k] for k in ift.REQUIRED_KEYS} == original

    assert (out / "loss-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    state = torch.load(out / "gpt-random-init-sft.pth", weights_only=True)
    model, _ = ift.build_model("124M", pretrained=False, overrides=ift.SMOKE_MODEL_OVERRIDES)
    model.load_state_dict(state)

    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["config"]["smoke"] is True
    assert summary["data"]["n_test"] == len(test_data)
    assert summary["final_losses"]["train"] < summary["initial_losses"]["train"]
    assert summary["training_minutes"] > 0
    assert summary["judge"]["mean_score"] == 42 and summary["judge"]["n_failed"] == 0
    assert len(judge.bodies) == len(test_data)
    assert summary["local_metrics"]["n"] == len(test_data)
    assert not (tmp_path / "outputs").exists()  # everything went to --output-dir


def test_cli_default_run_without_internet_fails_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no cached instruction-data.json here
    start = time.monotonic()
    rc = ift.main(["--output-dir", str(tmp_path / "out")])
    assert time.monotonic() - start < 10
    assert rc != 0
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert ift.DATA_URL in err and "--smoke" in err
    assert not (tmp_path / "out").exists()


def test_cli_unreachable_data_url_fails_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{closed_port()}/instruction-data.json"
    start = time.monotonic()
    rc = ift.main(["--data", url, "--data-cache", str(tmp_path / "d.json")])
    assert time.monotonic() - start < 10
    assert rc != 0
    err = capsys.readouterr().err
    assert url in err and "Connection refused" in err and "--smoke" in err


def test_cli_bad_data_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "x", "input": 1, "output": "y"}]))
    assert ift.main(["--smoke", "--data", str(path), "--output-dir", str(tmp_path)]) != 0
    assert "entry 0: key 'input' must be a string, got int" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-size", "gpt5"], "unknown model size 'gpt5'"),
        (["--judge-url", "http://127.0.0.1:bad"], "invalid port"),
    ],
)
def test_cli_bad_settings_fail_before_any_download(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert ift.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "could not download" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_missing_cuda_is_a_clear_error(capsys):
    assert ift.main(["--smoke", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_too_little_data(tmp_path, capsys):
    path = tmp_path / "few.json"
    path.write_text(json.dumps(tiny_entries(5)))  # 4 train, 0 test, 1 val
    assert ift.main(["--smoke", "--data", str(path), "--output-dir", str(tmp_path)]) == 2
    assert "0 for testing" in capsys.readouterr().err


def test_cli_flags_override_the_preset():
    args = ift.build_arg_parser().parse_args(
        [
            "--smoke",
            "--epochs",
            "1",
            "--lr",
            "0.01",
            "--no-judge",
            "--mask-prompt",
            "--prompt-style",
            "phi3",
            "--judge-api",
            "openai",
            "--max-new-tokens",
            "3",
        ]
    )
    cfg = ift.config_from_args(args)
    assert (cfg.smoke, cfg.epochs, cfg.lr, cfg.use_judge, cfg.mask_prompt) == (
        True,
        1,
        0.01,
        False,
        True,
    )
    assert (cfg.prompt_style, cfg.judge_api, cfg.max_new_tokens) == ("phi3", "openai", 3)
    assert cfg.batch_size == ift.RunConfig.smoke_preset().batch_size
    default = ift.config_from_args(ift.build_arg_parser().parse_args([]))
    assert default == ift.RunConfig()
    assert (default.model_size, default.lr, default.weight_decay, default.epochs) == (
        "gpt2-medium (355M)",
        5e-5,
        0.1,
        2,
    )
    assert (default.batch_size, default.eval_freq, default.eval_iter, default.seed) == (
        8,
        5,
        5,
        123,
    )
    assert (default.max_new_tokens, default.output_dir, default.models_dir) == (
        256,
        "outputs",
        "gpt2",
    )
