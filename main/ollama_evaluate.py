"""Chapter 7, section 7.8: scoring the test-set responses with a local LLM judge.

The judge is a larger instruction-tuned model (Llama 3 8B, served by Ollama) that reads each
test instruction, its reference answer and our model's response, and replies with a score
from 0 to 100. ``judge_prompt`` writes the question, ``query_model`` asks it over HTTP
(Ollama's streaming ``/api/chat``, or any OpenAI-compatible ``/v1/chat/completions``), and
``parse_score`` reads the number out of the reply. Without a judge, ``local_metrics`` gives
reference-based numbers (exact match and ROUGE-L), which are not the judge's score.

A judge that stops answering cannot stall a run: each reply gets ``timeout`` seconds, and after
``max_failures`` failed requests in a row the judge counts as down. Each entry's score and the
judge's raw reply are saved into the responses file as they arrive, so Ctrl-C, a crash or a
judge that went away loses nothing, and the next run asks only the entries still missing.

Score an existing responses file (again), as the course's script does:

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
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import requests

from instruction_data import (
    ChapterError,
    ConfigError,
    DatasetError,
    first_few,
    format_input,
    read_instruction_file,
)
from judge_host import (  # noqa: F401 (re-exported: ollama_evaluate.judge_endpoint etc.)
    JUDGE_APIS,
    OLLAMA_DEFAULT_PORT,
    JudgeUnavailableError,
    check_judge,
    judge_endpoint,
    judge_hint,
    ollama_base_url,
    start_hint,
    with_judge_hint,
)
from local_metrics import (  # noqa: F401 (re-exported: ollama_evaluate.rouge_l_f1 etc.)
    LOCAL_METRICS_NOTE,
    exact_match,
    lcs_length,
    local_metrics,
    rouge_l_f1,
)
from outputs import save_json
from progress_bars import progress_bar

JUDGE_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
JUDGE_TIMEOUT = 120.0  # seconds to wait for one reply
JUDGE_CONNECT_TIMEOUT = 3.0  # seconds to wait for the connection (at most)
JUDGE_MAX_FAILURES = 3  # failed requests in a row after which the judge counts as down


class JudgeReplyWarning(UserWarning):
    """The judge's reply to one entry could not be turned into a score in 0..100."""


