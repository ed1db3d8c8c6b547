"""Batching (7.3) and data loaders (7.4): the collate drafts, the final collate function's
exact tensors and prompt masking, the dataset, the loaders."""

from __future__ import annotations

import pytest
import torch

from course import collate_drafts
from course import instruction_data as data
from helpers import IGN, PAD, CharTokenizer, varied_entries
from runtime.gpt2_tokenizer import get_tokenizer

# The course's toy batch and the tensors the book prints for it
COURSE_BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
COURSE_INPUTS = [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
COURSE_SHIFTED_TARGETS = [[1, 2, 3, 4, PAD], [6, PAD, PAD, PAD, PAD], [8, 9, PAD, PAD, PAD]]
COURSE_TARGETS = [[1, 2, 3, 4, PAD], [6, PAD, IGN, IGN, IGN], [8, 9, PAD, IGN, IGN]]


# --- the drafts of section 7.3 ---------------------------------------------------------------


def test_draft_1_pads_with_end_of_text():
    inputs = collate_drafts.collate_draft_1(COURSE_BATCH)
    assert inputs.tolist() == COURSE_INPUTS
    assert inputs.dtype == torch.int64


def test_draft_2_adds_the_shifted_targets():
    inputs, targets = collate_drafts.collate_draft_2(COURSE_BATCH)
    assert inputs.tolist() == COURSE_INPUTS
    assert targets.tolist() == COURSE_SHIFTED_TARGETS


def test_draft_3_ignores_everything_after_the_first_end_of_text():
    inputs, targets = collate_drafts.collate_draft_3(COURSE_BATCH)
    assert inputs.tolist() == COURSE_INPUTS
    assert targets.tolist() == COURSE_TARGETS


def test_draft_3_cuts_to_allowed_max_length():
    inputs, targets = collate_drafts.collate_draft_3(COURSE_BATCH, allowed_max_length=3)
    assert inputs.tolist() == [row[:3] for row in COURSE_INPUTS]
    assert targets.tolist() == [row[:3] for row in COURSE_TARGETS]


BATCHES = [
    COURSE_BATCH,
    [[3]],
    [[1, 2], [3, 4]],  # equal lengths: no padding, only the end-of-text token
    [[1, PAD, 2], [3]],  # a padding id inside the text
    [[9] * 12, [1], [4, 5, 6, 7]],
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("allowed_max_length", [None, 1, 3, 50])
def test_draft_3_equals_the_final_collate_function(batch, allowed_max_length):
    draft = collate_drafts.collate_draft_3(batch, allowed_max_length=allowed_max_length)
    final = data.custom_collate_fn(batch, allowed_max_length=allowed_max_length)
    for a, b in zip(draft, final, strict=True):
        assert torch.equal(a, b)


def test_drafts_build_on_each_other():
    for batch in BATCHES:
        inputs_1 = collate_drafts.collate_draft_1(batch)
        inputs_2, targets_2 = collate_drafts.collate_draft_2(batch)
        inputs_3, targets_3 = collate_drafts.collate_draft_3(batch)
        assert torch.equal(inputs_1, inputs_2) and torch.equal(inputs_2, inputs_3)
        assert torch.equal(targets_2[:, :-1], inputs_2[:, 1:])  # targets = inputs shifted left
        kept = targets_3 != IGN
        assert torch.equal(targets_3[kept], targets_2[kept])  # draft 3 only masks


# --- the final collate function ------------------------------------------------------------


def test_course_example_exact_tensors():
    inputs, targets = data.custom_collate_fn(COURSE_BATCH)
    assert inputs.tolist() == COURSE_INPUTS
    assert targets.tolist() == COURSE_TARGETS
    assert inputs.dtype == targets.dtype == torch.int64


def test_items_are_not_modified():
    batch = [list(x) for x in COURSE_BATCH]
    data.custom_collate_fn(batch)
    assert batch == COURSE_BATCH


def test_custom_pad_and_ignore_index():
    inputs, targets = data.custom_collate_fn([[3, 4, 5], [6]], pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[3, 4, 5], [6, 0, 0]]
    assert targets.tolist() == [[4, 5, 0], [0, -1, -1]]


def test_truncation_to_allowed_max_length():
    inputs, targets = data.custom_collate_fn(COURSE_BATCH, allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, PAD], [7, 8, 9]]
    assert targets.tolist() == [[1, 2, 3], [6, PAD, IGN], [8, 9, PAD]]


def test_device_argument_moves_tensors():
    inputs, targets = data.custom_collate_fn(COURSE_BATCH, device="meta")
    assert inputs.device.type == targets.device.type == "meta"
    assert inputs.shape == targets.shape == (3, 5)
    inputs, _ = data.custom_collate_fn(COURSE_BATCH, device=torch.device("cpu"))
    assert inputs.device.type == "cpu"


def test_pad_token_inside_an_item_is_kept_as_a_target():
    # the padding is found by position, so a real 50256 in the text is not masked
    _, targets = data.custom_collate_fn([[1, PAD, 2], [3]])
    assert targets.tolist() == [[PAD, 2, PAD], [PAD, IGN, IGN]]


def test_pairs_without_mask_give_the_course_tensors():
    pairs = [(ids, 2) for ids in COURSE_BATCH]
    plain = data.custom_collate_fn(COURSE_BATCH)
    paired = data.custom_collate_fn(pairs)
    assert torch.equal(plain[0], paired[0]) and torch.equal(plain[1], paired[1])


def test_prompt_masking():
    # prompt lengths 3, 1, 2: the targets that predict prompt tokens (the first
    # prompt_length - 1) are ignored; response tokens and the end-of-text stay
    batch = [([0, 1, 2, 3, 4], 3), ([5, 6], 1), ([7, 8, 9], 2)]
    inputs, targets = data.custom_collate_fn(batch, mask_prompt=True)
    assert inputs.tolist() == COURSE_INPUTS
    assert targets.tolist() == [
        [IGN, IGN, 3, 4, PAD],
        [6, PAD, IGN, IGN, IGN],
        [IGN, 9, PAD, IGN, IGN],
    ]


def test_prompt_masking_then_truncation():
    batch = [([0, 1, 2, 3, 4], 3), ([5, 6], 1)]
    _, targets = data.custom_collate_fn(batch, mask_prompt=True, allowed_max_length=3)
    assert targets.tolist() == [[IGN, IGN, 3], [6, PAD, IGN]]


def test_prompt_masking_needs_prompt_lengths():
    with pytest.raises(ValueError, match="return_prompt_length=True"):
        data.custom_collate_fn(COURSE_BATCH, mask_prompt=True)


# --- dataset and loaders -------------------------------------------------------------------

ENTRIES = [
    {"instruction": "Say hi.", "input": "", "output": "Hi."},
    {"instruction": "Add.", "input": "1+1", "output": "2"},
    {"instruction": "Spell cat.", "input": "", "output": "c-a-t"},
]


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_dataset_pretokenizes_prompt_and_response(style):
    tok = CharTokenizer()
    ds = data.InstructionDataset(ENTRIES, tok, style=style)
    assert len(ds) == 3
    for i, entry in enumerate(ENTRIES):
        prompt = data.format_input(entry, style)
        assert tok.decode(ds[i]) == prompt + data.format_response(entry, style)
        assert ds.prompt_lengths[i] == len(prompt)
    pairs = data.InstructionDataset(ENTRIES, tok, style=style, return_prompt_length=True)
    assert pairs[1] == (ds[1], ds.prompt_lengths[1])


def test_masked_collate_on_dataset_keeps_only_the_response_in_the_loss():
    tok = CharTokenizer()
    ds = data.InstructionDataset(ENTRIES, tok, return_prompt_length=True)
    _, targets = data.custom_collate_fn([ds[0], ds[1]], mask_prompt=True)
    for row, entry in zip(targets.tolist(), ENTRIES[:2], strict=True):
        kept = [t for t in row if t != IGN]
        assert tok.decode(kept[:-1]) == data.format_response(entry)
        assert kept[-1] == PAD


def test_create_dataloaders_settings():
    tok = CharTokenizer()
    train, val, test = varied_entries(18), varied_entries(5), varied_entries(6)
    tl, vl, sl = data.create_dataloaders(train, val, test, tok, batch_size=4, allowed_max_length=40)
    assert (len(tl), len(vl), len(sl)) == (4, 2, 2)  # train drops its last partial batch
    assert sum(x.shape[0] for x, _ in tl) == 16
    assert sum(x.shape[0] for x, _ in vl) == 5 and sum(x.shape[0] for x, _ in sl) == 6
    assert all(x.shape[1] <= 40 for x, _ in tl)
    assert tl.num_workers == vl.num_workers == 0
    # val/test keep the file order: the first batch holds entries 0..3
    first_inputs, _ = next(iter(vl))
    expected, _ = data.custom_collate_fn(
        [data.InstructionDataset(val[:4], tok)[i] for i in range(4)], allowed_max_length=40
    )
    assert torch.equal(first_inputs, expected)


def test_train_loader_shuffles_reproducibly_with_its_own_generator():
    tok = CharTokenizer()
    entries = varied_entries(32)

    def first_epoch(seed):
        tl, vl, _ = data.create_dataloaders(
            entries, entries, entries[:2], tok, batch_size=4, seed=seed
        )
        torch.manual_seed(999)  # the loader's own generator decides, not the global seed
        return [x.tolist() for x, _ in tl], [x.tolist() for x, _ in vl]

    (a, in_order), (b, _), (c, _) = first_epoch(123), first_epoch(123), first_epoch(7)
    assert a == b and a != c
    assert a != in_order  # the validation loader of the same data keeps the file order


def test_create_dataloaders_leaves_the_global_random_state_alone():
    before = torch.random.get_rng_state()
    data.create_dataloaders(
        varied_entries(8), varied_entries(2), varied_entries(2), CharTokenizer()
    )
    assert torch.equal(torch.random.get_rng_state(), before)


def test_masked_loaders():
    tok = CharTokenizer()
    entries = varied_entries(8)
    tl, _, _ = data.create_dataloaders(
        entries, entries, entries, tok, batch_size=4, mask_prompt=True
    )
    _, targets = next(iter(tl))
    assert (targets[:, :10] == IGN).all()  # every alpaca prompt is longer than 10 chars


# --- with GPT-2's tokenizer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return get_tokenizer(offline=True)


def test_prompt_tokens_are_a_prefix_of_the_full_text(gpt2_tokenizer, shared_dir):
    """The masking design assumes encode(prompt) is a prefix of encode(prompt + response)."""
    entries = data.load_instruction_data(shared_dir / "data" / "instruction-data.json")
    for style in data.PROMPT_STYLES:
        ds = data.InstructionDataset(entries, gpt2_tokenizer, style=style)
        for i, entry in enumerate(entries):
            prompt_ids = gpt2_tokenizer.encode(data.format_input(entry, style))
            assert ds[i][: ds.prompt_lengths[i]] == prompt_ids, (style, i)


def test_prompt_ending_in_whitespace_masks_only_shared_tokens(gpt2_tokenizer):
    entry = {"instruction": "Echo.", "input": "trailing newline\n", "output": "ok"}
    ds = data.InstructionDataset([entry], gpt2_tokenizer)
    prompt_ids = gpt2_tokenizer.encode(data.format_input(entry))
    n = ds.prompt_lengths[0]
    assert n == len(prompt_ids) - 1  # the prompt's "\n" and the response's "\n\n" merge
    assert ds[0][:n] == prompt_ids[:n] and ds[0][n] != prompt_ids[n]


def test_masked_batch_covers_exactly_the_response(gpt2_tokenizer):
    entries = data.load_instruction_data(data.SAMPLE_DATA_PATH)[:4]
    ds = data.InstructionDataset(entries, gpt2_tokenizer, return_prompt_length=True)
    _, targets = data.custom_collate_fn([ds[i] for i in range(4)], mask_prompt=True)
    for row, entry in zip(targets.tolist(), entries, strict=True):
        kept = [t for t in row if t != IGN]
        assert kept[-1] == data.EOS_TOKEN_ID
        assert gpt2_tokenizer.decode(kept[:-1]) == data.format_response(entry)
