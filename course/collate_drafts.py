"""The drafts of the collate function that section 7.3 builds up, one idea at a time.

The notebook shows each draft and the batch it makes; the final version, which the
chapter uses, is ``instruction_data.custom_collate_fn``: draft 3 plus the ``device``
argument (and the optional prompt masking of exercise 7.2). A test checks that draft 3 and
the final function give identical tensors.
"""

from __future__ import annotations

import torch


def collate_draft_1(batch: list[list[int]], pad_token_id: int = 50256) -> torch.Tensor:
    """Draft 1, padding only: every item gets one end-of-text token, then padding up to
    the longest item in the batch."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst = []
    for item in batch:
        padded = item + [pad_token_id] * (batch_max_length - len(item))
        inputs_lst.append(torch.tensor(padded[:-1]))  # the last token is never an input
    return torch.stack(inputs_lst)


def collate_draft_2(
    batch: list[list[int]], pad_token_id: int = 50256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft 2, adding the targets: the inputs shifted one position to the left."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        padded = item + [pad_token_id] * (batch_max_length - len(item))
        inputs_lst.append(torch.tensor(padded[:-1]))
        targets_lst.append(torch.tensor(padded[1:]))  # the token that follows each input
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def collate_draft_3(
    batch: list[list[int]],
    pad_token_id: int = 50256,
    ignore_index: int = -100,
    allowed_max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft 3, adding the mask: every target after the first end-of-text token becomes
    ``ignore_index``, so padding is left out of the loss; then both are cut to
    ``allowed_max_length``."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        padded = item + [pad_token_id] * (batch_max_length - len(item))
        inputs, targets = torch.tensor(padded[:-1]), torch.tensor(padded[1:])
        targets[len(item) :] = ignore_index  # targets[len(item) - 1] is the end-of-text token
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)
