"""Chapter 7, section 7.8: scoring the test-set responses with a local LLM judge.

The judge is a larger instruction-tuned model (Llama 3 8B, served by Ollama) that reads each
test instruction, its reference answer and our model's response, and replies with a score
from 0 to 100. ``judge_prompt`` writes the question, ``query_model`` asks it over HTTP
(Ollama's streaming ``/api/chat``, or any OpenAI-compatible ``/v1/chat/completions``), and
``parse_score`` reads the number out of the reply. Without a judge, ``local_metrics`` gives
reference-based numbers (exact match and ROUGE-L), which are not the judge's score.

A judge that stops answering cannot stall a run: ``ask_judge`` sends ``query_model`` through
``judge_client``, which gives each whole reply ``timeout`` seconds and a size limit and
refuses an unusable reply; after ``max_failures`` failed attempts in a row the judge counts
as down. Each entry's score and a short excerpt of the judge's reply are saved into the
responses file as they arrive, so Ctrl-C, a crash or a judge that went away loses nothing,
and the next run asks only the entries still missing (``--rescore-unscored``: also those
whose reply had no score). That bookkeeping lives in ``runtime/judge_scores.py``; its names
are re-exported here. ``JudgeSettings`` names a judge (model, URL, API) and its limits as
one value; ``ask_about_each`` is the same loop for the other questions put to the judge:
the pairwise verdicts of ``compare_models`` and the rewrites of ``preference_data``.

Score an existing responses file (again), as the course's script does:

    python main/ollama_evaluate.py --file_path instruction-data-with-response.json
"""

from __future__ import annotations

import sys

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from course.instruction_data import (
    ChapterError,
    ConfigError,
    format_input,
)
from course.local_metrics import (  # noqa: F401 (re-exported: ollama_evaluate.rouge_l_f1 etc.)
    LOCAL_METRICS_NOTE,
    exact_match,
    lcs_length,
    local_metrics,
    rouge_l_f1,
)
from runtime import judge_client
from runtime.judge_client import (  # noqa: F401 (re-exported: ollama_evaluate.check_judge etc.)
    JUDGE_TIMEOUT,
    MAX_REPLY_BYTES,
    check_judge,
    excerpt,
    post_json,
    split_timeout,
)
from runtime.judge_host import (  # noqa: F401 (re-exported: ollama_evaluate.judge_endpoint etc.)
    JUDGE_APIS,
    OLLAMA_DEFAULT_PORT,
    JudgeReplyError,
    JudgeUnavailableError,
    judge_endpoint,
    judge_hint,
    ollama_base_url,
    redact_url,
    start_hint,
    with_judge_hint,
)
from runtime.judge_scores import (  # noqa: F401 (re-exported: ollama_evaluate.JudgeResult etc.)
    DEFAULT_JUDGE,
    JUDGE_MAX_FAILURES,
    NO_SCORE,
    RUBRICS,
    JudgeFailure,
    JudgeReplyWarning,
    JudgeResult,
    JudgeSettings,
    ask_each,
    check_rubric,
    collect_result,
    has_judge_reply,
    judge_settings,
    no_score,
    print_scores,
    read_responses,
    to_ask,
    what_to_do,
    with_short_reply,
)

JUDGE_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
RUBRIC_1_5 = """Score it on this rubric of 1 to 5, judging four criteria:
correctness (is it true and does it agree with the correct output?), completeness (does it do
all that was asked?), following the instruction (does it do what was asked, in the form
asked?) and conciseness (no padding, repetition or text that was not asked for).
5: correct, complete, follows the instruction exactly, and concise.
4: correct and follows the instruction, with a small omission or some unneeded text.
3: partly correct or partly complete, or does not quite follow the instruction.
2: mostly wrong or incomplete, or largely ignores the instruction.
1: wrong, empty, off-topic or nonsense.
Respond with the integer number only."""


def query_model(
    prompt: str,
    model: str = "llama3",
    url: str | None = None,
    *,
    api: str = "ollama",
    post: Callable[[str, dict], Iterable[bytes]] = post_json,
) -> str:
    """The book's function: send ``prompt`` to the judge ``model``; return its reply text.

    ``api="ollama"``: Ollama's ``/api/chat`` streams one JSON line per piece of the reply,
    whose ``message.content`` are joined. ``api="openai"``: an OpenAI-compatible
    ``/v1/chat/completions`` answers one JSON object. ``url=None`` means $OLLAMA_HOST.
    ``post(url, data)`` sends the request and yields the reply's lines; the default,
    ``judge_client.post_json``, bounds the reply's time and size. ``ask_judge`` also checks it.
    """
    messages = [{"role": "user", "content": prompt}]
    if api == "ollama":
        data = {"model": model, "messages": messages, "options": JUDGE_OPTIONS}
    else:
        data = {"model": model, "messages": messages, "temperature": 0, "seed": 123}
    lines = post(judge_endpoint(url, api), data)
    if api == "openai":
        return json.loads(b"".join(lines))["choices"][0]["message"]["content"]
    pieces = [json.loads(line)["message"]["content"] for line in lines if line.strip()]
    return "".join(pieces)


