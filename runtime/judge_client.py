"""The judge's HTTP client: what a real run needs around the course's ``query_model``.

``query_model`` (in ``ollama_evaluate``) is the book's twenty lines: build the chat request,
send it, join the reply's pieces. It sends through ``post_json`` from here, which bounds the
exchange: ``timeout`` seconds for the whole reply (a server that drips a byte at a time is
cut off when they are spent), at most ``max_bytes`` of reply, read in linear time, and an
HTTP error turned into one line that says what to do. ``ask`` wraps ``query_model`` and
checks its result: an empty, null, non-JSON or wrongly shaped reply raises
``JudgeReplyError``, a failed attempt, never a result. ``check_judge`` asks whether the
server is up. Messages name the server without the credentials its URL may carry.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import json
import math
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from course.instruction_data import ConfigError
from runtime.judge_host import (
    JudgeReplyError,
    JudgeUnavailableError,
    judge_base,
    judge_endpoint,
    judge_hint,
    redact_url,
    start_hint,
    with_judge_hint,
)

JUDGE_TIMEOUT = 120.0  # seconds for one whole reply
JUDGE_CONNECT_TIMEOUT = 3.0  # seconds to wait for the connection (at most)
MAX_REPLY_BYTES = 2 << 20  # a reply of Ollama's 2048-token context is far below this
EXCERPT_CHARS = 200  # how much of a reply is kept or shown
OPENAI_KEY_ENV = "OPENAI_API_KEY"
_READ_SIZE = 1 << 16


def excerpt(text: str | bytes, limit: int = EXCERPT_CHARS) -> str:
    """``text`` on one line, without control characters, cut to ``limit`` characters."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[: 4 * limit]).decode("utf-8", errors="replace")
    flat = re.sub(r"\s+", " ", "".join(c if c.isprintable() else " " for c in text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def split_timeout(timeout: float | tuple[float, float]) -> tuple[float, float]:
    """(connect, whole reply) seconds: a number bounds the reply, and the connection gets at
    most ``JUDGE_CONNECT_TIMEOUT`` of it; a pair is taken as it is."""
    pair = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    if not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in pair):
        raise ConfigError(f"judge timeout {timeout!r}: give a number of seconds above 0")
    total = pair[1]
    return pair if isinstance(timeout, tuple) else (min(JUDGE_CONNECT_TIMEOUT, total), total)


def api_key(api: str, env: str | None = None) -> str | None:
    """The judge's API key: from the environment variable ``env`` when named (it must be
    set), else $OPENAI_API_KEY for an OpenAI-compatible judge; None for Ollama."""
    if env:
        if not os.environ.get(env):
            raise ConfigError(f"the environment variable {env} (the judge's API key) is not set")
        return os.environ[env]
    return os.environ.get(OPENAI_KEY_ENV) or None if api == "openai" else None


class _Exchange:
    """One HTTP request whose whole exchange ends within ``seconds``: a timer shuts the
    socket down when they are spent, which ends any read in progress."""

    def __init__(self, url: str, seconds: float, connect_timeout: float):
        self.url, self.seconds, self.shown = url, seconds, redact_url(url)
        parts = urlsplit(url)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.auth = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.auth = "Basic " + base64.b64encode(pair.encode()).decode()
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self.connect_timeout = min(connect_timeout, seconds)
        self.conn = kind(parts.hostname, parts.port, timeout=self.connect_timeout)
        self.expired, self.connected = threading.Event(), False
        self.timer = threading.Timer(seconds, self._cut)
        self.timer.daemon = True

    def _cut(self) -> None:
        self.expired.set()
        with contextlib.suppress(OSError, AttributeError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """Report a socket or HTTP failure as ``JudgeUnavailableError``, in one line."""
        try:
            yield
        except (OSError, http.client.HTTPException) as exc:
            raise self._failure(exc) from None
        if self.expired.is_set():  # the timer ended the reply: what came is not all of it
            raise self._failure(TimeoutError())

    def _failure(self, exc: BaseException) -> JudgeUnavailableError:
        if not self.connected and isinstance(exc, TimeoutError):
            return JudgeUnavailableError(
                f"the LLM judge at {self.shown} is not reachable "
                f"(no connection within {self.connect_timeout:g} s)"
            )
        if self.expired.is_set() or isinstance(exc, TimeoutError):
            return JudgeUnavailableError(
                f"the LLM judge at {self.shown} gave no reply within {self.seconds:g} s "
                "(the time is for the whole reply; a slow judge needs a longer timeout)"
            )
        if isinstance(exc, http.client.IncompleteRead):
            return JudgeUnavailableError(f"{self.shown} closed the connection mid-reply")
        cause = getattr(exc, "strerror", None) or type(exc).__name__
        return JudgeUnavailableError(f"the LLM judge at {self.shown} is not reachable ({cause})")

    def open(self, method: str, body: bytes | None, headers: dict) -> http.client.HTTPResponse:
        """Send the request; the response, its headers read."""
        self.timer.start()
        if self.auth and "Authorization" not in headers:
            headers = {**headers, "Authorization": self.auth}
        with self._failures():
            self.conn.connect()
            self.connected = True
            self.conn.sock.settimeout(self.seconds)  # the timer cuts it sooner
            self.conn.request(method, self.target, body=body, headers=headers)
            return self.conn.getresponse()

    def read(self, response: http.client.HTTPResponse, limit: int) -> bytes:
        """What has arrived of the body (b"" at its end)."""
        with self._failures():
            return response.read1(limit)

    def close(self) -> None:
        self.timer.cancel()
        self.conn.close()


def _lines(exchange: _Exchange, response, max_bytes: int, received: bytearray) -> Iterator[bytes]:
    """The body's lines, kept in ``received``; each byte is looked at once (linear time)."""
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise JudgeReplyError(
            f"{exchange.shown} announced a reply of {int(length):,} bytes; "
            f"the limit is {max_bytes:,}"
        )
    start = 0
    while chunk := exchange.read(response, _READ_SIZE):
        if len(received) + len(chunk) > max_bytes:
            raise JudgeReplyError(f"{exchange.shown} sent more than {max_bytes:,} bytes of reply")
        scan = len(received)
        received += chunk
        while (end := received.find(b"\n", scan)) != -1:
            yield bytes(received[start:end])
            start = scan = end + 1
    if start < len(received):
        yield bytes(received[start:])


def _error_text(body: bytes) -> str:
    """The server's error message in an error reply (Ollama's and OpenAI's JSON, or text)."""
    with contextlib.suppress(ValueError, RecursionError):
        error = json.loads(body).get("error")
        error = error.get("message", error) if isinstance(error, dict) else error
        if error:
            return excerpt(str(error))
    return excerpt(body) or "no message"


def _status_error(exchange: _Exchange, response, model: str) -> JudgeUnavailableError | None:
    """None for HTTP 200; else the error, read from at most 4 kB of the body. A server error
    (5xx) counts as a server that is down: restarting it is what to do."""
    if response.status == 200:
        return None
    text = _error_text(exchange.read(response, 4096))
    where = f"{exchange.shown} answered HTTP {response.status}: {text}"
    if response.status >= 500:
        return JudgeUnavailableError(where)
    if response.status == 404 and exchange.url.endswith("/api/chat"):
        return JudgeReplyError(f"{where}; run `ollama pull {model}`")
    if response.status in (401, 403):
        return JudgeReplyError(
            f"{where}; give the judge's key in ${OPENAI_KEY_ENV} (or name another variable "
            "with --api-key-env), or its user and password in the URL"
        )
    return JudgeReplyError(where)


def post_json(
    url: str,
    data: dict,
    *,
    timeout: float | tuple[float, float] = JUDGE_TIMEOUT,
    max_bytes: int = MAX_REPLY_BYTES,
    key: str | None = None,
    received: bytearray | None = None,
) -> Iterator[bytes]:
    """POST ``data`` as JSON to ``url``; yield the reply's lines (``query_model``'s ``post``).

    The whole exchange ends within ``timeout`` seconds (or a (connect, reply) pair); more than
    ``max_bytes`` of reply, a failed connection or an HTTP error raise
    ``JudgeUnavailableError``. ``key``: sent as a bearer token. ``received`` collects the
    raw reply (``ask`` reads it when the reply is unusable).
    """
    connect, seconds = split_timeout(timeout)
    exchange = _Exchange(url, seconds, connect)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        response = exchange.open("POST", json.dumps(data).encode(), headers)
        error = _status_error(exchange, response, str(data.get("model", "")))
        if error is not None:
            raise error
        yield from _lines(
            exchange, response, max_bytes, bytearray() if received is None else received
        )
    finally:
        exchange.close()


def _shape_problem(reply: Any, api: str) -> str | None:
    """What is wrong with one parsed reply object of ``api``; None when it has its text."""
    if not isinstance(reply, dict):
        return f"a JSON {type(reply).__name__}, not an object"
    if reply.get("error"):
        return f"the judge reported an error: {_error_text(json.dumps(reply).encode())}"
    if api == "openai":
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return "no `choices`"
        reply, where = choices[0], "choices[0].message"
    else:
        where = "message"
    message = reply.get("message")
    if not isinstance(message, dict):
        return f"`{where}` is {json.dumps(message)[:40]}"
    if not isinstance(message.get("content"), str):
        return f"`{where}.content` is {json.dumps(message.get('content'))[:40]}"
    return None


def reply_problem(body: bytes, api: str) -> str | None:
    """Why the raw reply ``body`` of ``api`` is unusable; None when it is fine (for Ollama's
    stream: every line holds a piece and the last says ``done``)."""
    if not body.strip():
        return "an empty reply"
    lines = [line for line in body.split(b"\n") if line.strip()] if api == "ollama" else [body]
    for line in lines:
        try:
            parsed = json.loads(line)
        except (ValueError, RecursionError):
            return f"a reply that is not JSON: {excerpt(line, 80)!r}"
        problem = _shape_problem(parsed, api)
        if problem is not None:
            return problem
    if api == "ollama" and not json.loads(lines[-1]).get("done"):
        return "a reply stream that ended before `done`"
    return None


def ask(
    query: Callable[..., str],
    prompt: str,
    model: str,
    url: str | None = None,
    *,
    api: str = "ollama",
    timeout: float | tuple[float, float] = JUDGE_TIMEOUT,
    max_bytes: int = MAX_REPLY_BYTES,
    key: str | None = None,
) -> str:
    """``query(prompt, model, endpoint, api=api, post=...)`` (``query_model``) sent through
    ``post_json``'s limits; its reply text, checked.

    An unusable reply (empty, null, not JSON, not the API's shape, an unfinished stream)
    raises ``JudgeReplyError``; no connection, no reply in time or an HTTP error raise
    ``JudgeUnavailableError``: either way a failed attempt, never a result. ``key``: the
    API key (None: ``api_key(api)``, i.e. $OPENAI_API_KEY for an OpenAI-compatible judge).
    """
    endpoint = judge_endpoint(url, api)
    received = bytearray()
    key = api_key(api) if key is None else key
    post = functools.partial(
        post_json, timeout=timeout, max_bytes=max_bytes, key=key, received=received
    )
    try:
        reply = query(prompt, model, endpoint, api=api, post=post)
    except JudgeUnavailableError as exc:
        raise type(exc)(with_judge_hint(exc, api, model)) from None
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        reply = None
    # (a ``query`` that does not send through ``post`` leaves nothing in ``received``)
    problem = reply_problem(bytes(received), api) if received or not reply else None
    if problem is None and not (isinstance(reply, str) and reply.strip()):
        problem = "a reply without text"
    if problem is not None:
        raise JudgeReplyError(
            f"{redact_url(endpoint)} sent {problem} (is {api!r} the API of this server?)"
        )
    return reply


def check_judge(
    url: str | None = None,
    model: str = "llama3",
    *,
    api: str = "ollama",
    timeout: float | tuple[float, float] = (JUDGE_CONNECT_TIMEOUT, 10.0),
    key: str | None = None,
) -> str:
    """Ask the judge over HTTP whether it is up (and for Ollama, has ``model`` pulled).

    Returns the chat endpoint; raises ``JudgeUnavailableError`` saying what to do.
    """
    endpoint = judge_endpoint(url, api)
    base = judge_base(endpoint, api)
    probe = base + ("/api/tags" if api == "ollama" else "/models")
    connect, seconds = split_timeout(timeout)
    exchange = _Exchange(probe, seconds, connect)
    key = api_key(api) if key is None else key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = exchange.open("GET", None, headers)
        error = _status_error(exchange, response, model)
        if error is not None and api == "ollama":
            raise JudgeReplyError(f"{error}; is this an Ollama server? {start_hint(model)}")
        if error is not None and response.status in (401, 403):
            raise error  # (other servers may well lack /models: only a refusal counts)
        body = b"".join(_lines(exchange, response, MAX_REPLY_BYTES, bytearray()))
    except JudgeUnavailableError as exc:
        if not exc.server_down:
            raise
        raise JudgeUnavailableError(f"{str(exc).rstrip('.')}. {judge_hint(api, model)}") from None
    finally:
        exchange.close()
    if api == "ollama":
        _check_pulled(body, model, redact_url(base), redact_url(probe))
    return endpoint


def _check_pulled(body: bytes, model: str, base: str, probe: str) -> None:
    """Raise unless Ollama's /api/tags reply ``body`` lists ``model``."""
    try:
        listed = json.loads(body).get("models", [])
        names = {m.get(key) for m in listed for key in ("name", "model")}
    except (ValueError, AttributeError, TypeError, RecursionError):
        raise JudgeReplyError(
            f"{probe} did not answer Ollama's JSON. {start_hint(model)}"
        ) from None
    wanted = model if ":" in model else f"{model}:latest"
    if model not in names and wanted not in names:
        raise JudgeReplyError(
            f"the Ollama server at {base} does not have the model {model!r}; "
            f"run `ollama pull {model}`"
        )
