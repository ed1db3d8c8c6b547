"""The fast engine: the course's maths, organised for speed.

The course functions in ``previous_chapters.py`` and ``course/pretraining.py`` are the
reference. Each function here gives the same numbers as its course counterpart (the tests
check it) with less work, and runs only where a caller asks for it by name:

=========================  =============================  ======================================
course                     fast counterpart               what it saves
=========================  =============================  ======================================
``calc_loss_batch``        ``packed_loss_batch``          the positions after each row's last
                                                          target (padding, mostly), and the
                                                          output head wherever there is no target
``generate``, one prompt   ``generate_batch``             many prompts per step, a preallocated
                                                          key/value cache, no compute on padding,
                                                          finished rows leave the batch
``generate``, streamed     ``stream_tokens``              re-running the text every step (a
                                                          preallocated cache), for a chat; with
                                                          ``draft_tokens``, forwards (prompt
                                                          lookup, exact)
``shuffle=True`` batches   ``LengthGroupedBatchSampler``  padding: entries of similar length
                                                          share a batch
``torch.optim.AdamW``      ``make_optimizer``             a Python loop over the parameters
                                                          (fused AdamW, same update rule)
=========================  =============================  ======================================

Everything runs through ``GPTModel.forward`` (its keyword arguments: packed sequences, a
``KVCache``, positions, a padding mask, only some positions through the output head), never by
checking the model's type, so a ``torch.compile``'d, LoRA or ``DistributedDataParallel``
model takes these paths too. The decoding step of all three generation front ends is the
course's ``next_token_logits``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Sampler

from course.pretraining import calc_loss_batch
from previous_chapters import (
    KVCache,
    check_generation_settings,
    next_token_logits,
    sample_next_token,
)
from runtime.progress_bars import progress_bar

IGNORE_INDEX = -100  # cross_entropy's default: targets with this value are skipped


def ends_after_last(mask: torch.Tensor) -> torch.Tensor:
    """Per row of ``mask`` [batch, n]: 1 + the position of its last True (0: none)."""
    steps = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * steps).amax(dim=1)


# ---------------------------------------------------------------------------
# Training: the loss without the padding
# ---------------------------------------------------------------------------


def packed_loss_batch(
    input_batch: torch.Tensor,
    target_batch: torch.Tensor,
    model: nn.Module,
    device: torch.device | str,
) -> torch.Tensor:
    """``calc_loss_batch``'s value and gradients, computing only what can reach the loss.

    Attention is causal, so a position after a row's last target (padding, mostly) influences
    no loss: each row is cut after its last target. Rows that then differ in length are packed
    end to end into one row, each attending only to itself with positions from 0. The output
    head, the largest matrix product, runs only where there is a target.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    ends = ends_after_last(target_batch != IGNORE_INDEX).tolist()  # 1 + last target
    rows = [i for i, end in enumerate(ends) if end > 0]
    if not rows:  # nothing to predict: nan, like the course's loss
        return calc_loss_batch(input_batch, target_batch, model, device)
    lengths = [ends[i] for i in rows]
    if len(set(lengths)) == 1:  # every row ends at the same place: just crop the batch
        n, packed = lengths[0], None
        idx, targets = input_batch[rows, :n], target_batch[rows, :n]
    else:
        packed = lengths
        idx = torch.cat([input_batch[i, :n] for i, n in zip(rows, lengths, strict=True)])[None]
        targets = torch.cat([target_batch[i, :n] for i, n in zip(rows, lengths, strict=True)])[None]
    has_target = targets != IGNORE_INDEX
    logits = model(idx, seq_lengths=packed, head_mask=has_target)
    return F.cross_entropy(logits, targets[has_target])


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled training batches of entries with similar lengths, so with little padding.

    Every epoch: shuffle all indices and drop the last ``len % batch_size`` (as the course's
    ``drop_last`` does), sort each window of ``window_batches * batch_size`` indices by
    length, cut it into batches, and shuffle the order of all batches. An epoch sees as many
    entries as the course's loader; only which entries share a batch changes.
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


