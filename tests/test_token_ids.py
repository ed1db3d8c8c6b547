"""token_ids.py: every entry's token ids in one flat array, encoded in chunks.

``InstructionDataset(compact=True)`` must give exactly what encoding one entry at a time
gives (the course's way, ``InstructionDataset``'s default), and its prompt lengths must
agree with encoding each prompt apart.
"""

from __future__ import annotations

import numpy as np
import pytest

from course.instruction_data import (
    PROMPT_STYLES,
    SAMPLE_DATA_PATH,
    InstructionDataset,
    format_input,
    format_response,
    load_instruction_data,
)
from helpers import CharTokenizer, make_entries
from runtime import token_ids
from runtime.gpt2_tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer(offline=True)


def course_way(entries, tokenizer, style="alpaca"):
    """One entry at a time: the full text's ids, and how many leading ids the separately
    encoded prompt shares with them."""
    ids, prompt_lengths = [], []
    for entry in entries:
        prompt = format_input(entry, style)
        full = tokenizer.encode(prompt + format_response(entry, style))
        ids.append(full)
        prompt_lengths.append(token_ids.shared_prefix_length(tokenizer.encode(prompt), full))
    return ids, prompt_lengths


# texts whose ends merge with what follows in GPT-2's tokenizer (whitespace, punctuation,
# digits, non-ASCII), where the prompt's own encoding and the full text's can part ways
TAILS = ["", " ", "  ", "\n", " \n", "\n ", "\t", "\n\n", "\r\n", "\u00a0", "é", "😀", "?!", "'s"]
TAILS += [" 3", "—", "\u3000", "  \n  ", "a\n\t \n"]
EDGE_ENTRIES = [
    {"instruction": f"Echo{a}", "input": f"text{b}" if b != "" else "", "output": out}
    for a in TAILS
    for b in TAILS
    for out in ("ok", " ok", "\nok", "😀x")
]


@pytest.mark.parametrize("style", list(PROMPT_STYLES))
def test_ids_and_prompt_lengths_equal_one_entry_at_a_time(gpt2, style):
    entries = load_instruction_data(SAMPLE_DATA_PATH) + EDGE_ENTRIES
    dataset = InstructionDataset(
        entries, gpt2, style=style, return_prompt_length=True, compact=True
    )
    ids, prompt_lengths = course_way(entries, gpt2, style)
    assert [dataset[i][0] for i in range(len(entries))] == ids
    assert list(dataset.prompt_lengths) == prompt_lengths
    assert dataset.encoded_texts.lengths.tolist() == [len(x) for x in ids]
    course = InstructionDataset(entries, gpt2, style=style, return_prompt_length=True)
    assert [course[i] for i in range(len(entries))] == [dataset[i] for i in range(len(entries))]
    assert token_ids.token_lengths(course.encoded_texts) == token_ids.token_lengths(
        dataset.encoded_texts
    )


def test_the_real_dataset_encodes_as_one_entry_at_a_time(gpt2, shared_dir):
    entries = load_instruction_data(shared_dir / "data" / "instruction-data.json")
    dataset = InstructionDataset(entries, gpt2, compact=True)
    ids, prompt_lengths = course_way(entries, gpt2)
    assert list(dataset.encoded_texts) == ids and dataset.prompt_lengths == prompt_lengths


def test_chunks_of_any_size_give_the_same_ids(gpt2):
    pairs = [(format_input(e), format_response(e)) for e in EDGE_ENTRIES[:50]]
    whole, lengths = token_ids.encode_prompts_and_responses(pairs, gpt2)
    for chunk in (1, 3, 49):
        ids, chunk_lengths = token_ids.encode_prompts_and_responses(
            pairs, gpt2, chunk_entries=chunk
        )
        assert np.array_equal(ids.flat, whole.flat) and np.array_equal(ids.offsets, whole.offsets)
        assert chunk_lengths == lengths


def test_gpt2_ids_take_two_bytes_each(gpt2):
    dataset = InstructionDataset(load_instruction_data(SAMPLE_DATA_PATH), gpt2, compact=True)
    ids = dataset.encoded_texts
    assert ids.flat.dtype == np.uint16
    assert ids.nbytes == 2 * len(ids.flat) + 8 * (len(ids) + 1)
    assert all(type(t) is int for t in dataset[0])  # lists of Python ints, as in the course


def test_ids_beyond_two_bytes_are_kept_as_int32():
    entries = [{"instruction": "emoji 😀", "input": "", "output": "ok"}, *make_entries(3)]
    dataset = InstructionDataset(entries, CharTokenizer(), compact=True)
    assert dataset.encoded_texts.flat.dtype == np.int32
    assert 0x1F600 in dataset[0]  # 😀 with the character tokenizer


def test_token_ids_behave_like_a_list_of_lists():
    ids = token_ids.TokenIds(np.array([5, 6, 7, 8], dtype=np.uint16), np.array([0, 1, 1, 4]))
    assert len(ids) == 3 and list(ids) == [[5], [], [6, 7, 8]]
    assert ids[-1] == [6, 7, 8] and ids.lengths.tolist() == [1, 0, 3]
    with pytest.raises(IndexError):
        ids[3]
    with pytest.raises(ValueError, match="offsets"):
        token_ids.TokenIds(np.array([1, 2]), np.array([0, 3]))
    assert "3 texts, 4 tokens" in repr(ids)


@pytest.mark.parametrize("compact", [False, True])
def test_a_special_token_in_the_data_is_refused_as_by_encode(gpt2, compact):
    entry = {"instruction": "Say <|endoftext|>", "input": "", "output": "no"}
    with pytest.raises(ValueError, match="special token"):
        InstructionDataset([entry], gpt2, compact=compact)


@pytest.mark.parametrize("compact", [False, True])
def test_empty_data_gives_an_empty_dataset(gpt2, compact):
    dataset = InstructionDataset([], gpt2, compact=compact)
    assert len(dataset) == 0 and list(dataset.prompt_lengths) == []


def test_the_run_holds_its_token_ids_compactly(tmp_path):
    import torch

    import instruction_finetuning as ift

    cfg = ift.make_config(smoke=True, output_dir=str(tmp_path))
    splits, tokenizer = ift.prepare_data(cfg), ift.prepare_tokenizer(cfg)
    loaders = ift.prepare_loaders(cfg, splits, tokenizer, torch.device("cpu"))
    assert all(isinstance(lo.dataset.encoded_texts, token_ids.TokenIds) for lo in loaders)
