"""Tests for gpt_download: downloads that resume, retry, fall back, check what they got,
and fail clearly (network, server or local disk).

Everything runs offline: the "mirror" is an HTTP server on 127.0.0.1 started by the tests
(tests/helpers.py), serving a tiny GPT-2-shaped checkpoint written by real TensorFlow plus
GPT-2's real BPE files; its plan makes it misbehave on purpose. The checkpoint reader
itself is tested in test_tf_checkpoint.py.
"""

from __future__ import annotations

import errno
import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import gpt_download as gd
from helpers import TINY_CHECKPOINT, Mirror, SilentServer, closed_port
from runtime import downloads

TINY = TINY_CHECKPOINT
DATA_FILE = "model.ckpt.data-00000-of-00001"
FAST = {"retries": 2, "backoff": 0.0, "timeout": 10.0, "progress": False}
HPARAMS = json.loads((TINY / "hparams.json").read_text())


def _serve_tiny(tmp_path: Path, name: str):
    shutil.copytree(TINY, tmp_path / name / "124M")
    return Mirror(tmp_path / name)


@pytest.fixture
def mirror(tmp_path):
    """A loopback mirror laid out as {base}/{size}/{file}, serving the tiny checkpoint."""
    with _serve_tiny(tmp_path, "mirror") as server:
        yield server


@pytest.fixture
def backup(tmp_path):
    """A second, well-behaved mirror."""
    with _serve_tiny(tmp_path, "backup") as server:
        yield server


@pytest.fixture
def dead_url():
    """A loopback URL where nothing listens: every connection is refused."""
    return f"http://127.0.0.1:{closed_port()}"