def _timeouts(timeout: float | tuple[float, float]) -> tuple[float, float]:
    """(connect, read) seconds: a number is the wait for the reply, with a short connect wait."""
    pair = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    if not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in pair):
        raise ConfigError(f"judge timeout {timeout!r}: give a number of seconds above 0")
    connect, read = pair
    if isinstance(timeout, tuple):
        return connect, read
    return min(JUDGE_CONNECT_TIMEOUT, read), read


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
    ``timeout``: seconds to wait for the whole reply (the connection gets at most 3 s of
    them), or a (connect, read) pair. A failed request raises ``JudgeUnavailableError``.
    """
    endpoint = judge_endpoint(url, api)
    timeouts = _timeouts(timeout)  # (connect, read)
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
            endpoint, json=payload, headers=headers, stream=(api == "ollama"), timeout=timeouts
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
            return _read_ollama_stream(response.iter_lines(), endpoint, timeouts[1])
    except requests.Timeout:
        raise JudgeUnavailableError(
            f"the LLM judge at {endpoint} gave no reply within {timeouts[1]:g} s "
            "(a slow judge needs a longer timeout)"
        ) from None
    except requests.RequestException as exc:
        raise JudgeUnavailableError(
            f"the LLM judge at {endpoint} failed: {exc.__class__.__name__}. "
            + (start_hint(model) if api == "ollama" else "")
        ) from None
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise JudgeUnavailableError(f"{endpoint}: unexpected reply format ({exc!r})") from None


def _error_text(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        return response.text[:200]


def _read_ollama_stream(lines, endpoint: str, seconds: float = math.inf) -> str:
    """Join the streamed pieces of a reply; a reply still streaming after ``seconds`` fails."""
    deadline = time.monotonic() + seconds
    parts = []
    for line in lines:
        if time.monotonic() > deadline:
            raise JudgeUnavailableError(f"{endpoint}: the reply took longer than {seconds:g} s")
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
    if match is None:
        return None
    number = match.group(match.lastindex or 0)
    if "." in number or len(number.lstrip("-0")) > 3:  # 1000 and up (int() fails past 4300 digits)
        return None
    score = int(number)
    return score if 0 <= score <= 100 else None


@dataclass
class JudgeFailure:
    index: int  # position of the entry in the list given to the judge
    reply: str
    reason: str


NO_SCORE = "no integer score in 0..100"


@dataclass
class JudgeResult:
    """Scores of every entry the judge scored, and every entry it failed on (never dropped).

    Entries neither scored nor failed were not asked: the judge stopped first.
    """

    scores: list[int]  # in entry order, scored entries only (like the book's list)
    scored_indices: list[int]
    failures: list[JudgeFailure]
    model: str
    url: str
    n_entries: int | None = None  # all entries given to the judge (None: scored + failed)

    def __post_init__(self) -> None:
        if self.n_entries is None:
            self.n_entries = self.n_scored + self.n_failed

    @property
    def n_scored(self) -> int:
        return len(self.scores)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def n_not_asked(self) -> int:
        return self.n_entries - self.n_scored - self.n_failed

    @property
    def mean(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    def note(self) -> str:
        """What the mean covers, in one line."""
        total = self.n_entries
        if self.n_scored == total:
            return f"all {total} entries scored"
        note = f"mean over the {self.n_scored} scored entries"
        if self.n_failed:
            note += (
                f"; {self.n_failed} of {total} entries got no valid score and are NOT in the mean"
            )
        if self.n_not_asked:
            note += f"; {self.n_not_asked} of {total} entries were not asked (the judge stopped)"
        return note

    def summary(self) -> dict:
        return {
            "judge_model": self.model,
            "judge_url": self.url,
            "n_entries": self.n_entries,
            "n_scored": self.n_scored,
            "n_failed": self.n_failed,
            "n_not_asked": self.n_not_asked,
            "mean_score": self.mean,
            "note": self.note(),
            "scores": self.scores,
            "scored_indices": self.scored_indices,
            "failures": [asdict(f) for f in self.failures],
        }


def has_judge_reply(entry: dict, model: str) -> bool:
    """Whether ``entry`` holds a saved reply of judge ``model``: its score, or None if unusable."""
    score = entry.get("judge_score")
    usable = score is None or (type(score) is int and 0 <= score <= 100)
    return entry.get("judge_model") == model and "judge_score" in entry and usable


def _collect(
    records: Sequence[dict], model: str, endpoint: str, request_failures: dict[int, str]
) -> JudgeResult:
    """The result read from the entries' saved replies and this session's failed requests."""
    scores, indices, failures = [], [], []
    for i, entry in enumerate(records):
        if has_judge_reply(entry, model) and entry["judge_score"] is not None:
            scores.append(entry["judge_score"])
            indices.append(i)
        elif has_judge_reply(entry, model):
            failures.append(JudgeFailure(i, str(entry.get("judge_reply", "")), NO_SCORE))
        elif i in request_failures:
            failures.append(JudgeFailure(i, "", f"request failed: {request_failures[i]}"))
    return JudgeResult(scores, indices, failures, model, endpoint, n_entries=len(records))


def _warn(index: int, reason: str, reply: str | None = None) -> None:
    shown = "" if reply is None else f"; judge reply: {reply!r}"
    warnings.warn(f"entry {index}: {reason}{shown}", JudgeReplyWarning, stacklevel=4)


def ask_each(
    records: list[dict],
    todo: Sequence[int],
    ask: Callable[[dict], str],
    *,
    model: str,
    max_failures: int,
    request_failures: dict[int, str],
    save_path: str | os.PathLike | None,
    progress: bool,
    keep: Callable[[dict, str], None] | None = None,
    desc: str = "Scoring entries",
) -> None:
    """Ask the judge about each entry in ``todo``; stop after ``max_failures`` failed requests
    in a row (``JudgeUnavailableError``). Each reply is saved into ``records`` (and the file):
    as the judge's score, or as ``keep(entry, reply)`` stores it (``preference_data`` keeps
    the judge's rewrites this way)."""
    in_a_row = 0
    for i in progress_bar(todo, desc=desc, enabled=progress):
        try:
            reply = ask(records[i])
        except JudgeUnavailableError as exc:
            request_failures[i] = str(exc)
            _warn(i, f"request failed: {exc}")
            in_a_row += 1
            if in_a_row >= max_failures:
                raise JudgeUnavailableError(
                    f"the LLM judge failed {in_a_row} requests in a row, so it counts as down; "
                    f"last: {exc}"
                ) from None
            continue
        in_a_row = 0
        if keep is not None:
            keep(records[i], reply)
        else:
            score = parse_score(reply)
            records[i].update(judge_model=model, judge_score=score, judge_reply=reply)
            if score is None:
                _warn(i, NO_SCORE, reply)
        if save_path is not None:
            save_json(records, save_path)


