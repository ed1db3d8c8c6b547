"""The judge's HTTP client (judge_client.py) against servers that misbehave on purpose.

The rules: an empty, null, non-JSON or wrongly shaped reply is a failed attempt, never a saved
"no score"; ``timeout`` bounds the whole reply, whatever the server drips; a reply has a size
limit and is read in linear time; only the score and a short excerpt are saved; messages say
what happened in words, never an exception's repr; credentials never reach a file.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable

import pytest

import ollama_evaluate as oe
from helpers import closed_port
from runtime import judge_client
from runtime.judge_host import redact_url, redact_urls


class RawServer:
    """A loopback HTTP server that answers each request with ``answer(sock, path)``, raw.

    ``requests`` records each request's (method and path, headers dict, body bytes).
    """

    def __init__(self, answer: Callable[[socket.socket, str], None]):
        self.answer = answer
        self.requests: list[tuple[str, dict, bytes]] = []
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            while len(body) < int(headers.get("content-length", 0)):
                body += conn.recv(65536)
            self.requests.append((lines[0], headers, body))
            try:
                self.answer(conn, lines[0].split()[1])
            except OSError:  # the client hung up
                pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def raw_server():
    servers: list[RawServer] = []

    def start(answer) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def http(body: bytes, status: int = 200, length: bool = True) -> Callable:
    """An answer with ``body``; ``length=False``: no Content-Length (the end is the close)."""

    def answer(conn: socket.socket, path: str) -> None:
        size = f"Content-Length: {len(body)}\r\n" if length else ""
        conn.sendall(f"HTTP/1.1 {status} X\r\n{size}Connection: close\r\n\r\n".encode() + body)

    return answer


def ollama_lines(*objects) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


def openai_reply(content) -> bytes:
    return json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": content}}]}
    ).encode()


def entries(n: int) -> list[dict]:
    return [
        {"instruction": f"Task {i}.", "input": "", "output": f"A{i}.", "model_response": f"r{i}"}
        for i in range(n)
    ]


# --- unusable replies are failed attempts ----------------------------------------------------

UNUSABLE = [
    ("ollama", b"", "an empty reply"),
    ("openai", b"", "an empty reply"),
    ("ollama", ollama_lines({"message": None, "done": True}), "`message` is null"),
    ("ollama", ollama_lines({"message": {"content": None}, "done": True}), "content` is null"),
    ("openai", openai_reply(None), "`choices[0].message.content` is null"),
    ("openai", json.dumps({"choices": [{"message": None}]}).encode(), "message` is null"),
    ("openai", b"<html>Bad gateway</html>", "not JSON: '<html>Bad gateway</html>'"),
    ("ollama", b"Hello\n", "not JSON: 'Hello'"),
    ("openai", b"\x00a\xd8\x00\x00b", "not JSON"),  # gave "UnicodeDecodeError('utf-16-be', ..."
    ("openai", b"[1, 2]", "a JSON list, not an object"),
    ("openai", b'{"choices": []}', "no `choices`"),
    ("ollama", ollama_lines({"message": {"content": "4"}, "done": False}), "ended before `done`"),
    ("ollama", ollama_lines({"message": {"content": " "}, "done": True}), "a reply without text"),
    ("ollama", ollama_lines({"error": "model crashed"}), "reported an error: model crashed"),
]


@pytest.mark.parametrize(("api", "body", "says"), UNUSABLE)
def test_an_unusable_reply_is_a_failed_attempt_in_plain_words(raw_server, api, body, says):
    server = raw_server(http(body))
    with pytest.raises(oe.JudgeReplyError) as caught:
        oe.ask_judge("score it", url=server.base, api=api, timeout=5)
    message = str(caught.value)
    assert says in message and f"is {api!r} the API of this server?" in message
    for wrong in ("Error(", "Decode", "utf-16", ". .", "Start your", "ollama serve"):
        assert wrong not in message  # the server runs: starting it is not what to do


def test_an_unusable_reply_is_not_saved_and_a_later_run_asks_again(raw_server, tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(entries(2)))
    empty = raw_server(http(ollama_lines({"models": [{"name": "llama3:latest"}]})))
    with pytest.warns(oe.JudgeReplyWarning, match="an empty reply|not JSON|message"):
        out = oe.score_responses(
            json.loads(path.read_text()), judge_url=empty.base, save_path=path, progress=False
        )
    assert "failed 2 requests in a row" not in (out["judge_error"] or "")
    assert all("judge_score" not in e for e in json.loads(path.read_text()))  # nothing saved

    good = raw_server(
        lambda conn, p: http(
            json.dumps({"models": [{"name": "llama3:latest"}]}).encode()
            if p == "/api/tags"
            else ollama_lines({"message": {"content": "77"}, "done": True})
        )(conn, p)
    )
    assert oe.main(["--file_path", str(path), "--url", good.base]) == 0
    assert [e["judge_score"] for e in json.loads(path.read_text())] == [77, 77]


def test_an_empty_reply_saved_by_an_older_version_is_asked_again(raw_server, tmp_path):
    data = [
        {**e, "judge_model": "llama3", "judge_score": None, "judge_reply": ""} for e in entries(2)
    ]
    assert not oe.has_judge_reply(data[0], "llama3")
    data[1]["judge_reply"] = "no idea"  # a real reply without a score stays
    assert oe.to_ask(data, "llama3") == [0]
    assert oe.to_ask(data, "llama3", rescore_unscored=True) == [0, 1]


def test_rescore_unscored_asks_the_entries_without_a_score_again(judge_server, tmp_path, capsys):
    server = judge_server(lambda prompt: "55")
    data = entries(3)
    data[0].update(judge_model="llama3", judge_score=90, judge_reply="90")
    data[1].update(judge_model="llama3", judge_score=None, judge_reply="no idea")
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(data))
    assert oe.main(["--file_path", str(path), "--url", server.base]) == 0
    assert len(server.bodies) == 1  # only entry 2 had no reply
    assert oe.main(["--file_path", str(path), "--url", server.base, "--rescore-unscored"]) == 0
    assert len(server.bodies) == 2  # entry 1, asked again
    assert [e["judge_score"] for e in json.loads(path.read_text())] == [90, 55, 55]
    assert "Number of scores: 3 of 3" in capsys.readouterr().out


# --- time and size limits -----------------------------------------------------------------


def drip(headers: str, stop: threading.Event) -> Callable[[socket.socket, str], None]:
    """Send the headers, then one byte every 50 ms until ``stop`` (a never-ending reply)."""

    def answer(conn: socket.socket, path: str) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\n{headers}\r\n".encode())
        while not stop.wait(0.05):
            conn.sendall(b" ")

    return answer


@pytest.mark.parametrize(
    ("api", "headers"),
    [
        ("ollama", "Transfer-Encoding: chunked\r\n"),  # Ollama streams chunked NDJSON
        ("ollama", "Connection: close\r\n"),
        ("openai", "Content-Length: 100000\r\n"),
    ],
)
def test_the_timeout_bounds_the_whole_reply_of_a_dripping_server(raw_server, api, headers):
    stop = threading.Event()
    server = raw_server(drip(headers, stop))
    started = time.monotonic()
    try:
        with pytest.raises(oe.JudgeUnavailableError, match="no reply within 0.5 s"):
            oe.ask_judge("hi", url=server.base, api=api, timeout=0.5)
    finally:
        stop.set()
    assert time.monotonic() - started < 10  # (before: until the server stops dripping)


def test_no_connection_in_time_is_not_called_a_slow_reply(monkeypatch):
    def connect_timing_out(*args, **kwargs):
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", connect_timing_out)
    with pytest.raises(oe.JudgeUnavailableError) as caught:
        oe.ask_judge("hi", url="http://127.0.0.1:9")
    message = str(caught.value)
    assert "not reachable (no connection within 3 s)" in message and "ollama serve" in message
    assert "longer timeout" not in message


def test_check_judge_is_bounded_too(raw_server):
    stop = threading.Event()
    server = raw_server(drip("Connection: close\r\n", stop))
    try:
        with pytest.raises(oe.JudgeUnavailableError, match="within 0.5 s.*ollama serve"):
            oe.check_judge(server.base, timeout=0.5)
    finally:
        stop.set()


def test_a_huge_reply_is_refused_and_never_saved(raw_server, tmp_path):
    piece = {"message": {"content": "9" * 1000}, "done": False}
    stream = ollama_lines(*[piece] * 3000, {"message": {"content": ""}, "done": True})  # 3 MB
    server = raw_server(http(stream, length=False))
    with pytest.raises(oe.JudgeReplyError, match="more than 2,097,152 bytes"):
        oe.ask_judge("hi", url=server.base)
    big = raw_server(http(openai_reply("7" + " " * 3_000_000)))
    with pytest.raises(oe.JudgeReplyError, match="announced a reply of 3,000,0.. bytes"):
        oe.ask_judge("hi", url=big.base, api="openai")
    assert oe.ask_judge("hi", url=big.base, api="openai", max_bytes=4_000_000).startswith("7")


def test_a_huge_reply_saved_by_an_older_version_is_cut_to_an_excerpt(judge_server, tmp_path):
    server = judge_server(lambda prompt: "50")
    data = entries(2)
    data[0].update(judge_model="llama3", judge_score=70, judge_reply="70 " + "x" * 10**6)
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(data))
    result = oe.judge_responses(data, url=server.base, save_path=path, progress=False)
    assert result.scores == [70, 50] and len(server.bodies) == 1
    assert path.stat().st_size < 2000  # (it was copied whole into every save)


def test_a_long_reply_is_saved_as_a_short_excerpt(judge_server, tmp_path):
    server = judge_server(lambda prompt: "Score: 80. " + "Because " * 5000)
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(entries(1)))
    result = oe.judge_responses(entries(1), url=server.base, save_path=path, progress=False)
    saved = json.loads(path.read_text())[0]
    assert result.scores == [80] and saved["judge_score"] == 80
    assert saved["judge_reply"].startswith("Score: 80. Because")
    assert len(saved["judge_reply"]) == judge_client.EXCERPT_CHARS
    assert path.stat().st_size < 2000


class CountingBuffer(bytearray):
    """A bytearray that counts the bytes its ``find`` looks at."""

    looked_at = 0

    def find(self, sub, start=0, *args):
        found = super().find(sub, start, *args)
        CountingBuffer.looked_at += (len(self) if found == -1 else found + 1) - start
        return found


class ChunkedReply:
    """A response whose body arrives in small chunks (as a slow stream does)."""

    def __init__(self, body: bytes, size: int):
        self.chunks = [body[i : i + size] for i in range(0, len(body), size)]

    def getheader(self, name):
        return None

    def read1(self, n):
        return self.chunks.pop(0) if self.chunks else b""


def test_the_reply_is_read_in_linear_time():
    """Each byte is looked at once, however the lines and the chunks fall (a 1 MB line in
    100-byte chunks: the old reader looked at it again for every chunk, quadratically)."""
    body = b"x" * 1_000_000 + b"\n" + b"short\n" * 1000 + b"tail"
    exchange = judge_client._Exchange("http://127.0.0.1:9/api/chat", 5, 1)
    exchange.read = lambda response, n: response.read1(n)
    CountingBuffer.looked_at = 0
    lines = list(judge_client._lines(exchange, ChunkedReply(body, 100), 2 << 20, CountingBuffer()))
    assert lines == [b"x" * 1_000_000, *[b"short"] * 1000, b"tail"]
    assert CountingBuffer.looked_at <= len(body)


# --- messages, keys and credentials ---------------------------------------------------------


def test_an_http_error_is_one_line_without_internals(raw_server):
    server = raw_server(http(json.dumps({"error": {"message": "bad key"}}).encode(), 401))
    with pytest.raises(oe.JudgeReplyError) as caught:
        oe.ask_judge("hi", url=server.base, api="openai")
    message = str(caught.value)
    assert "answered HTTP 401: bad key" in message and "OPENAI_API_KEY" in message
    assert "\n" not in message and "Start your" not in message


def test_an_openai_judge_takes_its_key_from_the_environment(judge_server, raw_server, monkeypatch):
    seen = []

    def answer(conn, path):
        seen.append(server.requests[-1][1].get("authorization"))
        body = b'{"data": []}' if path == "/v1/models" else openai_reply("61")
        http(body)(conn, path)

    server = raw_server(answer)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-1")
    assert oe.judge_responses(entries(1), url=server.base, api="openai", progress=False).scores == [
        61
    ]
    assert seen == ["Bearer sk-test-1"] * 2  # the check and the question
    oe.check_judge(server.base, api="openai")  # (as preference_data.py asks)
    assert oe.ask_judge("hi", url=server.base, api="openai") == "61"
    assert seen == ["Bearer sk-test-1"] * 4
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-2")
    assert judge_client.api_key("openai", "MY_JUDGE_KEY") == "sk-test-2"
    assert judge_client.api_key("ollama") is None
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(oe.ConfigError, match="MY_JUDGE_KEY .* is not set"):
        judge_client.api_key("openai", "MY_JUDGE_KEY")


def test_cli_api_key_env_flag(raw_server, tmp_path, monkeypatch, capsys):
    seen = []

    def answer(conn, path):
        seen.append(server.requests[-1][1].get("authorization"))
        http(b"{}" if path == "/v1/models" else openai_reply("42"))(conn, path)

    server = raw_server(answer)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(entries(1)))
    argv = ["--file_path", str(path), "--url", server.base, "--api", "openai"]
    assert oe.main([*argv, "--api-key-env", "NOT_SET_ANYWHERE"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "NOT_SET_ANYWHERE" in err and seen == []
    monkeypatch.setenv("JUDGE_KEY", "sk-flag")
    assert oe.main([*argv, "--api-key-env", "JUDGE_KEY"]) == 0
    assert seen == ["Bearer sk-flag"] * 2


def test_credentials_in_the_judge_url_are_sent_but_never_written(raw_server, tmp_path):
    tags = json.dumps({"models": [{"name": "llama3:latest"}]}).encode()
    server = raw_server(
        lambda conn, p: http(
            tags if p == "/api/tags" else ollama_lines({"message": {"content": "x"}, "done": True})
        )(conn, p)
    )
    url = server.base.replace("http://", "http://user:secret@")
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(entries(1)))
    with pytest.warns(oe.JudgeReplyWarning):
        out = oe.score_responses(entries(1), judge_url=url, save_path=path, progress=False)
    expected = "Basic " + base64.b64encode(b"user:secret").decode()
    assert [r[1]["authorization"] for r in server.requests] == [expected] * 2
    assert out["judge"]["judge_url"] == f"{server.base}/api/chat"
    assert "secret" not in json.dumps(out) and "secret" not in path.read_text()
    down = f"http://user:secret@127.0.0.1:{closed_port()}"  # the error names it, not the secret
    out = oe.score_responses(entries(1), judge_url=down, progress=False)
    assert "not reachable" in out["judge_error"] and "secret" not in out["judge_error"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@host:8080/v1", "http://host:8080/v1"),
        ("https://token@example.org", "https://example.org"),
        ("user:pw@10.0.0.5:11434", "10.0.0.5:11434"),
        ("http://host:11434", "http://host:11434"),
        ("not a url", "not a url"),
        (None, None),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_urls_cleans_a_whole_config():
    config = {"judge_url": "http://u:p@h", "data": "https://k@d/x.json", "epochs": 2, "l": ["a"]}
    assert redact_urls(config) == {
        "judge_url": "http://h",
        "data": "https://d/x.json",
        "epochs": 2,
        "l": ["a"],
    }


def test_run_config_json_holds_no_url_secret(tmp_path, capsys):
    from runtime import run_config

    url = "http://user:secret@127.0.0.1:11434"
    cfg = run_config.RunConfig(
        output_dir=str(tmp_path), judge_url=url, data="https://k:pw@d/x.json"
    )
    run_config.start_run(cfg)
    saved = json.loads((cfg.run_dir / run_config.RUN_CONFIG_FILE).read_text())
    assert saved["judge_url"] == "http://127.0.0.1:11434" and saved["data"] == "https://d/x.json"
    assert cfg.judge_url == url  # the run itself still has the credentials it was given


# --- the layout: the course's function stays short, the client wraps it ----------------------


def test_query_model_is_the_books_short_function_and_the_modules_import_downwards():
    import ast
    import importlib
    import inspect

    body = inspect.getsource(oe.query_model).split('"""')[2]  # after the docstring
    assert len(body.strip().splitlines()) <= 12  # the book's loop; limits live in judge_client
    for name in ("timeout", "retry", "max_bytes"):
        assert name not in body

    for module, never in (
        ("runtime.judge_host", {"ollama_evaluate", "runtime.judge_client", "runtime.judge_scores"}),
        ("runtime.judge_client", {"ollama_evaluate", "runtime.judge_scores"}),
        ("runtime.judge_scores", {"ollama_evaluate"}),
    ):
        tree = ast.parse(inspect.getsource(importlib.import_module(module)))
        froms = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported = {n.module for n in froms} | {
            f"{n.module}.{a.name}" for n in froms for a in n.names
        }
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & never, f"{module} imports {imported & never}: an import cycle"


def test_a_resumed_run_takes_the_url_credentials_given_again(tmp_path, capsys):
    from runtime import run_config

    url = "http://user:secret@127.0.0.1:11434"
    cfg = run_config.RunConfig(output_dir=str(tmp_path), judge_url=url)
    run_config.start_run(cfg)
    again = run_config._resume_config(cfg.run_dir, {"judge_url": url})
    assert again.judge_url == url  # not refused as "another setting", and not saved
    assert run_config._resume_config(cfg.run_dir, {}).judge_url == "http://127.0.0.1:11434"
    with pytest.raises(oe.ConfigError, match="keeps the settings it started with"):
        run_config._resume_config(cfg.run_dir, {"judge_url": "http://u:p@10.0.0.1:11434"})


def test_split_timeout():
    assert judge_client.split_timeout(120) == (3.0, 120)  # the connection gets at most 3 s
    assert judge_client.split_timeout(0.5) == (0.5, 0.5)
    assert judge_client.split_timeout((1.0, 9.0)) == (1.0, 9.0)
