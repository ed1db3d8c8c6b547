"""The rubric, two judges compared, two models compared pairwise: against the loopback judge."""

from __future__ import annotations

import json
import re

import pytest
from scipy import stats
from test_llama_cpp import gguf_file, llama_cpp, llama_server, model_path  # noqa: F401

import compare_judges as cj
import compare_models as cm
import ollama_evaluate as oe
from ollama_evaluate import JudgeSettings
from runtime.outputs import save_json

pytestmark = pytest.mark.filterwarnings("ignore::ollama_evaluate.JudgeReplyWarning")


def responses(n: int = 12) -> list[dict]:
    return [
        {
            "instruction": f"Say the number {i}.",
            "input": "",
            "output": str(i),
            "model_response": f"The number is {i}." + " really" * (i % 4),
        }
        for i in range(n)
    ]


def number_in(prompt: str) -> int:
    return int(re.search(r"Say the number (\d+)", prompt).group(1))


# --- the rubric ---------------------------------------------------------------------------


def test_the_1_5_rubric_writes_out_its_criteria_and_parse_score_honours_the_scale() -> None:
    entry = responses(1)[0]
    prompt = oe.judge_prompt(entry, rubric="1-5")
    for criterion in ("correctness", "completeness", "following the instruction", "conciseness"):
        assert criterion in prompt
    assert "0 to 100" not in prompt and "0 to 100" in oe.judge_prompt(entry)
    assert oe.parse_score("4", "1-5") == 4
    assert oe.parse_score("Score: 5 out of 5", "1-5") == 5
    assert oe.parse_score("4/5", "1-5") == 4
    assert oe.parse_score("85", "1-5") is None and oe.parse_score("0", "1-5") is None
    assert oe.parse_score("85") == 85
    with pytest.raises(oe.ConfigError, match="unknown rubric"):
        oe.parse_score("3", "1-10")


def test_rubric_scores_are_saved_apart_and_the_summary_has_a_bootstrap_interval(
    judge_server, tmp_path, capsys
) -> None:
    judge = judge_server(lambda p: str(number_in(p) % 5 + 1) if "1 to 5" in p else "50")
    path = save_json(responses(), tmp_path / "r.json")
    assert oe.main(["--file_path", str(path), "--url", judge.base, "--rubric", "1-5"]) == 0
    out = capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert [e["judge_score"] for e in saved] == [i % 5 + 1 for i in range(12)]
    assert all(e["judge_rubric"] == "1-5" for e in saved)
    assert "95% bootstrap interval" in out and "rubric 1-5" in out
    asked = len(judge.bodies)
    assert oe.main(["--file_path", str(path), "--url", judge.base, "--rubric", "1-5"]) == 0
    assert len(judge.bodies) == asked  # all saved: nobody asked again
    # the book's scale is another set of scores: asked again, not mixed in
    result = oe.judge_responses(saved, model="llama3", url=judge.base, progress=False)
    assert result.scores == [50] * 12 and len(judge.bodies) == asked + 12
    summary = result.summary()
    assert summary["rubric"] == "0-100" and summary["mean_ci95"] == [50.0, 50.0]


# --- two judges ---------------------------------------------------------------------------


def test_two_judges_scored_compared_and_plotted(judge_server, tmp_path, capsys) -> None:
    a = judge_server(lambda p: str(number_in(p) % 5 + 1))
    b = judge_server(lambda p: str(min(5, number_in(p) % 5 + 1 + number_in(p) % 2)))
    path = save_json(responses(), tmp_path / "r.json")
    plot = tmp_path / "outputs" / "agreement.png"
    argv = ["--file_path", str(path), "--judge_a", "llama3", "--judge_a_url", a.base]
    argv += ["--judge_b", "llama3", "--judge_b_url", b.base, "--judge_b_api", "openai"]
    argv += ["--rubric", "1-5", "--plot", str(plot)]
    # same model name at two servers: the second would read the first's saved scores
    assert cj.main(argv) == 2
    assert "judge_a and --judge_b" in capsys.readouterr().err
    b.models.append("judge-b")
    argv[argv.index("--judge_b") + 1] = "judge-b"
    assert cj.main(argv) == 0
    out = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(plot.with_suffix(".json").read_text())
    sa = [i % 5 + 1 for i in range(12)]
    sb = [min(5, s + i % 2) for i, s in enumerate(sa)]
    assert report["scores"]["a"] == sa and report["scores"]["b"] == sb
    assert report["pearson"]["value"] == pytest.approx(stats.pearsonr(sa, sb).statistic)
    assert report["kendall"]["value"] == pytest.approx(stats.kendalltau(sa, sb).statistic)
    assert report["weighted_kappa"]["value"] is not None and "weighted_kappa" in out
    assert b.paths.count("/v1/chat/completions") == 12
    # a rerun reads the saved scores of both and asks nobody
    asked = len(a.bodies) + len(b.bodies)
    assert cj.main(argv) == 0 and len(a.bodies) + len(b.bodies) == asked


