"""Near-duplicate entries in instruction data: the course's dataset utility, fit for 52k entries.

    python main/find_near_duplicates.py --json_file FILE [--threshold 0.9]
        [--remove_duplicates --json_output_file OUT]

As in the course, each of the fields instruction, input and output is compared across all
entries: lowercased, without punctuation, as TF-IDF vectors of character 1- to 3-grams
(scikit-learn); two entries whose texts have a cosine similarity above the threshold are
near-duplicates. Texts of fewer than two characters are never paired. The report lists each
group of near-duplicates (entries linked by such pairs) with its similarities.
``--remove_duplicates`` removes every entry whose input or output is a near-duplicate of an
earlier entry's (the instruction alone is only reported: one instruction with two inputs
is two tasks), field after field, and writes the rest to ``--json_output_file``.

The course computes the full similarity matrix: for the 52k Alpaca entries that is 52,002²
numbers, about 21 GB. ``similar_pairs`` computes the same similarities in blocks of rows,
each block against the blocks after it, and keeps only the pairs above the threshold:

- the features that many texts share (a few thousand common n-grams, which hold nearly all
  the nonzeros) go through dense matrix products, which the CPU does fast: in bf16 where the
  CPU has bf16 instructions (2.4x faster than float32 on this project's machine), else in
  float32;
- the rare features, the vast majority, go through sparse products, whose cost grows with
  the square of how many texts share a feature, so stays small for them;
- each pair that comes within the rounding margin of the threshold (0.01 in bf16, 1e-4 in
  float32) is then computed again exactly (float64, as scikit-learn's ``cosine_similarity``),
  so the answer is the course's.

Why 0.01 covers bf16: rounding each of two non-negative unit vectors' entries to bf16 (8
significant bits) changes their dot product by at most (2u + u^2) * sum|x_i y_i| <= 0.0079
with u = 2^-8, and the products accumulate in float32.
"""

from __future__ import annotations

import sys

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import re
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from course.instruction_data import ChapterError, read_instruction_file
from runtime.outputs import save_json
from runtime.progress_bars import progress_bar
from runtime.run_config import cpu_has_fast_bf16

FIELDS = ("instruction", "input", "output")
REMOVED_BY = ("input", "output")  # near-duplicates in these fields are removed
BLOCK_ROWS = 4096  # rows per block: 4096 x 4096 float32 similarities take 64 MB
MARGIN = {torch.float32: 1e-4, torch.bfloat16: 0.01}  # similarities this close to the
# threshold are computed again exactly (see the module's docstring)


def preprocess_text(text: str) -> str:
    """Lowercase, punctuation removed (what the course compares)."""
    return re.sub(r"[^\w\s]", "", text.lower())


