"""What is measured: the sizes of each measurement, the data, the batches and their FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import REPO_ROOT
from course.instruction_data import (
    SAMPLE_DATA_PATH,
    InstructionDataset,
    custom_collate_fn,
    format_input,
    load_instruction_data,
    split_data,
)
from runtime.engine import IGNORE_INDEX
from runtime.gpt2_tokenizer import get_tokenizer

SEED = 123
LR, WEIGHT_DECAY = 5e-5, 0.1  # the chapter's AdamW settings
BATCH_SIZE = 8
EVAL_FREQ, EVAL_ITER = 5, 5  # the chapter's evaluation schedule
SAMPLE_TOKENS = 50  # the course prints a 50-token sample after each epoch
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "instruction-data.json"


@dataclass(frozen=True)
class Sizes:
    train_rounds: int = 6  # measured training steps per contender
    epoch_entries: int | None = 96  # training entries of the timed epoch (None: all)
    epoch_rounds: int = 2
    gen_prompts: int = 32
    gen_tokens: int = 128
    gen_rounds: int = 3
    naive_prompts: int = 1  # the naive loop is slow: fewer prompts, reported as tokens/s
    memory_steps: int = 3
    warmup: int = 1
    decode_tokens: int = 64  # batch 1: new tokens per timed run (bandwidth share, lookup, bf16)
    agreement_prompts: int = 16  # bf16 against fp32 greedy tokens: test prompts compared


QUICK = Sizes(  # the same model and measurements, less of each
    train_rounds=2,
    epoch_entries=16,
    epoch_rounds=1,
    gen_prompts=4,
    gen_tokens=16,
    gen_rounds=1,
    memory_steps=2,
    decode_tokens=16,
    agreement_prompts=4,
)


@dataclass
class Data:
    source: str
    train: list[dict]
    val: list[dict]
    test: list[dict]
    tokenizer: object

    def prompts(self, n: int) -> list[list[int]]:
        """Token ids of ``n`` prompts: the test split first, then the other entries, cycling."""
        entries = self.test + self.val + self.train
        return [self.tokenizer.encode(format_input(entries[i % len(entries)])) for i in range(n)]


def load_data(path: Path | None = None) -> Data:
    """The instruction data at ``path``; by default the chapter's dataset when ../shared has
    it, else the project's sample data."""
    if path is None:
        path = SHARED_DATA if SHARED_DATA.is_file() else SAMPLE_DATA_PATH
    train, test, val = split_data(load_instruction_data(path))
    return Data(str(path), train, val, test, get_tokenizer(offline=True))


def training_batches(data: Data, n: int, device: torch.device) -> list[tuple]:
    """``n`` random batches of 8 training entries, padded by the chapter's collate function."""
    dataset = InstructionDataset(data.train, data.tokenizer)
    g = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(n):
        rows = torch.randint(len(dataset), (BATCH_SIZE,), generator=g).tolist()
        batches.append(custom_collate_fn([dataset[i] for i in rows], device=device))
    return batches


def n_tokens(batch: tuple) -> int:
    """Non-padding tokens of a batch: the positions whose target is not ignored."""
    return int((batch[1] != IGNORE_INDEX).sum())


def train_step_flops(cfg: dict, batch: tuple) -> float:
    """Useful FLOPs of one training step (forward 1x, backward 2x) on a batch.

    Only real tokens count (not padding): for each row with n of them,
      matmul weights of the blocks: 6 * (12 * n_layers * emb_dim^2) * n
      output head at the positions with a target: 6 * emb_dim * vocab_size * n
      causal attention, q.k and p.v over n(n+1)/2 pairs: 6 * n_layers * emb_dim * n(n+1)
    """
    d, layers, vocab = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    lengths = (batch[1] != IGNORE_INDEX).sum(dim=1).tolist()
    tokens = sum(lengths)
    dense = 6 * 12 * layers * d * d * tokens
    head = 6 * d * vocab * tokens
    attention = 6 * layers * d * sum(n * (n + 1) for n in lengths)
    return float(dense + head + attention)
