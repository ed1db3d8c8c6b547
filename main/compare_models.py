"""Two models' responses to the same instructions, compared pairwise by an LLM judge.

    python main/compare_models.py --file_path_a outputs/baseline/instruction-data-with-response.json \\
        --file_path_b outputs/lora/instruction-data-with-response.json [--judge llama3 ...]

For each instruction the judge sees both responses and names the better one. Judges favour
one position, so every pair is asked twice, each response shown first once; only a verdict
that survives the swap counts as a win, anything else (the judge picked the same position
twice, or a reply named neither) is a tie. It reports:

* B's **win rate** over A (wins + half the ties, over all pairs), with a 95% bootstrap interval;
* a **length-controlled win rate**: the same over the pairs whose two responses differ by at
  most 10 GPT-2 tokens (judges also favour longer answers; this method keeps only the pairs
  where length cannot decide), with its interval and how many pairs it covers;
* the judge's **position bias**: how often a usable verdict named the response shown first
  (0.5: none), with its interval.

Every question goes through the chapter's judge client (``ollama_evaluate``): time limits, the
check that the judge is up, each verdict saved as it arrives (``--output``), and a rerun asks
only the missing ones. ``--seeds 123,124,125`` with ``{seed}`` in both file paths compares the
runs of each seed and reports each metric's mean and spread across the seeds.
"""

from __future__ import annotations

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import functools
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from course.instruction_data import ChapterError, ConfigError, DatasetError, format_input
from course.judge_stats import mean_and_spread, mean_with_ci
from ollama_evaluate import (
    DEFAULT_JUDGE,
    JUDGE_APIS,
    JUDGE_MAX_FAILURES,
    JUDGE_TIMEOUT,
    JudgeSettings,
    ask_about_each,
    read_responses,
)
from runtime.outputs import save_json

LENGTH_TOLERANCE = 10  # tokens: pairs this close in length make the length-controlled rate
LENGTH_METHOD = f"pairs whose responses differ by at most {LENGTH_TOLERANCE} GPT-2 tokens"
METRICS = ("win_rate", "length_controlled_win_rate", "position_bias")


def pairwise_prompt(entry: dict, first: str, second: str) -> str:
    """The judge's question: which of two responses to the entry is better."""
    return (
        f"Given the input `{format_input(entry)}` and the correct output `{entry['output']}`, "
        f"which of two responses is better?\n\nResponse A: `{first}`\n\nResponse B: `{second}`"
        "\n\nJudge correctness, completeness, following the instruction and conciseness; "
        "ignore the order in which they are shown. Respond with the letter A or B only."
    )


_VERDICT = re.compile(r"\b(?:response|answer)\s*([AB])\b", re.I)


def parse_verdict(reply: str) -> str | None:
    """ "A" or "B" from the judge's reply ("A", "**B**", "Response B is better."), or None
    when it names neither or both."""
    bare = re.fullmatch(r"[\W_]*([AB])[\W_]*", reply.strip())
    if bare:
        return bare.group(1)
    named = {m.upper() for m in _VERDICT.findall(reply)}
    return named.pop() if len(named) == 1 else None


def pair_entries(a: Sequence[dict], b: Sequence[dict], json_key: str) -> list[dict]:
    """One question per instruction both files answer: the entry and both responses."""
    of_b = {(e["instruction"], e.get("input", "")): e for e in b}
    pairs = []
    for entry in a:
        other = of_b.get((entry["instruction"], entry.get("input", "")))
        if other is not None:
            pairs.append(
                {
                    **{k: entry[k] for k in ("instruction", "input", "output")},
                    "response_a": entry[json_key],
                    "response_b": other[json_key],
                }
            )
    if not pairs:
        raise DatasetError("the two files answer no instruction in common: nothing to compare")
    return pairs


def questions(pairs: Sequence[dict]) -> list[dict]:
    """Each pair asked twice: A shown first ("ab"), then B shown first ("ba")."""
    return [{"pair": i, "order": order, **p} for i, p in enumerate(pairs) for order in ("ab", "ba")]


def keep_verdict(record: dict, reply: str, model: str) -> None:
    """Store the judge's verdict (None: the reply named neither response) and its reply."""
    record.update(verdict_model=model, verdict=parse_verdict(reply), verdict_reply=reply)


def _resume(records: list[dict], save_path: Path) -> list[dict]:
    """The questions with what an earlier session saved for them in ``save_path`` (checked
    against its checksum); a new file is written at once, with its checksum, and kept current
    as the verdicts arrive."""
    if not save_path.is_file():
        save_json(records, save_path, checksum=True)
        return records
    saved = read_responses(save_path, "response_b")
    same = [(s["pair"], s["order"], s["response_a"], s["response_b"]) for s in saved] == [
        (r["pair"], r["order"], r["response_a"], r["response_b"]) for r in records
    ]
    if not same:
        raise DatasetError(
            f"{save_path} holds verdicts on other responses; choose another --output"
        )
    return saved


