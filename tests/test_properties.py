"""Property-based tests (hypothesis) for the functions that take user data.

Validation on arbitrary JSON values, the prompt format on arbitrary entries, and the collate
function on arbitrary batches of token ids. Each property runs on ~75 random examples
(no example database is written).
"""

from __future__ import annotations

import pytest
import torch

import instruction_data as data
from collate_drafts import collate_draft_3
from helpers import IGN, PAD

hypothesis = pytest.importorskip(
    "hypothesis", reason="the property tests need hypothesis (pip install -r requirements-dev.txt)"
)
given, st = hypothesis.given, hypothesis.strategies
PROPERTY = hypothesis.settings(max_examples=75, deadline=None, database=None)

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
# well-formed entries, and entries that are wrong in one or two ways or entirely
good_entry = st.fixed_dictionaries(
    {key: st.text(max_size=20) for key in data.REQUIRED_KEYS},
    optional={"extra": json_scalars},
)
field_values = st.text(max_size=20) | json_scalars
entry_like = (
    good_entry
    | st.dictionaries(st.sampled_from([*data.REQUIRED_KEYS, "extra"]), field_values)
    | json_values
)
data_like = (
    st.lists(good_entry, min_size=1, max_size=6) | st.lists(entry_like, max_size=8) | json_values
)

texts = st.text(max_size=40)
entries = st.fixed_dictionaries({"instruction": texts, "input": texts, "output": texts})
token_ids = st.lists(st.integers(0, PAD), min_size=1, max_size=12)  # PAD may occur inside
batches = st.lists(token_ids, min_size=1, max_size=5)
prompt_pairs = token_ids.flatmap(lambda ids: st.tuples(st.just(ids), st.integers(0, len(ids))))


def _well_formed(entry) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(key), str) for key in data.REQUIRED_KEYS
    )


# --------------------------------------------------------------------------------------
# validate_instruction_data
# --------------------------------------------------------------------------------------


@PROPERTY
@given(data_like)
def test_validation_accepts_exactly_the_well_formed_lists(value):
    well_formed = isinstance(value, list) and bool(value) and all(map(_well_formed, value))
    try:
        data.validate_instruction_data(value, "src")  # any other exception fails the test
    except data.DatasetError as exc:
        assert not well_formed
        message = str(exc)
        assert message.startswith("src: ")
        if isinstance(value, list) and value:
            first_bad = next(i for i, entry in enumerate(value) if not _well_formed(entry))
            assert message.split("\n")[1].startswith(f"src: entry {first_bad}: ")
    else:
        assert well_formed


# --------------------------------------------------------------------------------------
# format_input
# --------------------------------------------------------------------------------------


@PROPERTY
@given(entries, st.sampled_from(sorted(data.PROMPT_STYLES)))
def test_format_input_is_header_instruction_then_input_if_any(entry, style_name):
    style = data.PROMPT_STYLES[style_name]
    prompt = data.format_input(entry, style_name)
    head = style.header + entry["instruction"]
    assert prompt.startswith(head)
    assert prompt[len(head) :] == (style.input_sep + entry["input"] if entry["input"] else "")
    full = prompt + data.format_response(entry, style_name)
    assert full == prompt + style.response_sep + entry["output"]


@PROPERTY
@given(st.fixed_dictionaries({key: st.text("ab :\n", max_size=15) for key in data.REQUIRED_KEYS}))
def test_alpaca_has_an_input_section_iff_the_input_is_non_empty(entry):
    # texts without "#", so that only the template can write the "### Input:" marker
    assert ("### Input:" in data.format_input(entry)) == bool(entry["input"])


# --------------------------------------------------------------------------------------
# custom_collate_fn
# --------------------------------------------------------------------------------------


@PROPERTY
@given(batches)
def test_collate_pads_inputs_and_shifts_targets(batch):
    inputs, targets = data.custom_collate_fn(batch)
    width = max(len(ids) for ids in batch)
    assert inputs.shape == targets.shape == (len(batch), width)
    for row, ids in enumerate(batch):
        padding = width - len(ids)
        assert inputs[row].tolist() == ids + [PAD] * padding
        # the next token at each position; the first end-of-text stays, the padding is ignored
        assert targets[row].tolist() == ids[1:] + [PAD] + [IGN] * padding
    draft_inputs, draft_targets = collate_draft_3(batch)
    assert torch.equal(inputs, draft_inputs) and torch.equal(targets, draft_targets)


@PROPERTY
@given(batches, st.integers(1, 14))
def test_collate_cuts_both_to_allowed_max_length(batch, allowed):
    inputs, targets = data.custom_collate_fn(batch, allowed_max_length=allowed)
    full_inputs, full_targets = data.custom_collate_fn(batch)
    assert torch.equal(inputs, full_inputs[:, :allowed])
    assert torch.equal(targets, full_targets[:, :allowed])
    draft_inputs, draft_targets = collate_draft_3(batch, allowed_max_length=allowed)
    assert torch.equal(inputs, draft_inputs) and torch.equal(targets, draft_targets)


@PROPERTY
@given(st.lists(prompt_pairs, min_size=1, max_size=5))
def test_mask_prompt_ignores_exactly_the_targets_inside_the_prompt(pairs):
    inputs, targets = data.custom_collate_fn(pairs, mask_prompt=True)
    plain_inputs, plain_targets = data.custom_collate_fn([ids for ids, _ in pairs])
    assert torch.equal(inputs, plain_inputs)
    for row, (_, prompt_length) in enumerate(pairs):
        masked = max(prompt_length - 1, 0)  # targets[j] predicts token j + 1
        assert (targets[row, :masked] == IGN).all()
        assert torch.equal(targets[row, masked:], plain_targets[row, masked:])
