"""Tests for gpt_download: CRC32C, the TensorFlow-free checkpoint reader, the downloader.

Everything runs offline: the "mirror" is an HTTP server on 127.0.0.1 started by
the tests, serving a tiny GPT-2-shaped checkpoint written by real TensorFlow
(tests/fixtures/make_tf_fixture.py). The real OpenAI index in ../shared is used
when present.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt_download as gd
from helpers import FIXTURES, TINY_CHECKPOINT, Mirror, closed_port
from previous_chapters import GPTModel, gpt2_config, load_weights_into_gpt

TINY = TINY_CHECKPOINT
DATA_FILE = "model.ckpt.data-00000-of-00001"
FAST = {"retries": 2, "backoff": 0.0, "timeout": 10.0, "progress": False}


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


@pytest.fixture
def mirror(tmp_path):
    """A loopback mirror laid out as {base}/{size}/{file}, serving the tiny checkpoint."""
    shutil.copytree(TINY, tmp_path / "mirror" / "124M")
    with Mirror(tmp_path / "mirror") as server:
        yield server


@pytest.fixture
def dead_url():
    """A loopback URL where nothing listens: every connection is refused."""
    return f"http://127.0.0.1:{closed_port()}"


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
        assert gd.crc32c(data) == expected, data


def test_crc32c_continues_a_running_crc():
    data = bytes(range(256)) * 40
    for cut in (0, 1, 1000, len(data)):
        assert gd.crc32c(data[cut:], gd.crc32c(data[:cut])) == gd.crc32c(data)


def test_mask_crc_rotates_right_15_and_adds_the_constant():
    assert gd.mask_crc(0) == 0xA282EAD8
    assert gd.mask_crc(1) == (1 << 17) + 0xA282EAD8
    assert gd.mask_crc(1 << 15) == 1 + 0xA282EAD8
    assert gd.mask_crc(0xFFFFFFFF) == (0xFFFFFFFF + 0xA282EAD8) & 0xFFFFFFFF


def test_protobuf_decoder():
    assert gd._read_varint(b"\x96\x01", 0) == (150, 2)
    # field 1 varint 150, field 2 bytes "ab", field 3 fixed32, field 4 varint -1 (int64)
    message = b"\x08\x96\x01\x12\x02ab\x1d\x01\x00\x00\x00" + b"\x20" + b"\xff" * 9 + b"\x01"
    fields = gd._parse_message(message)
    assert fields[1] == [150] and fields[2] == [b"ab"] and fields[3] == [1]
    assert gd._int64(fields[4][0]) == -1
    with pytest.raises(ValueError, match="cut short"):
        gd._parse_message(b"\x12\x05ab")


# ---------------------------------------------------------------------------
# Reading the TensorFlow-written fixture
# ---------------------------------------------------------------------------


def test_list_variables_matches_what_tensorflow_wrote():
    expected = sorted((name, list(w.shape)) for name, w in WEIGHTS.items())
    assert gd.list_variables(TINY / "model.ckpt") == expected


def test_load_variable_returns_the_exact_arrays():
    for name, weight in WEIGHTS.items():
        array = gd.load_variable(TINY / "model.ckpt", name)
        assert array.dtype == np.float32 and array.flags.writeable
        np.testing.assert_array_equal(array, weight)


def test_unknown_variable_is_a_key_error_with_close_names():
    with pytest.raises(KeyError, match=r"model/h1/mlp/c_fc/w"):
        gd.load_variable(TINY / "model.ckpt", "model/h1/mlp/c_fc/W")


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
    params = gd.load_gpt2_params_from_tf_ckpt(TINY / "model.ckpt", HPARAMS)
    _assert_same_tree(params, _course_params(WEIGHTS, HPARAMS["n_layer"]))
    assert params["blocks"][0]["attn"]["c_attn"]["w"].shape == (32, 96)  # conv1d [1,...] squeezed


def test_params_refuse_hparams_of_another_model():
    with pytest.raises(gd.CheckpointError, match="n_layer=3"):
        gd.load_gpt2_params_from_tf_ckpt(TINY / "model.ckpt", HPARAMS | {"n_layer": 3})
    with pytest.raises(gd.CheckpointError, match="wte"):
        gd.load_gpt2_params_from_tf_ckpt(TINY / "model.ckpt", HPARAMS | {"n_vocab": 50257})


def _copy_tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "124M"
    shutil.copytree(TINY, folder)
    return folder


def test_flipped_byte_in_the_data_shard_is_caught_by_the_tensor_crc(tmp_path, dead_url):
    folder = _copy_tiny(tmp_path)
    entry = gd.CheckpointReader(folder / "model.ckpt").entry("model/h1/mlp/c_fc/w")
    data = bytearray((folder / DATA_FILE).read_bytes())
    data[entry.offset + 123] ^= 0x01
    (folder / DATA_FILE).write_bytes(data)

    with pytest.raises(gd.CheckpointError) as caught:  # the folder is complete: no network
        gd.download_and_load_gpt2("124M", folder.parent, dead_url, backup_base_url=None, **FAST)
    message = str(caught.value)
    assert "'model/h1/mlp/c_fc/w'" in message and "CRC32C" in message
    assert str(folder / DATA_FILE) in message and "Delete" in message
    # the other tensors are intact
    np.testing.assert_array_equal(
        gd.load_variable(folder / "model.ckpt", "model/h1/mlp/c_fc/b"),
        WEIGHTS["model/h1/mlp/c_fc/b"],
    )


def test_truncated_data_shard_is_refused(tmp_path):
    folder = _copy_tiny(tmp_path)
    data = (folder / DATA_FILE).read_bytes()
    (folder / DATA_FILE).write_bytes(data[: len(data) // 2])
    reader = gd.CheckpointReader(folder / "model.ckpt")
    refused = 0
    for name, entry in reader.entries.items():
        if entry.offset + entry.size <= len(data) // 2:
            np.testing.assert_array_equal(reader.read(name), WEIGHTS[name])
        else:
            with pytest.raises(gd.CheckpointError, match=f"truncated: tensor '{name}'"):
                reader.read(name)
            refused += 1
    assert refused > 0


def test_corrupt_index_block_is_refused(tmp_path):
    folder = _copy_tiny(tmp_path)
    index = bytearray((folder / "model.ckpt.index").read_bytes())
    assert index.find(b"model/h0/attn/c_attn/b") < 100  # the data block starts the file
    index[40] ^= 0x20
    (folder / "model.ckpt.index").write_bytes(index)
    with pytest.raises(gd.CheckpointError, match=r"model\.ckpt\.index is corrupt"):
        gd.list_variables(folder / "model.ckpt")
    (folder / "model.ckpt.index").write_bytes(b"not an sstable")
    with pytest.raises(gd.CheckpointError, match="magic number"):
        gd.list_variables(folder / "model.ckpt")


# ---------------------------------------------------------------------------
# The real GPT-2 124M index from ../shared
# ---------------------------------------------------------------------------

GPT2_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


def test_real_index_lists_all_148_tensors_with_gpt2_shapes(shared_dir):
    variables = gd.list_variables(shared_dir / "fixtures/gpt2-124M-partial/model.ckpt")
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
    reader = gd.CheckpointReader(folder / "model.ckpt")
    entry = reader.entry("model/h0/attn/c_attn/b")
    raw = (folder / DATA_FILE).read_bytes()[entry.offset : entry.offset + entry.size]
    assert gd.mask_crc(gd.crc32c(raw)) == entry.masked_crc32c

    bias = reader.read("model/h0/attn/c_attn/b")
    assert bias.shape == (2304,) and bias.dtype == np.float32
    # the bytes whose CRC32C matched above, read as little-endian float32
    np.testing.assert_array_equal(bias, np.frombuffer(raw, dtype="<f4"))

    for name in reader.entries:
        if name != "model/h0/attn/c_attn/b":
            with pytest.raises(gd.CheckpointError) as caught:
                reader.read(name)
            message = str(caught.value)
            assert f"'{name}'" in message and "truncated" in message and DATA_FILE in message
    with pytest.raises(gd.CheckpointError, match="truncated"):
        gd.load_gpt2_params_from_tf_ckpt(folder / "model.ckpt", GPT2_124M)


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------


def test_download_and_load_through_a_mirror_then_offline(mirror, tmp_path, dead_url):
    models = tmp_path / "models"
    settings, params = gd.download_and_load_gpt2(
        "124M", models, mirror.url, backup_base_url=dead_url, retries=1, backoff=0.0
    )
    assert settings == HPARAMS
    _assert_same_tree(params, _course_params(WEIGHTS, HPARAMS["n_layer"]))
    assert sorted(path for path, _ in mirror.requests) == sorted(
        f"/124M/{name}" for name in gd.FILENAMES
    )  # each file once; no .meta graph file
    for name in gd.FILENAMES:
        assert (models / "124M" / name).read_bytes() == (TINY / name).read_bytes()
    assert not list((models / "124M").glob("*.part"))

    # a re-run uses the complete folder and makes no request at all
    mirror.close()
    seen = len(mirror.requests)
    settings2, params2 = gd.download_and_load_gpt2(
        "124M", models, dead_url, backup_base_url=dead_url
    )
    assert len(mirror.requests) == seen and settings2 == settings
    _assert_same_tree(params2, params)


def test_base_url_from_the_environment(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_BASE_URL", mirror.url + "/")
    settings, _ = gd.download_and_load_gpt2("124M", tmp_path, backup_base_url=None, **FAST)
    assert settings == HPARAMS and len(mirror.requests) == len(gd.FILENAMES)


def test_backup_url_is_used_when_the_primary_fails(mirror, tmp_path, dead_url):
    settings, params = gd.download_and_load_gpt2(
        "124M", tmp_path, dead_url, backup_base_url=mirror.url, **FAST
    )
    assert settings == HPARAMS
    np.testing.assert_array_equal(params["wte"], WEIGHTS["model/wte"])


def test_unknown_model_size_lists_the_allowed_ones(tmp_path, mirror):
    with pytest.raises(ValueError, match="124M, 355M, 774M, 1558M"):
        gd.download_and_load_gpt2("125M", tmp_path, mirror.url)
    assert mirror.requests == []


def test_download_resumes_after_a_cut_connection(mirror, tmp_path):
    url = f"{mirror.url}/124M/{DATA_FILE}"
    mirror.plan[f"/124M/{DATA_FILE}"] = ["cut"]
    target = gd.download_file(url, tmp_path / DATA_FILE, **FAST)
    full = (TINY / DATA_FILE).read_bytes()
    assert target.read_bytes() == full
    (first, no_range), (second, resume) = mirror.requests
    assert first == second == f"/124M/{DATA_FILE}" and no_range is None
    # it asked only for what it lacked (the half it got, less any unwritten chunk)
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", resume)[1]) <= len(full) // 2
    assert not (tmp_path / f"{DATA_FILE}.part").exists()


def test_download_restarts_when_the_server_ignores_range(mirror, tmp_path):
    mirror.plan[f"/124M/{DATA_FILE}"] = ["cut", "ignore_range"]
    target = gd.download_file(f"{mirror.url}/124M/{DATA_FILE}", tmp_path / DATA_FILE, **FAST)
    assert target.read_bytes() == (TINY / DATA_FILE).read_bytes()
    assert mirror.requests[1][1] is not None  # it asked for a range and got the whole file


def test_a_partial_file_longer_than_the_file_starts_over(mirror, tmp_path):
    full = (TINY / DATA_FILE).read_bytes()
    (tmp_path / f"{DATA_FILE}.part").write_bytes(full + b"stale bytes of another file")
    target = gd.download_file(f"{mirror.url}/124M/{DATA_FILE}", tmp_path / DATA_FILE, **FAST)
    assert target.read_bytes() == full
    assert [r for _, r in mirror.requests] == [f"bytes={len(full) + 27}-", None]


def test_short_body_is_never_renamed_into_place(mirror, tmp_path):
    mirror.plan[f"/124M/{DATA_FILE}"] = ["cut ignore_range"] * 2
    destination = tmp_path / DATA_FILE
    with pytest.raises(gd.DownloadError) as caught:
        gd.download_file(f"{mirror.url}/124M/{DATA_FILE}", destination, **FAST)
    assert not destination.exists()
    part = tmp_path / f"{DATA_FILE}.part"
    assert 0 < part.stat().st_size <= (TINY / DATA_FILE).stat().st_size // 2
    assert "2 attempt(s)" in str(caught.value) and str(part) in str(caught.value)


def test_when_both_urls_fail_the_error_says_what_and_what_to_do(mirror, tmp_path, dead_url):
    mirror.plan["/124M/hparams.json"] = ["500"] * 2
    with pytest.raises(gd.DownloadError) as caught:
        gd.download_and_load_gpt2("124M", tmp_path, mirror.url, backup_base_url=dead_url, **FAST)
    message = str(caught.value)
    assert "hparams.json" in message and str(tmp_path / "124M" / "hparams.json") in message
    assert f"{mirror.url}/124M/hparams.json" in message and "500" in message
    assert f"{dead_url}/124M/hparams.json" in message
    assert "internet connection" in message and "GPT2_BASE_URL" in message
    assert "by hand" in message
    assert not (tmp_path / "124M" / "hparams.json").exists()


def test_a_missing_file_is_not_retried(mirror, tmp_path, download_sleeps):
    with pytest.raises(gd.DownloadError, match="404") as caught:
        gd.download_file(f"{mirror.url}/124M/model.ckpt.meta", tmp_path / "meta", **FAST)
    assert len(mirror.requests) == 1 and download_sleeps == []
    assert "1 attempt(s)" in str(caught.value)


def test_server_errors_are_retried_with_doubling_back_off(mirror, tmp_path, download_sleeps):
    mirror.plan["/124M/hparams.json"] = ["500", "500"]
    target = gd.download_file(
        f"{mirror.url}/124M/hparams.json",
        tmp_path / "hparams.json",
        retries=3,
        backoff=0.5,
        progress=False,
    )
    assert target.read_bytes() == (TINY / "hparams.json").read_bytes()
    assert len(mirror.requests) == 3
    assert download_sleeps == [0.5, 1.0]  # backoff * 2**attempt between the attempts


def test_download_error_message_and_hint(tmp_path, dead_url, download_sleeps):
    url = f"{dead_url}/124M/vocab.bpe"
    with pytest.raises(gd.DownloadError) as caught:
        gd.download_file(url, tmp_path / "vocab.bpe", retries=2, progress=False, hint="Try X.")
    message = str(caught.value)
    assert message.startswith("could not download vocab.bpe to ")
    assert url in message and "2 attempt(s)" in message and "ConnectionError" in message
    assert message.endswith(" Try X.")
    assert len(download_sleeps) == 1  # between the two attempts, none after the last


def test_download_uses_the_default_timeout(mirror, tmp_path, request_timeouts):
    gd.download_file(f"{mirror.url}/124M/hparams.json", tmp_path / "h.json", progress=False)
    assert request_timeouts == [gd.DOWNLOAD_TIMEOUT]
    connect, read = gd.DOWNLOAD_TIMEOUT
    assert 0 < connect <= 10 and 0 < read <= 60  # a dead network fails in seconds, not hours


def test_an_existing_file_is_returned_without_a_request(mirror, tmp_path):
    target = tmp_path / "hparams.json"
    target.write_text("already here")
    assert gd.download_file(f"{mirror.url}/124M/hparams.json", target, **FAST) == target
    assert target.read_text() == "already here" and mirror.requests == []


# ---------------------------------------------------------------------------
# The downloaded weights drive the course's GPTModel like GPT-2
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


def test_downloaded_weights_give_gpt_model_the_logits_of_gpt2(mirror, tmp_path):
    settings, params = gd.download_and_load_gpt2(
        "124M", tmp_path, mirror.url, backup_base_url=None, **FAST
    )
    cfg = gpt2_config(
        "124M",
        vocab_size=settings["n_vocab"],
        context_length=settings["n_ctx"],
        emb_dim=settings["n_embd"],
        n_heads=settings["n_head"],
        n_layers=settings["n_layer"],
        drop_rate=0.0,
        qkv_bias=True,
    )
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    load_weights_into_gpt(model, params)

    ids = [3, 17, 499, 0, 250, 42, 8, 8, 131]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).numpy()[0]
    expected = _numpy_gpt2_logits(WEIGHTS, HPARAMS, ids)
    assert logits.shape == (len(ids), HPARAMS["n_vocab"])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
