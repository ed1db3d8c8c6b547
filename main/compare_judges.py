"""Two LLM judges score the same responses: how far do they agree?

    python main/compare_judges.py --file_path outputs/latest/instruction-data-with-response.json \\
        --judge_a llama3 --judge_b gpt-4o --judge_b_url https://api.example.com/v1 \\
        --judge_b_api openai [--rubric 1-5]

Each judge scores the file through the chapter's judge client (``ollama_evaluate``): its
time limits, its check that the judge is up, and its saved progress. Judge X's replies go
to ``<file>.scores-<X>-<rubric>.json`` beside the file as they arrive, so a rerun asks only
what is missing, and a judge whose scores are all saved is not asked at all. Replies of a
judge already saved in the file itself (by ``ollama_evaluate.py``) count as saved.

Over the entries both judges scored it reports Pearson's, Spearman's and Kendall's
correlations, each with a 95% bootstrap interval, the mean absolute difference and, on the
1-5 rubric, the quadratic-weighted Cohen's kappa (``judge_stats``); it draws the scores
against each other with the diagonal (``--plot``, default ``outputs/judge-agreement.png``) and
saves the numbers as JSON beside the plot.
"""

from __future__ import annotations

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from course.instruction_data import ChapterError, DatasetError, read_instruction_file
from course.judge_stats import agreement
from ollama_evaluate import (
    JUDGE_APIS,
    JUDGE_MAX_FAILURES,
    JUDGE_TIMEOUT,
    RUBRICS,
    JudgeResult,
    JudgeSettings,
    judge_responses,
    read_responses,
)
from runtime.outputs import save_figure, save_json, verify_file

PLOT = "outputs/judge-agreement.png"


def scores_path(file_path: str | os.PathLike, model: str, rubric: str) -> Path:
    """Where judge ``model``'s replies to ``file_path`` on ``rubric`` are saved."""
    path = Path(file_path)
    slug = re.sub(r"[^\w.-]+", "_", model).strip("_") or "judge"
    return path.with_name(f"{path.stem}.scores-{slug}-{rubric}.json")


def _saved_records(entries: list[dict], path: Path, json_key: str) -> list[dict]:
    """``entries``, or what an earlier session saved in ``path`` for the same entries (checked
    against its checksum); a new file is written at once, with its checksum, and kept current
    as the scores arrive."""
    if not path.is_file():
        save_json(entries, path, checksum=True)
        return entries
    verify_file(path, "delete it and its .sha256 to score these again")
    saved = read_instruction_file(path)
    keys = ("instruction", "input", json_key)
    if len(saved) != len(entries) or any(
        [s.get(k) for k in keys] != [e.get(k) for k in keys]
        for s, e in zip(saved, entries, strict=True)
    ):
        raise DatasetError(
            f"{path} holds scores of other responses than these {len(entries)}; "
            "delete it to score these again"
        )
    return saved


def judge_scores(
    entries: list[dict],
    file_path: str | os.PathLike,
    judge: JudgeSettings,
    *,
    rubric: str = "0-100",
    json_key: str = "model_response",
    progress: bool = True,
) -> JudgeResult:
    """The ``judge``'s scores of ``entries``: the saved ones, the missing ones asked (and
    saved in ``scores_path``). A judge that is down raises ``JudgeUnavailableError``."""
    path = scores_path(file_path, judge.model, rubric)
    records = _saved_records(entries, path, json_key)
    print(f"Judge {judge.model} ({judge.api}): scores in {path}")
    return judge_responses(
        records, json_key, **asdict(judge), save_path=path, progress=progress, rubric=rubric
    )


def paired_scores(a: JudgeResult, b: JudgeResult) -> tuple[list[int], list[int], list[int]]:
    """(entry indices, a's scores, b's scores) of the entries both judges scored."""
    of_a = dict(zip(a.scored_indices, a.scores, strict=True))
    of_b = dict(zip(b.scored_indices, b.scores, strict=True))
    both = sorted(of_a.keys() & of_b.keys())
    return both, [of_a[i] for i in both], [of_b[i] for i in both]


def compare_judges(a: JudgeResult, b: JudgeResult, rubric: str = "0-100") -> dict:
    """The agreement of two judges' results over the entries both scored."""
    indices, scores_a, scores_b = paired_scores(a, b)
    low, high = RUBRICS[rubric]
    labels = range(low, high + 1) if rubric == "1-5" else None
    return {
        "judge_a": a.model,
        "judge_b": b.model,
        "rubric": rubric,
        "n_entries": a.n_entries,
        "n_failed": {"a": a.n_failed, "b": b.n_failed},
        **agreement(scores_a, scores_b, labels=labels),
        "scores": {"indices": indices, "a": scores_a, "b": scores_b},
    }