def judge_responses(
    json_data: Sequence[dict],
    json_key: str = "model_response",
    model: str = "llama3",
    *,
    url: str | None = None,
    api: str = "ollama",
    timeout: float | tuple[float, float] = JUDGE_TIMEOUT,
    max_failures: int = JUDGE_MAX_FAILURES,
    save_path: str | os.PathLike | None = None,
    api_key: str | None = None,
    check: bool = True,
    progress: bool = True,
) -> JudgeResult:
    """Score every entry's ``json_key`` response with the judge; the detailed result.

    A reply without an integer 0..100 is a failure of its entry (a ``JudgeReplyWarning`` names
    the entry and the reply). So is a failed request (no connection, no reply within ``timeout``
    seconds, an HTTP error); after ``max_failures`` of those in a row the judge counts as down:
    ``JudgeUnavailableError``, whose ``result`` holds what was scored. A reply without a score
    does not count towards ``max_failures``. ``check=True`` first asks whether the judge is up.

    ``save_path``: after each reply all entries are saved there (atomically) with three more
    keys: ``judge_model``, ``judge_score`` (None: no usable score) and ``judge_reply`` (the raw
    text). Entries holding a reply of this ``model`` are not asked again, so a re-run after
    Ctrl-C, a crash or a give-up asks only the others. ``json_data`` itself is left unchanged.
    """
    endpoint = judge_endpoint(url, api)
    _timeouts(timeout)  # a bad timeout fails before any request
    if max_failures < 1:
        raise ConfigError(f"max_failures={max_failures}: give at least 1")
    records = [dict(entry) for entry in json_data]
    todo = [i for i, entry in enumerate(records) if not has_judge_reply(entry, model)]
    if len(todo) < len(records):
        print(f"{len(records) - len(todo)} of {len(records)} entries have a saved reply of {model}")

    def ask(entry: dict) -> str:
        prompt = judge_prompt(entry, json_key)
        return query_model(prompt, model, endpoint, api=api, timeout=timeout, api_key=api_key)

    request_failures: dict[int, str] = {}
    try:
        if todo and check:
            check_judge(endpoint, model, api=api)
        ask_each(
            records,
            todo,
            ask,
            model=model,
            max_failures=max_failures,
            request_failures=request_failures,
            save_path=save_path,
            progress=progress,
        )
    except JudgeUnavailableError as exc:
        saved = save_path is not None and any(has_judge_reply(r, model) for r in records)
        error = JudgeUnavailableError(_what_to_do(exc, api, model, save_path if saved else None))
        error.result = _collect(records, model, endpoint, request_failures)
        raise error from None
    return _collect(records, model, endpoint, request_failures)


def _what_to_do(exc: Exception, api: str, model: str, saved_in: str | os.PathLike | None) -> str:
    """The judge's failure, how to start the judge, and (with replies saved) how to go on."""
    message = with_judge_hint(exc, api, model)
    if saved_in is not None:
        message += (
            f" The replies so far are saved in {saved_in}; scoring it again (python "
            f"main/ollama_evaluate.py --file_path {saved_in}) asks only the missing entries."
        )
    return message


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


def print_scores(result: JudgeResult, label: str = "") -> None:
    """The course's two lines (number of scores, average score), and what the mean covers."""
    mean = "n/a" if result.mean is None else f"{result.mean:.2f}"
    print(f"Number of scores: {result.n_scored} of {result.n_entries}")
    print(f"Average score{label}: {mean}")
    if result.n_scored < result.n_entries:
        print(f"  ({result.note()})")


