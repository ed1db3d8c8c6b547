"""Chapter 7: fine-tuning GPT-2 to follow instructions.

One module for the notebook (``main.ipynb`` imports it), the command line and the tests:

    data (7.2)  ->  prompt format  ->  batching (7.3)  ->  data loaders (7.4)
    ->  pretrained GPT-2 (7.5)  ->  fine-tuning (7.6)  ->  test-set responses (7.7)
    ->  scores from an LLM judge, or local reference metrics without one (7.8)

Run it end to end with ``python main/instruction_finetuning.py`` (downloads the dataset and
GPT-2 355M), or offline in well under a minute with ``--smoke`` (a tiny randomly initialised
GPT on the bundled sample data, through the same code path).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

# `python main/instruction_finetuning.py` in a fresh clone: find previous_chapters.py and
# gpt_download.py in the repository root (an installed copy, if any, comes first).
_REPO_ROOT = Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "previous_chapters.py").is_file() and str(_REPO_ROOT) not in sys.path:
    sys.path.append(str(_REPO_ROOT))

import gpt_download  # noqa: E402
from previous_chapters import (  # noqa: E402
    MODEL_CONFIGS,
    GPTModel,
    calc_loss_loader,
    generate_batch,
    get_tokenizer,
    gpt2_config,
    load_weights_into_gpt,
    plot_losses,
    train_model_simple,
)

DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "01_main-chapter-code/instruction-data.json"
)
SAMPLE_DATA_PATH = Path(__file__).resolve().parent / "data" / "sample-instruction-data.json"
REQUIRED_KEYS = ("instruction", "input", "output")
EOS_TOKEN_ID = 50256  # <|endoftext|> in GPT-2's vocabulary, also used as padding
IGNORE_INDEX = -100  # targets with this value are skipped by cross_entropy
DOWNLOAD_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds: fail fast without internet
SMOKE_HINT = (
    "To run the chapter offline on the bundled sample data, use "
    "`python main/instruction_finetuning.py --smoke` (or SMOKE = True in the notebook)."
)


class ChapterError(Exception):
    """An expected failure (no internet, bad data, ...) with a message that says what to do."""


class DatasetError(ChapterError, ValueError):
    """The instruction data is not a JSON list of {instruction, input, output} strings."""


class ConfigError(ChapterError, ValueError):
    """An unknown prompt style, model size or judge API."""


class DownloadError(ChapterError, ConnectionError):
    """A file could not be downloaded."""


class JudgeUnavailableError(ChapterError, ConnectionError):
    """The LLM judge cannot be reached, or does not have the requested model."""


# --------------------------------------------------------------------------------------
# Data (7.2)
# --------------------------------------------------------------------------------------


def _is_url(source: str | os.PathLike) -> bool:
    return str(source).startswith(("http://", "https://"))


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _root_cause(exc: BaseException) -> str:
    """The innermost error behind a requests exception, e.g. 'ConnectionRefusedError: ...'."""
    if isinstance(exc, requests.HTTPError):
        return str(exc)
    node = getattr(exc.args[0], "reason", None) if exc.args else None
    node = node if isinstance(node, BaseException) else exc
    while node.__cause__ is not None or node.__context__ is not None:
        node = node.__cause__ or node.__context__
    return f"{type(node).__name__}: {node}"


def download_text(url: str, *, timeout: float | tuple[float, float] = DOWNLOAD_TIMEOUT) -> str:
    """GET ``url`` and return its text; any failure is one ``DownloadError`` with the smoke hint."""
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise DownloadError(
            f"could not download {url}: {_root_cause(exc)}. "
            f"Check your internet connection.\n{SMOKE_HINT}"
        ) from None
    response.encoding = response.encoding or "utf-8"
    return response.text


def parse_instruction_json(text: str, source: str) -> list[dict]:
    """Parse and validate the text of an instruction-data file (``source`` names it in errors)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    validate_instruction_data(data, source)
    return data