def print_report(report: dict) -> None:
    """The agreement, one statistic a line, with its interval."""
    print(
        f"{report['judge_a']} vs {report['judge_b']}, rubric {report['rubric']}: "
        f"{report['n']} of {report['n_entries']} entries scored by both"
    )
    for name in ("pearson", "spearman", "kendall", "weighted_kappa", "mean_abs_diff"):
        if name not in report:
            continue
        value, (low, high) = report[name]["value"], report[name]["ci95"]
        shown = "n/a (too few or constant scores)" if value is None else f"{value:.3f}"
        if value is not None and low is not None:
            shown += f"  (95% bootstrap interval {low:.3f} to {high:.3f})"
        print(f"  {name:15s} {shown}")


def plot_agreement(report: dict):
    """Judge b's scores against judge a's, one dot per entry (bigger where several coincide),
    with the diagonal where they would agree."""
    from collections import Counter

    import matplotlib.pyplot as plt

    counts = Counter(zip(report["scores"]["a"], report["scores"]["b"], strict=True))
    low, high = RUBRICS[report["rubric"]]
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    if counts:
        xs, ys = zip(*counts, strict=True)
        ax.scatter(xs, ys, s=[20 * n for n in counts.values()], alpha=0.6)
    ax.plot([low, high], [low, high], color="gray", linestyle="--", label="agreement")
    ax.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    if high - low < 10:  # a small rubric: whole numbers only
        ax.set_xticks(range(low, high + 1))
        ax.set_yticks(range(low, high + 1))
    ax.set_xlabel(f"judge A: {report['judge_a']}")
    ax.set_ylabel(f"judge B: {report['judge_b']}")
    rho = report["spearman"]["value"]
    ax.set_title(f"{report['n']} responses, Spearman {'n/a' if rho is None else f'{rho:.2f}'}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare_judges.py",
        description="Score one responses file with two LLM judges (or read their saved scores) "
        "and report how far they agree.",
    )
    p.add_argument("--file_path", required=True, help="JSON file of entries with responses")
    p.add_argument("--json_key", default="model_response", help="the response's key")
    for side in ("a", "b"):
        p.add_argument(f"--judge_{side}", required=True, help=f"judge {side.upper()}'s model")
        p.add_argument(f"--judge_{side}_url", help="its host or endpoint (default: $OLLAMA_HOST)")
        p.add_argument(f"--judge_{side}_api", choices=JUDGE_APIS, default="ollama")
    p.add_argument("--rubric", choices=RUBRICS, default="0-100", help="default: 0-100")
    p.add_argument("--timeout", type=float, default=JUDGE_TIMEOUT, help="seconds per reply")
    p.add_argument("--max_failures", type=int, default=JUDGE_MAX_FAILURES)
    p.add_argument("--plot", default=PLOT, help=f"the scatter plot (PNG; default: {PLOT})")
    return p


def _judges(args: argparse.Namespace) -> list[JudgeSettings]:
    """Judges A and B as ``--judge_a``, ``--judge_a_url`` ... and the shared limits name them."""
    return [
        JudgeSettings(
            getattr(args, f"judge_{side}"),
            getattr(args, f"judge_{side}_url"),
            getattr(args, f"judge_{side}_api"),
            args.timeout,
            args.max_failures,
        )
        for side in ("a", "b")
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: 0 when done, 2 with one ``error:`` line, 130 on Ctrl-C."""
    import matplotlib

    matplotlib.use("Agg")
    args = build_arg_parser().parse_args(argv)
    try:
        if args.judge_a == args.judge_b:
            raise ChapterError(
                f"--judge_a and --judge_b are both {args.judge_a}: their scores would share one "
                "file; compare two different judge models"
            )
        entries = read_responses(args.file_path, args.json_key)
        results = [
            judge_scores(entries, args.file_path, judge, rubric=args.rubric, json_key=args.json_key)
            for judge in _judges(args)
        ]
        report = compare_judges(*results, rubric=args.rubric)
        print_report(report)
        plot = save_figure(plot_agreement(report), args.plot)
        saved = save_json(report, Path(args.plot).with_suffix(".json"))
    except (ChapterError, OSError, KeyboardInterrupt) as exc:
        return interrupts.stopped_or_failed(
            exc, "the scores so far are saved; run the same command again"
        )
    print(f"Scatter plot: {plot}\nNumbers: {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
