"""Judge scores (7.8, ollama_evaluate.py): the Ollama / OpenAI-compatible client against a
loopback server, reply parsing, failures, OLLAMA_HOST, the local reference metrics, and the
command line that scores a responses file. Faults are made to happen for real: a judge that
never answers, one that goes away or starts failing midway, Ctrl-C during scoring (also as a
real SIGINT to a real process); each time the scores so far stay saved and a re-run asks
only the entries still missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ollama_evaluate as oe
from course.instruction_data import format_input
from helpers import REPO_ROOT, closed_port, default_sigint
from runtime.outputs import save_json, verify_file


def entries(*responses: str) -> list[dict]:
    return [
        {"instruction": f"Task {i}.", "input": "", "output": f"Answer {i}.", "model_response": r}
        for i, r in enumerate(responses)
    ]


# --- query_model ---------------------------------------------------------------------------


def test_query_model_joins_the_stream_and_sends_the_options(judge_server):
    server = judge_server(lambda prompt: f"echo: {prompt}")
    reply = oe.query_model("What do llamas eat?", url=f"{server.base}/api/chat")
    assert reply == "echo: What do llamas eat?"
    body = server.bodies[0]
    assert body["model"] == "llama3"
    assert body["messages"] == [{"role": "user", "content": "What do llamas eat?"}]
    assert body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}


def test_query_model_accepts_a_bare_host(judge_server):
    server = judge_server(lambda prompt: "ok")
    assert oe.query_model("hi", "llama3", f"127.0.0.1:{server.port}") == "ok"
    assert server.paths == ["/api/chat"]


def test_ollama_host_is_honoured(judge_server, monkeypatch):
    server = judge_server(lambda prompt: "from env")
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{server.port}")
    assert oe.query_model("hi") == "from env"
    monkeypatch.setenv("OLLAMA_HOST", f"http://localhost:{server.port}")
    assert oe.query_model("hi") == "from env"


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("", "http://127.0.0.1:11434"),
        ("127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080"),
        (":9999", "http://127.0.0.1:9999"),
        ("example.org", "http://example.org:11434"),
        ("http://example.org", "http://example.org:80"),
        ("https://example.org", "https://example.org:443"),
        ("http://10.0.0.5:1234", "http://10.0.0.5:1234"),
        ("[::1]:7000", "http://[::1]:7000"),
    ],
)
def test_ollama_host_forms(host, url, monkeypatch):
    assert oe.ollama_base_url(host) == url
    monkeypatch.setenv("OLLAMA_HOST", host)
    assert oe.judge_endpoint() == url + "/api/chat"


def test_openai_compatible_endpoint(judge_server):
    server = judge_server(lambda prompt: "73")
    reply = oe.query_model("score it", "my-model", server.base, api="openai")
    assert reply == "73"
    assert server.paths == ["/v1/chat/completions"]
    body = server.bodies[0]
    assert body["model"] == "my-model" and body["temperature"] == 0 and body["seed"] == 123
    assert body["messages"] == [{"role": "user", "content": "score it"}]
    assert oe.judge_endpoint(f"{server.base}/v1", "openai") == f"{server.base}/v1/chat/completions"


def test_server_down_says_how_to_start_ollama():
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(oe.JudgeUnavailableError, match=r"ollama serve.*ollama pull llama3"):
        oe.check_judge(url)
    with pytest.raises(oe.JudgeUnavailableError, match="not reachable"):
        oe.query_model("hi", url=url)
    with pytest.raises(oe.JudgeUnavailableError, match="not reachable.*ollama serve"):
        oe.ask_judge("hi", url=url)
    with pytest.raises(oe.JudgeUnavailableError, match="ollama serve"):
        oe.generate_model_scores(entries("x"), "model_response", url=url, progress=False)


def test_model_not_pulled(judge_server):
    server = judge_server(lambda prompt: "50", models=["mistral:latest"])
    with pytest.raises(oe.JudgeUnavailableError, match=r"ollama pull llama3"):
        oe.check_judge(server.base)
    with pytest.raises(oe.JudgeUnavailableError, match=r"ollama pull llama3"):
        oe.query_model("hi", url=server.base)
    assert oe.check_judge(server.base, "mistral") == f"{server.base}/api/chat"


def test_check_judge_asks_over_http(judge_server):
    server = judge_server(lambda prompt: "1", models=["llama3:8b"])
    assert oe.check_judge(server.base, "llama3:8b") == f"{server.base}/api/chat"
    assert server.paths == ["/api/tags"]
    with pytest.raises(oe.JudgeUnavailableError, match=r"ollama pull llama3"):
        oe.check_judge(server.base, "llama3")  # llama3 means llama3:latest


# --- scores --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("85", 85),
        ("Score: 85", 85),
        ("85/100", 85),
        ("**85**", 85),
        (" 85.\n", 85),
        ("I would rate it 85 out of 100.", 85),
        ("Out of 100, I'd give 85", 85),
        ("On a scale from 0 to 100: 0", 0),
        ("1. Accurate and complete.\nScore: 92", 92),
        ("The score is **64**.", 64),
        ("Final score = 7", 7),
        ("100", 100),
        ("101", None),
        ("-5", None),
        ("85.5", None),
        ("great answer", None),
        ("", None),
        ("1000", None),
        ("1" * 5000, None),  # int() refuses strings of more than 4300 digits
    ],
)
def test_parse_score(reply, score):
    assert oe.parse_score(reply) == score


def test_parse_score_properties():
    """On any text: never raises, None or an int 0..100; "Score: N" and a bare "N" give N."""
    hypothesis = pytest.importorskip(
        "hypothesis",
        reason="the property test needs hypothesis (pip install -r requirements-dev.txt)",
    )
    st = hypothesis.strategies

    @hypothesis.given(st.text())
    def any_text(reply):
        score = oe.parse_score(reply)
        assert score is None or (type(score) is int and 0 <= score <= 100)

    @hypothesis.given(st.integers(0, 100))
    def score_colon_n(n):
        assert oe.parse_score(f"Score: {n}") == n

    @hypothesis.given(st.integers(-(10**6), 10**6))
    def bare_integer(n):
        assert oe.parse_score(str(n)) == (n if 0 <= n <= 100 else None)

    any_text()
    score_colon_n()
    bare_integer()


def test_generate_model_scores_good_and_parsed_replies(judge_server):
    replies = {"resp A": "90", "resp B": "Score: 40", "resp C": "**75**"}
    server = judge_server(lambda prompt: next(v for k, v in replies.items() if k in prompt))
    data = entries("resp A", "resp B", "resp C")
    scores = oe.generate_model_scores(data, "model_response", url=server.base, progress=False)
    assert scores == [90, 40, 75]
    prompt = server.bodies[0]["messages"][0]["content"]
    assert format_input(data[0]) in prompt and "Answer 0." in prompt and "resp A" in prompt
    assert "0 to 100" in prompt and "integer number only" in prompt


def test_garbage_replies_are_failures_not_dropped(judge_server):
    replies = {"resp A": "88", "resp B": "I cannot score this.", "resp C": "250", "resp D": "60"}
    server = judge_server(lambda prompt: next(v for k, v in replies.items() if k in prompt))
    data = entries("resp A", "resp B", "resp C", "resp D")
    with pytest.warns(oe.JudgeReplyWarning) as caught:
        result = oe.judge_responses(data, url=server.base, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("entry 1" in m and "I cannot score this." in m for m in messages)
    assert any("entry 2" in m and "250" in m for m in messages)
    assert result.scores == [88, 60] and result.scored_indices == [0, 3]
    assert [(f.index, f.reply) for f in result.failures] == [
        (1, "I cannot score this."),
        (2, "250"),
    ]
    summary = result.summary()
    assert (summary["n_scored"], summary["n_failed"], summary["mean_score"]) == (2, 2, 74.0)
    assert "2 of 4" in summary["note"] and "NOT in the mean" in summary["note"]
    with pytest.warns(oe.JudgeReplyWarning):
        assert oe.generate_model_scores(
            data, "model_response", url=server.base, progress=False
        ) == [88, 60]


def test_judge_responses_over_openai_api(judge_server):
    server = judge_server(lambda prompt: "Score: 55")
    result = oe.judge_responses(entries("a", "b"), url=server.base, api="openai", progress=False)
    assert result.scores == [55, 55] and result.n_failed == 0
    assert server.paths[0] == "/v1/models"


def test_score_responses_falls_back_to_local_metrics(capsys):
    data = entries("Answer 0.", "something else")
    out = oe.score_responses(data, judge_url=f"127.0.0.1:{closed_port()}", progress=False)
    assert out["judge"] is None and "ollama serve" in out["judge_error"]
    assert out["local_metrics"]["exact_match"] == 0.5
    assert "NOT the LLM judge" in out["local_metrics"]["note"]
    assert "NOT the LLM judge" in capsys.readouterr().out


def test_score_responses_with_judge(judge_server):
    server = judge_server(lambda prompt: "70")
    out = oe.score_responses(entries("x", "y"), judge_url=server.base, progress=False)
    assert out["judge"]["mean_score"] == 70 and out["judge"]["n_scored"] == 2
    assert out["judge_error"] is None and out["local_metrics"]["n"] == 2


# --- a judge that cannot hang or forget ------------------------------------------------------


def saved_scores(path) -> list:
    """Each entry's saved ``judge_score`` in the file; "-" where the entry has none."""
    return [e.get("judge_score", "-") for e in json.loads(path.read_text(encoding="utf-8"))]