def validate_instruction_data(data: Any, source: str = "data", *, max_listed: int = 10) -> None:
    """Check that ``data`` is a non-empty list of objects with string instruction/input/output.

    Every problem is collected; the ``DatasetError`` lists the first ``max_listed`` and the count.
    Extra keys (e.g. ``model_response``) are allowed.
    """
    if not isinstance(data, list):
        raise DatasetError(
            f"{source}: the top level must be a JSON list of entries, got {type(data).__name__}"
        )
    if not data:
        raise DatasetError(f"{source}: the list of entries is empty")
    problems = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            problems.append(f"entry {i}: must be an object, got {type(entry).__name__}")
            continue
        for key in REQUIRED_KEYS:
            if key not in entry:
                problems.append(f"entry {i}: missing key {key!r}")
            elif not isinstance(entry[key], str):
                got = type(entry[key]).__name__
                problems.append(f"entry {i}: key {key!r} must be a string, got {got}")
    if problems:
        listed = "\n".join(f"{source}: {p}" for p in problems[:max_listed])
        more = len(problems) - max_listed
        tail = f"\n... and {more} more" if more > 0 else ""
        raise DatasetError(
            f"{source}: {len(problems)} problem(s) in {len(data)} entries "
            f"(each needs string keys {', '.join(REQUIRED_KEYS)}):\n{listed}{tail}"
        )


