"""The fast engine: the course's maths, organised for speed.

The course functions in ``previous_chapters.py`` are the reference. Each function here gives
the same numbers as its course counterpart (the tests check it) with less work, and runs
only where a caller asks for it by name:

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
                                                          preallocated cache), for a chat
``shuffle=True`` batches   ``LengthGroupedBatchSampler``  padding: entries of similar length
                                                          share a batch
``torch.optim.AdamW``      ``make_optimizer``             a Python loop over the parameters
                                                          (fused AdamW, same update rule)
=========================  =============================  ======================================

Everything works on a ``GPTModel`` through its modules (``tok_emb``, ``trf_blocks``, ...), never
by checking its type, so a ``torch.compile``'d model takes these paths too. ``hidden_states``
below is ``GPTModel.forward`` with the attention step passed in, which is what lets one model
run packed rows in training and padded, cached rows in generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Sampler

from previous_chapters import calc_loss_batch, check_generation_settings, sample_next_token
from progress_bars import progress_bar

IGNORE_INDEX = -100  # cross_entropy's default: targets with this value are skipped

# attend(layer, queries, keys, values) -> attention output, all [batch, heads, seq, head_dim]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hidden_states(
    model: nn.Module, idx: torch.Tensor, positions: torch.Tensor | None, attend: Attend
) -> torch.Tensor:
    """``GPTModel.forward`` up to the final norm, with given positions and attention step.

    ``positions`` are the position ids ([seq] or [batch, seq]; None: 0, 1, ..., seq - 1);
    ``attend`` replaces the causal attention of each block (the ``*_attention`` functions).
    """
    b, t = idx.shape
    # (a slice of the position table is cheaper to backpropagate through than a lookup)
    pos = model.pos_emb.weight[:t] if positions is None else model.pos_emb(positions)
    x = model.drop_emb(model.tok_emb(idx) + pos)
    for layer, block in enumerate(model.trf_blocks):
        att = block.att
        context = attend(layer, *att.split_heads(block.norm1(x)))
        x = x + block.drop_shortcut(att.out_proj(context.transpose(1, 2).reshape(b, t, att.d_out)))
        x = x + block.drop_shortcut(block.ff(block.norm2(x)))
    return model.final_norm(x)


def causal_attention(dropout_p: float = 0.0) -> Attend:
    """Plain causal attention, as in ``MultiHeadAttention``."""

    def attend(layer, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)

    return attend


def packed_attention(lengths: list[int], dropout_p: float = 0.0) -> Attend:
    """Causal attention within each of several sequences packed end to end in one row."""

    def attend(layer, q, k, v):
        parts = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
        return torch.cat(
            [
                F.scaled_dot_product_attention(*qkv, dropout_p=dropout_p, is_causal=True)
                for qkv in parts
            ],
            dim=2,
        )

    return attend


def attention_dropout(model: nn.Module) -> float:
    """The attention dropout ``MultiHeadAttention`` applies now (0 in eval mode)."""
    return model.trf_blocks[0].att.dropout if model.training else 0.0


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
    dropout_p = attention_dropout(model)
    if len(set(lengths)) == 1:  # every row ends at the same place: just crop the batch
        n = lengths[0]
        idx, targets = input_batch[rows, :n], target_batch[rows, :n]
        positions, attend = None, causal_attention(dropout_p)
    else:
        idx = torch.cat([input_batch[i, :n] for i, n in zip(rows, lengths, strict=True)])[None]
        targets = torch.cat([target_batch[i, :n] for i, n in zip(rows, lengths, strict=True)])[None]
        positions = torch.cat([torch.arange(n, device=idx.device) for n in lengths])
        attend = packed_attention(lengths, dropout_p)
    hidden = hidden_states(model, idx, positions, attend)
    has_target = targets != IGNORE_INDEX
    return F.cross_entropy(model.out_head(hidden[has_target]), targets[has_target])


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


class KVCache:
    """Every layer's keys and values for a batch of rows, allocated once, filled in place.

    ``keys`` and ``values`` are [n_layers, rows, heads, max_len, head_dim].
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int) -> None:
        att, weight = model.trf_blocks[0].att, model.out_head.weight
        shape = (len(model.trf_blocks), batch_size, att.num_heads, max_len, att.head_dim)
        # zeros, not empty: slots of left padding are never written but pass through the
        # (masked) attention, where garbage such as NaN would leak into the result
        self.keys = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.values = torch.zeros_like(self.keys)

    def view(self, rows: slice, offset: int) -> KVCache:
        """The part of this cache for ``rows``, from position ``offset`` on (shares memory)."""
        part = object.__new__(KVCache)
        part.keys = self.keys[:, rows, :, offset:]
        part.values = self.values[:, rows, :, offset:]
        return part

    def keep_rows(self, index: torch.Tensor) -> None:
        self.keys, self.values = self.keys[:, index], self.values[:, index]


def cached_attention(cache: KVCache, start: int, mask: torch.Tensor | None = None) -> Attend:
    """Store the new keys/values at ``start`` and attend over the cache up to them.

    ``mask`` [batch, 1, 1, start + new] marks real tokens (False: left padding); without it the
    new tokens are causal among themselves (``start`` must then be 0) or a single one.
    """

    def attend(layer, q, k, v):
        end = start + q.shape[2]
        keys, values = cache.keys[layer], cache.values[layer]
        keys[:, :, start:end], values[:, :, start:end] = k, v
        is_causal = mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(
            q, keys[:, :, :end], values[:, :, :end], attn_mask=mask, is_causal=is_causal
        )

    return attend


