"""Chapter 7, sections 7.2-7.4: the instruction data, the prompt format, batches and loaders.

    load_instruction_data -> split_data -> format_input -> InstructionDataset
    -> custom_collate_fn -> create_dataloaders

The collate function is built up in drafts in the notebook; the drafts live in
``collate_drafts.py``, the final function here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch.utils.data import DataLoader, Dataset

from gpt_download import DiskError, download_file
from runtime.engine import LengthGroupedBatchSampler
from runtime.errors import ChapterError, ConfigError, DatasetError  # noqa: F401 (re-exported)
from runtime.token_ids import encode_prompts_and_responses, shared_prefix_length, token_lengths

DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "01_main-chapter-code/instruction-data.json"
)
SAMPLE_DATA_PATH = (
    Path(__file__).resolve().parents[1] / "main" / "data" / "sample-instruction-data.json"
)
REQUIRED_KEYS = ("instruction", "input", "output")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")  # read as one entry per line
EOS_TOKEN_ID = 50256  # <|endoftext|> in GPT-2's vocabulary, also used as padding
SMOKE_HINT = (
    "To run the chapter offline on the bundled sample data, use "
    "`python main/instruction_finetuning.py --smoke` (or SMOKE = True in the notebook)."
)


def first_few(indices: Sequence[int], n: int = 10) -> str:
    """The first ``n`` indices for a message: ``"3, 8, 41"``, and ``" ..."`` if there are more."""
    return ", ".join(map(str, indices[:n])) + (" ..." if len(indices) > n else "")


# --------------------------------------------------------------------------------------
# 7.2 The dataset
# --------------------------------------------------------------------------------------


def key_problems(entry: dict, keys: Sequence[str], *, empty: str | None = None) -> list[str]:
    """What is wrong with ``entry``'s ``keys``: each missing or not a string, or, where
    ``empty`` gives the reason it matters, blank (an empty list when nothing is)."""
    problems = []
    for key in keys:
        if key not in entry:
            problems.append(f"missing key {key!r}")
        elif not isinstance(entry[key], str):
            problems.append(f"key {key!r} must be a string, got {type(entry[key]).__name__}")
        elif empty is not None and not entry[key].strip():
            problems.append(f"{key!r} is empty: {empty}")
    return problems


def _entry_problems(entry: Any) -> list[str]:
    """What is wrong with one entry (an empty list when nothing is)."""
    if not isinstance(entry, dict):
        return [f"must be an object, got {type(entry).__name__}"]
    return key_problems(entry, REQUIRED_KEYS)


def raise_problems(
    source: str, problems: list[str], checked: str, max_listed: int, needs: str = ""
) -> None:
    """Raise one ``DatasetError`` listing the first ``max_listed`` problems, if there are any;
    ``needs`` says what each entry needs (default: the instruction keys)."""
    if not problems:
        return
    needs = needs or f"string keys {', '.join(REQUIRED_KEYS)}"
    listed = "\n".join(f"{source}: {p}" for p in problems[:max_listed])
    more = len(problems) - max_listed
    tail = f"\n... and {more} more" if more > 0 else ""
    raise DatasetError(
        f"{source}: {len(problems)} problem(s) in {checked} (each needs {needs}):\n{listed}{tail}"
    )


def validate_instruction_data(data: Any, source: str = "data", *, max_listed: int = 10) -> None:
    """Check that ``data`` is a non-empty list of objects with string instruction/input/output.

    Every problem is collected; the ``DatasetError`` lists the first ``max_listed`` of them
    with their entry numbers, and how many there are. Extra keys are allowed.
    """
    if not isinstance(data, list):
        raise DatasetError(
            f"{source}: the top level must be a JSON list of entries (or JSON Lines: one "
            f"entry per line), got {type(data).__name__}"
        )
    if not data:
        raise DatasetError(f"{source}: the list of entries is empty")
    problems = [f"entry {i}: {p}" for i, entry in enumerate(data) for p in _entry_problems(entry)]
    raise_problems(source, problems, f"{len(data)} entries", max_listed)


def _read_json_lines(text: str, source: str, *, max_listed: int = 10) -> list[dict]:
    """The entries of JSON Lines text (one object per line, blank lines skipped), validated
    like a JSON list; problems are reported by line number."""
    entries, problems, lines = [], [], 0
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        lines += 1
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: invalid JSON at column {exc.colno}: {exc.msg}")
            continue
        except RecursionError:
            problems.append(f"line {number}: nested too deeply to read")
            continue
        problems += [f"line {number}: {p}" for p in _entry_problems(entry)]
        entries.append(entry)
    if not lines:
        raise DatasetError(f"{source}: the file holds no entries")
    raise_problems(source, problems, f"{lines} lines", max_listed)
    return entries


def read_instruction_file(path: str | os.PathLike, source: str | None = None) -> list[dict]:
    """Read and validate a local instruction-data file (``source`` names it in errors).

    The file is a JSON list of entries, or JSON Lines: one entry per line (a ``.jsonl`` or
    ``.ndjson`` file, or any file whose lines are objects).
    """
    path = Path(path)
    source = source or str(path)
    if path.is_dir():
        raise DatasetError(f"{source}: is a folder; pass a JSON or JSON Lines file")
    if not path.is_file():
        raise DatasetError(f"{source}: no such file (pass a local JSON file or an http(s) URL)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DatasetError(f"{source}: could not read it ({exc.strerror or exc})") from None
    names = (path.name, urlsplit(source).path)
    if any(name.lower().endswith(JSON_LINES_SUFFIXES) for name in names):
        return _read_json_lines(text, source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # objects, one per line
            return _read_json_lines(text, source)
        raise DatasetError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise DatasetError(f"{source}: nested too deeply to read; pass a list of entries") from None
    validate_instruction_data(data, source)
    return data


def default_cache_path(url: str) -> Path:
    """Where a URL's data is kept unless told otherwise: in the current folder, under the
    URL's file name plus a short hash of the whole URL (``instruction-data-1a2b3c4d.json``),
    so that two URLs never share a cache."""
    stem, suffix = os.path.splitext(Path(urlsplit(url).path).name or "instruction-data")
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return Path(f"{stem}-{digest}{suffix or '.json'}")


def _check_cache_source(cache: Path, url: str) -> None:
    """Refuse a cache whose ``.source`` file records another URL (none: used as it is)."""
    record = cache.with_name(cache.name + ".source")
    if not record.is_file():
        return
    recorded = record.read_text(encoding="utf-8").strip()
    if recorded != url:
        raise DatasetError(
            f"data cache {cache} holds the data of {recorded} (see {record}), not of {url}. "
            "Pass another cache path for this URL, or delete both files to download it again."
        )


def _download_data(url: str, cache: Path, record_source: bool) -> list[dict]:
    """Download ``url`` under a temporary name, check it, then move it to ``cache``."""
    download = cache.with_name(cache.name + ".download")
    try:
        download_file(url, download, retries=2, progress=False, hint=SMOKE_HINT)
        data = read_instruction_file(download, source=url)
    except DatasetError:
        download.unlink(missing_ok=True)
        raise
    try:
        if record_source:
            cache.with_name(cache.name + ".source").write_text(url + "\n", encoding="utf-8")
        os.replace(download, cache)
    except OSError as exc:
        raise DiskError.from_os_error("write", cache, exc) from exc
    return data


def load_instruction_data(
    source: str | os.PathLike, *, cache_path: str | os.PathLike | None = None
) -> list[dict]:
    """The entries of a local file (JSON or JSON Lines), or of a URL downloaded once and reused.

    A URL's file is kept at ``cache_path`` (default: ``default_cache_path(url)``) and read
    from there on later calls, without the network. A download is checked before it takes
    that place, so a broken download is never reused. An explicit ``cache_path`` records
    its URL in ``<cache_path>.source``, and a cache recorded for another URL is refused.
    """
    if not str(source).startswith(("http://", "https://")):
        return read_instruction_file(source)
    url = str(source)
    cache = Path(cache_path) if cache_path is not None else default_cache_path(url)
    if cache.is_dir():
        raise DatasetError(f"data cache {cache} is a folder; pass a file path for the data")
    if cache.is_file():
        _check_cache_source(cache, url)
        return read_instruction_file(cache)
    return _download_data(url, cache, record_source=cache_path is not None)


def download_and_load_file(file_path: str | os.PathLike, url: str) -> list[dict]:
    """The course's loader: download ``url`` to ``file_path`` unless that file exists; load it.

    As in the course, an existing ``file_path`` is used as it is, whichever URL it came from.
    """
    if Path(file_path).is_file():
        return read_instruction_file(file_path)
    return load_instruction_data(url, cache_path=file_path)


def split_data(
    data: Sequence[dict],
    train_frac: float = 0.85,
    test_frac: float = 0.10,
    *,
    seed: int | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, val) in the course's order: the first 85%, the next 10%, the rest.

    1,100 entries give 935 / 110 / 55. With ``seed``, a shuffled copy is split instead.
    """
    if not (0 <= train_frac <= 1 and 0 <= test_frac <= 1 and train_frac + test_frac <= 1):
        raise ValueError(f"need 0 <= train_frac + test_frac <= 1, got {train_frac}, {test_frac}")
    data = list(data)
    if seed is not None:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        data = [data[i] for i in order.tolist()]
    train_portion = int(len(data) * train_frac)
    test_portion = int(len(data) * test_frac)
    train = data[:train_portion]
    test = data[train_portion : train_portion + test_portion]
    val = data[train_portion + test_portion :]
    return train, test, val


