"""Many texts' token ids in one flat array, encoded in batches: the 52k Alpaca data in seconds.

A Python list of token ids costs about 36 bytes per token (an 8-byte pointer to a 28-byte
int object), so the 7.5 million tokens of the 52k Alpaca entries would take some 270 MB as
lists. ``TokenIds`` holds them as one flat array plus the offset where each text starts, and
hands out an ordinary list per text on request, as the course's dataset does. The array is
uint16 (2 bytes per token) when every id fits, as GPT-2's 50,257 do, else int32.
``encode_prompts_and_responses`` fills it chunk by chunk, so that no more than one chunk of
texts and lists exists at any time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from typing import Any

import numpy as np

CHUNK_ENTRIES = 4096  # entries encoded per batch: big enough for speed, small for memory


class TokenIds(Sequence):
    """The token ids of many texts: one flat array, and where each text starts.

    ``token_ids[i]`` is text i's ids as a new list of ints; ``token_ids.lengths`` is every
    text's number of tokens (an array, without building any list).
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        if offsets[0] != 0 or offsets[-1] != len(flat) or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must rise from 0 to len(flat)")
        self.flat = flat
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> list[int]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} texts")
        index %= len(self)
        return self.flat[self.offsets[index] : self.offsets[index + 1]].tolist()

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return self.flat.nbytes + self.offsets.nbytes

    def __repr__(self) -> str:
        return f"TokenIds({len(self)} texts, {len(self.flat)} tokens, {self.nbytes / 1e6:.1f} MB)"


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share: a prompt's length in the tokens of
    prompt + response (all the prompt's tokens, unless its last characters merge with the
    response's first ones into one token)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def token_lengths(encoded_texts: Sequence[Sequence[int]]) -> list[int]:
    """Each text's number of tokens, from a ``TokenIds`` without building its lists."""
    if isinstance(encoded_texts, TokenIds):
        return encoded_texts.lengths.tolist()
    return [len(ids) for ids in encoded_texts]


def _token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """How many bytes of text each token id stands for (None: the tokenizer cannot say)."""
    token_bytes = getattr(tokenizer, "decode_single_token_bytes", None)
    if token_bytes is None:
        return None
    return np.array([len(token_bytes(i)) for i in range(tokenizer.n_vocab)], dtype=np.int64)


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, by ``tokenizer.encode``.

    (tiktoken's ``encode_batch`` gives the same ids, but on this project's 2-core machine it
    took twice as long for the 52k Alpaca texts, 5.1 s against 2.5 s: it hands each text to
    a thread pool, and the threads gained nothing; see benchmarks/scale.py.)
    """
    return [tokenizer.encode(text) for text in texts]


def _prompt_lengths_by_bytes(
    flat: np.ndarray, offsets: np.ndarray, prompts: list[str], byte_lengths: np.ndarray
) -> list[int]:
    """For each text: how many of its leading tokens lie wholly within its prompt's bytes."""
    token_ends = np.cumsum(byte_lengths[flat])  # byte offset where each token ends
    text_starts = np.concatenate([[0], token_ends])[offsets[:-1]]
    prompt_ends = text_starts + np.array([len(p.encode("utf-8")) for p in prompts])
    inside = np.searchsorted(token_ends, prompt_ends, side="right") - offsets[:-1]
    return np.minimum(inside, np.diff(offsets)).tolist()


def _encode_chunk(
    tokenizer: Any, prompts: list[str], responses: list[str], byte_lengths: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One chunk: (its flat ids, the tokens per text, the prompt lengths)."""
    encoded = _encode_batch(tokenizer, [p + r for p, r in zip(prompts, responses, strict=True)])
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=lengths.sum())
    flat = flat.astype(np.uint16 if flat.size and flat.max() < 2**16 else np.int32)
    if byte_lengths is not None:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        prompt_lengths = _prompt_lengths_by_bytes(flat, offsets, prompts, byte_lengths)
    else:  # encode the prompts too and compare
        prompt_lengths = [
            shared_prefix_length(p, ids)
            for p, ids in zip(_encode_batch(tokenizer, prompts), encoded, strict=True)
        ]
    return flat, lengths, prompt_lengths


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def encode_prompts_and_responses(
    pairs: Iterable[tuple[str, str]], tokenizer: Any, *, chunk_entries: int = CHUNK_ENTRIES
) -> tuple[TokenIds, list[int]]:
    """Encode prompt + response of every (prompt, response) pair, a chunk at a time.

    Returns the texts' token ids and each prompt's length in tokens: how many leading tokens
    of the full text lie wholly within the prompt. (With a tokenizer that cannot tell how
    many bytes a token stands for, the prompt is encoded on its own and the length is the
    number of leading tokens both encodings share; for GPT-2's tokenizer and our prompt
    styles the two agree, which the tests check.) Encoding follows ``tokenizer.encode``'s
    rules: a special token such as ``<|endoftext|>`` in the text is refused.
    """
    byte_lengths = _token_byte_lengths(tokenizer)
    flats, lengths, prompt_lengths = [], [], []
    for chunk in _chunks(pairs, chunk_entries):
        prompts, responses = [p for p, _ in chunk], [r for _, r in chunk]
        flat, chunk_lengths, chunk_prompt_lengths = _encode_chunk(
            tokenizer, prompts, responses, byte_lengths
        )
        flats.append(flat)
        lengths.append(chunk_lengths)
        prompt_lengths += chunk_prompt_lengths
    flat = np.concatenate(flats) if flats else np.zeros(0, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]) if lengths else [0]
    return TokenIds(flat, np.asarray(offsets, dtype=np.int64)), prompt_lengths
