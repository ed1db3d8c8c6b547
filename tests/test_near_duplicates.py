"""find_near_duplicates.py: the course's near-duplicate finder, computed in blocks.

The data is made up here, with known near-duplicates (the same text in other case and
punctuation, a long text with one word changed) and near-misses (similar, but below the
threshold); the blocked computation is compared with scikit-learn's full matrix.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import find_near_duplicates as fnd
from helpers import REPO_ROOT

ROME = "The capital of Italy is Rome."
PHOTO = (
    "Photosynthesis is the process by which green plants use sunlight, water and carbon "
    "dioxide to make glucose and oxygen."
)
ENTRIES = [
    {"instruction": "Name the capital of Italy.", "input": "", "output": ROME},
    {"instruction": "Explain photosynthesis.", "input": "", "output": PHOTO},
    {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris."},  # near-miss of 0 (0.64)
    {"instruction": "NAME THE CAPITAL OF ITALY!", "input": "", "output": "THE CAPITAL OF ITALY IS ROME!!"},  # duplicate of 0
    {"instruction": "Describe respiration.", "input": "in cells", "output": "Respiration is the process by which cells break down glucose to release energy, water and carbon dioxide."},  # near-miss of 1 (0.79)
    {"instruction": "Explain photosynthesis briefly.", "input": "", "output": PHOTO.replace("glucose", "sugar")},  # near-duplicate of 1 (0.97)
    {"instruction": "Say a letter.", "input": "a", "output": "b"},
    {"instruction": "Say another letter.", "input": "a", "output": "b"},  # 1-character texts: never paired
]  # fmt: skip


def sklearn_pairs(texts: list[str], threshold: float) -> list[tuple[int, int]]:
    """The course's way: the full similarity matrix, every pair above the threshold."""
    from sklearn.metrics.pairwise import cosine_similarity

    sims = cosine_similarity(fnd.tfidf_vectors(texts))
    i, j = np.triu_indices(len(texts), 1)
    above = sims[i, j] > threshold
    return list(zip(i[above].tolist(), j[above].tolist(), strict=True))


def made_up_texts(n: int, seed: int = 0) -> list[str]:
    """Random sentences over a small vocabulary, some copied with one word changed."""
    rng = np.random.default_rng(seed)
    words = "the a of to plant water light energy cell sugar oxygen rome city river sun".split()
    texts = []
    for _ in range(n):
        if texts and rng.random() < 0.2:
            copy = texts[rng.integers(len(texts))].split()
            copy[rng.integers(len(copy))] = str(rng.choice(words))
            texts.append(" ".join(copy))
        else:
            texts.append(" ".join(rng.choice(words, rng.integers(3, 30))))
    return texts


