"""dpo_finetuning.py: the DPO run's settings, its checks before any work, the SFT model it
starts from, and the command line end to end (smoke runs, a judge on loopback)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict

import pytest
import torch

import dpo_finetuning as dft
import instruction_finetuning as ift
from course.instruction_data import SAMPLE_DATA_PATH, ConfigError, DatasetError
from helpers import FakeJudge, closed_port
from preference_data import SAMPLE_PREFERENCE_PATH
from previous_chapters import GPTModel
from runtime.model_file import ModelFileError
from runtime.outputs import save_json, save_model
from runtime.run_config import RunConfig, model_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add hand-offs


def rewriter_and_scorer(prompt: str) -> str:
    """A judge for both jobs: rewrites an answer when asked to, else gives a score."""
    if "rewrite the output" in prompt:
        answer = prompt.split("correct output `")[1].split("`")[0]
        return f"Please note: {answer}" if "more polite." in prompt else f"{answer} Duh."
    return "Score: 60"


@pytest.fixture
def judge():
    server = FakeJudge(rewriter_and_scorer)
    yield server
    server.close()


def dead_judge() -> str:
    return f"127.0.0.1:{closed_port()}"


def fake_sft_run(tmp_path, **settings) -> tuple:
    """A chapter run's folder as the chapter leaves it: run-config.json and a smoke-sized
    model file (random weights: what matters here is the shapes and the settings)."""
    cfg = RunConfig.smoke_preset(output_dir=str(tmp_path), run_name="sft-run", **settings)
    folder = tmp_path / "sft-run"
    save_json(asdict(cfg), folder / "run-config.json")
    torch.manual_seed(0)
    model = GPTModel(model_config(cfg))
    path = save_model(model, folder / cfg.model_file_name())
    return path, model


# --- settings -------------------------------------------------------------------------------


def test_defaults_are_the_courses():
    cfg = dft.DPOConfig()
    assert (cfg.beta, cfg.lr, cfg.weight_decay, cfg.epochs, cfg.batch_size) == (
        0.1,
        5e-6,
        0.01,
        1,
        8,
    )
    assert (cfg.eval_freq, cfg.eval_iter, cfg.reduction, cfg.judge_model) == (5, 5, "sum", "llama3")
    smoke = dft.make_dpo_config(smoke=True, beta=0.5, lr=None)
    assert smoke.smoke and smoke.beta == 0.5 and smoke.lr == dft.DPOConfig.smoke_preset().lr
    assert smoke.preferences == str(SAMPLE_PREFERENCE_PATH)
    with pytest.raises(ConfigError, match="unknown DPO setting"):
        dft.make_dpo_config(betaa=1)


def test_flags_become_settings():
    args = dft.build_arg_parser().parse_args(
        ["--smoke", "--beta", "0.3", "--reduction", "mean", "--no-judge", "--make-preferences"]
    )
    cfg = dft.config_from_args(args)
    assert (cfg.beta, cfg.reduction, cfg.use_judge, cfg.make_preferences) == (
        0.3,
        "mean",
        False,
        True,
    )


def test_the_judge_scores_both_models_on_the_rubric_chosen(tmp_path, capsys):
    """``--judge-rubric 1-5`` (a shared setting): both models' responses are scored on the
    1-5 rubric, and each summary names it beside the mean and its interval."""
    args = dft.build_arg_parser().parse_args(["--smoke", "--judge-rubric", "1-5"])
    assert dft.config_from_args(args).judge_rubric == "1-5"
    server = FakeJudge(lambda prompt: "4" if "rubric of 1 to 5" in prompt else "85")
    try:
        cfg = dft.DPOConfig.smoke_preset(judge_url=server.base, judge_rubric="1-5")
        entry = {"instruction": "Say hi.", "input": "", "output": "Hi.", "model_response": "Hi."}
        responses = {}
        for name in ("sft", "dpo"):
            responses[name] = ([dict(entry)], save_json([entry], tmp_path / f"{name}.json"))
        scores = dft.score_both(cfg, responses, progress=False)
    finally:
        server.close()
    for name in ("sft", "dpo"):
        judge = scores[name]["judge"]
        assert (judge["rubric"], judge["mean_score"], judge["mean_ci95"]) == ("1-5", 4, [4.0, 4.0])
        assert json.loads((tmp_path / f"{name}.json").read_text())[0]["judge_rubric"] == "1-5"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beta", "0"], "beta = 0.0 is out of range"),
        (["--lr", "-1"], "lr = -1.0 is out of range"),
        (["--epochs", "0"], "epochs = 0 is out of range"),
        (["--device", "foo"], "unknown device 'foo'"),
        (["--model", "no/such/model.pth"], "no/such/model.pth: no such file"),
        (["--preferences", "no-such-prefs.json"], "Add --make-preferences"),
        (["--judge-api", "openai", "--judge-url", "http://:80"], "no host name"),
    ],
)
def test_bad_settings_stop_before_any_work_with_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    argv = ["--smoke", "--output-dir", str(out), "--judge-url", dead_judge(), *flags]
    assert dft.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()  # nothing was written


def test_without_a_model_and_without_a_chapter_run_the_error_says_how_to_make_one(tmp_path, capsys):
    argv = ["--preferences", str(SAMPLE_PREFERENCE_PATH), "--output-dir", str(tmp_path)]
    assert dft.main(argv) == 2
    err = capsys.readouterr().err
    assert "no model file found" in err and "instruction_finetuning.py" in err


# --- the SFT model ----------------------------------------------------------------------------


def test_the_sft_model_and_its_run_settings_are_loaded(tmp_path):
    path, model = fake_sft_run(tmp_path, prompt_style="phi3", split_seed=7, test_frac=0.2)
    cfg = dft.make_dpo_config(model=str(path.parent))  # the run's folder finds its model
    sft, filled = dft.load_sft(cfg, torch.device("cpu"))
    assert filled.model == str(path)
    assert (filled.prompt_style, filled.split_seed, filled.test_frac) == ("phi3", 7, 0.2)
    assert filled.data == str(SAMPLE_DATA_PATH)  # the data the chapter run trained on
    assert sft.config["n_heads"] == model_config(RunConfig.smoke_preset())["n_heads"]
    for (name, got), want in zip(
        sft.model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    # settings given now win over the run's
    _, given = dft.load_sft(dft.make_dpo_config(model=str(path), prompt_style="alpaca"), "cpu")
    assert given.prompt_style == "alpaca"


def test_a_run_folder_with_two_models_asks_for_the_file(tmp_path):
    path, model = fake_sft_run(tmp_path)
    save_model(model, path.with_name("other-sft.pth"))
    with pytest.raises(ModelFileError, match=r"holds 2 \*-sft.pth files: pass the model file"):
        dft.sft_model_path(dft.make_dpo_config(model=str(path.parent)))


def test_the_dpo_model_is_named_after_the_sft_model():
    assert dft.dpo_model_name(dft.DPOConfig(model="r/gpt2-medium355M-sft.pth")) == (
        "gpt2-medium355M-dpo.pth"
    )
    assert dft.dpo_model_name(dft.DPOConfig(smoke=True)) == "gpt-random-init-dpo.pth"


def test_the_split_follows_the_chapter_and_unpaired_entries_stay_in_the_test_set():
    entries = [
        {
            "instruction": f"Task {i}.",
            "input": "",
            "output": f"Answer {i}.",
            "chosen": f"Kindly: Answer {i}.",
            "rejected": f"Answer {i}.",
        }
        for i in range(20)
    ]
    for i in (0, 12, 19):  # no pair: a training entry, a test entry, a validation entry
        del entries[i]["chosen"], entries[i]["rejected"]
        entries[i]["preference_error"] = "empty rewrite"
    cfg = dft.make_dpo_config(train_frac=0.5, test_frac=0.4, batch_size=2, smoke=True)
    splits = dft.split_preferences(cfg, entries)  # 10 / 8 / 2 entries in file order
    assert [e["instruction"] for e in splits.train] == [f"Task {i}." for i in range(1, 10)]
    assert [e["instruction"] for e in splits.test] == [f"Task {i}." for i in range(10, 18)]
    assert [e["instruction"] for e in splits.val] == ["Task 18."]
    with pytest.raises(DatasetError, match="0 validation pairs"):  # val: entry 19 only
        dft.split_preferences(dft.make_dpo_config(train_frac=0.5, test_frac=0.45), entries)


def test_pairs_longer_than_the_context_are_reported_once_per_split(capsys):
    pair = {"instruction": "Task.", "input": "", "output": "Fine.", "chosen": "Fine, thanks."}
    pairs = [
        {**pair, "rejected": "no " * (60 if i in (1, 3) else 2)}  # pairs 1 and 3 are long
        for i in range(4)
    ]
    splits = dft.PreferenceSplits(train=pairs, val=pairs[:1], test=pairs[:1])
    cfg = dft.make_dpo_config(batch_size=2, smoke=True, prompt_style="alpaca")
    tokenizer = dft.prepare_tokenizer(cfg)
    train, val = dft.prepare_preference_loaders(cfg, splits, tokenizer, 40, "cpu")
    assert capsys.readouterr().out == (
        "2 of 4 training pairs are longer than 40 tokens and are cut to 40 (pairs 1, 3)\n"
    )
    assert max(batch["chosen"].shape[1] for batch in train) <= 40


def test_ctrl_c_outside_training_exits_130_saying_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dft, "write_both_responses", interrupted)
    argv = ["--smoke", "--epochs", "1", "--output-dir", str(tmp_path), "--no-judge"]
    assert dft.main(argv) == 130
    run = (tmp_path / "latest-dpo").resolve()
    assert f"interrupted. Resume with: python main/dpo_finetuning.py --resume {run}" in (
        capsys.readouterr().err
    )
    assert (run / "gpt-random-init-dpo.pth").is_file()  # what was saved stays
    monkeypatch.undo()  # resuming loads the trained model instead of training again
    assert dft.main(["--resume", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "DPO training finished in an earlier session" in out and "Ep 1" not in out
    assert (run / "dpo-summary.json").is_file()


@pytest.mark.parametrize(
    "name", ["dpo-config.json", "dpo-training-result.json", "gpt-random-init-dpo.pth"]
)
def test_resume_refuses_a_damaged_file_of_the_run_in_one_line(tmp_path, capsys, monkeypatch, name):
    """The files a resumed DPO run reads back carry checksums; one flipped byte is refused
    with one line naming the file, and the run resumes once the file is restored."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dft, "write_both_responses", interrupted)
    argv = ["--smoke", "--epochs", "1", "--output-dir", str(tmp_path), "--no-judge"]
    assert dft.main(argv) == 130
    monkeypatch.undo()
    path = (tmp_path / "latest-dpo").resolve() / name
    assert path.with_name(name + ".sha256").is_file()
    good = path.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert dft.main(["--resume", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert f"{path} is damaged" in err
    path.write_bytes(good)
    assert dft.main(["--resume", "--output-dir", str(tmp_path)]) == 0


def test_resume_needs_an_earlier_dpo_run_and_keeps_its_settings(tmp_path, capsys):
    assert dft.main(["--resume", "--output-dir", str(tmp_path)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    save_json(
        asdict(dft.DPOConfig.smoke_preset(run_name="run")), tmp_path / "run" / "dpo-config.json"
    )
    assert dft.main(["--resume", str(tmp_path / "run"), "--beta", "0.5"]) == 2
    assert "keeps the settings it started with (beta=0.1)" in capsys.readouterr().err


def test_resume_reuses_the_responses_saved_and_refuses_damaged_ones(tmp_path, capsys, monkeypatch):
    """Stopped while scoring: the resumed run reuses both responses files (checked against
    their checksums) instead of generating them again; a flipped byte is refused in one line."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dft, "score_both", interrupted)
    argv = ["--smoke", "--epochs", "1", "--output-dir", str(tmp_path), "--no-judge"]
    assert dft.main(argv) == 130
    monkeypatch.undo()
    run = (tmp_path / "latest-dpo").resolve()
    path = run / "dpo-responses.json"
    for name in ("sft-responses.json", "dpo-responses.json"):
        assert (run / f"{name}.sha256").is_file()
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"model_response": "', b'"model_response": "X', 1))
    capsys.readouterr()
    assert dft.main(["--resume", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path} is damaged" in err and "Traceback" not in err
    path.write_bytes(good)
    assert dft.main(["--resume", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SFT responses: reused those of an earlier session of this run" in out
    assert "DPO responses: reused those of an earlier session of this run" in out
    assert "Generating the" not in out and path.read_bytes() == good


def test_resume_refuses_a_dpo_config_with_a_wrongly_typed_setting_in_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    saved = {**asdict(dft.DPOConfig.smoke_preset(run_name="run")), "beta": "big"}
    save_json(saved, tmp_path / "run" / "dpo-config.json")  # (by hand: no checksum)
    assert dft.main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert 'dpo-config.json: beta must be float but is "big"' in err


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_writes_the_model_both_responses_the_plot_and_the_scores(tmp_path, judge, capsys):
    out = tmp_path / "out"
    assert dft.main(["--smoke", "--output-dir", str(out), "--judge-url", judge.base]) == 0
    run = (out / "latest-dpo").resolve()
    assert run.name.endswith("-dpo-smoke")
    summary = json.loads((run / "dpo-summary.json").read_text())
    # the DPO model: a plain GPTModel state dict of the smoke model's shape
    state = torch.load(run / "gpt-random-init-dpo.pth", weights_only=True)
    GPTModel(summary["model"]["config"]).load_state_dict(state)
    assert (run / "dpo-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # training raised the reward margin on the training pairs
    first, last = summary["first_and_last"]["train_reward_margin"]
    assert last > first and summary["first_and_last"]["train_loss"][1] < 0.6931
    # both models answered the same 4 test entries, and the judge scored both files
    sft = json.loads((run / "sft-responses.json").read_text())
    dpo = json.loads((run / "dpo-responses.json").read_text())
    assert [e["instruction"] for e in sft] == [e["instruction"] for e in dpo]
    assert len(sft) == summary["data"]["n_test"] == 4
    assert all(e["judge_score"] == 60 for e in sft + dpo)
    for name in ("sft", "dpo"):
        assert summary["scores"][name]["judge"]["mean_score"] == 60
    assert len(judge.bodies) == 8
    printed = capsys.readouterr().out
    assert "SFT" in printed and "DPO" in printed and "judge mean score" in printed
    assert json.loads((run / "dpo-config.json").read_text())["beta"] == 0.1


@pytest.mark.slow
def test_from_a_chapter_run_its_responses_and_scores_are_reused(tmp_path, judge, capsys):
    out = tmp_path / "out"
    assert ift.main(["--smoke", "--output-dir", str(out), "--judge-url", judge.base]) == 0
    sft_run = (out / "latest").resolve()
    scored = len(judge.bodies)
    argv = ["--smoke", "--model", str(sft_run), "--output-dir", str(out), "--judge-url", judge.base]
    assert dft.main(argv) == 0
    assert "SFT responses: reused" in capsys.readouterr().out
    assert len(judge.bodies) - scored == 4  # only the DPO model's responses were scored
    run = (out / "latest-dpo").resolve()
    chapter = json.loads((sft_run / "instruction-data-with-response.json").read_text())
    assert json.loads((run / "sft-responses.json").read_text()) == chapter
    assert (out / "latest").resolve() == sft_run  # the chapter's --resume still finds its run
    summary = json.loads((run / "dpo-summary.json").read_text())
    assert summary["model"]["sft_model"] == str(sft_run / "gpt-random-init-sft.pth")
    assert (run / "gpt-random-init-dpo.pth").is_file()


@pytest.mark.slow
def test_make_preferences_lets_the_judge_write_the_pairs_first(tmp_path, judge):
    prefs = tmp_path / "prefs.json"
    argv = [
        "--smoke",
        "--make-preferences",
        "--data",
        str(SAMPLE_DATA_PATH),
        "--preferences",
        str(prefs),
        "--output-dir",
        str(tmp_path / "out"),
        "--judge-url",
        judge.base,
        "--no-judge",
    ]
    assert dft.main(argv) == 0
    pairs = json.loads(prefs.read_text())
    assert len(pairs) == 40 and all(p["preference_model"] == "llama3" for p in pairs)
    assert len(judge.bodies) == 40  # 40 rewrites; --no-judge: no scores
    summary = json.loads(((tmp_path / "out") / "latest-dpo" / "dpo-summary.json").read_text())
    assert summary["scores"]["dpo"]["judge"] is None


@pytest.mark.slow
def test_ctrl_c_in_training_then_resume_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path, capsys, monkeypatch
):
    """The command line, stopped by SIGINT in the middle of DPO training (exit 130, a
    checkpoint, the resume hint), then resumed: the DPO model file equals, bit for bit, the
    one of a run that was never interrupted."""
    from course import dpo

    flags = ["--smoke", "--no-judge", "--checkpoint-every", "3"]
    assert dft.main([*flags, "--output-dir", str(tmp_path / "whole")]) == 0
    whole = (tmp_path / "whole" / "latest-dpo").resolve()

    real, calls = dpo.dpo_batch_metrics, []

    def ctrl_c_at_step_10(*args, **kwargs):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            calls.append(1)
            if len(calls) == 11:
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo, "dpo_batch_metrics", ctrl_c_at_step_10)
    capsys.readouterr()
    assert dft.main([*flags, "--output-dir", str(tmp_path / "parts")]) == 130
    run = (tmp_path / "parts" / "latest-dpo").resolve()
    err = capsys.readouterr().err
    assert "SIGINT: training stopped after step 10" in err
    assert f"Resume with: python main/dpo_finetuning.py --resume {run}" in err
    assert (run / "checkpoint.pt").is_file() and not (run / "dpo-summary.json").exists()

    monkeypatch.undo()
    assert dft.main(["--resume", str(run)]) == 0
    assert "Resuming from" in capsys.readouterr().out
    assert not (run / "checkpoint.pt").exists()  # deleted once the model was saved
    model = "gpt-random-init-dpo.pth"
    got, want = (torch.load(r / model, weights_only=True) for r in (run, whole))
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    summary, summary_ref = (json.loads((r / "dpo-summary.json").read_text()) for r in (run, whole))
    assert summary["tracking"] == summary_ref["tracking"]
