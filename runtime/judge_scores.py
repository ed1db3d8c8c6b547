"""The judge's scores as the commands keep them: saved into the responses file entry by entry,
resumed, summed up with a bootstrap interval, printed.

``ollama_evaluate`` holds the course's pieces (``query_model``, ``judge_prompt``,
``parse_score``, ``generate_model_scores``); this module holds what makes them a tool that
loses nothing: ``JudgeSettings`` names the judge and its limits as one value; ``ask_each``
asks the judge about each entry still missing and saves every reply as it arrives, stopping
after ``max_failures`` failed requests in a row; ``has_judge_reply`` and ``to_ask`` decide
what a re-run asks again; ``JudgeResult`` holds the scores and every failure, never dropped,
and ``summary()`` is what run-summary.json keeps.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from course.instruction_data import ConfigError, DatasetError, first_few, read_instruction_file
from course.judge_stats import mean_with_ci
from runtime.errors import JudgeUnavailableError
from runtime.judge_client import JUDGE_TIMEOUT, excerpt
from runtime.judge_host import redact_url, with_judge_hint
from runtime.outputs import checksum_path, save_json, verify_file
from runtime.progress_bars import progress_bar

JUDGE_MAX_FAILURES = 3  # failed requests in a row after which the judge counts as down
RUBRICS = {"0-100": (0, 100), "1-5": (1, 5)}  # the scales a judge scores on: (lowest, highest)
NO_SCORE = "no integer score in 0..100"


@dataclass(frozen=True)
class JudgeSettings:
    """Which judge to ask and how patiently (``judge_responses``'s keywords of these names)."""

    model: str = "llama3"
    url: str | None = None  # host or endpoint; None: $OLLAMA_HOST
    api: str = "ollama"
    timeout: float | tuple[float, float] = JUDGE_TIMEOUT  # seconds per whole reply
    max_failures: int = JUDGE_MAX_FAILURES  # failed requests in a row before it counts as down

    @classmethod
    def of(cls, settings: Any, prefix: str = "") -> JudgeSettings:
        """The judge named by a command's arguments or a run's settings: their attributes
        ``{prefix}model``, ``{prefix}url`` ... (``prefix="judge_"``: ``judge_model`` ...)."""
        return cls(**{f.name: getattr(settings, prefix + f.name) for f in fields(cls)})


DEFAULT_JUDGE = JudgeSettings()


class JudgeReplyWarning(UserWarning):
    """The judge's reply to one entry could not be turned into a score in 0..100."""


def check_rubric(rubric: str) -> str:
    """``rubric`` if it is one of ``RUBRICS``, else a ``ConfigError`` naming them."""
    if rubric not in RUBRICS:
        raise ConfigError(f"unknown rubric {rubric!r}; choose one of: {', '.join(RUBRICS)}")
    return rubric


def no_score(rubric: str = "0-100") -> str:
    """The failure reason of a reply without a score on ``rubric``."""
    low, high = RUBRICS[rubric]
    return f"no integer score in {low}..{high}"


@dataclass
class JudgeFailure:
    index: int  # position of the entry in the list given to the judge
    reply: str
    reason: str


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
    rubric: str = "0-100"

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
            "mean_ci95": mean_with_ci(self.scores)["ci95"],  # bootstrap, fixed seed
            "rubric": self.rubric,
            "note": self.note(),
            "scores": self.scores,
            "scored_indices": self.scored_indices,
            "failures": [asdict(f) for f in self.failures],
        }


def has_judge_reply(entry: dict, model: str, rubric: str = "0-100") -> bool:
    """Whether ``entry`` holds a saved reply of judge ``model`` on ``rubric`` (none saved:
    the book's 0-100): its score, or None for a reply without one. An empty saved reply is no
    reply (an older version stored failed attempts so)."""
    score, (low, high) = entry.get("judge_score"), RUBRICS[rubric]
    if score is None:
        reply = entry.get("judge_reply")
        usable = "judge_score" in entry and isinstance(reply, str) and bool(reply.strip())
    else:
        usable = type(score) is int and low <= score <= high
    same = entry.get("judge_model") == model and entry.get("judge_rubric", "0-100") == rubric
    return same and usable


def with_short_reply(entry: dict) -> dict:
    """A copy of ``entry`` whose saved ``judge_reply`` is an excerpt (an older version saved
    whole replies, however large)."""
    entry = dict(entry)
    if isinstance(entry.get("judge_reply"), str):
        entry["judge_reply"] = excerpt(entry["judge_reply"])
    return entry


def to_ask(
    records: Sequence[dict], model: str, rescore_unscored: bool = False, rubric: str = "0-100"
) -> list[int]:
    """The entries to ask judge ``model`` about on ``rubric``: those without its reply, and
    with ``rescore_unscored`` also those whose saved reply had no score."""
    return [
        i
        for i, entry in enumerate(records)
        if not has_judge_reply(entry, model, rubric)
        or (rescore_unscored and entry.get("judge_score") is None)
    ]


