"""Batching (7.3) and data loaders (7.4): exact collate tensors, masking, the dataset, loaders."""

from __future__ import annotations

import pytest
import torch

import instruction_finetuning as ift

PAD = 50256
IGN = -100
COURSE_BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]


class CharTokenizer:
    """One token per character: prompt lengths and texts are easy to check by hand."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


def test_course_example_exact_tensors():
    inputs, targets = ift.custom_collate_fn(COURSE_BATCH)
    assert inputs.tolist() == [
        [0, 1, 2, 3, 4],
        [5, 6, PAD, PAD, PAD],
        [7, 8, 9, PAD, PAD],
    ]
    assert targets.tolist() == [
        [1, 2, 3, 4, PAD],
        [6, PAD, IGN, IGN, IGN],
        [8, 9, PAD, IGN, IGN],
    ]
    assert inputs.dtype == targets.dtype == torch.int64


def test_items_are_not_modified():
    batch = [list(x) for x in COURSE_BATCH]
    ift.custom_collate_fn(batch)
    assert batch == COURSE_BATCH


def test_custom_pad_and_ignore_index():
    inputs, targets = ift.custom_collate_fn([[3, 4, 5], [6]], pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[3, 4, 5], [6, 0, 0]]
    assert targets.tolist() == [[4, 5, 0], [0, -1, -1]]


def test_truncation_to_allowed_max_length():
    inputs, targets = ift.custom_collate_fn(COURSE_BATCH, allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, PAD], [7, 8, 9]]
    assert targets.tolist() == [[1, 2, 3], [6, PAD, IGN], [8, 9, PAD]]


def test_device_argument_moves_tensors():
    inputs, targets = ift.custom_collate_fn(COURSE_BATCH, device="meta")
    assert inputs.device.type == targets.device.type == "meta"
    assert inputs.shape == targets.shape == (3, 5)
    inputs, _ = ift.custom_collate_fn(COURSE_BATCH, device=torch.device("cpu"))
    assert inputs.device.type == "cpu"


def test_pad_token_inside_an_item_is_kept_as_a_target():
    # the padding is found by position, so a real 50256 in the text is not masked
    inputs, targets = ift.custom_collate_fn([[1, PAD, 2], [3]])
    assert targets.tolist() == [[PAD, 2, PAD], [PAD, IGN, IGN]]


def test_pairs_without_mask_give_the_course_tensors():
    pairs = [(ids, 2) for ids in COURSE_BATCH]
    plain = ift.custom_collate_fn(COURSE_BATCH)
    paired = ift.custom_collate_fn(pairs)
    assert torch.equal(plain[0], paired[0]) and torch.equal(plain[1], paired[1])


def test_prompt_masking():
    # prompt lengths 3, 1, 2: the targets that predict prompt tokens (the first
    # prompt_length - 1) are ignored; response tokens and the end-of-text stay
    batch = [([0, 1, 2, 3, 4], 3), ([5, 6], 1), ([7, 8, 9], 2)]
    inputs, targets = ift.custom_collate_fn(batch, mask_prompt=True)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
    assert targets.tolist() == [
        [IGN, IGN, 3, 4, PAD],
        [6, PAD, IGN, IGN, IGN],
        [IGN, 9, PAD, IGN, IGN],
    ]


def test_prompt_masking_then_truncation():
    batch = [([0, 1, 2, 3, 4], 3), ([5, 6], 1)]
    _, targets = ift.custom_collate_fn(batch, mask_prompt=True, allowed_max_length=3)
    assert targets.tolist() == [[IGN, IGN, 3], [6, PAD, IGN]]


def test_prompt_masking_needs_prompt_lengths():
    with pytest.raises(ValueError, match="return_prompt_length=True"):
        ift.custom_collate_fn(COURSE_BATCH, mask_prompt=True)


# --- dataset and loaders -------------------------------------------------------------------

ENTRIES = [
    {"instruction": "Say hi.", "input": "", "output": "Hi."},
    {"instruction": "Add.", "input": "1+1", "output": "2"},
    {"instruction": "Spell cat.", "input": "", "output": "c-a-t"},
]


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_dataset_pretokenizes_prompt_and_response(style):
    tok = CharTokenizer()
    ds = ift.InstructionDataset(ENTRIES, tok, style=style)
    assert len(ds) == 3
    for i, entry in enumerate(ENTRIES):
        prompt = ift.format_input(entry, style)
        assert tok.decode(ds[i]) == prompt + ift.format_response(entry, style)
        assert ds.prompt_lengths[i] == len(prompt)
    pairs = ift.InstructionDataset(ENTRIES, tok, style=style, return_prompt_length=True)
    assert pairs[1] == (ds[1], ds.prompt_lengths[1])


def test_masked_collate_on_dataset_keeps_only_the_response_in_the_loss():
    tok = CharTokenizer()
    ds = ift.InstructionDataset(ENTRIES, tok, return_prompt_length=True)
    _, targets = ift.custom_collate_fn([ds[0], ds[1]], mask_prompt=True)
    for row, entry in zip(targets.tolist(), ENTRIES[:2], strict=True):
        kept = [t for t in row if t != IGN]
        assert tok.decode(kept[:-1]) == ift.format_response(entry)
        assert kept[-1] == PAD


def make_entries(n: int) -> list[dict]:
    return [{"instruction": f"t{i}", "input": "x" * (i % 3), "output": "y" * i} for i in range(n)]


def test_create_dataloaders_settings():
    tok = CharTokenizer()
    train, val, test = make_entries(18), make_entries(5), make_entries(6)
    tl, vl, sl = ift.create_dataloaders(train, val, test, tok, batch_size=4, allowed_max_length=40)
    assert (len(tl), len(vl), len(sl)) == (4, 2, 2)  # train drops its last partial batch
    assert sum(x.shape[0] for x, _ in tl) == 16
    assert sum(x.shape[0] for x, _ in vl) == 5 and sum(x.shape[0] for x, _ in sl) == 6
    assert all(x.shape[1] <= 40 for x, _ in tl)
    assert tl.num_workers == vl.num_workers == 0
    # val/test keep the file order: the first batch holds entries 0..3
    first_inputs, _ = next(iter(vl))
    expected, _ = ift.custom_collate_fn(
        [ift.InstructionDataset(val[:4], tok)[i] for i in range(4)], allowed_max_length=40
    )
    assert torch.equal(first_inputs, expected)


def test_train_loader_shuffles_reproducibly():
    tok = CharTokenizer()
    data = make_entries(32)

    def first_epoch(seed):
        tl, vl, _ = ift.create_dataloaders(data, data, data[:2], tok, batch_size=4, seed=seed)
        torch.manual_seed(999)  # the loader's own generator decides, not the global seed
        return [x.tolist() for x, _ in tl], [x.tolist() for x, _ in vl]

    (a, in_order), (b, _), (c, _) = first_epoch(123), first_epoch(123), first_epoch(7)
    assert a == b and a != c
    assert a != in_order  # the validation loader of the same data keeps the file order


def test_masked_loaders():
    tok = CharTokenizer()
    data = make_entries(8)
    tl, _, _ = ift.create_dataloaders(data, data, data, tok, batch_size=4, mask_prompt=True)
    _, targets = next(iter(tl))
    assert (targets[:, :10] == IGN).all()  # every alpaca prompt is longer than 10 chars
