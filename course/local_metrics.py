"""Reference-based metrics computed locally, for when no LLM judge is reachable (section 7.8).

Exact match and ROUGE-L F1 compare a response with the dataset's answer word by word. They
are NOT the judge's score: a correct answer in other words scores low. ``ollama_evaluate``
imports them back, so ``ollama_evaluate.rouge_l_f1`` and friends keep working.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LOCAL_METRICS_NOTE = (
    "reference-based metrics computed locally (exact match, ROUGE-L F1 vs. the dataset "
    "output); NOT the LLM judge's score"
)


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