def write_entries(tmp_path, data, name="responses.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def release():
    """An event that hanging replies wait for; set at the end so their threads finish."""
    event = threading.Event()
    yield event
    event.set()


def test_scores_and_raw_replies_are_saved_as_they_arrive(judge_server, tmp_path):
    replies = {"resp A": "Score: 90", "resp B": "no idea"}
    server = judge_server(lambda prompt: next(v for k, v in replies.items() if k in prompt))
    data = entries("resp A", "resp B")
    path = write_entries(tmp_path, data)
    with pytest.warns(oe.JudgeReplyWarning, match="entry 1"):
        result = oe.judge_responses(data, save_path=path, url=server.base, progress=False)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert [{k: e[k] for k in ("judge_model", "judge_score", "judge_reply")} for e in saved] == [
        {"judge_model": "llama3", "judge_score": 90, "judge_reply": "Score: 90"},
        {"judge_model": "llama3", "judge_score": None, "judge_reply": "no idea"},
    ]
    assert [{k: e[k] for k in data[0]} for e in saved] == data  # the entries themselves kept
    assert "judge_score" not in data[0]  # the caller's list is not changed
    assert (result.scores, result.n_failed) == ([90], 1)
    # a second run asks nothing: both entries hold a reply of this judge model
    again = oe.judge_responses(saved, save_path=path, url=server.base, progress=False)
    assert len(server.bodies) == 2
    assert again.summary() == result.summary()


def test_another_judge_model_scores_again(judge_server, tmp_path):
    server = judge_server(lambda prompt: "40", models=["llama3:latest", "phi3:latest"])
    data = [{**e, "judge_model": "llama3", "judge_score": 90} for e in entries("a", "b")]
    path = write_entries(tmp_path, data)
    result = oe.judge_responses(data, model="phi3", save_path=path, url=server.base, progress=False)
    assert result.scores == [40, 40] and len(server.bodies) == 2
    assert {e["judge_model"] for e in json.loads(path.read_text())} == {"phi3"}


def test_a_judge_that_never_answers_is_given_up_after_k_timeouts(judge_server, release, tmp_path):
    server = judge_server(lambda prompt: "50" if release.wait(60) else "")  # accepts, then hangs
    path = write_entries(tmp_path, entries("a", "b", "c", "d", "e"))
    data = json.loads(path.read_text())
    with pytest.warns(oe.JudgeReplyWarning, match="no reply within 0.2 s"):
        out = oe.score_responses(
            data, judge_url=server.base, timeout=0.2, max_failures=3, save_path=path, progress=False
        )
    assert len(server.bodies) == 3  # K requests, then it gave up
    error = out["judge_error"]
    assert "failed 3 requests in a row" in error and "no reply within 0.2 s" in error
    assert "ollama serve" in error and "ollama pull llama3" in error
    assert out["judge"] is None  # nothing was scored
    assert saved_scores(path) == ["-"] * 5  # nothing to save: the file is as it was
    assert out["local_metrics"]["n"] == 5


def test_a_judge_that_goes_away_keeps_the_scores_and_a_rerun_asks_only_the_rest(
    judge_server, monkeypatch, tmp_path
):
    server = judge_server(lambda prompt: "80")
    real_query = oe.query_model

    def query_judge_closed_after_two(*args, **kwargs):
        if len(server.bodies) == 2:
            server.close()  # the judge goes away: connections are refused from now on
        return real_query(*args, **kwargs)

    monkeypatch.setattr(oe, "query_model", query_judge_closed_after_two)
    path = write_entries(tmp_path, entries("a", "b", "c", "d", "e", "f"))
    with pytest.warns(oe.JudgeReplyWarning, match="request failed"):
        out = oe.score_responses(
            json.loads(path.read_text()), judge_url=server.base, save_path=path, progress=False
        )
    assert saved_scores(path) == [80, 80, "-", "-", "-", "-"]
    assert "failed 3 requests in a row" in out["judge_error"]
    assert "ollama serve" in out["judge_error"] and str(path) in out["judge_error"]
    judge = out["judge"]  # what it did score before it went away
    assert (judge["n_scored"], judge["n_failed"], judge["n_not_asked"]) == (2, 3, 1)
    assert judge["mean_score"] == 80 and judge["scores"] == [80, 80]
    assert judge["scored_indices"] == [0, 1] and "not asked" in judge["note"]
    assert all(f["reason"].startswith("request failed") for f in judge["failures"])

    monkeypatch.setattr(oe, "query_model", real_query)
    back = judge_server(lambda prompt: "60")  # the judge is back (on another port)
    out = oe.score_responses(
        json.loads(path.read_text()), judge_url=back.base, save_path=path, progress=False
    )
    asked = [b["messages"][0]["content"] for b in back.bodies]
    assert len(asked) == 4 and all(
        f"response `{r}`" in a for r, a in zip("cdef", asked, strict=True)
    )
    assert saved_scores(path) == [80, 80, 60, 60, 60, 60]
    assert out["judge_error"] is None and out["judge"]["n_scored"] == 6
    assert out["judge"]["mean_score"] == pytest.approx((2 * 80 + 4 * 60) / 6)


def test_replies_without_a_score_do_not_count_towards_giving_up(judge_server, tmp_path):
    calls = []

    def reply(prompt):  # request failures and unusable replies take turns
        calls.append(prompt)
        if len(calls) % 2:
            raise RuntimeError("llama runner process has terminated")
        return "I cannot say"

    server = judge_server(reply)
    path = write_entries(tmp_path, entries(*"abcdef"))
    with pytest.warns(oe.JudgeReplyWarning):
        result = oe.judge_responses(
            json.loads(path.read_text()),
            url=server.base,
            max_failures=2,
            save_path=path,
            progress=False,
        )
    assert len(server.bodies) == 6 and result.n_scored == 0 and result.n_not_asked == 0
    reasons = [f.reason for f in result.failures]
    assert all("HTTP 500" in r and "runner" in r for r in reasons[::2])
    assert reasons[1::2] == [oe.NO_SCORE] * 3
    assert saved_scores(path) == ["-", None] * 3  # only answered entries are saved


def test_ctrl_c_while_scoring_keeps_every_score_so_far(judge_server, monkeypatch, tmp_path):
    server = judge_server(lambda prompt: "70")
    real_query = oe.query_model

    def query_interrupted_at_the_fourth(*args, **kwargs):
        if len(server.bodies) == 3:
            raise KeyboardInterrupt
        return real_query(*args, **kwargs)

    monkeypatch.setattr(oe, "query_model", query_interrupted_at_the_fourth)
    path = write_entries(tmp_path, entries(*"abcdef"))
    with pytest.raises(KeyboardInterrupt):
        oe.score_responses(
            json.loads(path.read_text()), judge_url=server.base, save_path=path, progress=False
        )
    assert saved_scores(path) == [70, 70, 70, "-", "-", "-"]


def test_bad_timeout_or_max_failures_fail_before_any_request(judge_server):
    server = judge_server(lambda prompt: "1")
    for bad in (0, -1.0, float("nan"), float("inf"), "10"):
        with pytest.raises(oe.ConfigError, match="seconds above 0"):
            oe.judge_responses(entries("a"), url=server.base, timeout=bad, progress=False)
    with pytest.raises(oe.ConfigError, match="at least 1"):
        oe.judge_responses(entries("a"), url=server.base, max_failures=0, progress=False)
    assert server.paths == []


# --- local metrics -------------------------------------------------------------------------


def test_exact_match_normalises_case_and_whitespace():
    assert oe.exact_match("The  capital is\nOttawa.", " the capital IS ottawa. ")
    assert not oe.exact_match("The capital is Ottawa", "The capital is Ottawa.")


def test_lcs_length():
    assert oe.lcs_length("abcbdab", "bdcaba") == 4
    assert oe.lcs_length([], ["a"]) == 0


def test_rouge_l_hand_cases():
    assert oe.rouge_l_f1("the cat sat", "The cat sat!") == 1.0
    assert oe.rouge_l_f1("dog", "the cat sat") == 0.0
    # lcs("the cat on the mat", "the cat sat on a mat") = the cat on mat = 4
    precision, recall = 4 / 5, 4 / 6
    expected = 2 * precision * recall / (precision + recall)
    assert oe.rouge_l_f1("the cat on the mat", "the cat sat on a mat") == pytest.approx(expected)
    assert oe.rouge_l_f1("", "") == 1.0 and oe.rouge_l_f1("", "x") == 0.0


def test_local_metrics_means():
    data = entries("Answer 0.", "Answer")  # outputs "Answer 0." and "Answer 1."
    m = oe.local_metrics(data)
    assert m["n"] == 2 and m["exact_match"] == 0.5
    assert m["rouge_l_f1"] == pytest.approx((1.0 + 2 / 3) / 2)


# --- the command line: python main/ollama_evaluate.py --file_path FILE ----------------------


def write_responses(tmp_path, data, name="responses.json") -> str:
    return str(write_entries(tmp_path, data, name))


def test_cli_scores_a_responses_file(judge_server, tmp_path, capsys):
    replies = {"resp A": "90", "resp B": "Score: 50"}
    server = judge_server(lambda prompt: next(v for k, v in replies.items() if k in prompt))
    path = write_responses(tmp_path, entries("resp A", "resp B"))
    assert oe.main(["--file_path", path, "--url", server.base]) == 0
    out = capsys.readouterr().out
    assert "Number of scores: 2 of 2" in out and "Average score: 70.00" in out
    assert server.paths == ["/api/tags", "/api/chat", "/api/chat"]
    assert {b["model"] for b in server.bodies} == {"llama3"}


def test_cli_options_key_model_and_openai_api(judge_server, tmp_path, capsys):
    server = judge_server(lambda prompt: "Score: 80" if "my answer" in prompt else "0")
    data = [{**e, "answer": "my answer"} for e in entries("ignored")]
    path = write_responses(tmp_path, data)
    argv = ["--file_path", path, "--url", server.base, "--json_key", "answer"]
    assert oe.main([*argv, "--model", "phi3", "--api", "openai"]) == 0
    assert "Average score: 80.00" in capsys.readouterr().out
    assert server.paths == ["/v1/models", "/v1/chat/completions"]
    assert server.bodies[0]["model"] == "phi3"


def test_cli_reports_replies_without_a_score(judge_server, tmp_path, capsys):
    server = judge_server(lambda prompt: "60" if "resp A" in prompt else "no idea")
    path = write_responses(tmp_path, entries("resp A", "resp B"))
    with pytest.warns(oe.JudgeReplyWarning, match="entry 1"):
        assert oe.main(["--file_path", path, "--url", server.base]) == 0
    out = capsys.readouterr().out
    assert "Number of scores: 1 of 2" in out and "Average score: 60.00" in out
    assert "1 of 2 entries got no valid score" in out


def test_cli_entries_without_responses_exit_2_naming_them(judge_server, tmp_path, capsys):
    server = judge_server(lambda prompt: "50")
    data = entries("a", "b", "c")
    del data[1]["model_response"]
    data[2]["model_response"] = None
    path = write_responses(tmp_path, data)
    assert oe.main(["--file_path", path, "--url", server.base]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "2 of 3 entries have no string 'model_response' (entries 1, 2)" in err
    assert "section 7.7" in err
    assert server.paths == []  # the file is checked before the judge is asked anything


def test_cli_unreachable_judge_exits_2_with_the_ollama_hint(tmp_path, capsys):
    path = write_responses(tmp_path, entries("a"))
    assert oe.main(["--file_path", path, "--url", f"127.0.0.1:{closed_port()}"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "ollama serve" in err and "ollama pull llama3" in err


def test_cli_bad_file_exits_2(tmp_path, capsys):
    assert oe.main(["--file_path", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    assert oe.main(["--file_path", str(bad)]) == 2
    assert "invalid JSON" in capsys.readouterr().err


def test_cli_needs_a_file_path(capsys):
    with pytest.raises(SystemExit) as exit_info:
        oe.main([])
    assert exit_info.value.code == 2
    assert "--file_path" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_as_a_script_from_the_repository_root(judge_server, tmp_path):
    """`python main/ollama_evaluate.py ...` in a fresh process finds its modules by itself."""
    server = judge_server(lambda prompt: "75")
    path = write_responses(tmp_path, entries("x", "y"))
    # no PYTHONPATH (the script puts the repository root on sys.path) and no OLLAMA_HOST
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OLLAMA_HOST")}
    result = subprocess.run(
        [sys.executable, "main/ollama_evaluate.py", "--file_path", path, "--url", server.base],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Number of scores: 2 of 2" in result.stdout
    assert "Average score: 75.00" in result.stdout
    assert len(server.bodies) == 2


def test_cli_scores_the_file_in_place_and_a_rerun_asks_nothing(judge_server, tmp_path, capsys):
    replies = {"resp A": "90", "resp B": "no idea"}
    server = judge_server(lambda prompt: next(v for k, v in replies.items() if k in prompt))
    path = write_entries(tmp_path, entries("resp A", "resp B"))
    with pytest.warns(oe.JudgeReplyWarning):
        assert oe.main(["--file_path", str(path), "--url", server.base]) == 0
    first = capsys.readouterr().out
    assert "Number of scores: 1 of 2" in first and "Average score: 90.00" in first
    assert saved_scores(path) == [90, None]
    requests_made = list(server.paths)
    assert oe.main(["--file_path", str(path), "--url", server.base]) == 0
    assert server.paths == requests_made  # everything was saved: the judge is not even asked
    again = capsys.readouterr().out
    assert "2 of 2 entries have a saved reply of llama3" in again
    assert "Number of scores: 1 of 2" in again and "Average score: 90.00" in again


def test_cli_refuses_a_damaged_responses_file_that_has_a_checksum(judge_server, tmp_path, capsys):
    """A responses file saved with a checksum (the chapter run's) keeps it current while
    scores are saved, and a byte changed afterwards is refused before the judge is asked."""
    server = judge_server(lambda prompt: "70")
    path = tmp_path / "responses.json"
    save_json(entries("resp A", "resp B"), path, checksum=True)
    assert oe.main(["--file_path", str(path), "--url", server.base]) == 0
    verify_file(path, "")  # the scores were saved with the checksum updated
    asked = len(server.paths)
    data = bytearray(path.read_bytes())
    data[data.index(b"resp A") + 5] ^= 0x01  # "resp A" becomes "resp @"
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert oe.main(["--file_path", str(path), "--url", server.base]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert f"{path} is damaged" in err and "responses.json.sha256" in err
    assert len(server.paths) == asked  # nothing was asked
    path.with_name("responses.json.sha256").unlink()  # made by hand: read unchecked
    assert oe.main(["--file_path", str(path), "--url", server.base]) == 0


def test_cli_timeout_and_max_failures_flags(judge_server, release, tmp_path, capsys):
    args = oe.build_arg_parser().parse_args(["--file_path", "f.json"])
    assert (args.timeout, args.max_failures) == (120.0, 3)
    server = judge_server(lambda prompt: "50" if release.wait(60) else "")  # never answers
    path = write_entries(tmp_path, entries("a", "b", "c"))
    argv = ["--file_path", str(path), "--url", server.base, "--timeout", "0.2"]
    with pytest.warns(oe.JudgeReplyWarning):
        assert oe.main([*argv, "--max_failures", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "failed 2 requests in a row" in err and "no reply within 0.2 s" in err
    assert "ollama serve" in err
    assert len(server.bodies) == 2
    for flag, value, says in (("--timeout", "0", "above 0"), ("--max_failures", "0", "at least 1")):
        assert oe.main(["--file_path", str(path), "--url", server.base, flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and says in err
    assert len(server.bodies) == 2


def test_cli_judge_that_starts_failing_exits_2_and_a_rerun_continues(
    judge_server, tmp_path, capsys
):
    down = threading.Event()

    def reply(prompt):
        if len(server.bodies) > 2 and not down.is_set():
            down.set()
        if down.is_set() and not back.is_set():
            raise RuntimeError("llama runner process has terminated")
        return "75"

    back = threading.Event()
    server = judge_server(reply)
    path = write_entries(tmp_path, entries(*"abcde"))
    argv = ["--file_path", str(path), "--url", server.base]
    with pytest.warns(oe.JudgeReplyWarning, match="HTTP 500"):
        assert oe.main([*argv, "--max_failures", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("error:") == 1 and "Traceback" not in captured.err
    assert "failed 2 requests in a row" in captured.err and "runner" in captured.err
    assert f"scoring it again (python main/ollama_evaluate.py --file_path {path})" in captured.err
    assert "Number of scores: 2 of 5" in captured.out  # what it did score, before the error
    assert saved_scores(path) == [75, 75, "-", "-", "-"]
    asked_before = len(server.bodies)
    back.set()
    assert oe.main(argv) == 0
    assert len(server.bodies) - asked_before == 3  # only the entries still missing
    assert saved_scores(path) == [75] * 5
    assert "Number of scores: 5 of 5" in capsys.readouterr().out


def test_cli_ctrl_c_exits_130_saying_the_scores_are_saved(
    judge_server, monkeypatch, tmp_path, capsys
):
    server = judge_server(lambda prompt: "70")
    real_query = oe.query_model

    def query_interrupted_at_the_second(*args, **kwargs):
        if len(server.bodies) == 1:
            raise KeyboardInterrupt
        return real_query(*args, **kwargs)

    monkeypatch.setattr(oe, "query_model", query_interrupted_at_the_second)
    path = write_entries(tmp_path, entries("a", "b", "c"))
    assert oe.main(["--file_path", str(path), "--url", server.base]) == 130
    message = capsys.readouterr().err
    assert "scores so far are saved in" in message and str(path) in message
    assert "run the same command again" in message
    assert saved_scores(path) == [70, "-", "-"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, which is POSIX-only")
def test_cli_real_process_interrupted_by_sigint_exits_130_and_a_rerun_finishes(
    judge_server, release, tmp_path
):
    """A real `python main/ollama_evaluate.py` gets SIGINT while the judge is answering."""

    def reply(prompt):  # answers two entries, then is slow until released
        if len(server.bodies) > 2:
            release.wait(60)
        return "66"

    server = judge_server(reply)
    path = write_entries(tmp_path, entries(*"abcde"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OLLAMA_HOST")}
    process = subprocess.Popen(
        [sys.executable, "main/ollama_evaluate.py", "--file_path", str(path), "--url", server.base],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_sigint,  # (a shell's background job would start with SIGINT ignored)
    )
    try:
        for _ in range(1200):  # up to a minute for the first two scores to be saved
            if saved_scores(path).count(66) == 2 or process.poll() is not None:
                break
            time.sleep(0.05)
        assert saved_scores(path) == [66, 66, "-", "-", "-"]
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "scores so far are saved" in err and "Traceback" not in err
    assert saved_scores(path) == [66, 66, "-", "-", "-"]
    release.set()
    asked_before = len(server.bodies)
    assert oe.main(["--file_path", str(path), "--url", server.base]) == 0
    assert len(server.bodies) - asked_before == 3
    assert saved_scores(path) == [66] * 5