def score_responses(
    entries: Sequence[dict],
    *,
    json_key: str = "model_response",
    use_judge: bool = True,
    judge_url: str | None = None,
    judge_model: str = "llama3",
    judge_api: str = "ollama",
    timeout: float | tuple[float, float] = JUDGE_TIMEOUT,
    max_failures: int = JUDGE_MAX_FAILURES,
    save_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Judge scores when a judge is reachable, and always the local reference metrics.

    Returns {"judge": ..., "judge_error": ..., "local_metrics": {...}} and prints what it found:

    * the judge answered for every entry: "judge" is ``JudgeResult.summary()``, "judge_error"
      is None;
    * the judge is unreachable, or gave up part-way: "judge_error" says why, and "judge" is the
      summary of the entries it did score (in this or an earlier session; ``n_not_asked``
      counts those it was not asked about), or None if it scored none;
    * ``use_judge=False``: "judge" is None and "judge_error" says so.

    ``timeout``, ``max_failures`` and ``save_path`` are ``judge_responses``'s: with
    ``save_path``, a re-run asks only the entries still missing. Ctrl-C (``KeyboardInterrupt``)
    propagates, with every reply so far saved.
    """
    judge, judge_error = None, None
    if use_judge:
        try:
            result = judge_responses(
                entries,
                json_key,
                judge_model,
                url=judge_url,
                api=judge_api,
                timeout=timeout,
                max_failures=max_failures,
                save_path=save_path,
                progress=progress,
            )
        except JudgeUnavailableError as exc:
            judge_error = str(exc)
            result = exc.result if exc.result is not None and exc.result.n_scored else None
            print(f"{'No LLM judge' if result is None else 'The LLM judge stopped'}: {judge_error}")
        if result is not None:
            judge = result.summary()
            print_scores(result, f" (judge {judge_model})")
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


def judge_settings(cfg: Any) -> dict[str, Any]:
    """``score_responses``'s judge keywords from a run's settings (``use_judge``, ``judge_*``)."""
    return {
        "use_judge": cfg.use_judge,
        "judge_url": cfg.judge_url,
        "judge_model": cfg.judge_model,
        "judge_api": cfg.judge_api,
        "timeout": cfg.judge_timeout,
        "max_failures": cfg.judge_max_failures,
    }


def add_judge_args(p: argparse.ArgumentParser) -> None:
    """The judge's flags of a run's command line (each None unless given: the run's
    settings fill in the defaults)."""
    p.add_argument("--judge-url", help="judge host or endpoint (default: $OLLAMA_HOST)")
    p.add_argument("--judge-model", help="judge model (default: llama3)")
    p.add_argument("--judge-api", choices=JUDGE_APIS, help="default: ollama")
    p.add_argument("--judge-timeout", type=float, help="seconds per judge reply (default: 120)")
    p.add_argument(
        "--judge-max-failures",
        type=int,
        help="failed judge requests in a row before giving up (default: 3)",
    )
    p.add_argument("--no-judge", action="store_true", help="skip the judge: local metrics only")


def read_responses(path: str | os.PathLike, json_key: str = "model_response") -> list[dict]:
    """The entries of a responses file; each must also have a string ``json_key``."""
    entries = read_instruction_file(path)
    missing = [i for i, e in enumerate(entries) if not isinstance(e.get(json_key), str)]
    if missing:
        raise DatasetError(
            f"{path}: {len(missing)} of {len(entries)} entries have no string {json_key!r} "
            f"(entries {first_few(missing)}); generate the responses first (section 7.7)"
        )
    return entries


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ollama_evaluate.py",
        description="Score the model responses in a JSON file with an LLM judge (section 7.8). "
        "Each score is saved into the file as it arrives; a re-run asks only the missing ones.",
    )
    p.add_argument(
        "--file_path",
        required=True,
        help="JSON file of entries with 'output' and the model's response "
        "(e.g. outputs/instruction-data-with-response.json); the scores are saved into it",
    )
    p.add_argument("--json_key", default="model_response", help="the response's key")
    p.add_argument("--model", default="llama3", help="the judge model (default: llama3)")
    p.add_argument(
        "--url", help="judge host or endpoint (default: $OLLAMA_HOST or localhost:11434)"
    )
    p.add_argument("--api", choices=JUDGE_APIS, default="ollama", help="ollama or openai")
    p.add_argument(
        "--timeout",
        type=float,
        default=JUDGE_TIMEOUT,
        help=f"seconds to wait for each reply (default: {JUDGE_TIMEOUT:g})",
    )
    p.add_argument(
        "--max_failures",
        type=int,
        default=JUDGE_MAX_FAILURES,
        help=f"failed requests in a row before giving up (default: {JUDGE_MAX_FAILURES})",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status.

    Expected failures print one ``error:`` line and exit with 2; Ctrl-C exits with 130. Either
    way every score so far is saved in the file, and running the command again continues.
    """
    args = build_arg_parser().parse_args(argv)
    try:
        entries = read_responses(args.file_path, args.json_key)
        result = judge_responses(
            entries,
            args.json_key,
            args.model,
            url=args.url,
            api=args.api,
            timeout=args.timeout,
            max_failures=args.max_failures,
            save_path=args.file_path,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the scores so far are saved in {args.file_path}; "
            "run the same command again to score the rest",
            file=sys.stderr,
        )
        return 130
    except ChapterError as exc:
        if isinstance(exc, JudgeUnavailableError) and exc.result and exc.result.n_scored:
            print_scores(exc.result)  # what the judge scored before it stopped
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_scores(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