# --------------------------------------------------------------------------------------
# The prompt format
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptStyle:
    """The text around an entry: header + instruction [+ input_sep + input] + response_sep + output.

    ``response_marker`` is what ``extract_response`` strips from generated text.
    """

    name: str
    header: str
    input_sep: str
    response_sep: str
    response_marker: str


PROMPT_STYLES: dict[str, PromptStyle] = {
    # the course's Alpaca-style template
    "alpaca": PromptStyle(
        name="alpaca",
        header=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            "\n\n### Instruction:\n"
        ),
        input_sep="\n\n### Input:\n",
        response_sep="\n\n### Response:\n",
        response_marker="### Response:",
    ),
    # the Phi-3 template of the chapter's exercise 7.1
    "phi3": PromptStyle(
        name="phi3",
        header="<|user|>\n",
        input_sep="\n",
        response_sep="\n<|assistant|>:\n",
        response_marker="<|assistant|>:",
    ),
}


def check_prompt_style(name: Any) -> str:
    """``name`` if it names a prompt style; else a ``ConfigError`` that lists them."""
    if name not in PROMPT_STYLES:
        raise ConfigError(
            f"unknown prompt style {name!r}; choose one of: {', '.join(PROMPT_STYLES)}"
        )
    return name


def get_prompt_style(style: str | PromptStyle) -> PromptStyle:
    """A prompt style by name (a ``PromptStyle`` passes through)."""
    if isinstance(style, PromptStyle):
        return style
    return PROMPT_STYLES[check_prompt_style(style)]