def collect_result(
    records: Sequence[dict],
    model: str,
    endpoint: str,
    request_failures: dict[int, str],
    rubric: str = "0-100",
) -> JudgeResult:
    """The result read from the entries' saved replies and this session's failed requests."""
    scores, indices, failures = [], [], []
    for i, entry in enumerate(records):
        if has_judge_reply(entry, model, rubric) and entry["judge_score"] is not None:
            scores.append(entry["judge_score"])
            indices.append(i)
        elif has_judge_reply(entry, model, rubric):
            reply = str(entry.get("judge_reply", ""))
            failures.append(JudgeFailure(i, reply, no_score(rubric)))
        elif i in request_failures:
            failures.append(JudgeFailure(i, "", f"request failed: {request_failures[i]}"))
    shown = redact_url(endpoint)
    return JudgeResult(scores, indices, failures, model, shown, len(records), rubric)


def _warn(index: int, reason: str, reply: str | None = None) -> None:
    shown = "" if reply is None else f"; judge reply: {excerpt(reply)!r}"
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
    keep: Callable[[dict, str], str | None],
    desc: str = "Scoring entries",
) -> None:
    """Ask the judge about each entry in ``todo``; stop after ``max_failures`` failed requests
    in a row (``JudgeUnavailableError``). Each reply is saved into ``records`` (and the file)
    as ``keep(entry, reply)`` stores it (a score, ``preference_data``'s rewrites ...); a
    reason ``keep`` returns is warned about (``JudgeReplyWarning``, with the reply). A failed
    request (unusable replies included) saves nothing, so the entry is asked again next time."""
    in_a_row = 0
    for i in progress_bar(todo, desc=desc, enabled=progress):
        try:
            reply = ask(records[i])
        except JudgeUnavailableError as exc:
            request_failures[i] = str(exc)
            _warn(i, f"request failed: {exc}")
            in_a_row += 1
            if in_a_row >= max_failures:
                raise type(exc)(  # (its kind decides what to do: start the server, or not)
                    f"the LLM judge failed {in_a_row} requests in a row, so it counts as down; "
                    f"last: {exc}"
                ) from None
            continue
        in_a_row = 0
        problem = keep(records[i], reply)
        if problem is not None:
            _warn(i, problem, reply)
        if save_path is not None:
            save_json(records, save_path)


def what_to_do(exc: Exception, api: str, model: str, saved_in: str | os.PathLike | None) -> str:
    """The judge's failure, how to start the judge, and (with replies saved) how to go on."""
    message = with_judge_hint(exc, api, model)
    if saved_in is not None:
        message += (
            f" The replies so far are saved in {saved_in}; scoring it again (python "
            f"main/ollama_evaluate.py --file_path {saved_in}) asks only the missing entries."
        )
    return message


def print_scores(result: JudgeResult, label: str = "") -> None:
    """The course's two lines (number of scores, average score), and what the mean covers."""
    mean = "n/a" if result.mean is None else f"{result.mean:.2f}"
    low, high = mean_with_ci(result.scores)["ci95"] or (None, None)
    if low is not None:
        mean += f" (95% bootstrap interval {low:.2f} to {high:.2f}; rubric {result.rubric})"
    print(f"Number of scores: {result.n_scored} of {result.n_entries}")
    print(f"Average score{label}: {mean}")
    if result.n_scored < result.n_entries:
        print(f"  ({result.note()})")


def judge_settings(cfg: Any) -> dict[str, Any]:
    """``score_responses``'s judge keywords from a run's settings (``use_judge``, ``judge_*``)."""
    return {
        "use_judge": cfg.use_judge,
        "judge_url": cfg.judge_url,
        "judge_model": cfg.judge_model,
        "judge_api": cfg.judge_api,
        "timeout": cfg.judge_timeout,
        "max_failures": cfg.judge_max_failures,
        "rubric": cfg.judge_rubric,
    }


def read_responses(path: str | os.PathLike, json_key: str = "model_response") -> list[dict]:
    """The entries of a responses file; each must also have a string ``json_key``. A file
    with a checksum file (the chapter run's) is checked against it first."""
    advice = (
        f"generate the responses again, or delete {checksum_path(path).name} to use it as it is"
    )
    verify_file(path, advice)
    entries = read_instruction_file(path)
    missing = [i for i, e in enumerate(entries) if not isinstance(e.get(json_key), str)]
    if missing:
        raise DatasetError(
            f"{path}: {len(missing)} of {len(entries)} entries have no string {json_key!r} "
            f"(entries {first_few(missing)}); generate the responses first (section 7.7)"
        )
    return entries
