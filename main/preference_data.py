"""Preference data for DPO: pairs of a better and a worse answer to the same instruction.

Each entry is an instruction entry with two more keys, ``chosen`` (the answer to prefer) and
``rejected`` (the answer to avoid):

    load_preference_data -> PreferenceDataset -> preference_collate_fn
    -> create_preference_loaders

The course makes such pairs with the judge model of section 7.8: for each entry it asks for
the reference answer rewritten a little more politely or a little less politely (a coin
flip per entry), and pairs the rewrite with the reference answer, the polite one being
``chosen``. ``generate_preference_data`` does this through the judge client of
``ollama_evaluate`` (Ollama or any OpenAI-compatible server), with its robustness: a timeout
per reply, a stop after ``max_failures`` failed requests in a row, every rewrite saved into
the output file as it arrives, and a re-run that asks only the entries still missing.

    python main/preference_data.py --data instruction-data.json \
        --output instruction-data-with-preference.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import functools
import os
import random
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from course.instruction_data import (
    DATA_URL,
    EOS_TOKEN_ID,
    REQUIRED_KEYS,
    ChapterError,
    DatasetError,
    PromptStyle,
    first_few,
    format_input,
    format_response,
    get_prompt_style,
    key_problems,
    load_instruction_data,
    raise_problems,
    read_instruction_file,
)
from gpt_download import DownloadError
from ollama_evaluate import (
    DEFAULT_JUDGE,
    JUDGE_APIS,
    JUDGE_MAX_FAILURES,
    JUDGE_TIMEOUT,
    JudgeReplyWarning,
    JudgeSettings,
    ask_about_each,
)
from runtime.outputs import save_json, verify_file
from runtime.token_ids import shared_prefix_length

PREFERENCE_KEYS = ("chosen", "rejected")
SAMPLE_PREFERENCE_PATH = Path(__file__).resolve().parent / "data" / "sample-preference-data.json"
PREFERENCE_FILE = "instruction-data-with-preference.json"  # the course's file name
POLITENESS = ("polite", "impolite")
MAKE_HINT = (
    "make pairs with the judge: python main/preference_data.py --data DATA --output FILE "
    "(a re-run finishes an interrupted file)"
)

# --------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------


def _pair_problems(entry: dict) -> list[str]:
    """What is wrong with an entry's pair (an empty list when nothing is)."""
    if "preference_error" in entry:  # the judge gave no usable rewrite: no pair, on purpose
        return []
    problems = key_problems(entry, PREFERENCE_KEYS, empty="a pair needs two answers")
    if problems:
        return problems
    if entry["chosen"].strip() == entry["rejected"].strip():
        return ["'chosen' and 'rejected' are the same text: a pair needs two different answers"]
    return []


def validate_preference_data(data: Sequence[dict], source: str, *, max_listed: int = 10) -> None:
    """Check every entry's pair: ``chosen`` and ``rejected`` strings, neither empty, not equal.

    (The instruction keys are checked when the file is read.) Entries that
    ``generate_preference_data`` marked with ``preference_error`` hold no pair and pass.
    The ``DatasetError`` lists the first ``max_listed`` problems, each naming its entry.
    """
    problems = []
    for i, entry in enumerate(data):
        words = entry["instruction"][:40] + ("..." if len(entry["instruction"]) > 40 else "")
        problems += [f"entry {i} ({words!r}): {p}" for p in _pair_problems(entry)]
    needs = f"string keys chosen and rejected, neither empty, not the same text; or {MAKE_HINT}"
    raise_problems(source, problems, f"{len(data)} entries", max_listed, needs)


def load_preference_data(path: str | os.PathLike) -> list[dict]:
    """The entries of a preference file (JSON or JSON Lines), checked.

    Every entry has instruction, input and output, and either a pair (``chosen`` and
    ``rejected``) or the ``preference_error`` mark of an entry the judge gave no usable
    rewrite for; ``usable_pairs`` leaves those out.
    """
    verify_file(
        path, f"delete it (and its {Path(path).name}.sha256) and make it again; {MAKE_HINT}"
    )
    entries = read_instruction_file(path)
    validate_preference_data(entries, str(path))
    return entries


