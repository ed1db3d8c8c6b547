"""Judge scores (7.8): the Ollama / OpenAI-compatible client against a loopback server,
reply parsing, failures, OLLAMA_HOST, and the local reference metrics."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import instruction_finetuning as ift


class FakeJudge:
    """A threaded loopback server speaking Ollama's API (streaming NDJSON) and the
    OpenAI-compatible chat API. ``reply(prompt)`` decides the answer; bodies are recorded."""

    def __init__(self, reply, models=("llama3:latest",)):
        self.reply = reply
        self.models = list(models)
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                judge.paths.append(self.path)
                if self.path == "/api/tags":
                    models = [{"name": m, "model": m} for m in judge.models]
                    self._send(200, json.dumps({"models": models}).encode())
                elif self.path == "/v1/models":
                    self._send(
                        200, json.dumps({"data": [{"id": m} for m in judge.models]}).encode()
                    )
                else:
                    self._send(404, b"404 page not found", "text/plain")

            def do_POST(self):
                judge.paths.append(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.bodies.append(body)
                text = judge.reply(body["messages"][0]["content"])
                if self.path == "/api/chat":
                    if (
                        body["model"] not in judge.models
                        and f"{body['model']}:latest" not in judge.models
                    ):
                        msg = {"error": f"model '{body['model']}' not found"}
                        return self._send(404, json.dumps(msg).encode())
                    # stream the reply in 3-character pieces, one JSON object per line
                    pieces = [text[i : i + 3] for i in range(0, len(text), 3)] or [""]
                    lines = [
                        {
                            "model": body["model"],
                            "message": {"role": "assistant", "content": p},
                            "done": False,
                        }
                        for p in pieces
                    ]
                    lines.append(
                        {
                            "model": body["model"],
                            "message": {"role": "assistant", "content": ""},
                            "done": True,
                        }
                    )
                    payload = "".join(json.dumps(x) + "\n" for x in lines).encode()
                    self._send(200, payload, "application/x-ndjson")
                elif self.path == "/v1/chat/completions":
                    answer = {
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]
                    }
                    self._send(200, json.dumps(answer).encode())
                else:
                    self._send(404, b"{}")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_server():
    servers = []

    def start(reply, **kw) -> FakeJudge:
        servers.append(FakeJudge(reply, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entries(*responses: str) -> list[dict]:
    return [
        {"instruction": f"Task {i}.", "input": "", "output": f"Answer {i}.", "model_response": r}
        for i, r in enumerate(responses)
    ]


# --- query_model ---------------------------------------------------------------------------


def test_query_model_joins_the_stream_and_sends_the_options(judge_server):
    server = judge_server(lambda prompt: f"echo: {prompt}")
    reply = ift.query_model("What do llamas eat?", url=f"{server.base}/api/chat")
    assert reply == "echo: What do llamas eat?"
    body = server.bodies[0]
    assert body["model"] == "llama3"
    assert body["messages"] == [{"role": "user", "content": "What do llamas eat?"}]
    assert body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}


def test_query_model_accepts_a_bare_host(judge_server):
    server = judge_server(lambda prompt: "ok")
    assert ift.query_model("hi", "llama3", f"127.0.0.1:{server.port}") == "ok"
    assert server.paths == ["/api/chat"]


def test_ollama_host_is_honoured(judge_server, monkeypatch):
    server = judge_server(lambda prompt: "from env")
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{server.port}")
    assert ift.query_model("hi") == "from env"
    monkeypatch.setenv("OLLAMA_HOST", f"http://localhost:{server.port}")
    assert ift.query_model("hi") == "from env"


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
    assert ift.ollama_base_url(host) == url
    monkeypatch.setenv("OLLAMA_HOST", host)
    assert ift.judge_endpoint() == url + "/api/chat"


def test_openai_compatible_endpoint(judge_server):
    server = judge_server(lambda prompt: "73")
    reply = ift.query_model("score it", "my-model", server.base, api="openai")
    assert reply == "73"
    assert server.paths == ["/v1/chat/completions"]
    body = server.bodies[0]
    assert body["model"] == "my-model" and body["temperature"] == 0 and body["seed"] == 123
    assert body["messages"] == [{"role": "user", "content": "score it"}]
    assert ift.judge_endpoint(f"{server.base}/v1", "openai") == f"{server.base}/v1/chat/completions"


def test_server_down_says_how_to_start_ollama():
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ift.JudgeUnavailableError, match=r"ollama serve.*ollama pull llama3"):
        ift.check_judge(url)
    with pytest.raises(ift.JudgeUnavailableError, match="ollama serve"):
        ift.query_model("hi", url=url)
    with pytest.raises(ift.JudgeUnavailableError, match="ollama serve"):
        ift.generate_model_scores(entries("x"), "model_response", url=url, progress=False)


def test_model_not_pulled(judge_server):
    server = judge_server(lambda prompt: "50", models=["mistral:latest"])
    with pytest.raises(ift.JudgeUnavailableError, match=r"ollama pull llama3"):
        ift.check_judge(server.base)
    with pytest.raises(ift.JudgeUnavailableError, match=r"ollama pull llama3"):
        ift.query_model("hi", url=server.base)
    assert ift.check_judge(server.base, "mistral") == f"{server.base}/api/chat"


def test_check_judge_asks_over_http(judge_server):
    server = judge_server(lambda prompt: "1", models=["llama3:8b"])
    assert ift.check_judge(server.base, "llama3:8b") == f"{server.base}/api/chat"
    assert server.paths == ["/api/tags"]
    with pytest.raises(ift.JudgeUnavailableError, match=r"ollama pull llama3"):
        ift.check_judge(server.base, "llama3")  # llama3 means llama3:latest


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
    assert ift.parse_score(reply) == score


def test_generate_model_scores_good_and_parsed_replies(judge_server):
    replies = {"resp A": "90", "resp B": "Score: 40", "resp C": "**75**"}
    server = judge_server(lambda prompt: next(v for k, v in replies.items() if k in prompt))
    data = entries("resp A", "resp B", "resp C")
    scores = ift.generate_model_scores(data, "model_response", url=server.base, progress=False)
    assert scores == [90, 40, 75]
    prompt = server.bodies[0]["messages"][0]["content"]
    assert ift.format_input(data[0]) in prompt and "Answer 0." in prompt and "resp A" in prompt
    assert "0 to 100" in prompt and "integer number only" in prompt


def test_garbage_replies_are_failures_not_dropped(judge_server):
    replies = {"resp A": "88", "resp B": "I cannot score this.", "resp C": "250", "resp D": "60"}
    server = judge_server(lambda prompt: next(v for k, v in replies.items() if k in prompt))
    data = entries("resp A", "resp B", "resp C", "resp D")
    with pytest.warns(ift.JudgeReplyWarning) as caught:
        result = ift.judge_responses(data, url=server.base, progress=False)
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
    with pytest.warns(ift.JudgeReplyWarning):
        assert ift.generate_model_scores(
            data, "model_response", url=server.base, progress=False
        ) == [88, 60]


def test_judge_responses_over_openai_api(judge_server):
    server = judge_server(lambda prompt: "Score: 55")
    result = ift.judge_responses(entries("a", "b"), url=server.base, api="openai", progress=False)
    assert result.scores == [55, 55] and result.n_failed == 0
    assert server.paths[0] == "/v1/models"


def test_score_responses_falls_back_to_local_metrics(capsys):
    data = entries("Answer 0.", "something else")
    out = ift.score_responses(data, judge_url=f"127.0.0.1:{closed_port()}", progress=False)
    assert out["judge"] is None and "ollama serve" in out["judge_error"]
    assert out["local_metrics"]["exact_match"] == 0.5
    assert "NOT the LLM judge" in out["local_metrics"]["note"]
    assert "NOT the LLM judge" in capsys.readouterr().out


def test_score_responses_with_judge(judge_server):
    server = judge_server(lambda prompt: "70")
    out = ift.score_responses(entries("x", "y"), judge_url=server.base, progress=False)
    assert out["judge"]["mean_score"] == 70 and out["judge"]["n_scored"] == 2
    assert out["judge_error"] is None and out["local_metrics"]["n"] == 2


# --- local metrics -------------------------------------------------------------------------


def test_exact_match_normalises_case_and_whitespace():
    assert ift.exact_match("The  capital is\nOttawa.", " the capital IS ottawa. ")
    assert not ift.exact_match("The capital is Ottawa", "The capital is Ottawa.")


def test_lcs_length():
    assert ift.lcs_length("abcbdab", "bdcaba") == 4
    assert ift.lcs_length([], ["a"]) == 0


def test_rouge_l_hand_cases():
    assert ift.rouge_l_f1("the cat sat", "The cat sat!") == 1.0
    assert ift.rouge_l_f1("dog", "the cat sat") == 0.0
    # lcs("the cat on the mat", "the cat sat on a mat") = the cat on mat = 4
    precision, recall = 4 / 5, 4 / 6
    expected = 2 * precision * recall / (precision + recall)
    assert ift.rouge_l_f1("the cat on the mat", "the cat sat on a mat") == pytest.approx(expected)
    assert ift.rouge_l_f1("", "") == 1.0 and ift.rouge_l_f1("", "x") == 0.0


def test_local_metrics_means():
    data = entries("Answer 0.", "Answer")  # outputs "Answer 0." and "Answer 1."
    m = ift.local_metrics(data)
    assert m["n"] == 2 and m["exact_match"] == 0.5
    assert m["rouge_l_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
