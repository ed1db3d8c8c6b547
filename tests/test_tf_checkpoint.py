"""Tests for tf_checkpoint: CRC32C, protobuf records, the index and the tensor data.

The tiny GPT-2-shaped checkpoint in tests/fixtures was written by real TensorFlow
(tests/fixtures/make_tf_fixture.py), so the TensorFlow-free reader is checked against the
genuine format; the real OpenAI 124M index in ../shared is used when present.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tf_checkpoint as tfc
from helpers import FIXTURES, TINY_CHECKPOINT
from previous_chapters import GPTModel, gpt2_config_from_hparams, load_weights_into_gpt

TINY = TINY_CHECKPOINT
DATA_FILE = "model.ckpt.data-00000-of-00001"


def _load_fixture_script():
    spec = importlib.util.spec_from_file_location(
        "make_tf_fixture", FIXTURES / "make_tf_fixture.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixture_script = _load_fixture_script()
WEIGHTS = fixture_script.make_weights()  # the arrays TensorFlow wrote, rebuilt without it
HPARAMS = fixture_script.HPARAMS


def _copy_tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "124M"
    shutil.copytree(TINY, folder)
    return folder


# ---------------------------------------------------------------------------
# CRC32C and the protobuf decoder
# ---------------------------------------------------------------------------

# Known CRC32C values (RFC 3720, appendix B.4, and the usual check string)
CRC_VECTORS = [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


def test_crc32c_known_vectors():
    for data, expected in CRC_VECTORS:
        assert tfc.crc32c(data) == expected, data


def test_crc32c_continues_a_running_crc():
    data = bytes(range(256)) * 40
    for cut in (0, 1, 1000, len(data)):
        assert tfc.crc32c(data[cut:], tfc.crc32c(data[:cut])) == tfc.crc32c(data)


def test_mask_crc_rotates_right_15_and_adds_the_constant():
    assert tfc.mask_crc(0) == 0xA282EAD8
    assert tfc.mask_crc(1) == (1 << 17) + 0xA282EAD8
    assert tfc.mask_crc(1 << 15) == 1 + 0xA282EAD8
    assert tfc.mask_crc(0xFFFFFFFF) == (0xFFFFFFFF + 0xA282EAD8) & 0xFFFFFFFF


def test_protobuf_decoder():
    assert tfc._read_varint(b"\x96\x01", 0) == (150, 2)
    # field 1 varint 150, field 2 bytes "ab", field 3 fixed32, field 4 varint -1 (int64)
    message = b"\x08\x96\x01\x12\x02ab\x1d\x01\x00\x00\x00" + b"\x20" + b"\xff" * 9 + b"\x01"
    fields = tfc._parse_message(message)
    assert fields[1] == [150] and fields[2] == [b"ab"] and fields[3] == [1]
    assert tfc._int64(fields[4][0]) == -1
    with pytest.raises(ValueError, match="cut short"):
        tfc._parse_message(b"\x12\x05ab")


# ---------------------------------------------------------------------------
# Reading the TensorFlow-written fixture
# ---------------------------------------------------------------------------


def test_list_variables_matches_what_tensorflow_wrote():
    expected = sorted((name, list(w.shape)) for name, w in WEIGHTS.items())
    assert tfc.list_variables(TINY / "model.ckpt") == expected


def test_load_variable_returns_the_exact_arrays():
    for name, weight in WEIGHTS.items():
        array = tfc.load_variable(TINY / "model.ckpt", name)
        assert array.dtype == np.float32 and array.flags.writeable
        np.testing.assert_array_equal(array, weight)


def test_unknown_variable_is_a_key_error_with_close_names():
    with pytest.raises(KeyError, match=r"model/h1/mlp/c_fc/w"):
        tfc.load_variable(TINY / "model.ckpt", "model/h1/mlp/c_fc/W")


def _course_params(weights: dict, n_layer: int) -> dict:
    """The course's params layout, written out by hand from TF-named weights."""

    def w(name):
        return np.squeeze(weights[name])

    blocks = []
    for i in range(n_layer):
        h = f"model/h{i}"
        blocks.append(
            {
                "attn": {
                    "c_attn": {"w": w(f"{h}/attn/c_attn/w"), "b": w(f"{h}/attn/c_attn/b")},
                    "c_proj": {"w": w(f"{h}/attn/c_proj/w"), "b": w(f"{h}/attn/c_proj/b")},
                },
                "mlp": {
                    "c_fc": {"w": w(f"{h}/mlp/c_fc/w"), "b": w(f"{h}/mlp/c_fc/b")},
                    "c_proj": {"w": w(f"{h}/mlp/c_proj/w"), "b": w(f"{h}/mlp/c_proj/b")},
                },
                "ln_1": {"g": w(f"{h}/ln_1/g"), "b": w(f"{h}/ln_1/b")},
                "ln_2": {"g": w(f"{h}/ln_2/g"), "b": w(f"{h}/ln_2/b")},
            }
        )
    return {
        "wte": w("model/wte"),
        "wpe": w("model/wpe"),
        "blocks": blocks,
        "g": w("model/ln_f/g"),
        "b": w("model/ln_f/b"),
    }