def tfidf_vectors(texts: Sequence[str]) -> sp.csr_matrix:
    """Each text as an l2-normalised TF-IDF vector of its character 1- to 3-grams."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3))
    return vectorizer.fit_transform([preprocess_text(t) for t in texts]).tocsr()


def _split_features(vectors: sp.csr_matrix, rare_share: float) -> tuple:
    """(common, rare): the columns in more than ``rare_share`` of the rows, and the others."""
    df = np.bincount(vectors.indices, minlength=vectors.shape[1])
    common = df > max(16, rare_share * vectors.shape[0])
    columns = vectors.tocsc()
    return columns[:, common].tocsr().astype(np.float32), columns[:, ~common].tocsr()


def _dense(matrix: sp.csr_matrix, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(matrix.toarray()).to(dtype)


def _block_candidates(
    row_block: torch.Tensor, common, rare, rows: slice, cols: slice, cut: float, dtype
) -> np.ndarray:
    """The pairs (i, j), i < j, of a block of rows against a block of columns whose similarity,
    the common features' part computed in ``dtype``, exceeds ``cut``. ``row_block`` is
    ``_dense(common[rows], dtype)``, made once for all the column blocks of these rows."""
    dense = (row_block @ _dense(common[cols], dtype).T).float().numpy()
    rare_part = (rare[rows] @ rare[cols].T).tocoo()  # few pairs share a rare n-gram
    dense[rare_part.row, rare_part.col] += rare_part.data
    i, j = np.nonzero(dense > cut)
    i, j = i + rows.start, j + cols.start
    keep = i < j
    return np.stack([i[keep], j[keep]], axis=1)


def similar_pairs(
    vectors: sp.csr_matrix,
    threshold: float,
    *,
    block_rows: int = BLOCK_ROWS,
    rare_share: float = 0.01,
    bf16: bool | None = None,
    progress: bool = False,
) -> list[tuple[int, int, float]]:
    """Every pair (i, j, similarity), i < j, of rows whose cosine similarity exceeds
    ``threshold``, in that order; the rows must be l2-normalised (as ``tfidf_vectors`` are).

    Rows are compared in blocks (see the module's docstring): memory stays at a few blocks,
    not the full matrix, and the similarities equal ``cosine_similarity``'s. ``bf16`` chooses
    the dense products' type (None: bf16 where the CPU has bf16 instructions).
    """
    dtype = torch.bfloat16 if (cpu_has_fast_bf16() if bf16 is None else bf16) else torch.float32
    cut = threshold - MARGIN[dtype]
    n = vectors.shape[0]
    common, rare = _split_features(vectors, rare_share)
    blocks = [slice(start, min(start + block_rows, n)) for start in range(0, n, block_rows)]
    work = [(a, b) for a in range(len(blocks)) for b in range(a, len(blocks))]
    found, row_block, last_a = [np.zeros((0, 2), dtype=np.int64)], None, None
    for a, b in progress_bar(work, desc="comparing", unit="block", enabled=progress):
        if a != last_a:  # (the work goes through each block of rows in turn)
            row_block, last_a = _dense(common[blocks[a]], dtype), a
        found.append(_block_candidates(row_block, common, rare, blocks[a], blocks[b], cut, dtype))
    pairs = np.concatenate(found)
    exact = vectors.astype(np.float64)
    similarity = np.asarray(exact[pairs[:, 0]].multiply(exact[pairs[:, 1]]).sum(axis=1)).ravel()
    keep = similarity > threshold
    order = np.lexsort((pairs[keep, 1], pairs[keep, 0]))
    return [
        (int(i), int(j), float(s))
        for (i, j), s in zip(pairs[keep][order], similarity[keep][order], strict=True)
    ]


def find_near_duplicates(
    json_data: Sequence[dict],
    threshold: float = 0.75,
    key: str = "instruction",
    *,
    progress: bool = False,
) -> tuple[list[dict], list[tuple[dict, dict, float]]]:
    """The course's function: (the entries without the near-duplicates found in ``key``,
    the pairs found as (entry, later entry, similarity)).

    Only near-duplicates in the input or the output are left out of the first part; texts
    are compared as ``similar_pairs`` does, and of each pair the later entry goes.
    """
    pairs = entry_pairs(json_data, key, threshold, progress=progress)
    kept = without_removed(json_data, pairs, key)
    return kept, [(json_data[i], json_data[j], s) for i, j, s in pairs]


def removed_entries(pairs: list[tuple[int, int, float]], key: str) -> set[int]:
    """The entries a search of field ``key`` removes: the later entry of each pair, when
    ``key`` is one of the fields in ``REMOVED_BY``."""
    return {j for _, j, _ in pairs} if key in REMOVED_BY else set()


def without_removed(json_data: Sequence[dict], pairs: list, key: str) -> list[dict]:
    """``json_data`` without the ``removed_entries`` of ``pairs`` found in ``key``."""
    removed = removed_entries(pairs, key)
    return [entry for index, entry in enumerate(json_data) if index not in removed]


def entry_pairs(
    json_data: Sequence[dict], key: str, threshold: float, *, progress: bool = False
) -> list[tuple[int, int, float]]:
    """The near-duplicate pairs (entry index, later entry index, similarity) in field ``key``.

    As in the course, the TF-IDF statistics cover every entry with a non-empty text, and a
    text of fewer than two characters is never paired.
    """
    indices = [i for i, entry in enumerate(json_data) if entry[key]]
    if len(indices) < 2:
        return []
    vectors = tfidf_vectors([json_data[i][key] for i in indices])
    pairs = similar_pairs(vectors, threshold, progress=progress)
    return [
        (indices[a], indices[b], s)
        for a, b, s in pairs
        if len(json_data[indices[a]][key]) > 1 and len(json_data[indices[b]][key]) > 1
    ]


def duplicate_groups(pairs: Sequence[tuple[int, int, float]]) -> list[list[int]]:
    """The entries linked by near-duplicate pairs, as groups (each sorted, groups in order of
    their first entry)."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]  # (path halving keeps the chains short)
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in sorted(parent):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def print_report(json_data: Sequence[dict], key: str, pairs: list, removing: bool) -> None:
    """Each group of near-duplicates in ``key``: its entries (index, text) and similarities."""
    print(f"\n{'=' * 60}\nSearching '{key}' for near-duplicates ...\n{'=' * 60}")
    if not pairs:
        print("No near-duplicates found")
        return
    groups = duplicate_groups(pairs)
    group_of = {i: number for number, group in enumerate(groups) for i in group}
    sims: list[list[float]] = [[] for _ in groups]
    for i, _, s in pairs:
        sims[group_of[i]].append(s)
    removed = removed_entries(pairs, key) if removing else set()
    for number, group in enumerate(groups):
        low, high = min(sims[number]), max(sims[number])
        print(f"Group {number + 1}: {len(group)} entries, similarity {low:.2f}-{high:.2f}")
        for i in group:
            mark = " (removed)" if i in removed else ""
            print(f"  [{i}]{mark} {_short(json_data[i][key])}")
    print(
        f"{len(pairs)} pairs in {len(groups)} groups"
        + (f"; {len(removed)} entries removed" if removed else "")
    )