def _question(record: dict) -> str:
    """The pairwise prompt of a question, its responses shown in the question's order."""
    first, second = ("a", "b") if record["order"] == "ab" else ("b", "a")
    return pairwise_prompt(record, record[f"response_{first}"], record[f"response_{second}"])


def ask_pairs(
    pairs: Sequence[dict],
    save_path: str | os.PathLike,
    judge: JudgeSettings = DEFAULT_JUDGE,
    *,
    ask: Callable[[str], str] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Both orders of every pair put to the ``judge``; the questions with their verdicts
    (saved in ``save_path`` as they arrive; a rerun asks only the missing ones).
    ``ask(prompt)`` replaces the judge server (a stand-in judge in an offline notebook)."""
    save_path = Path(save_path)
    records = _resume(questions(pairs), save_path)
    todo = [i for i, r in enumerate(records) if r.get("verdict_model") != judge.model]
    keep, desc = functools.partial(keep_verdict, model=judge.model), "Comparing pairs"
    ask_about_each(
        records, todo, _question, keep, judge, save_path, desc, ask=ask, progress=progress
    )
    return records


def pair_outcomes(records: Sequence[dict]) -> list[float]:
    """B's score per pair: 1 (B won in both orders), 0 (A did), 0.5 (a tie: the verdicts
    disagree, or one is missing: a reply that named neither, or no reply)."""
    winners: dict[int, list[str | None]] = {}
    for r in records:
        verdict = r.get("verdict")
        shown_first = "a" if r["order"] == "ab" else "b"
        other = "b" if shown_first == "a" else "a"
        winner = {"A": shown_first, "B": other}.get(verdict)
        winners.setdefault(r["pair"], []).append(winner)
    score = {"a": 0.0, "b": 1.0}
    return [
        score[w[0]] if len(w) == 2 and w[0] is not None and w[0] == w[1] else 0.5
        for _, w in sorted(winners.items())
    ]


def _rate(values: Sequence[float]) -> dict:
    result = mean_with_ci(list(values))
    return {"value": result["mean"], "ci95": result["ci95"], "n": len(values)}


def summarize(records: Sequence[dict], length: Callable[[str], int] | None = None) -> dict:
    """Win rate, length-controlled win rate and position bias of the judged questions."""
    if length is None:
        from runtime.gpt2_tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
        length = lambda text: len(tokenizer.encode(text, allowed_special="all"))  # noqa: E731
    outcomes = pair_outcomes(records)
    firsts = {r["pair"]: r for r in records if r["order"] == "ab"}
    close = [
        o
        for (_, r), o in zip(sorted(firsts.items()), outcomes, strict=True)
        if abs(length(r["response_a"]) - length(r["response_b"])) <= LENGTH_TOLERANCE
    ]
    verdicts = [r["verdict"] for r in records if r.get("verdict") is not None]
    return {
        "n_pairs": len(outcomes),
        "wins_b": outcomes.count(1.0),
        "wins_a": outcomes.count(0.0),
        "ties": outcomes.count(0.5),
        "failed_replies": sum(1 for r in records if "verdict_model" in r and r["verdict"] is None),
        "unanswered": sum(1 for r in records if "verdict_model" not in r),  # failed requests
        "win_rate": _rate(outcomes),
        "length_controlled_win_rate": {**_rate(close), "method": LENGTH_METHOD},
        "position_bias": _rate([1.0 if v == "A" else 0.0 for v in verdicts]),
    }


def seed_spread(reports: Sequence[dict]) -> dict:
    """Each metric's mean and standard deviation across seeds (``mean_and_spread``)."""
    return {m: mean_and_spread([r[m]["value"] for r in reports]) for m in METRICS}


def compare_models(
    file_path_a: str | os.PathLike,
    file_path_b: str | os.PathLike,
    output: str | os.PathLike,
    judge: JudgeSettings = DEFAULT_JUDGE,
    *,
    json_key: str = "model_response",
    progress: bool = True,
) -> dict:
    """Read both responses files, put every pair to the ``judge`` (``ask_pairs``), and
    summarize; the report names the files and the judge."""
    pairs = pair_entries(
        read_responses(file_path_a, json_key), read_responses(file_path_b, json_key), json_key
    )
    records = ask_pairs(pairs, output, judge, progress=progress)
    return {
        "a": str(file_path_a),
        "b": str(file_path_b),
        "judge": judge.model,
        **summarize(records),
    }


def _shown(rate: dict) -> str:
    if rate["value"] is None:
        return "n/a (no pairs)"
    low, high = rate["ci95"]
    return f"{rate['value']:.3f}  (95% bootstrap interval {low:.3f} to {high:.3f}; n={rate['n']})"


