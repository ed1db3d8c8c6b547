"""Chapter 7, section 7.8: scoring the test-set responses with a local LLM judge.

The judge is a larger instruction-tuned model (Llama 3 8B, served by Ollama) that reads each
test instruction, its reference answer and our model's response, and replies with a score
from 0 to 100. ``judge_prompt`` writes the question, ``query_model`` asks it over HTTP
(Ollama's streaming ``/api/chat``, or any OpenAI-compatible ``/v1/chat/completions``), and
``parse_score`` reads the number out of the reply. Without a judge, ``local_metrics`` gives
reference-based numbers (exact match and ROUGE-L), which are not the judge's score.

Score an existing responses file, as the course's script does:

    python main/ollama_evaluate.py --file_path instruction-data-with-response.json
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python main/ollama_evaluate.py` from a fresh clone: find the modules in the repository root
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "previous_chapters.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from instruction_data import (
    ChapterError,
    ConfigError,
    DatasetError,
    format_input,
    read_instruction_file,
)


class JudgeUnavailableError(ChapterError, ConnectionError):
    """The LLM judge cannot be reached, or does not have the requested model."""


OLLAMA_DEFAULT_PORT = 11434
JUDGE_APIS = ("ollama", "openai")
JUDGE_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
JUDGE_TIMEOUT = (3.0, 300.0)  # (connect, read) seconds


class JudgeReplyWarning(UserWarning):
    """The judge's reply to one entry could not be turned into a score in 0..100."""


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


def _judge_base(endpoint: str, api: str) -> str:
    if api == "ollama":
        return endpoint.removesuffix("/api/chat")
    return endpoint.removesuffix("/chat/completions")