def usable_pairs(entries: Sequence[dict]) -> list[dict]:
    """The entries that hold a pair (without the judge's failures)."""
    return [entry for entry in entries if "preference_error" not in entry]


# --------------------------------------------------------------------------------------
# Making pairs with the judge model
# --------------------------------------------------------------------------------------


def rewrite_prompt(entry: dict, politeness: str) -> str:
    """The judge's instruction: rewrite the entry's reference answer more ``politeness``."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"rewrite the output to be slightly more {politeness}. "
        "Change as little as possible. "
        "Reply with the rewritten output only, and nothing else."
    )


def politeness_choices(n: int, seed: int = 123) -> list[str]:
    """The course's coin flip per entry, "polite" or "impolite", drawn from ``seed``: the same
    entry gets the same choice in every session of a file."""
    rng = random.Random(seed)
    return [rng.choice(POLITENESS) for _ in range(n)]


def keep_rewrite(entry: dict, reply: str, model: str) -> None:
    """Store the judge's rewrite as the entry's pair, or mark the entry if it is unusable.

    A polite rewrite is ``chosen`` against the reference answer, an impolite one
    ``rejected``. An empty rewrite, or one equal to the reference answer, makes no pair:
    the entry gets ``preference_error`` (and the raw reply) instead, with a warning.
    """
    text = reply.strip()
    entry["preference_model"] = model
    if not text or text == entry["output"].strip():
        entry["preference_error"] = "empty rewrite" if not text else "rewrite equals the output"
        entry["preference_reply"] = reply
        for key in PREFERENCE_KEYS:
            entry.pop(key, None)
        warnings.warn(
            f"{entry['instruction'][:40]!r}: no pair ({entry['preference_error']}); "
            f"judge reply: {reply!r}",
            JudgeReplyWarning,
            stacklevel=2,
        )
        return
    polite = entry["politeness"] == "polite"
    entry["chosen"], entry["rejected"] = (
        (text, entry["output"]) if polite else (entry["output"], text)
    )
    entry.pop("preference_error", None)
    entry.pop("preference_reply", None)


def _is_asked(entry: dict, model: str) -> bool:
    """Whether ``entry`` holds a reply of judge ``model`` (a pair, or a marked failure)."""
    return entry.get("preference_model") == model and (
        "preference_error" in entry or all(key in entry for key in PREFERENCE_KEYS)
    )


def _resume_records(entries: Sequence[dict], save_path: Path) -> list[dict]:
    """Copies of ``entries``, with what an earlier session saved in ``save_path`` for them."""
    records = [dict(entry) for entry in entries]
    if not save_path.is_file():
        return records
    verify_file(save_path, "delete it to ask the judge for every entry again")
    saved = read_instruction_file(save_path)
    same = len(saved) == len(records) and all(
        [s[k] for k in REQUIRED_KEYS] == [r[k] for k in REQUIRED_KEYS]
        for s, r in zip(saved, records, strict=True)
    )
    if not same:
        raise DatasetError(
            f"{save_path} holds pairs of other data ({len(saved)} entries, not these "
            f"{len(records)}); choose another output file or delete it"
        )
    return saved


def _question(entry: dict) -> str:
    """The judge's instruction for ``entry``, in the direction of its coin flip."""
    return rewrite_prompt(entry, entry["politeness"])