def _read_local(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (pass a local JSON file or an http(s) URL)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_instruction_json(text, str(path))


def load_instruction_data(
    source: str | os.PathLike,
    *,
    cache_path: str | os.PathLike | None = None,
    timeout: float | tuple[float, float] = DOWNLOAD_TIMEOUT,
) -> list[dict]:
    """Load a JSON list of {instruction, input, output} entries from a local file or a URL.

    A URL is downloaded once into ``cache_path`` (default: the URL's file name in the current
    directory, like the course) and the cached file is reused from then on, without network.
    The download is validated before it is cached, and written atomically.
    """
    if not _is_url(source):
        return _read_local(Path(source))
    url = str(source)
    cache = Path(cache_path) if cache_path is not None else Path(Path(urlsplit(url).path).name)
    if cache.is_file():
        return _read_local(cache)
    text = download_text(url, timeout=timeout)
    data = parse_instruction_json(text, url)
    _write_atomically(cache, text)
    return data


def download_and_load_file(file_path: str | os.PathLike, url: str) -> list[dict]:
    """The course's loader: download ``url`` to ``file_path`` unless it exists, then load it."""
    return load_instruction_data(url, cache_path=file_path)


def split_data(
    data: Sequence[dict],
    train_frac: float = 0.85,
    test_frac: float = 0.10,
    *,
    seed: int | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Split into (train, test, val) in the course's order: train first, then test, the rest val.

    1,100 entries give 935 / 110 / 55. With ``seed`` a shuffled copy is split (input untouched).
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
# Prompt format
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptStyle:
    """How an entry becomes text: prompt = header + instruction [+ input_sep + input],
    response = response_sep + output. ``response_marker`` is stripped from generated text."""

    name: str
    header: str
    input_sep: str
    response_sep: str
    response_marker: str

    def format_input(self, entry: dict) -> str:
        text = self.header + entry["instruction"]
        if entry["input"]:
            text += self.input_sep + entry["input"]
        return text

    def format_response(self, entry: dict) -> str:
        return self.response_sep + entry["output"]


PROMPT_STYLES: dict[str, PromptStyle] = {
    # The course's Alpaca-style template.
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
    # The Phi-3 template of the chapter's exercise 7.1.
    "phi3": PromptStyle(
        name="phi3",
        header="<|user|>\n",
        input_sep="\n",
        response_sep="\n<|assistant|>:\n",
        response_marker="<|assistant|>:",
    ),
}


def get_prompt_style(style: str | PromptStyle) -> PromptStyle:
    """Look up a prompt style by name (or pass a ``PromptStyle`` through)."""
    if isinstance(style, PromptStyle):
        return style
    if style not in PROMPT_STYLES:
        raise ConfigError(
            f"unknown prompt style {style!r}; choose one of: {', '.join(PROMPT_STYLES)}"
        )
    return PROMPT_STYLES[style]


def format_input(entry: dict, style: str | PromptStyle = "alpaca") -> str:
    """The prompt of an entry: instruction, plus the input when it is non-empty."""
    return get_prompt_style(style).format_input(entry)


def format_response(entry: dict, style: str | PromptStyle = "alpaca") -> str:
    """The part the model learns to write: the response separator plus the output."""
    return get_prompt_style(style).format_response(entry)


def extract_response(generated: str, style: str | PromptStyle = "alpaca") -> str:
    """Clean generated text like the course: drop the response marker and surrounding space."""
    marker = get_prompt_style(style).response_marker
    text = generated.strip()
    if text.startswith(marker):
        text = text[len(marker) :]
    return text.strip()


# --------------------------------------------------------------------------------------
# Batching (7.3) and data loaders (7.4)
# --------------------------------------------------------------------------------------


def _shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class InstructionDataset(Dataset):
    """Pre-tokenized prompt+response texts of a list of entries.

    ``dataset[i]`` is the token-id list, as in the course. With ``return_prompt_length=True``
    it is ``(token_ids, prompt_length)`` instead, which ``custom_collate_fn(mask_prompt=True)``
    needs to leave the prompt out of the loss. ``prompt_lengths[i]`` is always available.

    The prompt is ``format_input(entry)`` (instruction + input); the response separator
    ("### Response:") stays in the loss, as in the course's exercise 7.2. Its length is the
    number of leading tokens that ``encode(prompt)`` shares with ``encode(full_text)``: all of
    them, unless a trailing newline of the prompt merges with the response's "\\n\\n".
    """

    def __init__(
        self,
        data: Sequence[dict],
        tokenizer,
        *,
        style: str | PromptStyle = "alpaca",
        return_prompt_length: bool = False,
    ) -> None:
        self.data = data
        self.style = get_prompt_style(style)
        self.return_prompt_length = return_prompt_length
        self.encoded_texts: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        for entry in data:
            prompt = self.style.format_input(entry)
            full_ids = tokenizer.encode(prompt + self.style.format_response(entry))
            self.encoded_texts.append(full_ids)
            self.prompt_lengths.append(_shared_prefix_length(tokenizer.encode(prompt), full_ids))

    def __getitem__(self, index: int) -> list[int] | tuple[list[int], int]:
        if self.return_prompt_length:
            return self.encoded_texts[index], self.prompt_lengths[index]
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.encoded_texts)


def custom_collate_fn(
    batch: Sequence[list[int] | tuple[list[int], int]],
    pad_token_id: int = EOS_TOKEN_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    device: str | torch.device = "cpu",
    *,
    mask_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of token-id lists into (inputs, targets), exactly as the course does.

    Each item gets one end-of-text token, then padding up to the longest item + 1.
    inputs = padded[:-1], targets = padded[1:]; in the targets the first end-of-text token
    stays (the model learns to stop), the padding after it becomes ``ignore_index``.
    Inputs and targets are cut to ``allowed_max_length`` and moved to ``device``.

    Items may also be ``(token_ids, prompt_length)`` pairs (see ``InstructionDataset``); with
    ``mask_prompt=True`` the targets that predict prompt tokens become ``ignore_index`` too,
    so the loss covers only the response.

    The padding is found by position (everything after the item's own end-of-text token), so
    a ``pad_token_id`` inside an item's text is left alone; for other items this equals the
    course's search for ``pad_token_id`` values.
    """
    items = [item if isinstance(item, tuple) else (item, None) for item in batch]
    batch_max_length = max(len(ids) + 1 for ids, _ in items)
    inputs_lst, targets_lst = [], []
    for ids, prompt_length in items:
        padded = list(ids) + [pad_token_id] * (batch_max_length - len(ids))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        # targets[len(ids) - 1] is the end-of-text token; all later positions are padding
        targets[len(ids) :] = ignore_index
        if mask_prompt:
            if prompt_length is None:
                raise ValueError(
                    "mask_prompt=True needs (token_ids, prompt_length) items; build the "
                    "dataset with InstructionDataset(..., return_prompt_length=True)"
                )
            # targets[j] predicts token j+1, so the first prompt_length-1 targets are prompt
            targets[: max(prompt_length - 1, 0)] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled training batches whose entries have similar lengths, so little padding.

    Every epoch: shuffle all indices and drop the last ``len % batch_size`` of them (as the
    course's ``drop_last`` does), sort each window of ``window_batches * batch_size`` indices
    by length, cut it into batches, and shuffle the order of all batches. Each epoch sees the
    same number of entries as the course's loader; only which entries share a batch changes.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        window_batches: int = 50,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size < 1 or window_batches < 1:
            raise ValueError(
                f"batch_size and window_batches must be >= 1, got {batch_size}, {window_batches}"
            )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.window = window_batches * batch_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        order = order[: len(self) * self.batch_size]
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=self.lengths.__getitem__)
            batches += [
                window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)
            ]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


def create_dataloaders(
    train_data: Sequence[dict],
    val_data: Sequence[dict],
    test_data: Sequence[dict],
    tokenizer,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    allowed_max_length: int | None = 1024,
    style: str | PromptStyle = "alpaca",
    mask_prompt: bool = False,
    seed: int = 123,
    group_by_length: bool = False,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """The three loaders of section 7.4: (train, val, test).

    Training shuffles (with its own generator seeded by ``seed``) and drops the last partial
    batch; validation and test keep their order and every entry. ``group_by_length=True``
    batches training entries of similar length together (``LengthGroupedBatchSampler``):
    less padding, so a faster epoch; off by default, as in the course.
    """
    collate = functools.partial(
        custom_collate_fn,
        device=device,
        allowed_max_length=allowed_max_length,
        mask_prompt=mask_prompt,
    )

    def loader(data: Sequence[dict], train: bool) -> DataLoader:
        dataset = InstructionDataset(data, tokenizer, style=style, return_prompt_length=mask_prompt)
        if train and group_by_length:
            lengths = [len(ids) for ids in dataset.encoded_texts]
            generator = torch.Generator().manual_seed(seed)
            return DataLoader(
                dataset,
                batch_sampler=LengthGroupedBatchSampler(lengths, batch_size, generator=generator),
                collate_fn=collate,
                num_workers=num_workers,
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collate,
            shuffle=train,
            drop_last=train,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed) if train else None,
        )

    torch.manual_seed(seed)
    return loader(train_data, True), loader(val_data, False), loader(test_data, False)


# --------------------------------------------------------------------------------------
# Model (7.5) and fine-tuning (7.6)
# --------------------------------------------------------------------------------------

SMOKE_MODEL_OVERRIDES = {"emb_dim": 64, "n_layers": 2, "n_heads": 4, "context_length": 256}


@dataclass
class RunConfig:
    """Every choice of a chapter run. The defaults are the chapter's."""

    # model
    model_size: str = "gpt2-medium (355M)"
    pretrained: bool = True  # False: random initialisation (the smoke run)
    model_overrides: dict = field(default_factory=dict)  # e.g. a tiny emb_dim / n_layers
    models_dir: str = "gpt2"
    # data
    data: str = DATA_URL  # local JSON file or http(s) URL
    data_cache: str | None = None  # where a downloaded file is kept (default: cwd, its name)
    train_frac: float = 0.85
    test_frac: float = 0.10
    split_seed: int | None = None  # None: split in file order, as the course does
    prompt_style: str = "alpaca"
    mask_prompt: bool = False
    group_by_length: bool = False  # batch entries of similar length together (less padding)
    # training
    batch_size: int = 8
    num_workers: int = 0
    allowed_max_length: int = 1024
    epochs: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    device: str | None = None  # None: cuda when available, else cpu
    # responses
    max_new_tokens: int = 256
    gen_batch_size: int = 8
    # judge
    use_judge: bool = True
    judge_url: str | None = None  # None: OLLAMA_HOST or http://localhost:11434
    judge_model: str = "llama3"
    judge_api: str = "ollama"  # or "openai" (any OpenAI-compatible chat endpoint)
    # outputs
    output_dir: str = "outputs"
    smoke: bool = False

    @classmethod
    def smoke_preset(cls, **overrides: Any) -> RunConfig:
        """A run that finishes offline in seconds: tiny random GPT, the bundled sample data."""
        preset = dict(
            model_size="gpt2-small (124M)",
            pretrained=False,
            model_overrides=dict(SMOKE_MODEL_OVERRIDES),
            data=str(SAMPLE_DATA_PATH),
            batch_size=8,
            epochs=2,
            lr=1e-3,
            eval_freq=2,
            eval_iter=1,
            max_new_tokens=16,
            smoke=True,
        )
        preset.update(overrides)
        return cls(**preset)

    def resolved_device(self) -> torch.device:
        """``device``, or cuda when available, else cpu; asking for a missing cuda is an error."""
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but PyTorch sees no CUDA GPU")
        return device

    def model_file_name(self) -> str:
        """``gpt2-medium355M-sft.pth`` like the course; ``gpt-random-init-sft.pth`` otherwise."""
        if not self.pretrained:
            return "gpt-random-init-sft.pth"
        return re.sub(r"[ ()]", "", _canonical_model_name(self.model_size)) + "-sft.pth"


def _canonical_model_name(model_size: str) -> str:
    """'355M', 'gpt2-medium' or 'gpt2-medium (355M)' -> 'gpt2-medium (355M)'."""

    wanted = model_size.strip().lower()
    for name in MODEL_CONFIGS:
        family, size = name.split(" ")
        if wanted in (name.lower(), family.lower(), size.strip("()").lower()):
            return name
    raise ConfigError(
        f"unknown model size {model_size!r}; choose one of: {', '.join(MODEL_CONFIGS)}"
    )


def model_config(model_size: str = "gpt2-medium (355M)", **overrides: Any) -> dict:
    """The GPT config of a GPT-2 size (context 1024, qkv bias, no dropout), with overrides."""

    return gpt2_config(_canonical_model_name(model_size), **overrides)


def build_model(
    model_size: str | dict = "gpt2-medium (355M)",
    *,
    pretrained: bool = True,
    models_dir: str | os.PathLike = "gpt2",
    overrides: dict | None = None,
    device: str | torch.device = "cpu",
    seed: int = 123,
) -> tuple[torch.nn.Module, dict]:
    """A GPTModel in eval mode and its config.

    ``pretrained=True`` loads OpenAI's GPT-2 weights (downloaded once into
    ``models_dir/<size>``); the shapes come from the checkpoint's hparams.json, the rest of
    the config (and ``overrides``) from ``model_config``. Otherwise the weights are random
    (seeded). ``model_size`` may also be a full config dict (random weights only).
    """

    if isinstance(model_size, dict):
        cfg = {**model_size, **(overrides or {})}
    else:
        cfg = model_config(model_size, **(overrides or {}))
    params = None
    if pretrained:  # download (or find) the weights before building anything
        if isinstance(model_size, dict):
            raise ConfigError("pretrained=True needs a model size name, not a config dict")
        tag = _canonical_model_name(model_size).split(" ")[1].strip("()")
        settings, params = _download_gpt2_params(tag, models_dir)
        cfg.update(
            vocab_size=settings["n_vocab"],
            context_length=settings["n_ctx"],
            emb_dim=settings["n_embd"],
            n_heads=settings["n_head"],
            n_layers=settings["n_layer"],
        )
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    if params is not None:
        load_weights_into_gpt(model, params)
    model.to(device)
    model.eval()
    return model, cfg


def _download_gpt2_params(tag: str, models_dir: str | os.PathLike) -> tuple[dict, dict]:
    """(hparams settings, params) of GPT-2 ``tag``; a failure carries the smoke hint."""

    try:
        settings, params = gpt_download.download_and_load_gpt2(
            model_size=tag, models_dir=str(models_dir)
        )
    except (gpt_download.DownloadError, gpt_download.CheckpointError, OSError) as exc:
        raise DownloadError(
            f"could not get the GPT-2 {tag} weights into {models_dir}: {exc}\n{SMOKE_HINT}"
        ) from None
    return settings, params


@dataclass
class TrainingResult:
    """What ``finetune`` reports: losses before, during and after training, and its wall time."""

    initial_train_loss: float
    initial_val_loss: float
    train_losses: list[float]
    val_losses: list[float]
    tokens_seen: list[int]
    num_epochs: int
    minutes: float

    @property
    def final_train_loss(self) -> float | None:
        return self.train_losses[-1] if self.train_losses else None

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[-1] if self.val_losses else None


def initial_losses(
    model: torch.nn.Module, train_loader, val_loader, device, num_batches: int = 5
) -> tuple[float, float]:
    """Train and val loss before fine-tuning, over the first ``num_batches`` batches."""

    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=num_batches)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=num_batches)
    return train_loss, val_loss


def make_optimizer(
    model: torch.nn.Module, lr: float = 5e-5, weight_decay: float = 0.1
) -> torch.optim.AdamW:
    """The chapter's AdamW, using PyTorch's fused kernel where the parameters allow it.

    Fused AdamW applies the same update rule as the default one, in one pass over all
    parameters instead of a Python loop over them: for GPT-2 124M on 2 CPU cores a step
    takes 0.04 s instead of 0.3 s.
    """
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def finetune(
    model: torch.nn.Module,
    train_loader,
    val_loader,
    tokenizer,
    *,
    num_epochs: int = 2,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    eval_freq: int = 5,
    eval_iter: int = 5,
    start_context: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 123,
    progress: bool = True,
) -> TrainingResult:
    """Section 7.6: report the initial losses, train with AdamW, report the wall time.

    ``start_context`` (the text the model continues after each epoch) defaults to the prompt
    of the first validation entry, as in the course.
    """

    if start_context is None:
        val_set = val_loader.dataset
        start_context = val_set.style.format_input(val_set.data[0])
    device = torch.device(device)
    train_loss, val_loss = initial_losses(model, train_loader, val_loader, device, eval_iter)
    print(f"Initial training loss: {train_loss:.3f}")
    print(f"Initial validation loss: {val_loss:.3f}")

    start = time.time()
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay)
    train_losses, val_losses, tokens_seen = train_model_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        device,
        num_epochs=num_epochs,
        eval_freq=eval_freq,
        eval_iter=eval_iter,
        start_context=start_context,
        tokenizer=tokenizer,
        progress=progress,
    )
    minutes = (time.time() - start) / 60
    print(f"Training completed in {minutes:.2f} minutes.")
    model.eval()
    return TrainingResult(
        initial_train_loss=train_loss,
        initial_val_loss=val_loss,
        train_losses=[float(x) for x in train_losses],
        val_losses=[float(x) for x in val_losses],
        tokens_seen=[int(x) for x in tokens_seen],
        num_epochs=num_epochs,
        minutes=minutes,
    )