def test_a_judge_that_is_down_ends_in_one_line_and_keeps_what_the_other_saved(
    judge_server, tmp_path, capsys
) -> None:
    from helpers import closed_port

    a = judge_server(lambda p: "3")
    path = save_json(responses(4), tmp_path / "r.json")
    argv = ["--file_path", str(path), "--judge_a", "llama3", "--judge_a_url", a.base]
    argv += ["--judge_b", "other", "--judge_b_url", f"127.0.0.1:{closed_port()}"]
    argv += ["--rubric", "1-5", "--plot", str(tmp_path / "p.png")]
    assert cj.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error:") and "ollama serve" in errors[0]
    saved = json.loads(cj.scores_path(path, "llama3", "1-5").read_text())
    assert [e["judge_score"] for e in saved] == [3] * 4


# --- two models, pairwise -----------------------------------------------------------------


def _shown_first_is(prompt: str, marker: str) -> bool:
    if marker not in prompt:
        return False
    return prompt.index("Response A:") < prompt.index(marker) < prompt.index("Response B:")


def test_pairwise_counts_only_verdicts_that_survive_the_swap(judge_server, tmp_path) -> None:
    base = responses(10)
    better = [dict(e, model_response=e["model_response"] + " GOOD") for e in base]
    a_path = save_json(base, tmp_path / "a" / "r.json")
    b_path = save_json(better, tmp_path / "b" / "r.json")

    # a judge that prefers GOOD on even numbers, and always "A" (the first shown) on odd ones
    def reply(prompt: str) -> str:
        if number_in(prompt) % 2:
            return "A"
        return "**A**" if _shown_first_is(prompt, "GOOD") else "Response B is better."

    judge = judge_server(reply)
    out = tmp_path / "verdicts.json"
    report = cm.compare_models(a_path, b_path, out, JudgeSettings(url=judge.base), progress=False)
    assert report["n_pairs"] == 10 and report["wins_b"] == 5 and report["ties"] == 5
    assert report["win_rate"]["value"] == pytest.approx(0.75)
    low, high = report["win_rate"]["ci95"]
    assert low < 0.75 < high
    assert report["position_bias"]["value"] == pytest.approx(15 / 20)
    lc = report["length_controlled_win_rate"]
    assert lc["n"] == 10 and "10 GPT-2 tokens" in lc["method"]  # " GOOD" is one token
    assert len(judge.bodies) == 20
    saved = json.loads(out.read_text())
    assert all(r["verdict_model"] == "llama3" and r["verdict"] in "AB" for r in saved)
    # a rerun asks nobody and reports the same
    assert cm.compare_models(a_path, b_path, out, JudgeSettings(url=judge.base)) == report
    assert len(judge.bodies) == 20


def test_unparsable_verdicts_are_ties_and_length_control_drops_long_pairs(judge_server, tmp_path):
    base = responses(6)
    longer = [
        dict(e, model_response=e["model_response"] + (" and more" * 20 if i < 3 else "!"))
        for i, e in enumerate(base)
    ]
    a_path = save_json(base, tmp_path / "a" / "r.json")
    b_path = save_json(longer, tmp_path / "b" / "r.json")
    judge = judge_server(
        lambda p: (
            "I cannot decide."
            if number_in(p) == 5
            else ("A" if _shown_first_is(p, "more") else "B")
        )
    )
    report = cm.compare_models(a_path, b_path, tmp_path / "v.json", JudgeSettings(url=judge.base))
    assert report["wins_b"] == 3 and report["ties"] == 3 and report["failed_replies"] == 2
    lc = report["length_controlled_win_rate"]
    assert lc["n"] == 3 and lc["value"] == pytest.approx(0.5)  # the short pairs are all ties