def print_report(report: dict) -> None:
    print(f"B = {report['b']}\nA = {report['a']}\njudge: {report['judge']}")
    print(
        f"{report['n_pairs']} pairs: B won {report['wins_b']}, A won {report['wins_a']}, "
        f"{report['ties']} ties (inconsistent verdicts count as ties); "
        f"{report['failed_replies']} replies named neither response"
        + (f", {report['unanswered']} questions got no reply" if report["unanswered"] else "")
    )
    print(f"  win rate of B               {_shown(report['win_rate'])}")
    print(f"  length-controlled win rate  {_shown(report['length_controlled_win_rate'])}")
    print(f"    ({LENGTH_METHOD})")
    print(f"  first-shown preferred       {_shown(report['position_bias'])}  (0.5: no bias)")


def plot_win_rates(reports: dict[str, dict]):
    """Each comparison's win rate and length-controlled win rate with their 95% intervals;
    the line at 0.5 is a draw."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(reports), 3.6))
    x = np.arange(len(reports))
    for offset, metric, label in (
        (-0.18, "win_rate", "win rate"),
        (0.18, "length_controlled_win_rate", "length-controlled"),
    ):
        values, errors = [], [[], []]
        for report in reports.values():
            rate = report[metric]
            value = np.nan if rate["value"] is None else rate["value"]
            low, high = rate["ci95"] or (value, value)
            values.append(value)
            errors[0].append(value - low)
            errors[1].append(high - value)
        ax.bar(x + offset, values, width=0.34, yerr=errors, capsize=4, label=label)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(x, list(reports), rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate against A (95% interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare_models.py",
        description="Compare two models' responses pairwise with an LLM judge, in both orders.",
    )
    p.add_argument("--file_path_a", required=True, help="responses of model A (the reference)")
    p.add_argument("--file_path_b", required=True, help="responses of model B")
    p.add_argument("--json_key", default="model_response", help="the response's key")
    p.add_argument("--judge", default="llama3", help="the judge model (default: llama3)")
    p.add_argument("--url", help="judge host or endpoint (default: $OLLAMA_HOST)")
    p.add_argument("--api", choices=JUDGE_APIS, default="ollama")
    p.add_argument("--timeout", type=float, default=JUDGE_TIMEOUT, help="seconds per reply")
    p.add_argument("--max_failures", type=int, default=JUDGE_MAX_FAILURES)
    p.add_argument(
        "--seeds",
        help="comma-separated seeds, e.g. 123,124,125: {seed} in the file paths is replaced "
        "by each, and the metrics' mean and spread across seeds are reported",
    )
    p.add_argument(
        "--output",
        help="where the verdicts are saved (default: outputs/pairwise-<A's folder>-vs-<B's "
        "folder>-<judge>.json, '-seed<N>' added per seed)",
    )
    return p


def _output(args: argparse.Namespace, a: str, b: str, seed: int | None) -> Path:
    suffix = "" if seed is None else f"-seed{seed}"
    if args.output:
        path = Path(args.output)
        return path.with_name(f"{path.stem}{suffix}{path.suffix or '.json'}")
    folders = [Path(p).resolve().parent.name for p in (a, b)]  # (a run's own folder name)
    slug = re.sub(r"[^\w.-]+", "_", f"{folders[0]}-vs-{folders[1]}-{args.judge}")
    return Path("outputs") / f"pairwise-{slug}{suffix}.json"


def _seeds(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give whole numbers separated by commas") from None
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: 0 when done, 2 with one ``error:`` line, 130 on Ctrl-C."""
    args = build_arg_parser().parse_args(argv)
    try:
        seeds = _seeds(args.seeds)
        if seeds != [None] and "{seed}" not in args.file_path_a + args.file_path_b:
            raise ConfigError("--seeds needs {seed} in --file_path_a and --file_path_b")
        judge = JudgeSettings(args.judge, args.url, args.api, args.timeout, args.max_failures)
        reports = []
        for seed in seeds:
            a, b = (p.replace("{seed}", str(seed)) for p in (args.file_path_a, args.file_path_b))
            output = _output(args, a, b, seed)
            report = compare_models(a, b, output, judge, json_key=args.json_key)
            print_report(report)
            reports.append(report)
        if len(reports) > 1:
            spread = seed_spread(reports)
            for metric, s in spread.items():
                std = "n/a" if s["std"] is None else f"{s['std']:.3f}"
                mean = "n/a" if s["mean"] is None else f"{s['mean']:.3f}"
                print(f"across {s['n_seeds']} seeds: {metric} mean {mean}, std {std}")
    except (ChapterError, OSError, KeyboardInterrupt) as exc:
        return interrupts.stopped_or_failed(
            exc, "the verdicts so far are saved; run the same command again"
        )
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
