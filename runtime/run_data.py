"""The data steps of a chapter run (7.2-7.4), as ``instruction_finetuning.run`` and the
notebook call them: the entries and their splits, GPT-2's tokenizer, and the loaders of the
run's settings (``RunConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from course.instruction_data import (
    DatasetError,
    create_dataloaders,
    load_instruction_data,
    report_long_entries,
    split_data,
)
from runtime.distributed import SINGLE_PROCESS, Ranks
from runtime.gpt2_tokenizer import get_tokenizer
from runtime.run_config import RunConfig, allowed_max_length
from runtime.token_ids import token_lengths


@dataclass
class Splits:
    """The loaded entries and their train / test / validation parts (7.2)."""

    data: list[dict]
    train: list[dict]
    test: list[dict]
    val: list[dict]


def prepare_data(cfg: RunConfig) -> Splits:
    """7.2: load the entries (downloaded once) and split them 85/10/5 in file order."""
    data = load_instruction_data(cfg.data, cache_path=cfg.data_cache)
    train, test, val = split_data(data, cfg.train_frac, cfg.test_frac, seed=cfg.split_seed)
    print(f"Training set length: {len(train)}")
    print(f"Validation set length: {len(val)}")
    print(f"Test set length: {len(test)}")
    if not val or not test:
        raise DatasetError(
            f"{cfg.data}: {len(data)} entries leave {len(val)} for validation and "
            f"{len(test)} for testing; the chapter needs at least one of each"
        )
    return Splits(data, train, test, val)


def prepare_tokenizer(cfg: RunConfig) -> Any:
    """GPT-2's tokenizer (tiktoken's gpt2 encoding; the smoke run never tries the network)."""
    return get_tokenizer(offline=True if cfg.smoke else None, models_dir=cfg.models_dir)


def prepare_loaders(
    cfg: RunConfig,
    splits: Splits,
    tokenizer: Any,
    device: torch.device,
    ranks: Ranks = SINGLE_PROCESS,
):
    """7.3-7.4: the (train, val, test) loaders; texts are cut to the model's context.

    Their batches are global batches: ``cfg.batch_size`` entries for each process (torchrun's
    ``ranks``) and each of the ``cfg.grad_accum`` micro-batches of a step.
    """
    limit = allowed_max_length(cfg)
    batch_size = cfg.batch_size * ranks.world_size * cfg.grad_accum
    print(
        f"Global batch: {batch_size} entries (batch {cfg.batch_size} x {ranks.world_size} "
        f"process(es) x {cfg.grad_accum} accumulation step(s)), {cfg.precision}"
    )
    loaders = create_dataloaders(
        splits.train,
        splits.val,
        splits.test,
        tokenizer,
        batch_size=batch_size,
        num_workers=cfg.num_workers,
        device=device,
        allowed_max_length=limit,
        style=cfg.prompt_style,
        mask_prompt=cfg.mask_prompt,
        seed=cfg.seed,
        group_by_length=cfg.group_by_length,
        compact=True,  # token ids in one flat array: the 52k Alpaca data in seconds
    )
    for name, loader in zip(("training", "validation", "test"), loaders, strict=True):
        report_long_entries(name, token_lengths(loader.dataset.encoded_texts), limit)
    if len(loaders[0]) == 0:
        raise DatasetError(
            f"{cfg.data}: {len(splits.train)} training entries make no full batch of "
            f"{batch_size}; use more data, a smaller --batch-size or --grad-accum, or fewer "
            "processes"
        )
    return loaders
