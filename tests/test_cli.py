"""instruction_finetuning.py: the run configuration, the steps of a run, and the command line.

``--smoke`` writes every output; bad settings are refused before any download; without
internet the default run stops with one clear error line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import instruction_finetuning as ift
from course.instruction_data import (
    DATA_URL,
    REQUIRED_KEYS,
    SAMPLE_DATA_PATH,
    SMOKE_HINT,
    ConfigError,
    DatasetError,
    load_instruction_data,
    split_data,
)
from helpers import DataServer, FakeJudge, closed_port_url, numbered_entries
from previous_chapters import gpt2_config
from runtime import gpt2_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add hand-offs

TINY = {"emb_dim": 32, "n_layers": 1, "n_heads": 2, "context_length": 128}

SUMMARY_KEYS = {
    "config",
    "device",
    "data",
    "model",
    "initial_losses",
    "final_losses",
    "loss_history",
    "training_minutes",
    "outputs",
    "judge",
    "judge_error",
    "local_metrics",
}


def parse(*argv: str) -> ift.RunConfig:
    return ift.config_from_args(ift.build_arg_parser().parse_args(list(argv)))


# --- the run configuration -------------------------------------------------------------------


def test_defaults_are_the_chapters():
    cfg = ift.RunConfig()
    assert (cfg.model_size, cfg.pretrained, cfg.data) == ("gpt2-medium (355M)", True, DATA_URL)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == (2, 8, 5e-5, 0.1)
    assert (cfg.eval_freq, cfg.eval_iter, cfg.seed, cfg.max_new_tokens) == (5, 5, 123, 256)
    assert (cfg.train_frac, cfg.test_frac, cfg.prompt_style) == (0.85, 0.10, "alpaca")
    assert (cfg.output_dir, cfg.models_dir, cfg.judge_model) == ("outputs", "gpt2", "llama3")


def test_smoke_preset_is_a_tiny_random_gpt_on_the_sample_data():
    cfg = ift.RunConfig.smoke_preset()
    assert cfg.smoke and cfg.model_size is None and not cfg.pretrained
    assert cfg.data == str(SAMPLE_DATA_PATH)
    assert ift.model_config(cfg) == gpt2_config("124M", **ift.SMOKE_MODEL_OVERRIDES)
    assert ift.RunConfig.smoke_preset(epochs=1).epochs == 1


def test_model_file_names_follow_the_course():
    assert ift.RunConfig().model_file_name() == "gpt2-medium355M-sft.pth"
    assert ift.RunConfig(model_size="124M").model_file_name() == "gpt2-small124M-sft.pth"
    assert ift.RunConfig.smoke_preset().model_file_name() == "gpt-random-init-sft.pth"


def test_model_config_takes_a_run_config():
    assert ift.model_config(ift.RunConfig(model_size="gpt2-medium"))["emb_dim"] == 1024
    cfg = ift.RunConfig(model_size="124M", model_overrides={"context_length": 256})
    assert ift.model_config(cfg) == gpt2_config("124M", context_length=256)
    with pytest.raises(ConfigError, match="unknown GPT-2 model 'gpt5'.*gpt2-small"):
        ift.model_config(ift.RunConfig(model_size="gpt5"))
    with pytest.raises(ConfigError, match="emb_dims"):
        ift.model_config(ift.RunConfig(model_overrides={"emb_dims": 8}))


def test_make_config_ignores_none_and_refuses_unknown_settings():
    assert ift.make_config(epochs=None, lr=None) == ift.RunConfig()
    assert ift.make_config(smoke=True, epochs=None) == ift.RunConfig.smoke_preset()
    assert ift.make_config(epochs=3).epochs == 3
    with pytest.raises(ConfigError, match="epoch"):
        ift.make_config(epoch=3)


def test_make_config_refuses_a_model_size_for_the_smoke_run():
    with pytest.raises(ConfigError, match="cannot take a model size.*--model-size"):
        ift.make_config(smoke=True, model_size="124M")


@pytest.mark.parametrize("smoke", [True, False])
def test_notebook_settings_and_command_line_flags_make_the_same_config(smoke):
    notebook = ift.make_config(
        smoke=smoke,
        model_size=None,
        epochs=1,
        batch_size=None,
        lr=None,
        weight_decay=0.05,
        prompt_style="phi3",
        mask_prompt=True,
        data=None,
        output_dir="somewhere",
        use_judge=False,
        judge_model=None,
        judge_url="127.0.0.1:1234",
        judge_api="openai",
    )
    flags = ["--epochs", "1", "--weight-decay", "0.05", "--prompt-style", "phi3"]
    flags += ["--mask-prompt", "--output-dir", "somewhere", "--no-judge"]
    flags += ["--judge-url", "127.0.0.1:1234", "--judge-api", "openai"]
    assert parse(*(["--smoke"] if smoke else []), *flags) == notebook
    assert notebook.smoke is smoke and notebook.lr == (1e-3 if smoke else 5e-5)


def test_cli_flags_override_the_preset():
    cfg = parse(
        "--smoke",
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--no-judge",
        "--mask-prompt",
        "--group-by-length",
        "--prompt-style",
        "phi3",
        "--judge-api",
        "openai",
        "--max-new-tokens",
        "3",
    )
    assert (cfg.smoke, cfg.epochs, cfg.lr, cfg.use_judge, cfg.mask_prompt) == (
        True,
        1,
        0.01,
        False,
        True,
    )
    assert (cfg.prompt_style, cfg.judge_api, cfg.max_new_tokens) == ("phi3", "openai", 3)
    assert cfg.group_by_length
    assert cfg.batch_size == ift.RunConfig.smoke_preset().batch_size
    assert parse() == ift.RunConfig()
    assert parse("--smoke") == ift.RunConfig.smoke_preset()


def test_describe_names_the_settings_that_shape_a_run():
    smoke = ift.describe(ift.RunConfig.smoke_preset(use_judge=False))
    assert "tiny random GPT (smoke), random weights" in smoke
    assert "sample-instruction-data.json (alpaca prompts" in smoke
    assert "none (local metrics)" in smoke
    chapter = ift.describe(ift.RunConfig())
    assert "gpt2-medium (355M)" in chapter and DATA_URL in chapter
    assert "2 epochs, batch 8, AdamW lr 5e-05, weight decay 0.1" in chapter
    assert "llama3 via ollama" in chapter and "outputs/" in chapter


# --- check_settings --------------------------------------------------------------------------


def test_check_settings_returns_the_device():
    assert ift.check_settings(ift.RunConfig.smoke_preset(device="cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ift.check_settings(ift.RunConfig.smoke_preset()).type == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "epochs = 0 is out of range: it must be at least 1"),
        ({"batch_size": 0}, "batch_size = 0 is out of range"),
        ({"lr": -1.0}, "lr = -1.0 is out of range"),
        ({"lr": float("nan")}, "lr = nan is out of range"),
        ({"weight_decay": float("inf")}, "weight_decay = inf is out of range"),
        ({"max_new_tokens": 0}, "max_new_tokens = 0 is out of range"),
        ({"device": "foo"}, "unknown device 'foo'"),
        ({"prompt_style": "chatml"}, "unknown prompt style 'chatml'"),
        ({"judge_api": "anthropic"}, "unknown judge api 'anthropic'"),
        ({"judge_url": "http://127.0.0.1:bad"}, "invalid port"),
        ({"model_size": None, "pretrained": True}, "needs a model size"),
    ],
)
def test_check_settings_refuses(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ift.check_settings(ift.RunConfig.smoke_preset(**changes))


@pytest.fixture
def data_server():
    """Counts requests for the data; answers 404, so a download that happens fails loudly."""
    with DataServer(b"not found", status=404) as server:
        yield server


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "epochs = 0 is out of range: it must be at least 1"),
        (["--batch-size", "0"], "batch_size = 0 is out of range"),
        (["--lr", "-1"], "lr = -1.0 is out of range"),
        (["--lr", "nan"], "lr = nan is out of range"),
        (["--max-new-tokens", "0"], "max_new_tokens = 0 is out of range"),
        (["--device", "foo"], "unknown device 'foo'; use cpu, cuda or cuda:N"),
        (["--model-size", "gpt5"], "unknown GPT-2 model 'gpt5'"),
        (["--judge-url", "http://127.0.0.1:bad"], "invalid port"),
        (["--smoke", "--model-size", "124M"], "the smoke run uses its own tiny random GPT"),
    ],
)
def test_cli_bad_settings_exit_2_before_any_download(
    argv, message, data_server, tmp_path, monkeypatch, capsys, download_sleeps
):
    monkeypatch.chdir(tmp_path)
    data = ["--data", data_server.url, "--data-cache", str(tmp_path / "d.json")]
    assert ift.main([*argv, *data]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert message in err
    assert data_server.requests == 0 and "could not download" not in err and download_sleeps == []
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_missing_cuda_is_a_clear_error(capsys):
    assert ift.main(["--smoke", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


# --- failures while loading the data ----------------------------------------------------------


def test_cli_default_run_without_internet_fails_fast_and_clearly(
    tmp_path, monkeypatch, capsys, download_sleeps
):
    monkeypatch.chdir(tmp_path)  # no cached instruction-data.json here
    assert ift.main(["--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert DATA_URL in err and "test network guard" in err
    assert err.count(SMOKE_HINT) == 1  # the hint once, not twice
    # what keeps it fast: two attempts at the data with one short back-off, then it stops
    assert "2 attempt(s)" in err and len(download_sleeps) == 1 and download_sleeps[0] <= 1.0
    assert list(tmp_path.iterdir()) == []  # no output folder, no partial download


def test_cli_unreachable_data_url_fails_with_the_smoke_hint(
    tmp_path, monkeypatch, capsys, download_sleeps
):
    monkeypatch.chdir(tmp_path)
    url = closed_port_url()
    assert ift.main(["--data", url, "--data-cache", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err
    assert url in err and "Connection refused" in err and "--smoke" in err
    assert err.count("error:") == 1 and "Traceback" not in err


def test_cli_gpt2_download_failure_points_to_smoke(tmp_path, monkeypatch, capsys, download_sleeps):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPT2_BASE_URL", raising=False)
    monkeypatch.setenv(gpt2_tokenizer.OFFLINE_ENV_VAR, "1")  # only GPT-2's weights are fetched
    path = tmp_path / "d.json"
    path.write_text(json.dumps(numbered_entries(20)))
    argv = ["--data", str(path), "--model-size", "124M", "--models-dir", str(tmp_path / "gpt2")]
    assert ift.main([*argv, "--batch-size", "2", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "could not download checkpoint" in err and "GPT2_BASE_URL" in err
    assert err.count(SMOKE_HINT) == 1  # added by the command line, once
    assert not (tmp_path / "out").exists()


def test_cli_bad_data_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "x", "input": 1, "output": "y"}]))
    assert ift.main(["--smoke", "--data", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "entry 0: key 'input' must be a string, got int" in err and "Traceback" not in err


def test_cli_too_little_data(tmp_path, capsys):
    path = tmp_path / "few.json"
    path.write_text(json.dumps(numbered_entries(5)))  # 4 train, 0 test, 1 val
    assert ift.main(["--smoke", "--data", str(path), "--output-dir", str(tmp_path)]) == 2
    assert "0 for testing" in capsys.readouterr().err


# --- the steps of a run ----------------------------------------------------------------------


def test_prepare_data_splits_and_reports(tmp_path, capsys):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(numbered_entries(20)))
    splits = ift.prepare_data(ift.RunConfig.smoke_preset(data=str(path)))
    assert (len(splits.train), len(splits.test), len(splits.val)) == (17, 2, 1)
    assert splits.train + splits.test + splits.val == splits.data == numbered_entries(20)
    out = capsys.readouterr().out
    assert "Training set length: 17" in out and "Test set length: 2" in out


def test_prepare_tokenizer_of_the_smoke_run_never_tries_the_network(monkeypatch):
    def no_download():
        raise AssertionError("the smoke run must not try to download")

    monkeypatch.setattr(gpt2_tokenizer, "_fill_tiktoken_cache", no_download)
    gpt2_tokenizer.get_tokenizer.cache_clear()
    try:
        tok = ift.prepare_tokenizer(ift.RunConfig.smoke_preset())
    finally:
        gpt2_tokenizer.get_tokenizer.cache_clear()
    assert tok.encode("Hello, world") == [15496, 11, 995]


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer.get_tokenizer(offline=True)


def test_prepare_loaders_cut_texts_to_the_model_context(tokenizer, capsys):
    entries = [{**e, "output": "word " * 300} for e in numbered_entries(12)]
    cfg = ift.RunConfig.smoke_preset(model_overrides=TINY, batch_size=4)
    splits = ift.Splits(entries, entries[:8], entries[8:10], entries[10:])
    train, val, test = ift.prepare_loaders(cfg, splits, tokenizer, torch.device("cpu"))
    assert (len(train), len(val), len(test)) == (2, 1, 1)
    assert all(x.shape[1] == TINY["context_length"] for x, _ in train)
    n = TINY["context_length"]
    out = capsys.readouterr().out  # each split says so, once
    assert f"8 of 8 training entries are longer than {n} tokens and are cut to {n} " in out
    assert "(entries 0, 1, 2, 3, 4 ...)" in out and "2 of 2 test entries" in out


def test_prepare_loaders_needs_a_full_training_batch(tokenizer):
    entries = numbered_entries(6)
    cfg = ift.RunConfig.smoke_preset(batch_size=8)
    splits = ift.Splits(entries, entries[:4], entries[4:5], entries[5:])
    with pytest.raises(DatasetError, match="4 training entries make no full batch of 8"):
        ift.prepare_loaders(cfg, splits, tokenizer, torch.device("cpu"))


def test_write_summary_is_strict_json_with_the_documented_keys(tmp_path):
    cfg = ift.RunConfig.smoke_preset(output_dir=str(tmp_path), run_name="run")
    entries = numbered_entries(10)
    splits = ift.Splits(entries, entries[:8], entries[8:9], entries[9:])
    result = ift.TrainingResult(float("nan"), 3.0, [2.0], [float("inf")], [64], 1, 0.25)
    scores = {"judge": None, "judge_error": "judge disabled", "local_metrics": {"n": 1}}
    outputs = {"model": tmp_path / "m.pth"}
    summary = ift.write_summary(
        cfg, torch.device("cpu"), splits, {"emb_dim": 8}, result, outputs, scores
    )

    def refuse(constant):
        raise ValueError(constant)

    saved = json.loads((cfg.run_dir / "run-summary.json").read_text(), parse_constant=refuse)
    assert set(saved) == set(summary) == SUMMARY_KEYS
    assert saved["initial_losses"] == {"train": None, "val": 3.0}  # NaN -> null
    assert saved["loss_history"] == {"train": [2.0], "val": [None], "tokens_seen": [64]}
    assert saved["final_losses"] == {"train": 2.0, "val": None}
    assert saved["model"] == {"size": None, "pretrained": False, "config": {"emb_dim": 8}}
    assert saved["data"]["n_entries"] == 10 and saved["data"]["n_train"] == 8
    assert saved["config"]["smoke"] is True and saved["device"] == "cpu"
    assert saved["outputs"] == {"model": str(tmp_path / "m.pth")}
    assert saved["judge_error"] == "judge disabled" and saved["training_minutes"] == 0.25
    assert math.isnan(summary["initial_losses"]["train"])  # the returned dict is untouched


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_phi3_with_prompt_masking(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(numbered_entries(24)))
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
    responses = json.loads((cfg.run_dir / "instruction-data-with-response.json").read_text())
    assert [e["instruction"] for e in responses] == [
        e["instruction"] for e in numbered_entries(24)[20:22]
    ]


def test_the_chapter_run_scores_on_the_rubric_chosen_and_its_summary_says_so(
    tmp_path, judge_server
):
    """``--judge-rubric 1-5``: the run's judge step asks with the 1-5 rubric's prompt, and
    run-summary.json's judge entry names the rubric, with the mean and its 95% interval."""
    from course.judge_stats import mean_with_ci

    server = judge_server(lambda prompt: "5" if "rubric of 1 to 5" in prompt else "85")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(numbered_entries(24)))
    settings = {"data": str(path), "output_dir": str(tmp_path / "out"), "model_overrides": TINY}
    settings.update(epochs=1, batch_size=4, max_new_tokens=4, judge_url=server.base)
    argv = ["--smoke", "--judge-rubric", "1-5", "--judge-url", server.base]
    assert parse(*argv).judge_rubric == "1-5" and parse("--smoke").judge_rubric == "0-100"
    cfg = ift.RunConfig.smoke_preset(**settings, judge_rubric="1-5")
    summary = ift.run(cfg, progress=False)
    judge = summary["judge"]
    assert judge["rubric"] == "1-5" and judge["n_scored"] == 2 and judge["mean_score"] == 5
    assert judge["mean_ci95"] == mean_with_ci(judge["scores"])["ci95"] == [5.0, 5.0]
    assert all("rubric of 1 to 5" in body["messages"][0]["content"] for body in server.bodies)
    saved = json.loads((cfg.run_dir / "run-summary.json").read_text())
    assert saved["judge"]["rubric"] == "1-5" and saved["config"]["judge_rubric"] == "1-5"
    responses = json.loads((cfg.run_dir / "instruction-data-with-response.json").read_text())
    assert [(e["judge_rubric"], e["judge_score"]) for e in responses] == [("1-5", 5)] * 2
    with pytest.raises(ConfigError, match="judge_rubric = 1-10 is out of range"):
        ift.check_settings(ift.RunConfig.smoke_preset(judge_rubric="1-10"))


