"""Judge scores (7.8, ollama_evaluate.py): the Ollama / OpenAI-compatible client against a
loopback server, reply parsing, failures, OLLAMA_HOST, the local reference metrics, and the
command line that scores a responses file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import ollama_evaluate as oe
from helpers import REPO_ROOT, FakeJudge, closed_port
from instruction_data import format_input


@pytest.fixture
def judge_server():
    servers = []

    def start(reply, **kw) -> FakeJudge:
        servers.append(FakeJudge(reply, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


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
    with pytest.raises(oe.JudgeUnavailableError, match="ollama serve"):
        oe.query_model("hi", url=url)
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
    ],
)
def test_parse_score(reply, score):
    assert oe.parse_score(reply) == score


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


def write_responses(tmp_path, data, name="responses.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


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