def test_parse_verdict() -> None:
    assert cm.parse_verdict(" B.") == "B" and cm.parse_verdict("**A**") == "A"
    assert cm.parse_verdict("Response A is better than response A's rival") == "A"
    assert cm.parse_verdict("Response A and Response B are equal") is None
    assert cm.parse_verdict("") is None and cm.parse_verdict("Both") is None


def test_seeds_report_mean_and_spread(judge_server, tmp_path, capsys) -> None:
    judge = judge_server(lambda p: "A" if _shown_first_is(p, "GOOD") else "B")
    for seed, n_good in ((1, 2), (2, 4), (3, 6)):
        base = responses(6)
        save_json(base, tmp_path / f"a{seed}" / "r.json")
        good = [" GOOD" if i < n_good else "" for i in range(6)]
        b = [
            dict(e, model_response=e["model_response"] + g) for e, g in zip(base, good, strict=True)
        ]
        save_json(b, tmp_path / f"b{seed}" / "r.json")
    # B wins the pairs with GOOD; where neither has it the judge says "B" twice: a tie
    argv = ["--file_path_a", str(tmp_path / "a{seed}" / "r.json")]
    argv += ["--file_path_b", str(tmp_path / "b{seed}" / "r.json"), "--url", judge.base]
    argv += ["--seeds", "1,2,3", "--output", str(tmp_path / "v.json")]
    assert cm.main(argv) == 0
    out = capsys.readouterr().out
    rates = [(n + (6 - n) * 0.5) / 6 for n in (2, 4, 6)]
    mean = sum(rates) / 3
    assert f"across 3 seeds: win_rate mean {mean:.3f}" in out
    assert f"std {stats.tstd(rates):.3f}" in out
    assert (tmp_path / "v-seed2.json").is_file()
    assert cm.main(argv[:-4] + ["--seeds", "x"]) == 2
    assert "--seeds 'x'" in capsys.readouterr().err


# --- the real llama.cpp server (OpenAI-compatible) as a judge ------------------------------


@pytest.mark.slow
def test_the_real_llama_cpp_server_judges_beside_the_ollama_fake(
    llama_server,  # noqa: F811
    judge_server,
    tmp_path,
    capsys,
) -> None:
    """The tiny model's verdicts and scores are nonsense; every request must still get an
    answer that is saved (a score or a failure, a verdict or a tie), and the reports run."""
    fake = judge_server(lambda p: str(number_in(p) % 5 + 1))
    path = save_json(responses(4), tmp_path / "r.json")
    argv = ["--file_path", str(path), "--judge_a", "llama3", "--judge_a_url", fake.base]
    argv += ["--judge_b", "tiny-sft", "--judge_b_url", llama_server, "--judge_b_api", "openai"]
    argv += ["--rubric", "1-5", "--plot", str(tmp_path / "p.png"), "--timeout", "300"]
    assert cj.main(argv) == 0, capsys.readouterr().err
    saved = json.loads(cj.scores_path(path, "tiny-sft", "1-5").read_text())
    assert all(e["judge_model"] == "tiny-sft" and e["judge_reply"] for e in saved)
    assert (tmp_path / "p.png").is_file()

    a_path = save_json(responses(3), tmp_path / "a" / "r.json")
    b_path = save_json(responses(3)[::-1], tmp_path / "b" / "r.json")
    out = tmp_path / "v.json"
    report = cm.compare_models(
        a_path,
        b_path,
        out,
        JudgeSettings("tiny-sft", llama_server, "openai", timeout=300),
        progress=False,
    )
    verdicts = json.loads(out.read_text())
    assert len(verdicts) == 6 and all(v["verdict_model"] == "tiny-sft" for v in verdicts)
    assert report["wins_a"] + report["wins_b"] + report["ties"] == 3