@pytest.mark.slow
def test_cli_smoke_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with FakeJudge(lambda prompt: "Score: 42") as judge:
        rc = ift.main(["--smoke", "--output-dir", str(out), "--judge-url", judge.base])
    assert rc == 0

    run = (out / "latest").resolve()
    assert sorted(p.name for p in out.iterdir()) == sorted(["latest", run.name])
    assert run.name.endswith("-smoke")
    sample = load_instruction_data(SAMPLE_DATA_PATH)
    _, test_data, _ = split_data(sample)
    responses = json.loads((run / "instruction-data-with-response.json").read_text())
    assert len(responses) == len(test_data) > 0
    for entry, original in zip(responses, test_data, strict=True):
        assert isinstance(entry["model_response"], str)
        assert {k: entry[k] for k in REQUIRED_KEYS} == original

    assert (run / "loss-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    state = torch.load(run / "gpt-random-init-sft.pth", weights_only=True)
    model, _ = ift.build_model("124M", pretrained=False, overrides=ift.SMOKE_MODEL_OVERRIDES)
    model.load_state_dict(state)

    summary = json.loads((run / "run-summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["config"]["smoke"] is True and summary["model"]["size"] is None
    assert summary["config"]["run_name"] == run.name
    assert summary["data"]["n_test"] == len(test_data)
    assert summary["final_losses"]["train"] < summary["initial_losses"]["train"]
    assert summary["judge"]["mean_score"] == 42 and summary["judge"]["n_failed"] == 0
    assert summary["judge"]["mean_ci95"] == [42.0, 42.0]  # every score 42: no spread
    assert summary["judge_error"] is None
    assert len(judge.bodies) == len(test_data)
    assert summary["local_metrics"]["n"] == len(test_data)
    assert summary["outputs"] == {
        "loss_plot": str(out / run.name / "loss-plot.png"),
        "model": str(out / run.name / "gpt-random-init-sft.pth"),
        "responses": str(out / run.name / "instruction-data-with-response.json"),
    }
    read_back = ["gpt-random-init-sft.pth", "instruction-data-with-response.json"]
    read_back += ["run-config.json", "training-result.json"]  # (each with its checksum)
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == sorted(
        ["loss-plot.png", "run-summary.json", *read_back, *(f"{n}.sha256" for n in read_back)]
    )
    assert not (tmp_path / "outputs").exists()  # everything went to --output-dir


@pytest.mark.slow
def test_each_run_gets_its_own_folder_and_resume_finishes_a_run(tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--smoke", "--no-judge", "--output-dir", str(out), "--epochs", "1"]
    assert ift.main(flags) == 0
    first = (out / "latest").resolve()
    first_summary = (first / "run-summary.json").read_text()
    assert ift.main(flags) == 0
    second = (out / "latest").resolve()
    assert second != first and (first / "run-summary.json").read_text() == first_summary

    # an interrupted run: it stopped after training (no responses, no summary yet)
    for name in ("instruction-data-with-response.json", "run-summary.json"):
        (second / name).unlink()
    capsys.readouterr()
    assert ift.main(["--resume", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "Training finished in an earlier session" in printed and "Initial training" not in printed
    )
    assert (
        json.loads((second / "run-summary.json").read_text())["config"]["run_name"] == second.name
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(["latest", first.name, second.name])

    # a resumed run keeps its settings
    assert ift.main(["--resume", str(first), "--lr", "0.5"]) == 2
    assert "keeps the settings it started with (lr=0.001)" in capsys.readouterr().err


def test_resume_needs_an_earlier_run(tmp_path, capsys):
    assert ift.main(["--resume", "--output-dir", str(tmp_path / "none")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "notarun").mkdir()
    assert ift.main(["--resume", str(tmp_path / "notarun")]) == 2
    assert "run-config.json is missing or unreadable" in capsys.readouterr().err


def test_the_readmes_flag_table_lists_every_flag_of_help():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("| flag | meaning (default) |", 1)[1].split("\n\n", 1)[0]
    documented = {
        flag
        for row in table.splitlines()[2:]
        for flag in re.findall(r"--[a-z-]+", row.split("|")[1])
    }
    parser = ift.build_arg_parser()
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    assert documented == flags - {"--help"}
    assert set(re.findall(r"--[a-z-]+", parser.format_help())) >= documented  # --help shows them


def test_every_flag_and_check_comes_from_the_settings_definitions():
    from runtime.run_config import check_ranges
    from runtime.run_settings import SETTINGS, definitions, ranges

    flags = {s for a in ift.build_arg_parser()._actions for s in a.option_strings}
    for name, definition in definitions(ift.RunConfig):
        assert getattr(ift.RunConfig(), name) == SETTINGS[name].default  # the default, once
        if definition.flag is not None:
            flag = "--" + definition.flag.get("name", name.replace("_", "-"))
            assert flag in flags
    rules = dict((name, rule) for name, _, rule in ranges(ift.RunConfig))
    assert rules["lr"] == "a number above 0, such as 5e-5" and "epochs" in rules
    with pytest.raises(ConfigError, match="eval_iter = 0 is out of range: it must be at least 1"):
        check_ranges(ift.RunConfig(eval_iter=0), ranges(ift.RunConfig))


def test_dpo_settings_reuse_the_shared_definitions():
    import dpo_finetuning as dft
    from runtime.dpo_config import DPOConfig
    from runtime.run_settings import SETTINGS, definitions

    shared = {n: d for n, d in definitions(DPOConfig) if n in SETTINGS}
    assert {"lr", "epochs", "batch_size", "judge_timeout", "seed", "device"} <= set(shared)
    assert shared["judge_timeout"] == SETTINGS["judge_timeout"]  # the same definition ...
    assert (
        shared["lr"].check is SETTINGS["lr"].check and shared["lr"].default == 5e-6
    )  # ... own default
    args = dft.build_arg_parser().parse_args(["--lr", "1e-3", "--no-judge", "--make-preferences"])
    cfg = dft.config_from_args(args)
    assert (cfg.lr, cfg.use_judge, cfg.make_preferences, cfg.epochs) == (1e-3, False, True, 1)
    help_text = dft.build_arg_parser().format_help()
    assert "(default: 5e-6)" in help_text and "(default: 1)" in help_text
