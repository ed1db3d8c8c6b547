"""Property-based tests (hypothesis) for the functions that take user data.

Validation on arbitrary JSON values, the prompt format on arbitrary entries, the collate
function on arbitrary batches of token ids, and every reader of a file the project writes
(checkpoint, model file, LoRA adapter, responses and preference JSON, run config) on damaged
and random bytes. Each property runs on ~75 random examples (no example database is written).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
from pathlib import Path

import pytest
import torch

from course import instruction_data as data
from course.collate_drafts import collate_draft_3
from course.instruction_data import ChapterError
from helpers import IGN, PAD, make_entries, tiny_config, tiny_model
from preference_data import SAMPLE_PREFERENCE_PATH as SAMPLE_PREFERENCE

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


# --------------------------------------------------------------------------------------
# File readers: damaged and random bytes read correctly or raise the project's own error
# --------------------------------------------------------------------------------------

FILE_PROPERTY = hypothesis.settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)


def _good_files(folder: Path) -> dict[str, Path]:
    """One file of each kind, as the project writes it (with its checksum beside it)."""
    from dataclasses import asdict

    from course.lora import apply_lora, save_lora_adapter
    from runtime import outputs, trainer
    from runtime.run_config import RunConfig

    model = tiny_model(1)
    optimizer = torch.optim.AdamW(model.parameters())
    shuffle = {"epoch_start": None, "now": None}
    files = {
        "checkpoint": trainer.save_checkpoint(
            folder / "checkpoint.pt", model, optimizer, trainer.TrainState(), shuffle
        ),
        "model": outputs.save_model(model, folder / "m-sft.pth"),
        "responses": outputs.save_json(
            [{**e, "model_response": "x", "score": 7} for e in make_entries(3)],
            folder / "responses.json",
            checksum=True,
        ),
        "preference": outputs.save_json(
            json.loads(SAMPLE_PREFERENCE.read_text()), folder / "pref.json", checksum=True
        ),
        "run config": outputs.save_json(
            asdict(RunConfig.smoke_preset()), folder / "run-config.json", checksum=True
        ),
    }
    lora_model = tiny_model(2)
    apply_lora(lora_model, 2, 4.0, quiet=True)
    files["adapter"] = save_lora_adapter(lora_model, folder / "a-lora-adapter.pth")
    return files


def _read(kind: str, path: Path):
    """Read ``path`` with the project's reader of files of ``kind``."""
    from course.lora import load_lora_adapter
    from preference_data import load_preference_data
    from runtime import outputs, trainer
    from runtime.model_file import load_model_file
    from runtime.run_config import RunConfig, read_saved_config

    if kind == "checkpoint":
        model = tiny_model(5)
        return trainer.load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    if kind == "model":
        return load_model_file(path, n_heads=tiny_config()["n_heads"])
    if kind == "adapter":
        return load_lora_adapter(tiny_model(6), path)
    if kind == "preference":
        return load_preference_data(path)
    if kind == "run config":
        return read_saved_config(path, RunConfig, "start a new run")
    return outputs.read_json(path, "delete it")


FILE_KINDS = ["checkpoint", "model", "adapter", "responses", "preference", "run config"]
_ORIGINALS: dict[str, bytes] = {}


def _original(kind: str) -> bytes:
    if not _ORIGINALS:
        with tempfile.TemporaryDirectory() as folder:
            for name, path in _good_files(Path(folder)).items():
                _ORIGINALS[name] = path.read_bytes()
    return _ORIGINALS[kind]


# a damage: (position as a fraction of the size, what happens there, random bytes)
damages = st.lists(
    st.tuples(
        st.floats(0, 1, exclude_max=True),
        st.sampled_from(["flip", "cut", "insert", "overwrite"]),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=3,
)


def _damage(data: bytes, changes) -> bytes:
    out = bytearray(data)
    for where, how, noise in changes:
        i = int(where * len(out)) if out else 0
        if how == "flip" and out:
            out[i] ^= noise[0] or 1
        elif how == "cut":
            del out[i:]
        elif how == "insert":
            out[i:i] = noise
        else:
            out[i : i + len(noise)] = noise
    return bytes(out)


def _expect_read_or_own_error(kind: str, data: bytes, *, checksum: bool) -> None:
    """Write ``data`` as a file of ``kind`` (its recorded checksum beside it, or none) and
    read it: it reads (then it must be unchanged, if checked), or raises a ChapterError."""
    from runtime import outputs

    original = _original(kind)
    with tempfile.TemporaryDirectory() as folder:
        name = {"checkpoint": "checkpoint.pt", "run config": "run-config.json"}.get(kind, kind)
        path = Path(folder) / name
        path.write_bytes(data)
        if checksum:
            digest = hashlib.sha256(original).hexdigest()
            outputs.checksum_path(path).write_text(f"{digest}  {name}\n")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                _read(kind, path)
        except ChapterError as exc:
            assert "\n" not in str(exc) or kind == "preference", str(exc)
            assert not (checksum and data == original), f"the written file was refused: {exc}"
            if checksum and data != original:
                assert "is damaged" in str(exc)
        else:
            assert not checksum or data == original  # a checked file reads only if unchanged


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_the_file_as_written_reads(kind):
    _expect_read_or_own_error(kind, _original(kind), checksum=True)


@pytest.mark.parametrize("checksum", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("kind", FILE_KINDS)
@FILE_PROPERTY
@given(changes=damages)
def test_a_damaged_file_reads_or_raises_the_projects_error(kind, checksum, changes):
    _expect_read_or_own_error(kind, _damage(_original(kind), changes), checksum=checksum)


@pytest.mark.parametrize("kind", FILE_KINDS)
@FILE_PROPERTY
@given(data=st.binary(max_size=2000))
def test_random_bytes_raise_the_projects_error(kind, data):
    _expect_read_or_own_error(kind, data, checksum=False)


json_documents = json_values.map(lambda v: json.dumps(v).encode()) | st.integers(1, 3000).map(
    lambda depth: ("[" * depth + "]" * depth).encode()
)


@pytest.mark.parametrize("kind", ["responses", "preference", "run config"])
@FILE_PROPERTY
@given(data=json_documents)
def test_any_json_document_reads_or_raises_the_projects_error(kind, data):
    _expect_read_or_own_error(kind, data, checksum=False)
