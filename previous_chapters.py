"""The code of chapters 2-5 that chapter 7 reuses, written the way the course writes it.

Here: the GPT model of chapter 4 with a key/value cache for generation, its configurations,
and ``generate`` (chapters 4-5): greedy decoding, or temperature and top-k sampling.
Chapter 5's pretraining (the losses, ``train_model_simple``, ``plot_losses``,
``load_weights_into_gpt``) is in ``course/pretraining.py``, which builds on this module;
its names are served from here too (``from previous_chapters import train_model_simple``),
imported on first use by the ``__getattr__`` at the end, never while this module loads.

This file is the course layer: plain, short, and the reference that everything else is
tested against. The faster paths that the chapter's pipeline uses (a loss that skips
padding, batched generation with a preallocated cache, length-grouped batches, fused
AdamW) live apart in ``runtime/engine.py``; callers choose them explicitly, for example
``train_model_simple(..., loss_fn=engine.packed_loss_batch)``.

Two things differ from the course's own code, neither in the maths: the query, key and
value projections are one fused ``nn.Linear`` (``qkv``, = [W_query | W_key | W_value]),
and attention is computed by ``torch.nn.functional.scaled_dot_product_attention``, which
is softmax(q k^T / sqrt(head_dim)) v with the causal mask, in one fused kernel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.gemv import Linear  # nn.Linear; batch-1 decoding uses every CPU thread

# cuDNN's attention, PyTorch's first choice for bf16 on recent GPUs, builds a plan for every new
# sequence length, and ours change at every step (decoding, packed training): on an H200 that
# cost 2 ms of CPU per call and made bf16 7x slower than fp32. PyTorch's flash and
# memory-efficient kernels need no plan. (A no-op on CPUs.)
torch.backends.cuda.enable_cudnn_sdp(False)

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

CONFIG_KEYS = tuple(GPT_CONFIG_124M)


def resolve_model_name(model_name: str) -> str:
    """ "gpt2-medium (355M)", "gpt2-medium" or "355M" -> the MODEL_CONFIGS key "gpt2-medium (355M)"."""
    wanted = model_name.strip().lower()
    for name in MODEL_CONFIGS:
        family, size = name.lower().split(" ")  # "gpt2-medium", "(355m)"
        if wanted in (name.lower(), family, size.strip("()")):
            return name
    raise ValueError(
        f"unknown GPT-2 model {model_name!r}; choose one of: {', '.join(MODEL_CONFIGS)}"
    )


def gpt2_config(model_name: str, **overrides: Any) -> dict[str, Any]:
    """The full model config of a GPT-2 size, e.g. ``gpt2_config("355M", drop_rate=0.1)``."""
    unknown = set(overrides) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {sorted(unknown)}; valid keys: {list(CONFIG_KEYS)}"
        )
    return {**GPT_CONFIG_124M, **MODEL_CONFIGS[resolve_model_name(model_name)], **overrides}


def gpt2_config_from_hparams(settings: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The model config of a GPT-2 checkpoint from its hparams.json ``settings``."""
    shapes = {
        "vocab_size": settings["n_vocab"],
        "context_length": settings["n_ctx"],
        "emb_dim": settings["n_embd"],
        "n_heads": settings["n_head"],
        "n_layers": settings["n_layer"],
    }
    return {**GPT_CONFIG_124M, **shapes, **overrides}


# ---------------------------------------------------------------------------
# Model (chapter 4)
# ---------------------------------------------------------------------------