def generate_preference_data(
    entries: Sequence[dict],
    save_path: str | os.PathLike,
    judge: JudgeSettings = DEFAULT_JUDGE,
    *,
    seed: int = 123,
    check: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Ask the ``judge`` for a polite or impolite rewrite of every entry's answer.

    All entries are saved to ``save_path`` after each reply (atomically), each answered one
    with ``politeness``, ``preference_model`` and its pair (see ``keep_rewrite``). Entries
    already answered there by this judge model are not asked again, so a re-run after Ctrl-C,
    a crash or a judge that went away asks only the others. After ``judge.max_failures``
    failed requests in a row: ``JudgeUnavailableError``, saying how to go on. Returns all
    entries, as saved (``usable_pairs`` gives the pairs).
    """
    save_path = Path(save_path)
    records = _resume_records(entries, save_path)
    for record, politeness in zip(records, politeness_choices(len(records), seed), strict=True):
        record.setdefault("politeness", politeness)
    model = judge.model
    todo = [i for i, record in enumerate(records) if not _is_asked(record, model)]
    if len(todo) < len(records):
        print(f"{len(records) - len(todo)} of {len(records)} entries have a rewrite of {model}")
    keep, desc = functools.partial(keep_rewrite, model=model), "Rewriting answers"
    ask_about_each(
        records, todo, _question, keep, judge, save_path, desc, check=check, progress=progress
    )
    save_json(records, save_path, checksum=True)
    _report(records, save_path)
    return records


def _report(records: Sequence[dict], save_path: Path) -> None:
    failed = [i for i, record in enumerate(records) if "preference_error" in record]
    print(f"{len(records) - len(failed)} preference pairs saved in {save_path}")
    if failed:
        print(
            f"{len(failed)} of {len(records)} entries got no usable rewrite and have no pair "
            f"(entries {first_few(failed)}; see their preference_reply)"
        )


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


class PreferenceDataset(Dataset):
    """The pairs as token ids, tokenized once: ``dataset[i]`` is a dict of ``prompt`` (the
    prompt's ids), ``chosen`` and ``rejected`` (prompt + response header + answer + end-of-text).

    ``prompt_length`` is how many leading tokens of ``chosen`` and ``rejected`` belong to the
    prompt (as ``InstructionDataset`` counts them), so that only the answers are scored.
    """

    def __init__(
        self, data: Sequence[dict], tokenizer: Any, *, style: str | PromptStyle = "alpaca"
    ) -> None:
        self.data = data
        self.style = get_prompt_style(style)
        self.encoded_texts: list[dict] = []
        for i, entry in enumerate(data):
            if any(not isinstance(entry.get(key), str) for key in PREFERENCE_KEYS):
                raise DatasetError(
                    f"entry {i} ({entry['instruction'][:40]!r}) has no pair; "
                    "pass usable_pairs(entries)"
                )
            prompt_text = format_input(entry, self.style)
            prompt = tokenizer.encode(prompt_text)
            item = {"prompt": prompt}
            for key in PREFERENCE_KEYS:
                answer = format_response({**entry, "output": entry[key]}, self.style)
                ids = tokenizer.encode(prompt_text + answer)
                item[key] = ids + [EOS_TOKEN_ID]  # scored too: the answer ends here
                item[f"{key}_prompt_length"] = shared_prefix_length(prompt, ids)
            self.encoded_texts.append(item)

    def __getitem__(self, index: int) -> dict:
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.encoded_texts)


def preference_collate_fn(
    batch: Sequence[dict],
    pad_token_id: int = EOS_TOKEN_ID,
    allowed_max_length: int | None = None,
    mask_prompt_tokens: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Pad a batch of pairs to one common length (the course's DPO ``custom_collate_fn``).

    Returns {"prompt": [ids per item], "chosen", "rejected": [batch, n] token ids,
    "chosen_mask", "rejected_mask": [batch, n] booleans}: True where a token belongs to the
    answer (and its end-of-text token), False on padding and, with ``mask_prompt_tokens``,
    on the prompt. Cut to ``allowed_max_length`` and moved to ``device``.
    """
    width = max(len(item[key]) for item in batch for key in PREFERENCE_KEYS)
    out: dict[str, Any] = {"prompt": [torch.tensor(item["prompt"]) for item in batch]}
    for key in PREFERENCE_KEYS:
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, item in enumerate(batch):
            ids[row, : len(item[key])] = torch.tensor(item[key])
            start = item[f"{key}_prompt_length"] if mask_prompt_tokens else 0
            mask[row, start : len(item[key])] = True
        if allowed_max_length is not None:
            ids, mask = ids[:, :allowed_max_length], mask[:, :allowed_max_length]
        out[key], out[f"{key}_mask"] = ids.to(device), mask.to(device)
    return out


def create_preference_loaders(
    train_data: Sequence[dict],
    val_data: Sequence[dict],
    tokenizer: Any,
    *,
    batch_size: int = 8,
    style: str | PromptStyle = "alpaca",
    allowed_max_length: int | None = 1024,
    device: str | torch.device = "cpu",
    seed: int = 123,
) -> tuple[DataLoader, DataLoader]:
    """The (train, val) loaders of pairs: training shuffles (seeded) and drops the last
    partial batch, as in the course; validation keeps its order and every pair."""
    collate = functools.partial(
        preference_collate_fn, allowed_max_length=allowed_max_length, device=device
    )

    def loader(data: Sequence[dict], train: bool) -> DataLoader:
        return DataLoader(
            PreferenceDataset(data, tokenizer, style=style),
            batch_size=batch_size,
            collate_fn=collate,
            shuffle=train,
            drop_last=train,
            generator=torch.Generator().manual_seed(seed) if train else None,
        )

    return loader(train_data, True), loader(val_data, False)


# --------------------------------------------------------------------------------------
# The command line: make a preference file with the judge
# --------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preference_data.py",
        description="Make DPO preference pairs: the judge model rewrites each reference answer "
        "a little more or less politely. Each rewrite is saved as it arrives; a re-run asks "
        "only the missing entries.",
    )
    p.add_argument("--data", default=DATA_URL, help="instruction data: JSON file or http(s) URL")
    p.add_argument("--data-cache", help="where a downloaded --data file is kept")
    p.add_argument("--output", default=PREFERENCE_FILE, help=f"default: {PREFERENCE_FILE}")
    p.add_argument("--judge-model", default="llama3", help="default: llama3")
    p.add_argument("--judge-url", help="judge host or endpoint (default: $OLLAMA_HOST)")
    p.add_argument("--judge-api", choices=JUDGE_APIS, default="ollama", help="default: ollama")
    p.add_argument(
        "--judge-timeout",
        type=float,
        default=JUDGE_TIMEOUT,
        help=f"seconds per reply (default: {JUDGE_TIMEOUT:g})",
    )
    p.add_argument(
        "--judge-max-failures",
        type=int,
        default=JUDGE_MAX_FAILURES,
        help=f"failed requests in a row before giving up (default: {JUDGE_MAX_FAILURES})",
    )
    p.add_argument("--seed", type=int, default=123, help="the polite/impolite coin flips")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: 0 when done, 2 with one ``error:`` line, 130 on Ctrl-C."""
    args = build_arg_parser().parse_args(argv)
    try:
        if args.judge_max_failures < 1 or not args.judge_timeout > 0:
            raise ChapterError("--judge-max-failures must be at least 1 and --judge-timeout > 0")
        if Path(args.output).is_dir():
            raise ChapterError(f"--output {args.output} is a folder; give a file name")
        entries = load_instruction_data(args.data, cache_path=args.data_cache)
        judge = JudgeSettings.of(args, prefix="judge_")
        generate_preference_data(entries, args.output, judge, seed=args.seed)
    except (ChapterError, DownloadError, OSError, KeyboardInterrupt) as exc:
        saved = f"the rewrites so far are saved in {args.output}; run the same command again"
        return interrupts.stopped_or_failed(exc, f"{saved} to ask the rest")
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