def _leaves(tree, where="params"):
    """(path, array) for every array of a params tree, in a fixed order."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in _leaves(tree[key], f"{where}[{key!r}]")]
    if isinstance(tree, list):
        return [leaf for i, item in enumerate(tree) for leaf in _leaves(item, f"{where}[{i}]")]
    return [(where, tree)]


def _assert_same_params(actual: dict, expected: dict) -> None:
    pairs = zip(_leaves(actual), _leaves(expected), strict=True)
    for (where, a), (where_expected, e) in pairs:
        assert where == where_expected
        np.testing.assert_array_equal(a, e, err_msg=where)


def _copy_tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "124M"
    shutil.copytree(TINY, folder)
    return folder


TINY_PARAMS = gd.load_gpt2_params_from_tf_ckpt(TINY / "model.ckpt", HPARAMS)


# ---------------------------------------------------------------------------
# A complete folder
# ---------------------------------------------------------------------------


def test_flipped_byte_in_the_data_shard_is_caught_by_the_tensor_crc(tmp_path, dead_url):
    folder = _copy_tiny(tmp_path)
    entry = gd.CheckpointReader(folder / "model.ckpt").entry("model/h1/mlp/c_fc/w")
    data = bytearray((folder / DATA_FILE).read_bytes())
    data[entry.offset + 123] ^= 0x01
    (folder / DATA_FILE).write_bytes(data)

    # the folder is complete and every file passes its (cheap) check: no network
    with pytest.raises(gd.CheckpointError) as caught:
        gd.download_and_load_gpt2("124M", folder.parent, dead_url, backup_base_url=None, **FAST)
    message = str(caught.value)
    assert "'model/h1/mlp/c_fc/w'" in message and "CRC32C" in message
    assert str(folder / DATA_FILE) in message and "Delete" in message
    # the other tensors are intact
    np.testing.assert_array_equal(
        gd.load_variable(folder / "model.ckpt", "model/h1/mlp/c_fc/b"),
        gd.load_variable(TINY / "model.ckpt", "model/h1/mlp/c_fc/b"),
    )


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------


def test_download_and_load_through_a_mirror_then_offline(mirror, tmp_path, dead_url):
    models = tmp_path / "models"
    settings, params = gd.download_and_load_gpt2(
        "124M", models, mirror.url, backup_base_url=dead_url, retries=1, backoff=0.0
    )
    assert settings == HPARAMS
    _assert_same_params(params, TINY_PARAMS)
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
    _assert_same_params(params2, params)


def test_base_url_from_the_environment(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_BASE_URL", mirror.url + "/")
    settings, _ = gd.download_and_load_gpt2("124M", tmp_path, backup_base_url=None, **FAST)
    assert settings == HPARAMS and len(mirror.requests) == len(gd.FILENAMES)


def test_backup_url_is_used_when_the_primary_fails(mirror, tmp_path, dead_url):
    settings, params = gd.download_and_load_gpt2(
        "124M", tmp_path, dead_url, backup_base_url=mirror.url, **FAST
    )
    assert settings == HPARAMS
    _assert_same_params(params, TINY_PARAMS)


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
    # one line for what failed (the URL, after how many attempts, the short cause), one for
    # what to do; urllib3's chain only in ``details`` (--verbose)
    what, to_do = message.split("\n")
    assert what == f"could not download vocab.bpe from {url} after 2 attempt(s): Connection refused"
    assert to_do.startswith("Check your internet connection") and to_do.endswith(" Try X.")
    assert "HTTPConnectionPool" not in message and "Max retries" not in message
    assert "ConnectionRefusedError" in caught.value.details
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


def test_retries_must_be_at_least_one(mirror, tmp_path):
    with pytest.raises(ValueError, match="retries must be at least 1"):
        gd.download_file(f"{mirror.url}/124M/hparams.json", tmp_path / "h.json", retries=0)
    assert mirror.requests == []


# ---------------------------------------------------------------------------
# Each file is checked for its kind
# ---------------------------------------------------------------------------


def test_the_release_files_pass_their_checks():
    for name in gd.FILENAMES:
        gd.check_gpt2_file(TINY / name, name)


def _half(name: str) -> bytes:
    data = (TINY / name).read_bytes()
    return data[: len(data) // 2]


HTML = b"<!DOCTYPE html><html><body>Service unavailable</body></html>"
WRONG_FILES = [
    ("hparams.json", HTML, "it is not JSON"),
    ("hparams.json", b"[50257, 1024]", "it holds a JSON list, not an object"),
    ("hparams.json", b'{"n_vocab": 50257, "n_ctx": true, "n_embd": "768"}', "n_ctx, n_embd"),
    ("checkpoint", HTML, "it names no model_checkpoint_path"),
    ("encoder.json", b"{}", "it is not GPT-2's encoder.json: SHA-256"),
    ("vocab.bpe", _half("vocab.bpe"), "it is not GPT-2's vocab.bpe: SHA-256"),
    ("model.ckpt.index", HTML, "it is not a TensorFlow checkpoint index: it is too short"),
    ("model.ckpt.index", _half("model.ckpt.index"), "not a TensorFlow checkpoint index"),
    (DATA_FILE, _half(DATA_FILE), "it has 87,040 bytes, but model.ckpt.index expects 174,080"),
]


@pytest.mark.parametrize(("name", "content", "reason"), WRONG_FILES)
def test_a_file_of_the_wrong_kind_fails_its_check(tmp_path, name, content, reason):
    folder = _copy_tiny(tmp_path)  # the index beside the shard tells the shard's size
    (folder / name).write_bytes(content)
    with pytest.raises(gd.FileCheckError) as caught:
        gd.check_gpt2_file(folder / name, name)
    assert reason in str(caught.value)


def test_an_html_page_instead_of_the_file_is_refused_and_the_backup_used(
    mirror, backup, tmp_path, download_sleeps
):
    mirror.plan["/124M/hparams.json"] = ["html"] * 3
    settings, _ = gd.download_and_load_gpt2(
        "124M", tmp_path, mirror.url, backup_base_url=backup.url, **FAST
    )
    assert settings == HPARAMS
    # not retried at the server that sent the page (it would send it again)
    assert [p for p, _ in mirror.requests].count("/124M/hparams.json") == 1
    assert [p for p, _ in backup.requests] == ["/124M/hparams.json"]
    assert download_sleeps == []


def test_a_file_failing_its_check_everywhere_is_never_kept(mirror, backup, tmp_path):
    for server in (mirror, backup):
        server.plan["/124M/model.ckpt.index"] = ["html"]
    with pytest.raises(gd.DownloadError) as caught:
        gd.download_and_load_gpt2("124M", tmp_path, mirror.url, backup_base_url=backup.url, **FAST)
    message = str(caught.value)
    assert message.startswith("could not download model.ckpt.index from ")
    assert f"{mirror.url}/124M/model.ckpt.index" in message
    assert f"{backup.url}/124M/model.ckpt.index" in message
    assert message.count("fails its check: it is not a TensorFlow checkpoint index") == 2
    assert not (tmp_path / "124M" / "model.ckpt.index").exists()
    assert not (tmp_path / "124M" / "model.ckpt.index.part").exists()  # not resumed later


def test_a_complete_answer_of_the_wrong_size_is_refused_by_the_index(mirror, tmp_path):
    mirror.plan[f"/124M/{DATA_FILE}"] = ["truncate"]
    with pytest.raises(gd.DownloadError) as caught:
        gd.download_and_load_gpt2("124M", tmp_path, mirror.url, backup_base_url=None, **FAST)
    message = str(caught.value)
    assert "87,040 bytes, but model.ckpt.index expects 174,080" in message
    assert "1 attempt(s)" in message
    assert not (tmp_path / "124M" / DATA_FILE).exists()


def test_a_cached_file_that_fails_its_check_is_downloaded_again(mirror, tmp_path, capsys):
    folder = _copy_tiny(tmp_path)
    (folder / "hparams.json").write_bytes(HTML)  # e.g. saved by an older version
    (folder / DATA_FILE).write_bytes(_half(DATA_FILE))  # an interrupted copy
    settings, params = gd.download_and_load_gpt2(
        "124M", folder.parent, mirror.url, backup_base_url=None, **FAST
    )
    assert settings == HPARAMS
    _assert_same_params(params, TINY_PARAMS)
    assert sorted(p for p, _ in mirror.requests) == ["/124M/hparams.json", f"/124M/{DATA_FILE}"]
    err = capsys.readouterr().err
    assert f"{folder / 'hparams.json'} fails its check (it is not JSON" in err
    assert f"{folder / DATA_FILE} fails its check (it has 87,040 bytes" in err
    assert "downloading it again" in err


def test_an_existing_file_that_passes_its_check_is_kept(mirror, tmp_path):
    target = tmp_path / "hparams.json"
    shutil.copy(TINY / "hparams.json", target)
    check = functools.partial(gd.check_gpt2_file, name="hparams.json")
    assert gd.download_file(f"{mirror.url}/124M/hparams.json", target, check=check) == target
    assert mirror.requests == []


# ---------------------------------------------------------------------------
# Servers that stall or trickle
# ---------------------------------------------------------------------------


def test_a_server_that_never_answers_times_out(tmp_path, download_sleeps, request_timeouts):
    with SilentServer("/124M/hparams.json") as server:
        with pytest.raises(gd.DownloadError) as caught:
            gd.download_file(
                server.url, tmp_path / "h.json", retries=2, timeout=(1.0, 0.2), progress=False
            )
    message = str(caught.value)
    assert server.url in message and "2 attempt(s)" in message and "timed out" in message
    assert request_timeouts == [(1.0, 0.2)] * 2 and len(download_sleeps) == 1


def test_a_stall_mid_file_times_out_and_the_retry_resumes(
    mirror, tmp_path, request_timeouts, download_sleeps
):
    mirror.plan[f"/124M/{DATA_FILE}"] = ["stall"]
    url = f"{mirror.url}/124M/{DATA_FILE}"
    target = gd.download_file(url, tmp_path / DATA_FILE, retries=2, timeout=(2.0, 0.3))
    assert download_sleeps == [1.0]  # the default back-off, once
    assert target.read_bytes() == (TINY / DATA_FILE).read_bytes()
    (_, first), (_, second) = mirror.requests
    assert first is None and 0 < int(re.fullmatch(r"bytes=(\d+)-", second)[1]) <= 87_040
    assert request_timeouts == [(2.0, 0.3)] * 2  # "no byte for 0.3 s" is what ended the stall


def test_a_trickling_server_is_stopped_by_the_deadline(mirror, tmp_path, download_sleeps):
    # a byte every 50 ms never trips the 2 s read timeout; only the deadline ends it
    mirror.plan["/124M/hparams.json"] = ["trickle"] * 3
    destination = tmp_path / "hparams.json"
    with pytest.raises(gd.DownloadError) as caught:
        gd.download_file(
            f"{mirror.url}/124M/hparams.json",
            destination,
            retries=3,
            timeout=(2.0, 2.0),
            deadline=0.3,
            progress=False,
        )
    message = str(caught.value)
    assert "after 1 attempt(s): still receiving after its 0.3 s deadline" in message
    assert len(mirror.requests) == 1 and download_sleeps == []  # not retried
    part = tmp_path / "hparams.json.part"
    full = (TINY / "hparams.json").stat().st_size
    assert not destination.exists() and 0 < part.stat().st_size < full  # kept: it resumes
    assert f"{part} is kept and resumes" in message


def test_the_limits_are_settings_with_defaults(monkeypatch):
    for name in (downloads.SILENCE_ENV, downloads.DEADLINE_ENV, downloads.MIN_RATE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert downloads.download_limits() == (gd.DOWNLOAD_TIMEOUT, None, 1000.0)  # no fixed deadline
    monkeypatch.setenv(downloads.SILENCE_ENV, "12")
    monkeypatch.setenv(downloads.DEADLINE_ENV, "900")
    monkeypatch.setenv(downloads.MIN_RATE_ENV, "0")  # no floor
    assert downloads.download_limits() == ((5.0, 12.0), 900.0, 0.0)
    assert downloads.download_limits((1.0, 2.0), 3.0, 4.0) == ((1.0, 2.0), 3.0, 4.0)  # given wins
    monkeypatch.setenv(downloads.SILENCE_ENV, "soon")
    with pytest.raises(ValueError, match="DOWNLOAD_SILENCE_SECONDS='soon'"):
        downloads.download_limits()


def test_a_transfer_below_the_floor_gives_up_keeping_the_partial_file(
    mirror, tmp_path, download_sleeps, monkeypatch, capsys
):
    """A byte every 50 ms (20 bytes/s) is below a 1,000 bytes/s floor: after SLOW_SECONDS
    (a minute by default, 0.3 s here) it gives up, with the right byte counts, not retried."""
    monkeypatch.setattr(downloads, "SLOW_SECONDS", 0.6)
    monkeypatch.setattr(downloads, "NOTICE_SECONDS", 0.2)
    mirror.plan["/124M/hparams.json"] = ["trickle"] * 3
    destination = tmp_path / "hparams.json"
    with pytest.raises(gd.DownloadError) as caught:
        gd.download_file(
            f"{mirror.url}/124M/hparams.json", destination, timeout=(2.0, 2.0), progress=False
        )
    message = str(caught.value)
    part = tmp_path / "hparams.json.part"
    size, full = part.stat().st_size, (TINY / "hparams.json").stat().st_size
    assert re.search(r"after 1 attempt\(s\): slower than 1,000 bytes/s for 0\.\d+ s", message)
    assert f"; {size:,} of {full:,} bytes)" in message and 0 < size < full, message  # not "0 of"
    assert f"{part} is kept and resumes" in message and not destination.exists()
    assert len(mirror.requests) == 1 and download_sleeps == []
    host = mirror.url.split("/")[2]
    err = capsys.readouterr().err  # said while it was still trying
    assert re.search(rf"hparams.json: {host} sends slowly \(\d+ bytes/s; \d+ of 83 bytes\)", err)


def test_the_terminal_says_within_seconds_what_a_transfer_waits_on(
    tmp_path, monkeypatch, capsys, download_sleeps
):
    monkeypatch.setattr(downloads, "NOTICE_SECONDS", 0.2)
    with SilentServer("/124M/hparams.json") as server:
        with pytest.raises(gd.DownloadError):
            gd.download_file(
                server.url, tmp_path / "h.json", retries=1, timeout=(1.0, 1.0), progress=False
            )
    host = server.url.split("/")[2]
    err = capsys.readouterr().err
    assert re.search(
        rf"hparams.json: waiting on {host} for \d+ s \(no answer yet\); giving up after 1 s", err
    )


# ---------------------------------------------------------------------------
# Local disk problems are reported as such
# ---------------------------------------------------------------------------


def _break_writes(monkeypatch, error: OSError) -> None:
    """Make writing a download's .part file fail as a full or read-only disk would."""
    real_open = open

    class FailingFile:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise error

        def close(self):
            self.file.close()

    def fake_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FailingFile(file) if str(path).endswith(".part") else file

    monkeypatch.setattr(downloads, "open", fake_open, raising=False)