def find_print_and_remove_near_duplicates(
    json_data: list[dict],
    remove_duplicates: bool = False,
    threshold: float = 0.75,
    *,
    progress: bool = True,
) -> list[dict]:
    """The course's function: report the near-duplicates of each field and, with
    ``remove_duplicates``, return the entries without those found in input or output (each
    field is searched in what the fields before it left)."""
    for key in FIELDS:
        pairs = entry_pairs(json_data, key, threshold, progress=progress)
        print_report(json_data, key, pairs, remove_duplicates)
        if remove_duplicates:
            json_data = without_removed(json_data, pairs, key)
    return json_data


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="find_near_duplicates.py",
        description="Find near-duplicate entries (TF-IDF of character n-grams, cosine "
        "similarity) in instruction data, and optionally write the data without them.",
    )
    p.add_argument("--json_file", required=True, help="the instruction data (JSON or JSON Lines)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="similarity above which two texts are near-duplicates, between 0 and 1 (0.9)",
    )
    p.add_argument(
        "--remove_duplicates",
        action="store_true",
        help="remove entries whose input or output is a near-duplicate of an earlier entry's, "
        "and write the rest to --json_output_file",
    )
    p.add_argument("--json_output_file", help="where --remove_duplicates writes the cleaned data")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        if not 0 < args.threshold <= 1:
            raise ChapterError(f"--threshold {args.threshold} must be above 0 and at most 1")
        if args.remove_duplicates and not args.json_output_file:
            raise ChapterError("--remove_duplicates needs --json_output_file, the file to write")
        data = read_instruction_file(args.json_file)
        cleaned = find_print_and_remove_near_duplicates(
            data, args.remove_duplicates, args.threshold
        )
        if args.remove_duplicates:
            path = save_json(cleaned, args.json_output_file)
            print(
                f"\n{len(data) - len(cleaned)} of {len(data)} entries removed; "
                f"{len(cleaned)} written to {path}"
            )
    except ChapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
