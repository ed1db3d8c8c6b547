"""A synthetic stand-in for the 52k Stanford Alpaca file (exercise 7.3), made offline.

    python benchmarks/synthetic_alpaca.py --out alpaca-52k.json            # 52,002 entries
    python benchmarks/synthetic_alpaca.py --out small.json --entries 2000

The real file cannot be downloaded on this project's machines, and the benchmarks need its
shape rather than its meaning: 52,002 entries (split 85/10/5 as the course does: 44,201
train, 5,200 test, 2,601 validation), about 40% of them with an input, short instructions
and outputs from one word to a few hundred, about 7.5 million GPT-2 tokens once formatted
with the Alpaca prompt (the token ids take about 30 MB as int32). The words are GPT-2's
own single-token words, drawn with Zipf-like frequencies, so that the text tokenizes and
compares (character n-grams) like English prose.

Near-duplicates are planted on purpose, as the real data has some: ``dup_rate`` of the
entries copy an earlier entry with one word of each field changed (and keep being similar
above 0.9 cosine), so that ``main/find_near_duplicates.py`` has something to find.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import REPO_ROOT  # noqa: E402,F401  (puts main/ on sys.path)
from runtime.gpt2_tokenizer import get_tokenizer  # noqa: E402
from runtime.outputs import save_json  # noqa: E402

ALPACA_ENTRIES = 52_002
# Words per field: lognormal (median, sigma), clipped to (low, high). Chosen so that the
# formatted entries average about 145 GPT-2 tokens, as the real file's do.
INSTRUCTION_WORDS = (13, 0.45, 2, 60)
INPUT_WORDS = (18, 0.9, 1, 400)
OUTPUT_WORDS = (42, 1.0, 1, 800)
INPUT_SHARE = 0.4  # entries with a non-empty input
COMMON_WORDS = 150  # GPT-2's first 150 words are the common ones every text uses
COMMON_WEIGHTS = 1.0 / (np.arange(COMMON_WORDS) + 5.0)
COMMON_WEIGHTS /= COMMON_WEIGHTS.sum()
TOPIC_WEIGHTS = 1.0 / (np.arange(40) + 2.0)
TOPIC_WEIGHTS /= TOPIC_WEIGHTS.sum()


def gpt2_words(tokenizer) -> list[str]:
    """GPT-2's tokens that are one lowercase word after a space, most frequent first (BPE
    merges frequent pieces first, so a lower id is roughly a more frequent word)."""
    words = []
    for token_id in range(50_000):
        piece = tokenizer.decode([token_id])
        if re.fullmatch(r" [a-z]{2,}", piece):
            words.append(piece[1:])
    return words


def _lengths(rng: np.random.Generator, n: int, spec: tuple) -> np.ndarray:
    median, sigma, low, high = spec
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)


def _sentence_text(words: np.ndarray, rng: np.random.Generator, question: bool = False) -> str:
    """Words as sentences of 6-20 words: capitalised, with a full stop (or question mark)."""
    sentences, start = [], 0
    while start < len(words):
        end = start + int(rng.integers(6, 21))
        part = " ".join(words[start:end])
        sentences.append(part[:1].upper() + part[1:])
        start = end
    return ". ".join(sentences) + ("?" if question else ".")


def _entry_words(rng: np.random.Generator, vocabulary: np.ndarray, k: int) -> np.ndarray:
    """``k`` words of one entry: half common words, half from the entry's own topic (40 words
    of the rest), each drawn with Zipf-like frequencies; as in real text, two long entries
    share their common words but not their topics."""
    topic = vocabulary[COMMON_WORDS + rng.choice(len(vocabulary) - COMMON_WORDS, 40, replace=False)]
    common = rng.choice(COMMON_WORDS, k, p=COMMON_WEIGHTS)
    own = rng.choice(40, k, p=TOPIC_WEIGHTS)
    return np.where(rng.random(k) < 0.5, vocabulary[common], topic[own])


def _change_one_word(text: str, vocabulary: list[str], rng: np.random.Generator) -> str:
    if not text:
        return text
    words = text.split(" ")
    words[int(rng.integers(len(words)))] = vocabulary[int(rng.integers(len(vocabulary)))]
    return " ".join(words)


def make_entries(
    n: int = ALPACA_ENTRIES, *, seed: int = 123, dup_rate: float = 0.01, tokenizer=None
) -> list[dict]:
    """``n`` Alpaca-shaped entries (see the module's docstring), the same for the same seed."""
    vocabulary = np.array(gpt2_words(tokenizer or get_tokenizer(offline=True)))
    rng = np.random.default_rng(seed)
    lengths = {
        "instruction": _lengths(rng, n, INSTRUCTION_WORDS),
        "input": _lengths(rng, n, INPUT_WORDS) * (rng.random(n) < INPUT_SHARE),
        "output": _lengths(rng, n, OUTPUT_WORDS),
    }
    entries = []
    for i in range(n):
        words = _entry_words(rng, vocabulary, sum(int(v[i]) for v in lengths.values()))
        entry, used = {}, 0
        for key in ("instruction", "input", "output"):
            k = int(lengths[key][i])
            entry[key] = (
                _sentence_text(words[used : used + k], rng, key == "instruction") if k else ""
            )
            used += k
        if i > 0 and rng.random() < dup_rate:  # a near-duplicate of an earlier entry
            earlier = entries[int(rng.integers(i))]
            entry = {key: _change_one_word(text, vocabulary, rng) for key, text in earlier.items()}
        entries.append(entry)
    return entries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--entries", type=int, default=ALPACA_ENTRIES, help="default: 52,002")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--dup-rate", type=float, default=0.01, help="share of planted near-duplicates")
    args = p.parse_args(argv)
    if args.entries < 1 or not 0 <= args.dup_rate <= 1:
        p.error("--entries must be at least 1 and --dup-rate between 0 and 1")
    entries = make_entries(args.entries, seed=args.seed, dup_rate=args.dup_rate)
    path = save_json(entries, args.out)
    print(f"{len(entries)} entries written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