def ask_judge(prompt: str, model: str = "llama3", url: str | None = None, **limits: Any) -> str:
    """``query_model`` within ``judge_client.ask``'s ``limits`` (``api``, ``timeout``,
    ``max_bytes``, ``key``), its reply checked: an unusable reply or a failed request raises
    ``JudgeUnavailableError``."""
    return judge_client.ask(query_model, prompt, model, url, **limits)


def ask_about_each(
    records: list[dict],
    todo: Sequence[int],
    prompt: Callable[[dict], str],
    keep: Callable[[dict, str], str | None],
    judge: JudgeSettings,
    save_path: Path,
    desc: str,
    *,
    check: bool = True,
    progress: bool = True,
    ask: Callable[[str], str] | None = None,
) -> None:
    """Put ``prompt(record)`` to the ``judge`` for each record in ``todo``, each reply stored by
    ``keep`` and saved in ``save_path`` as it arrives (``ask_each``, its bar named ``desc``);
    ``check``: first ask whether the judge is up. ``ask(prompt)`` replaces the judge server (a
    stand-in judge). A judge that stops raises ``JudgeUnavailableError`` saying how to start
    it and that a rerun asks only the missing entries."""
    endpoint = judge_endpoint(judge.url, judge.api)

    def question(record: dict) -> str:
        text = prompt(record)
        if ask is not None:
            return ask(text)
        return ask_judge(text, judge.model, endpoint, api=judge.api, timeout=judge.timeout)

    try:
        if todo and check and ask is None:
            check_judge(endpoint, judge.model, api=judge.api)
        ask_each(
            records,
            todo,
            question,
            model=judge.model,
            max_failures=judge.max_failures,
            request_failures={},
            save_path=save_path,
            progress=progress,
            keep=keep,
            desc=desc,
        )
    except JudgeUnavailableError as exc:
        message = with_judge_hint(exc, judge.api, judge.model)
        if save_path.is_file():
            message += (
                f" The replies so far are saved in {save_path}; the same command again asks "
                "only the missing entries."
            )
        raise JudgeUnavailableError(message) from None