def test_a_full_disk_is_a_disk_error_and_not_retried(
    mirror, tmp_path, monkeypatch, download_sleeps
):
    _break_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    part = tmp_path / f"{DATA_FILE}.part"
    with pytest.raises(gd.DiskError) as caught:
        gd.download_file(f"{mirror.url}/124M/{DATA_FILE}", tmp_path / DATA_FILE, **FAST)
    message = str(caught.value)
    assert message.startswith(f"could not write {part}: No space left on device.")
    assert "local disk, not the network" in message and "free some space" in message
    assert "internet" not in message
    assert len(mirror.requests) == 1 and download_sleeps == []


@pytest.mark.parametrize(
    ("where", "error", "words"),
    [
        ("open", PermissionError(errno.EACCES, "Permission denied"), "could not write"),
        ("replace", OSError(errno.EROFS, "Read-only file system"), "could not move hparams"),
    ],
)
def test_unwritable_files_are_disk_errors(mirror, tmp_path, monkeypatch, where, error, words):
    def fail(*args, **kwargs):
        raise error

    if where == "open":
        monkeypatch.setattr(downloads, "open", fail, raising=False)
    else:
        monkeypatch.setattr(downloads.os, "replace", fail)
    with pytest.raises(gd.DiskError) as caught:
        gd.download_file(f"{mirror.url}/124M/hparams.json", tmp_path / "hparams.json", **FAST)
    assert words in str(caught.value) and error.strerror in str(caught.value)
    assert len(mirror.requests) == 1  # no retry, no backup: the disk would refuse again


