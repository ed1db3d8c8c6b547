"""Where the LLM judge of section 7.8 runs, and whether it is up.

``judge_endpoint`` turns a host (or $OLLAMA_HOST) into the chat URL of Ollama's API or of an
OpenAI-compatible one; ``check_judge`` asks the server over HTTP whether it is up and has the
model. ``ollama_evaluate`` imports all of it back, so ``ollama_evaluate.check_judge`` and
friends keep working.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests

from instruction_data import ChapterError, ConfigError

if TYPE_CHECKING:
    from ollama_evaluate import JudgeResult

OLLAMA_DEFAULT_PORT = 11434
JUDGE_APIS = ("ollama", "openai")


class JudgeUnavailableError(ChapterError, ConnectionError):
    """The LLM judge cannot be reached, does not have the model, or stopped answering.

    ``result``: set by ``ollama_evaluate.judge_responses`` to the ``JudgeResult`` of what was
    scored before (in this or an earlier session); None when raised elsewhere.
    """

    result: JudgeResult | None = None


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
        raise ConfigError(f"OLLAMA_HOST / judge host {value!r}: invalid port") from None
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
        raise ConfigError(f"judge URL {base!r}: invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"judge URL {base!r}: no host name")
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
    """The judge's failure followed by ``judge_hint`` (once: some failures already say it)."""
    hint = judge_hint(api, model)
    return str(error) if hint in str(error) else f"{str(error).rstrip('.')}. {hint}"


def check_judge(
    url: str | None = None,
    model: str = "llama3",
    *,
    api: str = "ollama",
    timeout: float | tuple[float, float] = (3.0, 10.0),
) -> str:
    """Ask the judge over HTTP whether it is up (and for Ollama, has ``model`` pulled).

    Returns the chat endpoint; raises ``JudgeUnavailableError`` saying what to do.
    """
    endpoint = judge_endpoint(url, api)
    base = judge_base(endpoint, api)
    probe = base + ("/api/tags" if api == "ollama" else "/models")
    try:
        response = requests.get(probe, timeout=timeout)
    except requests.RequestException as exc:
        raise JudgeUnavailableError(
            f"the LLM judge at {base} is not reachable ({exc.__class__.__name__}). "
            + judge_hint(api, model)
        ) from None
    if api == "ollama":
        if response.status_code != 200:
            raise JudgeUnavailableError(
                f"{probe} answered HTTP {response.status_code}; is this an Ollama server? "
                + start_hint(model)
            )
        try:
            names = {m.get("name") for m in response.json().get("models", [])}
            names |= {m.get("model") for m in response.json().get("models", [])}
        except (ValueError, AttributeError):
            raise JudgeUnavailableError(f"{probe} did not answer Ollama's JSON") from None
        wanted = model if ":" in model else f"{model}:latest"
        if model not in names and wanted not in names:
            raise JudgeUnavailableError(
                f"the Ollama server at {base} does not have the model {model!r}; "
                f"run `ollama pull {model}`"
            )
    return endpoint