def padded_causal_attention(real: torch.Tensor) -> Attend:
    """Causal attention over left-padded rows; ``real`` [batch, seq] is False on padding."""
    t = real.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=real.device).tril()
    # a padding query sees itself, so that no row of the mask is empty (which gives NaN)
    allowed = (causal & real[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=real.device)

    def attend(layer, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    return attend


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
        positions = torch.arange(n, device=prompts.device)
        attend = cached_attention(cache.view(slice(first, end), offset=p - n), 0)
        last.append(hidden_states(model, prompts[first:end, p - n :], positions, attend)[:, -1])
        first = end
    return model.out_head(torch.cat(last))


def _rows_to_keep(finished: torch.Tensor) -> torch.Tensor | None:
    """Which rows stay in the batch now that some finished; None: keep them all.

    Worth it once at least a quarter of the rows can go. On a CPU, matrix products of 2 or 3
    rows cost more than of 4 (BLAS falls back to row-by-row products), so the batch shrinks
    to 1 row or to at least 4, keeping some finished rows if need be.
    """
    b, n_alive = len(finished), int((~finished).sum())
    target = n_alive if n_alive == 1 or n_alive >= 4 else min(4, b)
    if 4 * (b - target) < b:
        return None
    alive, done = (~finished).nonzero()[:, 0], finished.nonzero()[:, 0]
    return torch.cat([alive, done[: target - n_alive]])


def _left_padded(
    prompts: list[list[int]], p: int, extra: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [b, p + extra] token buffer with each prompt ending at column p (padding before it),
    and a mask of the real tokens (the ``extra`` columns for new tokens count as real)."""
    tokens = torch.full((len(prompts), p + extra), pad_id, dtype=torch.long)
    real = torch.ones((len(prompts), p + extra), dtype=torch.bool)
    for r, row in enumerate(prompts):
        tokens[r, p - len(row) : p] = torch.tensor(row)
        real[r, : p - len(row)] = False
    return tokens.to(device), real.to(device)


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

    While the longest text fits ``context_size``, each step feeds one token per row and
    reuses the cache; after that the window slides and each step re-runs it, as the course's
    ``generate`` does.
    """
    device = model.out_head.weight.device
    prompts = [p[-context_size:] for p in prompts]
    b, p = len(prompts), max(len(row) for row in prompts)
    tokens, real = _left_padded(prompts, p, max_new_tokens, pad_id, device)
    lengths = torch.tensor([len(row) for row in prompts], device=device)
    n_cached = min(max_new_tokens, context_size - p + 1)  # steps whose text fits the context
    alive = torch.arange(b, device=device)  # rows still in the batch
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        n = p + step  # tokens so far, padding included
        if step == 0 and n_cached > 0:
            cache = KVCache(model, b, p + n_cached - 1)
            logits = _prefill(model, tokens[:, :p], lengths.tolist(), cache)
        elif step < n_cached:
            mask = None if bool(real[alive, :n].all()) else real[alive, None, None, :n]
            positions = (lengths[alive] + step - 1)[:, None]
            hidden = hidden_states(
                model, tokens[alive, n - 1 : n], positions, cached_attention(cache, n - 1, mask)
            )
            logits = model.out_head(hidden[:, -1])
        else:
            window, window_real = (
                tokens[alive, n - context_size : n],
                real[alive, n - context_size : n],
            )
            positions = (window_real.long().cumsum(1) - 1).clamp(min=0)
            hidden = hidden_states(model, window, positions, padded_causal_attention(window_real))
            logits = model.out_head(hidden[:, -1])
        next_token = pick(logits)[:, 0]
        tokens[alive, n] = next_token
        if eos_id is None:
            continue
        finished |= next_token == eos_id
        if bool(finished.all()):
            break
        keep = _rows_to_keep(finished)
        if keep is not None:
            alive, finished = alive[keep], finished[keep]
            if step + 1 < n_cached:
                cache.keep_rows(keep)
    new = tokens[:, p:].tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in new]


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
) -> list[list[int]]:
    """Each prompt's new tokens (its ``eos_id`` excluded), generated many prompts at a time.

    Prompts are sorted by length and run in batches of ``batch_size`` (all at once when
    None), left-padded with ``pad_token_id`` and masked, with positions counted from each
    row's first real token: greedy, every row gets exactly what ``generate`` gives it alone.
    Results come back in input order. (When sampling, the rows share one random stream, so
    the draws differ from sampling one prompt at a time.)
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
) -> Iterator[int]:
    """The new tokens ``generate`` gives one prompt, yielded one at a time as they are picked.

    For a chat that shows the answer as it grows. Same tokens as ``generate`` (and, sampling,
    the same draws from ``generator``): while the text fits ``context_size`` each step feeds
    one token through a preallocated ``KVCache``; after that the window slides and each step
    re-runs it. Stops before ``eos_id``, which is not yielded.
    """
    check_generation_settings(max_new_tokens, context_size, top_k)
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty; it needs at least one token")
    device = model.out_head.weight.device
    tokens = list(prompt_ids)
    n_cached = max(0, min(max_new_tokens, context_size - len(tokens) + 1))  # steps that fit
    cache = KVCache(model, 1, len(tokens) + n_cached - 1) if n_cached else None
    for step in range(max_new_tokens):
        n = len(tokens)
        if step < n_cached:  # the whole prompt first, then one new token per step
            start = 0 if step == 0 else n - 1
            idx = torch.tensor([tokens[start:]], device=device)
            positions = torch.arange(start, n, device=device)
            hidden = hidden_states(model, idx, positions, cached_attention(cache, start))
        else:
            window = torch.tensor([tokens[-context_size:]], device=device)
            hidden = hidden_states(model, window, None, causal_attention())
        logits = model.out_head(hidden[:, -1])
        next_id = int(sample_next_token(logits, temperature, top_k, generator))
        if next_id == eos_id:
            return
        tokens.append(next_id)
        yield next_id