def format_input(entry: dict, style: str | PromptStyle = "alpaca") -> str:
    """The prompt of an entry: the style's header and the instruction, then the input if any."""
    s = get_prompt_style(style)
    text = s.header + entry["instruction"]
    if entry["input"]:
        text += s.input_sep + entry["input"]
    return text


def format_response(entry: dict, style: str | PromptStyle = "alpaca") -> str:
    """What the model learns to write after the prompt: the response header and the output."""
    return get_prompt_style(style).response_sep + entry["output"]


# --------------------------------------------------------------------------------------
# 7.3 Batches
# --------------------------------------------------------------------------------------


class InstructionDataset(Dataset):
    """The entries as token ids of prompt + response, tokenized once up front.

    ``dataset[i]`` is entry i's list of token ids, as in the course. With
    ``return_prompt_length=True`` it is ``(token_ids, prompt_length)``, which
    ``custom_collate_fn(mask_prompt=True)`` needs to leave the prompt out of the loss.

    ``compact=True`` is for big data such as the 52k Alpaca entries: the same token ids,
    encoded in batches into one flat array of 2 bytes per token (``token_ids.TokenIds``)
    instead of a Python list per entry, in seconds instead of minutes.
    """

    def __init__(
        self,
        data: Sequence[dict],
        tokenizer: Any,
        *,
        style: str | PromptStyle = "alpaca",
        return_prompt_length: bool = False,
        compact: bool = False,
    ) -> None:
        self.data = data
        self.style = get_prompt_style(style)
        self.return_prompt_length = return_prompt_length
        pairs = ((format_input(e, self.style), format_response(e, self.style)) for e in data)
        if compact:
            self.encoded_texts, self.prompt_lengths = encode_prompts_and_responses(pairs, tokenizer)
            return
        self.encoded_texts, self.prompt_lengths = [], []
        for prompt, response in pairs:
            self.encoded_texts.append(tokenizer.encode(prompt + response))
            prompt_ids = tokenizer.encode(prompt)
            self.prompt_lengths.append(shared_prefix_length(prompt_ids, self.encoded_texts[-1]))

    def __getitem__(self, index: int) -> list[int] | tuple[list[int], int]:
        if self.return_prompt_length:
            return self.encoded_texts[index], self.prompt_lengths[index]
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.encoded_texts)