class KVCache:
    """Every layer's keys and values for a batch of rows, kept so that generation feeds each
    token through the model once: ``keys`` and ``values`` are [n_layers, batch, heads,
    capacity, head_dim], of which the first ``length`` positions are filled.

    Made with room for ``capacity`` positions (the engine knows how many it needs), it grows
    when a forward needs more (the course's open-ended ``use_cache=True``), doubling up to the
    model's ``context_length``.
    """

    def __init__(self, model: nn.Module, batch_size: int, capacity: int = 0) -> None:
        att, weight = model.trf_blocks[0].att, model.tok_emb.weight
        shape = (len(model.trf_blocks), batch_size, att.num_heads, capacity, att.head_dim)
        # zeros, not empty: slots of left padding are never written but pass through the
        # (masked) attention, where garbage such as NaN would leak into the result
        self.keys = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = 0
        self.max_length = model.context_length  # (no position past it: never grow beyond)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write one layer's new keys and values [batch, heads, new, head_dim] after the
        ``length`` cached ones; all of them up to the new ones, [batch, heads, length + new, hd]."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[3]:
            self._grow(end)
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def _grow(self, needed: int) -> None:
        more = max(needed, min(2 * self.keys.shape[3], self.max_length)) - self.keys.shape[3]
        pad = self.keys.new_zeros((*self.keys.shape[:3], more, self.keys.shape[4]))
        self.keys, self.values = torch.cat((self.keys, pad), 3), torch.cat((self.values, pad), 3)

    def view(self, rows: slice, offset: int) -> KVCache:
        """An empty cache for ``rows`` whose position 0 is this cache's ``offset`` (it writes
        into this cache's memory)."""
        part = object.__new__(KVCache)
        part.keys, part.values = self.keys[:, rows, :, offset:], self.values[:, rows, :, offset:]
        part.length, part.max_length = 0, self.max_length - offset
        return part

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (generation drops rows that have finished)."""
        self.keys, self.values = self.keys[:, index], self.values[:, index]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention.

    Keyword arguments change which keys each query sees, never the maths: ``cache`` (a
    ``KVCache``, with ``layer`` this block's index) adds the keys and values of earlier tokens;
    ``mask`` [batch, 1, new, keys] (True: may attend) replaces the causal rule, for left-padded
    rows; ``seq_lengths`` splits each row into sequences packed end to end, each causal alone.
    """

    def __init__(
        self, d_in: int, d_out: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"emb_dim {d_out} must be divisible by n_heads {num_heads}")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.dropout = dropout  # on the attention weights, as in the course
        self.qkv = Linear(d_in, 3 * d_out, bias=qkv_bias)  # = [W_query | W_key | W_value]
        self.out_proj = Linear(d_out, d_out)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``x`` [b, t, d_in], each [b, num_heads, t, head_dim]."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
        seq_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        queries, keys, values = self.split_heads(x)
        if cache is not None:  # the keys and values of the earlier tokens, then these
            keys, values = cache.store(layer, keys, values)
        dropout = self.dropout if self.training else 0.0
        n_q, n_k = queries.shape[2], keys.shape[2]
        if seq_lengths is not None:  # packed sequences: each attends to itself only
            parts = zip(*(z.split(seq_lengths, 2) for z in (queries, keys, values)), strict=True)
            context = torch.cat(
                [
                    F.scaled_dot_product_attention(*p, dropout_p=dropout, is_causal=True)
                    for p in parts
                ],
                dim=2,
            )
        elif mask is None and n_q == n_k:  # a fresh text: token i attends to tokens 0..i
            context = F.scaled_dot_product_attention(
                queries, keys, values, dropout_p=dropout, is_causal=True
            )
        else:  # new tokens after cached ones: each sees the cache and the new tokens up to itself
            if mask is None and n_q > 1:
                mask = torch.ones(n_q, n_k, dtype=torch.bool, device=x.device).tril(n_k - n_q)
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, dropout_p=dropout
            )
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