def make_optimizer(
    model: nn.Module, lr: float = 5e-5, weight_decay: float = 0.1
) -> torch.optim.AdamW:
    """The chapter's AdamW, with PyTorch's fused kernel where the parameters allow it.

    Fused AdamW applies the same update rule in one pass over all parameters instead of a
    Python loop over them: for GPT-2 124M on 2 CPU cores a step takes 0.04 s instead of 0.3 s.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


# ---------------------------------------------------------------------------
# Generation: many prompts at once, with a preallocated cache
# ---------------------------------------------------------------------------


def _prefill(model: nn.Module, prompts: torch.Tensor, lengths: list[int], cache: KVCache):
    """Fill the cache from left-padded ``prompts`` [b, p]; the last position's logits [b, vocab].

    Consecutive rows of equal length run together without their padding, exactly as each
    prompt would run alone.
    """
    b, p = prompts.shape
    last, first = [], 0
    while first < b:
        end = first + 1
        while end < b and lengths[end] == lengths[first]:
            end += 1
        n = lengths[first]
        part = cache.view(slice(first, end), offset=p - n)
        last.append(model(prompts[first:end, p - n :], cache=part, last_only=True)[:, -1])
        first = end
    cache.length = p
    return torch.cat(last)


def _rows_to_keep(finished: torch.Tensor, n_alive: int) -> torch.Tensor | None:
    """Which rows stay in the batch now that some finished; None: keep them all.

    Worth it once at least a quarter of the rows can go. On a CPU, matrix products of 2 or 3
    rows cost more than of 4 (BLAS falls back to row-by-row products), so the batch shrinks
    to 1 row or to at least 4, keeping some finished rows if need be.
    """
    b = len(finished)
    target = n_alive if n_alive == 1 or n_alive >= 4 else min(4, b)
    if 4 * (b - target) < b:
        return None
    alive, done = (~finished).nonzero()[:, 0], finished.nonzero()[:, 0]
    return torch.cat([alive, done[: target - n_alive]])


def _left_padded(
    prompts: list[list[int]], p: int, extra: int, pad_id: int, device: torch.device
) -> torch.Tensor:
    """A [b, p + extra] token buffer with each prompt ending at column p (padding before it)."""
    tokens = torch.full((len(prompts), p + extra), pad_id, dtype=torch.long)
    for r, row in enumerate(prompts):
        tokens[r, p - len(row) : p] = torch.tensor(row)
    return tokens.to(device)


def _generate_rows(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    context_size: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    eos_id: int | None,
    pad_id: int,
) -> list[list[int]]:
    """The new tokens of ``prompts`` run as one left-padded batch; each row stops at its eos.

    The prompts fill a ``KVCache`` (``_prefill``), then every step is the course's
    ``next_token_logits`` on the rows still running.
    """
    device = model.tok_emb.weight.device
    prompts = [p[-context_size:] for p in prompts]
    b, p = len(prompts), max(len(row) for row in prompts)
    tokens = _left_padded(prompts, p, max_new_tokens, pad_id, device)
    pad = torch.tensor([p - len(row) for row in prompts], device=device)
    has_pad = len({len(row) for row in prompts}) > 1
    n_cached = min(max_new_tokens, context_size - p + 1)  # steps whose text fits the context
    cache = KVCache(model, b, p + n_cached - 1) if n_cached > 0 else None
    alive, rows = torch.arange(b, device=device), tokens  # the rows still in the batch
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        n = p + step  # tokens so far, padding included
        if step == 0 and cache is not None:
            logits = _prefill(model, rows[:, :p], [len(row) for row in prompts], cache)
        else:
            logits = next_token_logits(
                model, rows[:, :n], cache, context_size, pad if has_pad else None
            )
        next_token = pick(logits)[:, 0]
        rows[:, n] = next_token
        if eos_id is None:
            continue
        finished |= next_token == eos_id
        n_alive = int((~finished).sum())  # the step's one wait for the device
        if n_alive == 0:
            break
        keep = _rows_to_keep(finished, n_alive)
        if keep is not None:
            if rows is not tokens:  # (after the first drop, ``rows`` is a copy)
                tokens[alive] = rows
            alive, rows, finished, pad = alive[keep], rows[keep], finished[keep], pad[keep]
            has_pad = bool(pad.any())
            if cache is not None:
                cache.keep_rows(keep)
    if rows is not tokens:
        tokens[alive] = rows
    new = tokens[:, p:].tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in new]


def in_precision(model: nn.Module, precision: str) -> nn.Module:
    """The model to generate with: itself for "fp32"; for "bf16", a copy with bf16 weights
    (so a ``KVCache`` made for it holds bf16 keys and values: half the bytes per token).
    Check the hardware first with ``run_config.check_precision``."""
    if precision == "fp32":
        return model
    return copy.deepcopy(model).to(torch.bfloat16)


@torch.inference_mode()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    context_size: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    pad_token_id: int = 50256,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    draft_tokens: int = 0,
) -> list[list[int]]:
    """Each prompt's new tokens (its ``eos_id`` excluded), generated many prompts at a time.

    Prompts are sorted by length and run in batches of ``batch_size`` (all at once when
    None), left-padded with ``pad_token_id`` and masked, with positions counted from each
    row's first real token: greedy, every row gets exactly what ``generate`` gives it alone.
    Results come back in input order. (When sampling, the rows share one random stream, so
    the draws differ from sampling one prompt at a time.) ``draft_tokens=k``: each prompt
    alone through ``stream_tokens`` with prompt lookup (greedy, batch 1: a chat's case).
    """
    check_generation_settings(max_new_tokens, context_size, top_k)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    vocab_size = model.out_head.weight.shape[0]
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(
            f"pad_token_id {pad_token_id} is outside the model's vocabulary (0..{vocab_size - 1}); "
            "pass a valid pad_token_id (any id works: padding is masked)"
        )

    if draft_tokens:
        return [
            list(stream_tokens(model, p, max_new_tokens, context_size, temperature=temperature,
                               eos_id=eos_id, draft_tokens=draft_tokens))
            for p in progress_bar(prompts, desc="generating", unit="prompt", enabled=progress)
        ]  # fmt: skip

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits, temperature, top_k, generator)

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    step = batch_size or max(len(order), 1)
    chunks = [order[i : i + step] for i in range(0, len(order), step)]
    results: list[list[int]] = [[] for _ in prompts]
    for chunk in progress_bar(chunks, desc="generating", unit="batch", enabled=progress):
        if max_new_tokens == 0:
            continue
        rows = [list(prompts[i]) for i in chunk]
        new = _generate_rows(model, rows, max_new_tokens, context_size, pick, eos_id, pad_token_id)
        for i, row in zip(chunk, new, strict=True):
            results[i] = row
    return results


def lookup_draft(history: Sequence[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup: up to ``k`` tokens that followed the latest earlier occurrence of the
    text's last n tokens, for the longest n <= ``max_ngram`` that occurs earlier ([]: none)."""
    if k < 1:
        return []
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        tail = list(history[-n:])
        for start in range(len(history) - n - 1, -1, -1):
            if history[start] == tail[0] and list(history[start : start + n]) == tail:
                return list(history[start + n : start + n + k])
    return []


def _accepted(logits: torch.Tensor, draft: list[int]) -> list[int]:
    """Greedy's tokens at the drafted positions, from ``logits`` [m + 1, vocab] of the text
    and its ``m`` drafted tokens: each draft kept while greedy would have picked it, then
    greedy's own next token."""
    picked = logits.argmax(-1).tolist()
    a = 0
    while a < len(draft) and draft[a] == picked[a]:
        a += 1
    return picked[: a + 1]


@torch.inference_mode()
def stream_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    context_size: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    draft_tokens: int = 0,
    stats: dict[str, int] | None = None,
) -> Iterator[int]:
    """The new tokens ``generate`` gives one prompt, yielded one at a time as they are picked.

    For a chat that shows the answer as it grows. Same tokens as ``generate`` (and, sampling,
    the same draws from ``generator``, the same step ``next_token_logits``), from a ``KVCache``
    made once for the whole answer. Stops before ``eos_id``, which is not yielded.

    ``draft_tokens=k`` (greedy only): exact speculative decoding by prompt lookup. Each step
    drafts up to k tokens (``lookup_draft``), runs them through the model with the text in one
    forward, and keeps only those greedy decoding picks, plus greedy's next token. ``stats``
    counts the ``forwards``, the ``tokens`` they gave and the tokens ``drafted``.
    """
    check_generation_settings(max_new_tokens, context_size, top_k)
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty; it needs at least one token")
    if draft_tokens and temperature > 0:
        raise ValueError("draft_tokens (prompt lookup) needs greedy decoding: temperature=0")
    device = model.tok_emb.weight.device
    history, n, end = list(prompt_ids), len(prompt_ids), len(prompt_ids) + max_new_tokens
    tokens = torch.empty((1, end), dtype=torch.long, device=device)
    tokens[0, :n] = torch.tensor(history)
    cache = KVCache(model, 1, max(min(end - 1, context_size), 0))
    stats = {} if stats is None else stats
    while n < end:
        draft = lookup_draft(history, min(draft_tokens, end - n - 1, context_size - n))
        if draft:
            tokens[0, n : n + len(draft)] = torch.tensor(draft)
            logits = next_token_logits(
                model, tokens[:, : n + len(draft)], cache, context_size, all_new=True
            )
            new = _accepted(logits[0, -len(draft) - 1 :], draft)
            cache.length = n + len(new) - 1  # forget the keys of the rejected drafts
        else:
            logits = next_token_logits(model, tokens[:, :n], cache, context_size)
            new = [int(sample_next_token(logits, temperature, top_k, generator))]
        for key, count in (("forwards", 1), ("tokens", len(new)), ("drafted", len(draft))):
            stats[key] = stats.get(key, 0) + count
        for next_id in new:
            if next_id == eos_id:
                return
            tokens[0, n] = next_id
            n += 1
            history.append(next_id)
            yield next_id