def _start_hint(model: str) -> str:
    return f"Start the judge with `ollama serve`, then `ollama pull {model}` (once)."


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
    base = _judge_base(endpoint, api)
    probe = base + ("/api/tags" if api == "ollama" else "/models")
    try:
        response = requests.get(probe, timeout=timeout)
    except requests.RequestException as exc:
        raise JudgeUnavailableError(
            f"the LLM judge at {base} is not reachable ({exc.__class__.__name__}). "
            + (_start_hint(model) if api == "ollama" else "Start your OpenAI-compatible server.")
        ) from None
    if api == "ollama":
        if response.status_code != 200:
            raise JudgeUnavailableError(
                f"{probe} answered HTTP {response.status_code}; is this an Ollama server? "
                + _start_hint(model)
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


def query_model(
    prompt: str,
    model: str = "llama3",
    url: str | None = None,
    *,
    api: str = "ollama",
    seed: int = 123,
    temperature: float = 0.0,
    num_ctx: int = 2048,
    timeout: float | tuple[float, float] = JUDGE_TIMEOUT,
    api_key: str | None = None,
) -> str:
    """Send one user message to the judge and return its reply text.

    ``api="ollama"``: POST {host}/api/chat, read the streamed NDJSON lines and join their
    ``message.content`` until ``done``. ``api="openai"``: POST {base}/v1/chat/completions
    (non-streaming) and return ``choices[0].message.content``. ``url=None`` uses $OLLAMA_HOST.
    """
    endpoint = judge_endpoint(url, api)
    messages = [{"role": "user", "content": prompt}]
    if api == "ollama":
        payload = {
            "model": model,
            "messages": messages,
            "stream": True,
            "options": {"seed": seed, "temperature": temperature, "num_ctx": num_ctx},
        }
    else:
        payload = {"model": model, "messages": messages, "temperature": temperature, "seed": seed}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with requests.post(
            endpoint, json=payload, headers=headers, stream=(api == "ollama"), timeout=timeout
        ) as response:
            if response.status_code == 404 and api == "ollama":
                raise JudgeUnavailableError(
                    f"{endpoint}: {_error_text(response)}; run `ollama pull {model}`"
                )
            if response.status_code != 200:
                raise JudgeUnavailableError(
                    f"{endpoint} answered HTTP {response.status_code}: {_error_text(response)}"
                )
            if api == "openai":
                return response.json()["choices"][0]["message"]["content"]
            return _read_ollama_stream(response.iter_lines(), endpoint)
    except requests.RequestException as exc:
        raise JudgeUnavailableError(
            f"the LLM judge at {endpoint} failed: {exc.__class__.__name__}. "
            + (_start_hint(model) if api == "ollama" else "")
        ) from None
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise JudgeUnavailableError(f"{endpoint}: unexpected reply format ({exc!r})") from None


def _error_text(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:200]


def _read_ollama_stream(lines, endpoint: str) -> str:
    parts = []
    for line in lines:
        if not line.strip():
            continue
        chunk = json.loads(line)
        if "error" in chunk:
            raise JudgeUnavailableError(f"{endpoint}: {chunk['error']}")
        parts.append(chunk.get("message", {}).get("content", ""))
        if chunk.get("done"):
            break
    return "".join(parts)


def judge_prompt(entry: dict, json_key: str = "model_response") -> str:
    """The judge's instruction: the input, the correct output, the response to score."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


_SCALE_MENTIONS = re.compile(r"(?:/|\bout of|\bof)\s*100\b|\b0\s*(?:-|to)\s*100\b", re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_AFTER_SCORE = re.compile(r"\bscore\b\W{0,6}?(?:is\W{0,3})?(-?\d+(?:\.\d+)?)", re.I)


def parse_score(reply: str) -> int | None:
    """The integer score 0..100 in a judge reply, or None.

    "85", "Score: 85", "85/100", "**85**", "85 out of 100" all give 85; a number right after
    the word "score" wins over an earlier one ("1. Accurate. Score: 85" gives 85). A reply
    without a number, with a non-integer number, or outside 0..100 gives None.
    """
    text = _SCALE_MENTIONS.sub(" ", reply)
    match = _AFTER_SCORE.search(text) or _NUMBER.search(text)
    if match is None or "." in match.group(match.lastindex or 0):
        return None
    score = int(match.group(match.lastindex or 0))
    return score if 0 <= score <= 100 else None


@dataclass
class JudgeFailure:
    index: int  # position of the entry in the list given to the judge
    reply: str
    reason: str


@dataclass
class JudgeResult:
    """Scores of every entry the judge scored, and every entry it failed on (never dropped)."""

    scores: list[int]  # in entry order, scored entries only (like the book's list)
    scored_indices: list[int]
    failures: list[JudgeFailure]
    model: str
    url: str

    @property
    def n_scored(self) -> int:
        return len(self.scores)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def mean(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    def summary(self) -> dict:
        total = self.n_scored + self.n_failed
        note = (
            f"mean over the {self.n_scored} scored entries; {self.n_failed} of {total} "
            "entries got no valid score and are NOT in the mean"
            if self.n_failed
            else f"all {total} entries scored"
        )
        return {
            "judge_model": self.model,
            "judge_url": self.url,
            "n_scored": self.n_scored,
            "n_failed": self.n_failed,
            "mean_score": self.mean,
            "note": note,
            "scores": self.scores,
            "scored_indices": self.scored_indices,
            "failures": [asdict(f) for f in self.failures],
        }


def judge_responses(
    json_data: Sequence[dict],
    json_key: str = "model_response",
    model: str = "llama3",
    *,
    url: str | None = None,
    api: str = "ollama",
    timeout: float | tuple[float, float] = JUDGE_TIMEOUT,
    api_key: str | None = None,
    check: bool = True,
    progress: bool = True,
) -> JudgeResult:
    """Score every entry's ``json_key`` response with the judge; the detailed result.

    Replies that are not an integer 0..100, and requests that fail part-way, are recorded
    as failures (with a ``JudgeReplyWarning`` naming the entry and the reply).
    ``check=True`` first asks the judge whether it is up (``JudgeUnavailableError`` if not).
    """
    endpoint = judge_endpoint(url, api)
    if check:
        check_judge(endpoint, model, api=api)
    scores, indices, failures = [], [], []
    for i, entry in enumerate(tqdm(json_data, desc="Scoring entries", disable=not progress)):
        try:
            reply = query_model(
                judge_prompt(entry, json_key),
                model,
                endpoint,
                api=api,
                timeout=timeout,
                api_key=api_key,
            )
        except JudgeUnavailableError as exc:
            reply, reason = "", f"request failed: {exc}"
        else:
            score = parse_score(reply)
            if score is not None:
                scores.append(score)
                indices.append(i)
                continue
            reason = "no integer score in 0..100"
        failures.append(JudgeFailure(index=i, reply=reply, reason=reason))
        warnings.warn(f"entry {i}: {reason}; judge reply: {reply!r}", JudgeReplyWarning, 2)
    return JudgeResult(scores, indices, failures, model=model, url=endpoint)


def generate_model_scores(
    json_data: Sequence[dict],
    json_key: str,
    model: str = "llama3",
    **kwargs: Any,
) -> list[int]:
    """The book's function: the integer scores of the entries the judge could score.

    Failed entries are warned about (``JudgeReplyWarning``) but, as in the book, not in the
    list; use ``judge_responses`` (same keywords) for the failures and a summary.
    """
    return judge_responses(json_data, json_key, model, **kwargs).scores


# --------------------------------------------------------------------------------------
# Local reference metrics (when no judge is reachable)
# --------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after lowercasing and collapsing whitespace."""
    return _normalise(prediction) == _normalise(reference)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1: LCS of the lowercased word tokens, P = lcs/|pred|, R = lcs/|ref|."""
    pred, ref = _words(prediction), _words(reference)
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


LOCAL_METRICS_NOTE = (
    "reference-based metrics computed locally (exact match, ROUGE-L F1 vs. the dataset "
    "output); NOT the LLM judge's score"
)


def local_metrics(entries: Sequence[dict], json_key: str = "model_response") -> dict:
    """Mean exact match and ROUGE-L F1 of ``entry[json_key]`` against ``entry['output']``."""
    n = len(entries)
    em = [exact_match(e[json_key], e["output"]) for e in entries]
    rl = [rouge_l_f1(e[json_key], e["output"]) for e in entries]
    return {
        "note": LOCAL_METRICS_NOTE,
        "n": n,
        "exact_match": sum(em) / n if n else None,
        "rouge_l_f1": sum(rl) / n if n else None,
    }


def score_responses(
    entries: Sequence[dict],
    *,
    json_key: str = "model_response",
    use_judge: bool = True,
    judge_url: str | None = None,
    judge_model: str = "llama3",
    judge_api: str = "ollama",
    progress: bool = True,
) -> dict:
    """Judge scores when a judge is reachable, and always the local reference metrics.

    Returns {"judge": JudgeResult.summary() or None, "judge_error": str or None,
    "local_metrics": {...}}; prints what it found.
    """
    judge, judge_error = None, None
    if use_judge:
        try:
            result = judge_responses(
                entries, json_key, judge_model, url=judge_url, api=judge_api, progress=progress
            )
        except JudgeUnavailableError as exc:
            judge_error = str(exc)
            print(f"No LLM judge: {judge_error}")
        else:
            judge = result.summary()
            mean = "n/a" if result.mean is None else f"{result.mean:.2f}"
            print(f"Number of scores: {result.n_scored} of {len(entries)}")
            print(f"Average score (judge {judge_model}): {mean}  [{judge['note']}]")
    else:
        judge_error = "judge disabled (--no-judge)"
    metrics = local_metrics(entries, json_key)
    print(
        f"Local metrics over {metrics['n']} entries: exact match {metrics['exact_match']:.3f}, "
        f"ROUGE-L F1 {metrics['rouge_l_f1']:.3f}\n  ({LOCAL_METRICS_NOTE})"
    )
    return {"judge": judge, "judge_error": judge_error, "local_metrics": metrics}


# --------------------------------------------------------------------------------------
# The command line: score an existing responses file
# --------------------------------------------------------------------------------------


def read_responses(path: str | os.PathLike, json_key: str = "model_response") -> list[dict]:
    """The entries of a responses file; each must also have a string ``json_key``."""
    entries = read_instruction_file(path)
    missing = [i for i, e in enumerate(entries) if not isinstance(e.get(json_key), str)]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DatasetError(
            f"{path}: {len(missing)} of {len(entries)} entries have no string {json_key!r} "
            f"(entries {shown}); generate the responses first (section 7.7)"
        )
    return entries


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ollama_evaluate.py",
        description="Score the model responses in a JSON file with an LLM judge (section 7.8).",
    )
    p.add_argument(
        "--file_path",
        required=True,
        help="JSON file of entries with 'output' and the model's response "
        "(e.g. outputs/instruction-data-with-response.json)",
    )
    p.add_argument("--json_key", default="model_response", help="the response's key")
    p.add_argument("--model", default="llama3", help="the judge model (default: llama3)")
    p.add_argument(
        "--url", help="judge host or endpoint (default: $OLLAMA_HOST or localhost:11434)"
    )
    p.add_argument("--api", choices=JUDGE_APIS, default="ollama", help="ollama or openai")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = build_arg_parser().parse_args(argv)
    try:
        entries = read_responses(args.file_path, args.json_key)
        result = judge_responses(entries, args.json_key, args.model, url=args.url, api=args.api)
    except ChapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mean = "n/a" if result.mean is None else f"{result.mean:.2f}"
    print(f"Number of scores: {result.n_scored} of {len(entries)}")
    print(f"Average score: {mean}")
    if result.failures:
        print(result.summary()["note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