def _assert_same_tree(actual, expected, where="params"):
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_same_tree(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same_tree(a, e, f"{where}[{i}]")
    else:
        assert actual.shape == expected.shape, where
        np.testing.assert_array_equal(actual, expected, err_msg=where)


def test_params_are_in_the_course_layout():
    params = tfc.load_gpt2_params_from_tf_ckpt(TINY / "model.ckpt", HPARAMS)
    _assert_same_tree(params, _course_params(WEIGHTS, HPARAMS["n_layer"]))
    assert params["blocks"][0]["attn"]["c_attn"]["w"].shape == (32, 96)  # conv1d [1,...] squeezed


def test_params_refuse_hparams_of_another_model():
    with pytest.raises(tfc.CheckpointError, match="n_layer=3"):
        tfc.load_gpt2_params_from_tf_ckpt(TINY / "model.ckpt", HPARAMS | {"n_layer": 3})
    with pytest.raises(tfc.CheckpointError, match="wte"):
        tfc.load_gpt2_params_from_tf_ckpt(TINY / "model.ckpt", HPARAMS | {"n_vocab": 50257})


def test_truncated_data_shard_is_refused(tmp_path):
    folder = _copy_tiny(tmp_path)
    data = (folder / DATA_FILE).read_bytes()
    (folder / DATA_FILE).write_bytes(data[: len(data) // 2])
    reader = tfc.CheckpointReader(folder / "model.ckpt")
    refused = 0
    for name, entry in reader.entries.items():
        if entry.offset + entry.size <= len(data) // 2:
            np.testing.assert_array_equal(reader.read(name), WEIGHTS[name])
        else:
            with pytest.raises(tfc.CheckpointError, match=f"truncated: tensor '{name}'"):
                reader.read(name)
            refused += 1
    assert refused > 0


def test_corrupt_index_block_is_refused(tmp_path):
    folder = _copy_tiny(tmp_path)
    index = bytearray((folder / "model.ckpt.index").read_bytes())
    assert index.find(b"model/h0/attn/c_attn/b") < 100  # the data block starts the file
    index[40] ^= 0x20
    (folder / "model.ckpt.index").write_bytes(index)
    with pytest.raises(tfc.CheckpointError) as caught:
        tfc.list_variables(folder / "model.ckpt")
    message = str(caught.value)
    assert "model.ckpt.index is not a usable checkpoint index: corrupt block at byte 0" in message
    assert "Delete" in message
    (folder / "model.ckpt.index").write_bytes(b"not an sstable")
    with pytest.raises(tfc.CheckpointError, match="magic number"):
        tfc.list_variables(folder / "model.ckpt")
    with pytest.raises(ValueError, match="magic number"):  # the reader's own, plain error
        tfc.read_index(folder / "model.ckpt.index")


# ---------------------------------------------------------------------------
# The real GPT-2 124M index from ../shared
# ---------------------------------------------------------------------------

GPT2_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


def test_real_index_lists_all_148_tensors_with_gpt2_shapes(shared_dir):
    variables = tfc.list_variables(shared_dir / "fixtures/gpt2-124M-partial/model.ckpt")
    assert len(variables) == 148
    assert [name for name, _ in variables] == sorted(name for name, _ in variables)
    shapes = dict(variables)
    expected = fixture_script.variable_shapes(GPT2_124M)
    assert shapes == {name: list(shape) for name, shape in expected.items()}
    assert shapes["model/wte"] == [50257, 768] and shapes["model/wpe"] == [1024, 768]
    assert shapes["model/h11/attn/c_attn/w"] == [1, 768, 2304]
    assert shapes["model/h0/mlp/c_proj/w"] == [1, 3072, 768]


def test_real_index_reads_the_complete_tensor_and_refuses_the_rest(shared_dir):
    folder = shared_dir / "fixtures/gpt2-124M-partial"
    reader = tfc.CheckpointReader(folder / "model.ckpt")
    entry = reader.entry("model/h0/attn/c_attn/b")
    raw = (folder / DATA_FILE).read_bytes()[entry.offset : entry.offset + entry.size]
    assert tfc.mask_crc(tfc.crc32c(raw)) == entry.masked_crc32c

    bias = reader.read("model/h0/attn/c_attn/b")
    assert bias.shape == (2304,) and bias.dtype == np.float32
    # the bytes whose CRC32C matched above, read as little-endian float32
    np.testing.assert_array_equal(bias, np.frombuffer(raw, dtype="<f4"))

    for name in reader.entries:
        if name != "model/h0/attn/c_attn/b":
            with pytest.raises(tfc.CheckpointError) as caught:
                reader.read(name)
            message = str(caught.value)
            assert f"'{name}'" in message and "truncated" in message and DATA_FILE in message
    with pytest.raises(tfc.CheckpointError, match="truncated"):
        tfc.load_gpt2_params_from_tf_ckpt(folder / "model.ckpt", GPT2_124M)


# ---------------------------------------------------------------------------
# The weights read drive the course's GPTModel like GPT-2
# ---------------------------------------------------------------------------


def _numpy_gpt2_logits(weights: dict, hp: dict, ids: list[int]) -> np.ndarray:
    """GPT-2's forward pass in float64 numpy, straight from the TF-named weights."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    n, d, heads = len(ids), hp["n_embd"], hp["n_head"]

    def layer_norm(x, prefix):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w[f"{prefix}/g"] + w[f"{prefix}/b"]

    def linear(x, prefix):
        return x @ w[f"{prefix}/w"][0] + w[f"{prefix}/b"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = w["model/wte"][ids] + w["model/wpe"][:n]
    future = np.triu(np.ones((n, n), dtype=bool), k=1)
    for i in range(hp["n_layer"]):
        h = f"model/h{i}"
        q, k, v = np.split(linear(layer_norm(x, f"{h}/ln_1"), f"{h}/attn/c_attn"), 3, axis=-1)
        q, k, v = (t.reshape(n, heads, d // heads).transpose(1, 0, 2) for t in (q, k, v))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d // heads)
        scores[:, future] = -np.inf
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        x = x + linear((attn @ v).transpose(1, 0, 2).reshape(n, d), f"{h}/attn/c_proj")
        x = x + linear(gelu(linear(layer_norm(x, f"{h}/ln_2"), f"{h}/mlp/c_fc")), f"{h}/mlp/c_proj")
    return layer_norm(x, "model/ln_f") @ w["model/wte"].T


def test_read_weights_give_gpt_model_the_logits_of_gpt2():
    params = tfc.load_gpt2_params_from_tf_ckpt(TINY / "model.ckpt", HPARAMS)
    cfg = gpt2_config_from_hparams(HPARAMS)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    load_weights_into_gpt(model, params)

    ids = [3, 17, 499, 0, 250, 42, 8, 8, 131]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).numpy()[0]
    expected = _numpy_gpt2_logits(WEIGHTS, HPARAMS, ids)
    assert logits.shape == (len(ids), HPARAMS["n_vocab"])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