def test_a_folder_where_the_file_should_be_is_refused_before_any_request(mirror, tmp_path):
    (tmp_path / "124M" / "hparams.json").mkdir(parents=True)
    with pytest.raises(gd.DiskError) as caught:
        gd.download_and_load_gpt2("124M", tmp_path, mirror.url, backup_base_url=None, **FAST)
    message = str(caught.value)
    assert f"{tmp_path / '124M' / 'hparams.json'} is a folder" in message
    assert "choose another destination" in message
    assert [p for p, _ in mirror.requests] == ["/124M/checkpoint", "/124M/encoder.json"]


def test_a_file_where_the_folder_should_be_is_refused_before_any_request(mirror, tmp_path):
    models = tmp_path / "models"
    models.write_text("not a folder")
    with pytest.raises(gd.DiskError, match=rf"{re.escape(str(models))} is a file, but "):
        gd.download_and_load_gpt2("124M", models, mirror.url, backup_base_url=None, **FAST)
    assert mirror.requests == []


def test_offline_the_command_says_what_failed_and_what_to_do_in_two_lines(
    tmp_path, monkeypatch, capsys, download_sleeps
):
    """No network: one line for what failed (URL, attempts, short cause), one for what to
    do; never urllib3's chain (that is for --verbose), never the temporary file's name."""
    import instruction_finetuning as ift

    monkeypatch.chdir(tmp_path)
    assert ift.main(["--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 2, err
    assert err[0] == (
        f"error: could not download instruction-data.json from {ift.DATA_URL} after 2 "
        "attempt(s): test network guard: lookup of 'raw.githubusercontent.com' refused"
    )
    assert err[1].startswith("Check your internet connection") and "--smoke" in err[1]
    assert ".download" not in "\n".join(err)  # (it said "could not download X to X" of those)
    assert ift.main(["--output-dir", str(tmp_path / "out"), "--verbose"]) == 2
    verbose = capsys.readouterr().err
    assert "requests.exceptions.ConnectionError" in verbose and "NetworkBlocked" in verbose