def judge_prompt(entry: dict, json_key: str = "model_response", rubric: str = "0-100") -> str:
    """The judge's instruction: the input, the correct output, the response to score.

    ``rubric="1-5"`` writes out the criteria of a 1-5 rubric instead of the book's 0-100.
    """
    question = (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
    )
    if check_rubric(rubric) == "1-5":
        return f"{question}.\n\n{RUBRIC_1_5}"
    return (
        f"{question}"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


_SCALE_MENTIONS = re.compile(
    r"(?:/|\bout of|\bof)\s*(?:100|5)\b|\b[01]\s*(?:-|to)\s*(?:100|5)\b", re.I
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_AFTER_SCORE = re.compile(r"\bscore\b\W{0,6}?(?:is\W{0,3})?(-?\d+(?:\.\d+)?)", re.I)


def parse_score(reply: str, rubric: str = "0-100") -> int | None:
    """The integer score in a judge reply, within the ``rubric``'s range (0..100), or None.

    "85", "Score: 85", "85/100", "**85**", "85 out of 100" all give 85; a number right after
    the word "score" wins over an earlier one ("1. Accurate. Score: 85" gives 85). A reply
    without a number, with a non-integer number, or outside the range gives None ("4/5" gives
    4 on the 1-5 rubric; "85" gives None there).
    """
    low, high = RUBRICS[check_rubric(rubric)]
    text = _SCALE_MENTIONS.sub(" ", reply)
    match = _AFTER_SCORE.search(text) or _NUMBER.search(text)
    if match is None:
        return None
    number = match.group(match.lastindex or 0)
    if "." in number or len(number.lstrip("-0")) > 3:  # 1000 and up (int() fails past 4300 digits)
        return None
    score = int(number)
    return score if low <= score <= high else None


def checked_endpoint(
    url: str | None, api: str, rubric: str, timeout: float | tuple, max_failures: int
) -> str:
    """The judge's endpoint, once the settings are checked (before any request is made)."""
    endpoint, _ = judge_endpoint(url, api), check_rubric(rubric)
    split_timeout(timeout)
    if max_failures < 1:
        raise ConfigError(f"max_failures={max_failures}: give at least 1")
    return endpoint


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
    rescore_unscored: bool = False,
    check: bool = True,
    progress: bool = True,
    rubric: str = "0-100",
) -> JudgeResult:
    """Score every entry's ``json_key`` response with the judge; the detailed result.

    A reply without an integer on the ``rubric`` ("0-100", the book's, or "1-5") fails its
    entry (a ``JudgeReplyWarning`` names it). So does a failed request (no connection, no whole
    reply within ``timeout`` s, an HTTP error, an empty, null or malformed reply);
    ``max_failures`` of those in a row (replies without a score do not count) raise
    ``JudgeUnavailableError``, whose ``result`` holds what was scored. ``check=True`` first
    asks whether the judge is up. ``api_key``: a bearer token (default: $OPENAI_API_KEY for
    ``api="openai"``). ``save_path``: after each reply all entries are saved there
    (atomically) with ``judge_model``, ``judge_score`` (None: no usable score), ``judge_reply``
    (an excerpt) and ``judge_rubric``; entries holding a reply of this ``model`` on this
    ``rubric`` are not asked again (with ``rescore_unscored``, those without a score are).
    """
    endpoint = checked_endpoint(url, api, rubric, timeout, max_failures)
    key = api_key if api_key is not None else judge_client.api_key(api)
    records = [with_short_reply(entry) for entry in json_data]
    todo = to_ask(records, model, rescore_unscored, rubric)
    if len(todo) < len(records):
        print(f"{len(records) - len(todo)} of {len(records)} entries have a saved reply of {model}")

    def ask(entry: dict) -> str:
        prompt = judge_prompt(entry, json_key, rubric)
        return ask_judge(prompt, model, endpoint, api=api, timeout=timeout, key=key)

    def keep(entry: dict, reply: str) -> str | None:
        score = parse_score(reply, rubric)
        entry.update(judge_model=model, judge_score=score, judge_reply=excerpt(reply))
        entry["judge_rubric"] = rubric
        return no_score(rubric) if score is None else None

    request_failures: dict[int, str] = {}
    try:
        if todo and check:
            check_judge(endpoint, model, api=api, key=key)
        limits = {"max_failures": max_failures, "request_failures": request_failures}
        limits.update(model=model, save_path=save_path, progress=progress, keep=keep)
        ask_each(records, todo, ask, **limits)
    except JudgeUnavailableError as exc:
        saved = save_path is not None and any(has_judge_reply(r, model, rubric) for r in records)
        error = type(exc)(what_to_do(exc, api, model, save_path if saved else None))
        error.result = collect_result(records, model, endpoint, request_failures, rubric)
        raise error from None
    return collect_result(records, model, endpoint, request_failures, rubric)


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
    rubric: str = "0-100",
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
                rubric=rubric,
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
    p.add_argument(
        "--rescore-unscored",
        action="store_true",
        help="ask the judge again about the entries whose saved reply had no score",
    )
    p.add_argument(
        "--api-key-env",
        metavar="NAME",
        help=f"environment variable holding the judge's API key (default for --api openai: "
        f"{judge_client.OPENAI_KEY_ENV})",
    )
    p.add_argument(
        "--rubric",
        choices=RUBRICS,
        default="0-100",
        help="the judge's scale: 0-100 (the book's) or a 1-5 rubric with written criteria",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status.

    Expected failures print one ``error:`` line and exit with 2; Ctrl-C exits with 130. Either
    way every score so far is saved in the file, and running the command again continues.
    """
    args = build_arg_parser().parse_args(argv)
    try:
        key = judge_client.api_key(args.api, args.api_key_env)
        entries = read_responses(args.file_path, args.json_key)
        judge = asdict(JudgeSettings.of(args))  # model, url, api, timeout, max_failures
        result = judge_responses(
            entries,
            args.json_key,
            **judge,
            save_path=args.file_path,
            api_key=key,
            rescore_unscored=args.rescore_unscored,
            rubric=args.rubric,
        )
    except (ChapterError, KeyboardInterrupt) as exc:
        if isinstance(exc, JudgeUnavailableError) and exc.result and exc.result.n_scored:
            print_scores(exc.result)  # what the judge scored before it stopped
        saved = f"the scores so far are saved in {args.file_path}; run the same command again"
        return interrupts.stopped_or_failed(exc, f"{saved} to score the rest")
    print_scores(result)
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