def test_bad_judge_replies_are_failures_and_left_out_of_the_agreement(judge_server, tmp_path):
    replies = {0: "", 1: "Excellent answer!", 2: "7", 3: "4", 4: "Score: 2"}
    a = judge_server(lambda p: replies[number_in(p)])
    b = judge_server(lambda p: "3", models=["other:latest"])
    entries = responses(5)
    with pytest.warns(oe.JudgeReplyWarning, match="no integer score in 1..5"):
        result_a = cj.judge_scores(
            entries, tmp_path / "r.json", JudgeSettings(url=a.base), rubric="1-5", progress=False
        )
    result_b = cj.judge_scores(
        entries, tmp_path / "r.json", JudgeSettings("other", b.base), rubric="1-5", progress=False
    )
    assert result_a.n_failed == 3 and result_a.scored_indices == [3, 4]
    report = cj.compare_judges(result_a, result_b, rubric="1-5")
    assert report["n"] == 2 and report["n_failed"] == {"a": 3, "b": 0}
    assert report["scores"] == {"indices": [3, 4], "a": [4, 2], "b": [3, 3]}
    assert report["pearson"]["value"] is None  # judge b gave one constant score


def test_a_failed_request_leaves_its_pair_unanswered_and_a_rerun_asks_it_again(
    judge_server, tmp_path
):
    down = {"n": 2}

    def reply(prompt: str) -> str:
        if number_in(prompt) == 2 and down["n"]:
            down["n"] -= 1
            raise RuntimeError("model runner crashed")
        return "A" if _shown_first_is(prompt, "GOOD") else "B"

    judge = judge_server(reply)
    base = responses(4)
    a_path = save_json(base, tmp_path / "a" / "r.json")
    b_path = save_json([dict(e, model_response="GOOD") for e in base], tmp_path / "b" / "r.json")
    kwargs = dict(judge=JudgeSettings(url=judge.base), progress=False)
    with pytest.warns(oe.JudgeReplyWarning, match="HTTP 500"):
        first = cm.compare_models(a_path, b_path, tmp_path / "v.json", **kwargs)
    assert first["unanswered"] == 2 and first["wins_b"] == 3 and first["ties"] == 1
    again = cm.compare_models(a_path, b_path, tmp_path / "v.json", **kwargs)
    assert again["unanswered"] == 0 and again["wins_b"] == 4 and len(judge.bodies) == 10


def _flip_one_bit(path) -> bytes:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    return bytes(data)


def test_damaged_saved_verdicts_and_scores_are_refused_in_one_line(judge_server, tmp_path, capsys):
    """Issue 16: the files these commands read back carry checksums from their first save; a
    damaged one is refused in one line, and nothing overwrites it."""
    judge = judge_server(lambda p: "A" if "Response A" in p else "3")
    a_path = save_json(responses(4), tmp_path / "a" / "r.json")
    b_path = save_json(responses(4), tmp_path / "b" / "r.json")
    out = tmp_path / "verdicts.json"
    cm.compare_models(a_path, b_path, out, JudgeSettings(url=judge.base), progress=False)
    assert (tmp_path / "verdicts.json.sha256").is_file()
    damaged = _flip_one_bit(out)
    argv = ["--file_path_a", str(a_path), "--file_path_b", str(b_path), "--output", str(out)]
    assert cm.main([*argv, "--url", judge.base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and f"{out} is damaged" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == damaged

    argv = ["--file_path", str(a_path), "--judge_a", "llama3", "--judge_a_url", judge.base]
    argv += ["--judge_b", "other", "--judge_b_url", judge.base, "--rubric", "1-5"]
    argv += ["--plot", str(tmp_path / "agreement.png")]
    judge.models.append("other")
    assert cj.main(argv) == 0
    scores = cj.scores_path(a_path, "llama3", "1-5")
    assert scores.with_name(scores.name + ".sha256").is_file()
    damaged = _flip_one_bit(scores)
    capsys.readouterr()
    assert cj.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and f"{scores} is damaged" in err and len(err.splitlines()) == 1
    assert scores.read_bytes() == damaged