def custom_collate_fn(
    batch: Sequence[list[int] | tuple[list[int], int]],
    pad_token_id: int = 50256,
    ignore_index: int = -100,
    allowed_max_length: int | None = None,
    device: str | torch.device = "cpu",
    *,
    mask_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of token-id lists into (inputs, targets), exactly as the course does.

    Each item gets one end-of-text token, then padding up to the longest item + 1;
    inputs = padded[:-1], targets = padded[1:]. In the targets the first end-of-text token
    stays (the model learns to stop) and the padding after it becomes ``ignore_index``.
    Both are cut to ``allowed_max_length`` and moved to ``device``.

    Items may be ``(token_ids, prompt_length)`` pairs (see ``InstructionDataset``); then
    ``mask_prompt=True`` also ignores the targets that predict prompt tokens, so that the
    loss covers only the response. The padding is found by position (everything after the
    item's own end-of-text token), so a ``pad_token_id`` inside an item's text stays a target.
    """
    items = [item if isinstance(item, tuple) else (item, None) for item in batch]
    batch_max_length = max(len(ids) + 1 for ids, _ in items)
    inputs_lst, targets_lst = [], []
    for ids, prompt_length in items:
        padded = list(ids) + [pad_token_id] * (batch_max_length - len(ids))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        targets[len(ids) :] = ignore_index  # targets[len(ids) - 1] is the end-of-text token
        if mask_prompt:
            if prompt_length is None:
                raise ValueError(
                    "mask_prompt=True needs (token_ids, prompt_length) items; build the "
                    "dataset with InstructionDataset(..., return_prompt_length=True)"
                )
            targets[: max(prompt_length - 1, 0)] = ignore_index  # targets[j] predicts token j+1
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


# --------------------------------------------------------------------------------------
# 7.4 Data loaders
# --------------------------------------------------------------------------------------


def create_dataloaders(
    train_data: Sequence[dict],
    val_data: Sequence[dict],
    test_data: Sequence[dict],
    tokenizer: Any,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    allowed_max_length: int | None = 1024,
    style: str | PromptStyle = "alpaca",
    mask_prompt: bool = False,
    seed: int = 123,
    group_by_length: bool = False,
    compact: bool = False,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """The three loaders of section 7.4: (train, val, test).

    Training shuffles (with its own random generator, seeded by ``seed``) and drops the
    last partial batch; validation and test keep their order and every entry.
    ``group_by_length=True`` batches training entries of similar length together
    (``engine.LengthGroupedBatchSampler``): less padding, a faster epoch; off by default,
    as in the course. ``compact=True`` holds the token ids compactly (``InstructionDataset``).
    """
    collate = functools.partial(
        custom_collate_fn,
        device=device,
        allowed_max_length=allowed_max_length,
        mask_prompt=mask_prompt,
    )

    def loader(data: Sequence[dict], train: bool) -> DataLoader:
        dataset = InstructionDataset(
            data, tokenizer, style=style, return_prompt_length=mask_prompt, compact=compact
        )
        generator = torch.Generator().manual_seed(seed) if train else None
        if train and group_by_length:
            lengths = token_lengths(dataset.encoded_texts)
            sampler = LengthGroupedBatchSampler(lengths, batch_size, generator=generator)
            return DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collate,
            shuffle=train,
            drop_last=train,
            num_workers=num_workers,
            generator=generator,
        )

    return loader(train_data, True), loader(val_data, False), loader(test_data, False)


def report_long_entries(
    name: str, lengths: Sequence[int], limit: int, *, kind: str = "entries"
) -> list[int]:
    """Print, once, how many of a split's ``kind`` are longer than ``limit`` tokens (and are
    therefore cut), with the first few of their indices; returns the indices."""
    long = [i for i, n in enumerate(lengths) if n > limit]
    if long:
        print(
            f"{len(long)} of {len(lengths)} {name} {kind} are longer than {limit} tokens and "
            f"are cut to {limit} ({kind} {first_few(long, 5)})"
        )
    return long