def plot_training(result: TrainingResult, save_path: str | os.PathLike | None = None):
    """The loss plot of the chapter (train and val loss over epochs and tokens seen)."""

    epochs_seen = torch.linspace(0, result.num_epochs, len(result.train_losses))
    return plot_losses(
        epochs_seen, result.tokens_seen, result.train_losses, result.val_losses, save_path=save_path
    )


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Save the state dict (loads with ``torch.load(path, weights_only=True)``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


# --------------------------------------------------------------------------------------
# Responses (7.7)
# --------------------------------------------------------------------------------------


def generate_responses(
    model: torch.nn.Module,
    test_data: Sequence[dict],
    tokenizer,
    *,
    context_size: int,
    style: str | PromptStyle = "alpaca",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    eos_id: int = EOS_TOKEN_ID,
    json_key: str = "model_response",
    progress: bool = True,
) -> list[dict]:
    """Greedy responses for every test entry, batched; returns copies with ``json_key`` added.

    ``generate_batch`` returns only the new tokens (cut before end-of-text); the response
    marker and surrounding whitespace are stripped as in the course.
    """

    style = get_prompt_style(style)
    prompts = [tokenizer.encode(style.format_input(entry)) for entry in test_data]
    model.eval()
    with torch.no_grad():
        new_tokens = generate_batch(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            context_size=context_size,
            eos_id=eos_id,
            batch_size=batch_size,
            progress=progress,
        )
    responses = [extract_response(tokenizer.decode(list(t)), style) for t in new_tokens]
    return [
        {**entry, json_key: response} for entry, response in zip(test_data, responses, strict=True)
    ]


def save_json(data: Any, path: str | os.PathLike) -> Path:
    """Write JSON with indent=4 (the course's format for the responses file), atomically."""
    path = Path(path)
    _write_atomically(path, json.dumps(data, indent=4))
    return path


# --------------------------------------------------------------------------------------
# Judge scores (7.8)
# --------------------------------------------------------------------------------------

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
        base = url if _is_url(url) else f"http://{url}"
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
# The whole chapter
# --------------------------------------------------------------------------------------


def run(cfg: RunConfig, *, show_plot: bool = False, progress: bool = True) -> dict:
    """Data -> split -> loaders -> model -> train -> plot -> save -> responses -> scores.

    Writes into ``cfg.output_dir``: the loss plot, the model state dict, the test responses
    JSON and ``run-summary.json`` (also returned).
    """

    # settings errors surface before any download
    get_prompt_style(cfg.prompt_style)
    judge_endpoint(cfg.judge_url, cfg.judge_api)
    model_cfg = model_config(cfg.model_size, **cfg.model_overrides)
    device = cfg.resolved_device()
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)

    data = load_instruction_data(cfg.data, cache_path=cfg.data_cache)
    train_data, test_data, val_data = split_data(
        data, cfg.train_frac, cfg.test_frac, seed=cfg.split_seed
    )
    print(f"Training set length: {len(train_data)}")
    print(f"Validation set length: {len(val_data)}")
    print(f"Test set length: {len(test_data)}")
    if not val_data or not test_data:
        raise DatasetError(
            f"{cfg.data}: {len(data)} entries leave {len(val_data)} for validation and "
            f"{len(test_data)} for testing; the chapter needs at least one of each"
        )

    tokenizer = get_tokenizer(offline=True if cfg.smoke else None)
    train_loader, val_loader, _test_loader = create_dataloaders(
        train_data,
        val_data,
        test_data,
        tokenizer,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=device,
        allowed_max_length=min(cfg.allowed_max_length, model_cfg["context_length"]),
        style=cfg.prompt_style,
        mask_prompt=cfg.mask_prompt,
        seed=cfg.seed,
        group_by_length=cfg.group_by_length,
    )
    if len(train_loader) == 0:
        raise DatasetError(
            f"{cfg.data}: {len(train_data)} training entries make no full batch of "
            f"{cfg.batch_size}; use more data or a smaller --batch-size"
        )

    model, model_cfg = build_model(
        cfg.model_size,
        pretrained=cfg.pretrained,
        models_dir=cfg.models_dir,
        overrides=cfg.model_overrides,
        device=device,
        seed=cfg.seed,
    )
    result = finetune(
        model,
        train_loader,
        val_loader,
        tokenizer,
        num_epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        eval_freq=cfg.eval_freq,
        eval_iter=cfg.eval_iter,
        start_context=format_input(val_data[0], cfg.prompt_style),
        device=device,
        seed=cfg.seed,
        progress=progress,
    )

    plot_path = out / "loss-plot.png"
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_training(result, save_path=plot_path)
    if not show_plot:
        import matplotlib.pyplot as plt

        plt.close(fig)
    model_path = save_model(model, out / cfg.model_file_name())
    print(f"Model saved as {model_path}")

    responses = generate_responses(
        model,
        test_data,
        tokenizer,
        context_size=model_cfg["context_length"],
        style=cfg.prompt_style,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.gen_batch_size,
        progress=progress,
    )
    responses_path = save_json(responses, out / "instruction-data-with-response.json")
    print(f"Responses saved as {responses_path}")

    scores = score_responses(
        responses,
        use_judge=cfg.use_judge,
        judge_url=cfg.judge_url,
        judge_model=cfg.judge_model,
        judge_api=cfg.judge_api,
        progress=progress,
    )
    summary = {
        "config": asdict(cfg),
        "device": str(device),
        "data": {
            "source": cfg.data,
            "n_entries": len(data),
            "n_train": len(train_data),
            "n_val": len(val_data),
            "n_test": len(test_data),
        },
        "model_config": model_cfg,
        "initial_losses": {"train": result.initial_train_loss, "val": result.initial_val_loss},
        "final_losses": {"train": result.final_train_loss, "val": result.final_val_loss},
        "training_minutes": result.minutes,
        "outputs": {
            "loss_plot": str(plot_path),
            "model": str(model_path),
            "responses": str(responses_path),
        },
        **scores,
    }
    save_json(summary, out / "run-summary.json")
    return summary


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="instruction_finetuning.py",
        description="Chapter 7: instruction fine-tune GPT-2, generate test responses, score them.",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="offline preset: tiny random GPT on the bundled sample data (seconds)",
    )
    p.add_argument("--model-size", help='e.g. "gpt2-medium (355M)" (default) or "124M"')
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--data", help="instruction data: JSON file or http(s) URL")
    p.add_argument(
        "--data-cache", help="where a downloaded --data file is kept (default: its name, in cwd)"
    )
    p.add_argument("--output-dir", help="where outputs go (default: outputs)")
    p.add_argument("--models-dir", help="where GPT-2 weights are kept (default: gpt2)")
    p.add_argument("--judge-url", help="judge host or endpoint (default: $OLLAMA_HOST)")
    p.add_argument("--judge-model", help="judge model (default: llama3)")
    p.add_argument("--judge-api", choices=JUDGE_APIS)
    p.add_argument("--no-judge", action="store_true", help="skip the judge, local metrics only")
    p.add_argument("--prompt-style", choices=list(PROMPT_STYLES))
    p.add_argument(
        "--mask-prompt", action="store_true", help="leave the instruction and input out of the loss"
    )
    p.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch training entries of similar length together (less padding, faster)",
    )
    p.add_argument("--max-new-tokens", type=int, help="response length limit (default: 256)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    return p


# RunConfig fields set by a flag of the same name (when the flag is given)
_FLAG_FIELDS = (
    "model_size",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "data",
    "data_cache",
    "output_dir",
    "models_dir",
    "judge_url",
    "judge_model",
    "judge_api",
    "prompt_style",
    "max_new_tokens",
    "seed",
    "device",
)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The smoke preset or the chapter's defaults, with every given flag applied on top."""
    cfg = RunConfig.smoke_preset() if args.smoke else RunConfig()
    changes = {f: getattr(args, f) for f in _FLAG_FIELDS if getattr(args, f) is not None}
    if args.no_judge:
        changes["use_judge"] = False
    if args.mask_prompt:
        changes["mask_prompt"] = True
    if args.group_by_length:
        changes["group_by_length"] = True
    return replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    import matplotlib

    matplotlib.use("Agg")
    args = build_arg_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        run(cfg)
    except ChapterError as exc:  # expected failures: one clear message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Run summary saved as {Path(cfg.output_dir) / 'run-summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