@pytest.mark.parametrize("block_rows", [16, 4096])
@pytest.mark.parametrize("rare_share", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("bf16", [False, True])
def test_blocked_pairs_equal_the_full_similarity_matrix(block_rows, rare_share, bf16):
    texts = made_up_texts(150)
    vectors = fnd.tfidf_vectors(texts)
    for threshold in (0.5, 0.8, 0.9, 0.95):
        got = fnd.similar_pairs(
            vectors, threshold, block_rows=block_rows, rare_share=rare_share, bf16=bf16
        )
        assert [(i, j) for i, j, _ in got] == sklearn_pairs(texts, threshold)


def test_similarities_are_the_exact_cosines():
    from sklearn.metrics.pairwise import cosine_similarity

    texts = made_up_texts(80, seed=1)
    vectors = fnd.tfidf_vectors(texts)
    sims = cosine_similarity(vectors)
    for bf16 in (False, True):
        pairs = fnd.similar_pairs(vectors, 0.7, block_rows=16, bf16=bf16)
        assert pairs and all(s == pytest.approx(sims[i, j], abs=1e-12) for i, j, s in pairs)


def test_known_duplicates_are_found_and_near_misses_are_not():
    pairs = {key: fnd.entry_pairs(ENTRIES, key, 0.9) for key in fnd.FIELDS}
    assert [(i, j) for i, j, _ in pairs["output"]] == [(0, 3), (1, 5)]
    assert pairs["output"][0][2] == pytest.approx(1.0)  # case and punctuation do not count
    assert 0.9 < pairs["output"][1][2] < 1.0
    assert [(i, j) for i, j, _ in pairs["instruction"]] == [(0, 3)]
    assert pairs["input"] == []  # "a" and "a": texts of one character are never paired
    lower = [(i, j) for i, j, _ in fnd.entry_pairs(ENTRIES, "output", 0.75)]
    assert (1, 4) in lower and (0, 2) not in lower  # the respiration near-miss is at 0.79


def test_removal_drops_later_entries_duplicated_in_input_or_output(capsys):
    cleaned = fnd.find_print_and_remove_near_duplicates(
        list(ENTRIES), remove_duplicates=True, threshold=0.9, progress=False
    )
    assert cleaned == [e for i, e in enumerate(ENTRIES) if i not in (3, 5)]
    report = capsys.readouterr().out
    assert "Searching 'instruction'" in report and "Searching 'output'" in report
    assert "Group 1: 2 entries, similarity 1.00-1.00" in report
    assert "[3] (removed) THE CAPITAL OF ITALY IS ROME!!" in report
    assert "2 pairs in 2 groups; 2 entries removed" in report


def test_instruction_duplicates_are_reported_but_kept():
    entries = [
        {
            "instruction": "Translate the sentence.",
            "input": "Good morning",
            "output": "Buenos dias",
        },
        {"instruction": "Translate the sentence!", "input": "Thank you", "output": "Gracias"},
    ]
    kept, pairs = fnd.find_near_duplicates(entries, 0.9, "instruction")
    assert kept == entries and len(pairs) == 1 and pairs[0][:2] == (entries[0], entries[1])
    kept, _ = fnd.find_near_duplicates(entries + [entries[1]], 0.9, "output")
    assert kept == entries  # the copy's output duplicates entry 1's: the copy goes


def test_groups_join_chains_of_pairs():
    pairs = [(0, 4, 0.95), (4, 9, 0.92), (2, 3, 0.99), (7, 9, 0.91)]
    assert fnd.duplicate_groups(pairs) == [[0, 4, 7, 9], [2, 3]]


def test_command_line_writes_the_cleaned_file(tmp_path, capsys):
    source, out = tmp_path / "data.json", tmp_path / "clean.json"
    source.write_text(json.dumps(ENTRIES), encoding="utf-8")
    argv = ["--json_file", str(source), "--remove_duplicates", "--json_output_file", str(out)]
    assert fnd.main(argv) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == [ENTRIES[i] for i in (0, 1, 2, 4, 6, 7)]
    assert "2 of 8 entries removed; 6 written to" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--remove_duplicates"], "needs --json_output_file"),
        (["--threshold", "1.5"], "--threshold 1.5 must be above 0 and at most 1"),
    ],
)
def test_command_line_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    source = tmp_path / "data.json"
    source.write_text(json.dumps(ENTRIES), encoding="utf-8")
    assert fnd.main(["--json_file", str(source), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_the_bundled_sample_data_has_no_near_duplicate_outputs():
    data = json.loads((REPO_ROOT / "main" / "data" / "sample-instruction-data.json").read_text())
    assert fnd.entry_pairs(data, "output", 0.9) == []


@pytest.mark.parametrize("bf16", [False, True])
def test_a_pair_just_above_the_threshold_is_found_and_one_at_it_is_not(bf16):
    """The blocked products only shortlist; each shortlisted pair is computed exactly, so
    the edge of the threshold falls where the course's ``>`` puts it."""
    texts = made_up_texts(60, seed=2)
    vectors = fnd.tfidf_vectors(texts)
    i, j, s = fnd.similar_pairs(vectors, 0.6, bf16=bf16)[0]
    assert (i, j) in [(a, b) for a, b, _ in fnd.similar_pairs(vectors, s - 1e-9, bf16=bf16)]
    assert (i, j) not in [(a, b) for a, b, _ in fnd.similar_pairs(vectors, s, bf16=bf16)]