class FeedForward(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            Linear(emb_dim, 4 * emb_dim),
            nn.GELU(approximate="tanh"),  # GPT-2's GELU
            Linear(4 * emb_dim, emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(norm1(x)), then x + feed_forward(norm2(x)).

    Keyword arguments go to the attention (see ``MultiHeadAttention``)."""

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

    def forward(self, x: torch.Tensor, **attention: Any) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), **attention))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2: token and position embeddings, transformer blocks, a final norm, the output head.

    ``model(idx)`` returns the logits [batch, seq, vocab]. ``model(idx, use_cache=True)``
    also keeps every layer's keys and values (in ``kv_cache``) and continues the positions
    where the last call stopped; ``reset_kv_cache()`` starts over. The keyword arguments of
    ``forward`` serve generation and packed training with the same maths.
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
        self.out_head = Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self.kv_cache: KVCache | None = None  # use_cache=True's keys and values
        self._init_weights(cfg["n_layers"])

    def _init_weights(self, n_layers: int) -> None:
        """GPT-2's initialisation: N(0, 0.02), zero biases, and the projections that write
        into the residual stream scaled down by sqrt(2 * n_layers)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, weight in self.named_parameters():  # (in block order, as GPT-2 does)
            if name.endswith(("att.out_proj.weight", "ff.layers.2.weight")):
                nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    def forward(
        self,
        in_idx: torch.Tensor,
        use_cache: bool = False,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        seq_lengths: list[int] | None = None,
        last_only: bool = False,
        head_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The logits of ``in_idx`` [batch, seq]: [batch, seq, vocab].

        - ``cache``: a ``KVCache`` whose tokens come before these (``use_cache=True``: the
          model's own ``kv_cache``); positions continue after them.
        - ``positions`` [seq] or [batch, seq]: the position ids (default: counted on).
        - ``mask`` [batch, 1, seq, keys]: which keys each position may see (left padding).
        - ``seq_lengths``: each row holds sequences of these lengths end to end (packed
          training); each attends to itself only, with positions from 0.
        - ``last_only``: only the last position through the output head ([batch, 1, vocab]);
          ``head_mask`` [batch, seq]: only the True positions ([selected, vocab]).
        """
        if use_cache and cache is None:
            if self.kv_cache is None:
                self.kv_cache = KVCache(self, in_idx.shape[0])
            cache = self.kv_cache
        x = self.drop_emb(
            self.tok_emb(in_idx) + self._position_embeddings(in_idx, cache, positions, seq_lengths)
        )
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, cache=cache, layer=layer, mask=mask, seq_lengths=seq_lengths)
        if cache is not None:
            cache.length += in_idx.shape[1]
        if last_only:
            x = x[:, -1:]
        elif head_mask is not None:
            x = x[head_mask]
        return self.out_head(self.final_norm(x))

    def _position_embeddings(self, in_idx, cache, positions, seq_lengths) -> torch.Tensor:
        seq_len = in_idx.shape[1]
        if seq_lengths is not None:
            positions = torch.cat([torch.arange(n, device=in_idx.device) for n in seq_lengths])
        if positions is not None:
            return self.pos_emb(positions)
        start = 0 if cache is None else cache.length
        if start + seq_len > self.context_length:
            raise ValueError(
                f"{start + seq_len} tokens exceed context_length {self.context_length}; "
                "crop the input to its last context_length tokens"
            )
        # (a slice of the table: the same as a lookup, and cheaper to backpropagate through)
        return self.pos_emb.weight[start : start + seq_len]

    @property
    def current_pos(self) -> int:
        """The number of tokens in ``use_cache=True``'s cache."""
        return 0 if self.kv_cache is None else self.kv_cache.length

    def reset_kv_cache(self) -> None:
        self.kv_cache = None


# ---------------------------------------------------------------------------
# Generation (chapters 4-5)
# ---------------------------------------------------------------------------


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [batch, 1] from last-position logits [batch, vocab], as the course picks it.

    Keep the ``top_k`` largest logits; with ``temperature`` > 0 sample from
    softmax(logits / temperature), else take the most likely token.
    """
    if top_k is not None:
        top_logits, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits = logits.masked_fill(logits < top_logits[:, -1:], float("-inf"))
    if temperature > 0.0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)
    return torch.argmax(logits, dim=-1, keepdim=True)


def check_generation_settings(max_new_tokens: int, context_size: int, top_k: int | None) -> None:
    """Refuse settings no generation can use (a ValueError naming all three)."""
    if max_new_tokens < 0 or context_size < 1 or (top_k is not None and top_k < 1):
        raise ValueError(
            f"need max_new_tokens >= 0, context_size >= 1, top_k >= 1 or None; got "
            f"{max_new_tokens}, {context_size}, {top_k}"
        )


def next_token_logits(
    model: nn.Module,
    tokens: torch.Tensor,
    cache: KVCache | None,
    context_size: int,
    pad: torch.Tensor | None = None,
    *,
    all_new: bool = False,
) -> torch.Tensor:
    """The logits [batch, vocab] of the token after ``tokens`` [batch, n]: one decoding step.

    While the text fits ``context_size``, only the tokens ``cache`` lacks run through the
    model (the whole prompt first, then one per step) and the cache keeps their keys and
    values; after that the last ``context_size`` tokens run afresh each step, as in the
    course's loop. ``pad`` [batch] counts each row's left padding (None: no padding): it is
    masked, and positions count from each row's first real token. ``all_new``: the logits of
    every token run, [batch, new, vocab] (to check several drafted tokens at once).
    """
    n = tokens.shape[1]
    if cache is None or n > context_size:
        cache, start, first_key = None, max(n - context_size, 0), max(n - context_size, 0)
    else:
        start, first_key = cache.length, 0
    positions = mask = None
    if pad is not None:  # positions and mask from each row's first real token in the window
        first = pad.clamp(min=first_key)[:, None]
        queries = torch.arange(start, n, device=tokens.device)
        positions = (queries - first).clamp(min=0)
        keys = torch.arange(first_key, n, device=tokens.device)
        mask = (keys >= first)[:, None, None, :]
        if n - start > 1:  # causal, and a padding query sees itself (no empty row: NaN)
            mask = (mask & (keys <= queries[:, None])) | (keys == queries[:, None])
    logits = model(
        tokens[:, start:], cache=cache, positions=positions, mask=mask, last_only=not all_new
    )
    return logits if all_new else logits[:, -1]


@torch.no_grad()
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

    Each step looks at the last ``context_size`` tokens. Generation stops when the next token
    is ``eos_id`` (which is not appended); with several rows, when every row has produced it,
    finished rows being padded with ``eos_id`` meanwhile. ``use_cache=True`` (needs a
    ``GPTModel``) feeds only the newest token while the text fits the context
    (``next_token_logits``), with the same result; ``use_cache=False`` re-runs the window
    every step, as the course does.
    """
    check_generation_settings(max_new_tokens, context_size, top_k)
    if use_cache and not hasattr(model, "reset_kv_cache"):
        raise TypeError(
            f"use_cache=True needs a GPTModel; pass use_cache=False for a {type(model).__name__}"
        )
    capacity = max(min(idx.shape[1] + max_new_tokens - 1, context_size), 0)
    cache = KVCache(model, idx.shape[0], capacity) if use_cache else None
    done = torch.zeros((idx.shape[0], 1), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if use_cache:
            logits = next_token_logits(model, idx, cache, context_size)
        else:
            logits = model(idx[:, -context_size:])[:, -1, :]
        idx_next = sample_next_token(logits, temperature, top_k, generator)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(done, eos_id)  # finished rows keep emitting eos
            done |= idx_next == eos_id
            if bool(done.all()):
                break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def text_to_token_ids(text: str, tokenizer: Any) -> torch.Tensor:
    """Encode ``text`` into a [1, n] tensor (``<|endoftext|>`` allowed)."""
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: Any) -> str:
    """Decode a [1, n] (or [n]) tensor of token ids."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


# ---------------------------------------------------------------------------
# Chapter 5's names, served from course/pretraining.py
# ---------------------------------------------------------------------------

CHAPTER_5_NAMES = (
    "LossFn",
    "LossHistory",
    "LoopState",
    "TrainingRun",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "generate_and_print_sample",
    "load_weights_into_gpt",
    "plot_losses",
    "train_model_simple",
)


def __getattr__(name: str) -> Any:
    """Chapter 5's names, from ``course.pretraining`` when first asked for (PEP 562); not
    imported at the top because that module imports this one (no import cycle)."""
    if name in CHAPTER_5_NAMES:
        from course import pretraining

        return getattr(pretraining, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *CHAPTER_5_NAMES})


__all__ = [
    "CONFIG_KEYS",
    "GPT_CONFIG_124M",
    "MODEL_CONFIGS",
    "FeedForward",
    "GPTModel",
    "MultiHeadAttention",
    "TransformerBlock",
    "generate",
    "gpt2_config",
    "gpt2_config_from_hparams",
    "resolve_model_name",
    "sample_next_token",
    "text_to_token_ids",
    "token_ids_to_text",
    *(name for name in CHAPTER_5_NAMES if name != "LossFn"),
]
