"""Where the LLM judge of section 7.8 runs, and what its failures say.

``judge_endpoint`` turns a host (or $OLLAMA_HOST) into the chat URL of Ollama's API or of an
OpenAI-compatible one; ``redact_url`` takes the credentials out of a URL before it is shown
or saved; the errors and hints say what to do. ``judge_client`` talks to the server.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from course.instruction_data import ConfigError
from runtime.errors import JudgeReplyError, JudgeUnavailableError  # noqa: F401 (re-exported)

OLLAMA_DEFAULT_PORT = 11434
JUDGE_APIS = ("ollama", "openai")


def redact_url(url: str | None) -> str | None:
    """``url`` without the user name and password it may carry (``http://user:pw@host`` gives
    ``http://host``), so that no secret is printed or saved; other strings are returned as
    they are."""
    if not isinstance(url, str) or "@" not in url:
        return url
    try:
        parts = urlsplit(url if "://" in url else f"//{url}")
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    clean = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return clean if "://" in url else clean.removeprefix("//")


def redact_urls(value: Any) -> Any:
    """A copy of ``value`` (JSON-like: dicts, lists, strings) with every URL redacted: what a
    run writes into run-config.json and its summaries."""
    if isinstance(value, dict):
        return {key: redact_urls(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_urls(item) for item in value]
    return redact_url(value) if isinstance(value, str) else value


def ollama_base_url(host: str | None = None) -> str:
    """Ollama's base URL from ``host`` or $OLLAMA_HOST (default http://127.0.0.1:11434).

    Accepts the forms Ollama does: "127.0.0.1:11434", "0.0.0.0", ":11434", "example.com",
    "http://host:port", "https://host" (port 443; "http://host" without a port means 80).
    A bind-all address (0.0.0.0 / ::) is reached through loopback.
    """
    value = (host if host is not None else os.environ.get("OLLAMA_HOST", "")).strip()
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest, port = "http", value, OLLAMA_DEFAULT_PORT
    else:
        port = {"http": 80, "https": 443}.get(scheme.lower(), OLLAMA_DEFAULT_PORT)
    hostport, _, path = rest.partition("/")
    parsed = urlsplit(f"//{hostport}")
    try:
        port = parsed.port or port
    except ValueError:
        raise ConfigError(f"OLLAMA_HOST / judge host {redact_url(value)!r}: invalid port") from None
    name = parsed.hostname or "127.0.0.1"
    if name in ("0.0.0.0", "::"):
        name = "127.0.0.1" if name == "0.0.0.0" else "::1"
    if ":" in name:
        name = f"[{name}]"
    path = f"/{path.strip('/')}" if path.strip("/") else ""
    return f"{scheme}://{name}:{port}{path}"


def judge_endpoint(url: str | None = None, api: str = "ollama") -> str:
    """The chat URL for ``api``: a full endpoint is kept; a bare host gets the API's path.

    ollama: {base}/api/chat.  openai: {base}/v1/chat/completions (Ollama serves this too).
    """
    if api not in JUDGE_APIS:
        raise ConfigError(f"unknown judge api {api!r}; choose one of: {', '.join(JUDGE_APIS)}")
    if url is None:
        base = ollama_base_url()
    else:
        base = url if url.startswith(("http://", "https://")) else f"http://{url}"
    base = base.rstrip("/")
    parts = urlsplit(base)
    try:
        _ = parts.port  # raises ValueError for a non-numeric port
    except ValueError:
        raise ConfigError(f"judge URL {redact_url(base)!r}: invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"judge URL {redact_url(base)!r}: no host name")
    path = parts.path
    if api == "ollama":
        return base if path else base + "/api/chat"
    if path.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if path.endswith("/v1") else "/v1/chat/completions")


def judge_base(endpoint: str, api: str) -> str:
    """The server's base URL of a chat endpoint."""
    if api == "ollama":
        return endpoint.removesuffix("/api/chat")
    return endpoint.removesuffix("/chat/completions")


def start_hint(model: str) -> str:
    """What to do when an Ollama judge does not answer."""
    return f"Start the judge with `ollama serve`, then `ollama pull {model}` (once)."


def judge_hint(api: str, model: str) -> str:
    """What to do when the judge of ``api`` does not answer."""
    return start_hint(model) if api == "ollama" else "Start your OpenAI-compatible server."


def with_judge_hint(error: Exception, api: str, model: str) -> str:
    """The judge's failure, followed by ``judge_hint`` when starting the server is what to do
    (once: some failures already say it)."""
    hint = judge_hint(api, model)
    if not getattr(error, "server_down", True) or hint in str(error):
        return str(error)
    return f"{str(error).rstrip('.')}. {hint}"
