"""Data (7.2) and prompt format: loading, validation, download cache, split, prompt styles."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

import gpt_download
from course import instruction_data as data
from helpers import DataServer, closed_port_url, make_entries

ENTRY_WITH_INPUT = {
    "instruction": "Rewrite the sentence in the past tense.",
    "input": "She walks home.",
    "output": "She walked home.",
}
ENTRY_NO_INPUT = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


# --- prompt format -------------------------------------------------------------------------


def test_format_input_alpaca_with_and_without_input():
    preamble = (
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request."
    )
    assert data.format_input(ENTRY_WITH_INPUT) == (
        f"{preamble}\n\n### Instruction:\nRewrite the sentence in the past tense."
        "\n\n### Input:\nShe walks home."
    )
    assert data.format_input(ENTRY_NO_INPUT) == (
        f"{preamble}\n\n### Instruction:\nName a primary color."
    )
    assert data.format_response(ENTRY_NO_INPUT) == "\n\n### Response:\nRed."


def test_format_input_phi3_with_and_without_input():
    assert data.format_input(ENTRY_WITH_INPUT, "phi3") == (
        "<|user|>\nRewrite the sentence in the past tense.\nShe walks home."
    )
    assert data.format_input(ENTRY_NO_INPUT, style="phi3") == "<|user|>\nName a primary color."
    assert data.format_response(ENTRY_WITH_INPUT, "phi3") == "\n<|assistant|>:\nShe walked home."


def test_unknown_style_lists_the_styles():
    with pytest.raises(ValueError, match=r"unknown prompt style 'chatml'.*alpaca, phi3"):
        data.format_input(ENTRY_NO_INPUT, style="chatml")
    with pytest.raises(ValueError, match="chatml"):
        data.get_prompt_style("chatml")


def test_a_custom_prompt_style_passes_through():
    style = data.PromptStyle(
        name="plain", header="Q: ", input_sep=" | ", response_sep="\nA: ", response_marker="A:"
    )
    assert data.get_prompt_style(style) is style
    assert data.format_input(ENTRY_WITH_INPUT, style) == (
        "Q: Rewrite the sentence in the past tense. | She walks home."
    )
    assert data.format_response(ENTRY_WITH_INPUT, style) == "\nA: She walked home."
    assert data.get_prompt_style("phi3") is data.PROMPT_STYLES["phi3"]


# --- validation ----------------------------------------------------------------------------


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def test_valid_file_loads_unchanged(tmp_path):
    entries = [ENTRY_WITH_INPUT, {**ENTRY_NO_INPUT, "extra": 1}]
    assert data.load_instruction_data(write_json(tmp_path / "d.json", entries)) == entries


def test_the_bundled_sample_is_valid():
    entries = data.read_instruction_file(data.SAMPLE_DATA_PATH)
    assert len(entries) == 40
    data.validate_instruction_data(entries)


def test_validation_names_index_and_key(tmp_path):
    entries = make_entries(20)
    entries[17]["input"] = 3
    path = write_json(tmp_path / "instruction-data.json", entries)
    with pytest.raises(data.DatasetError) as err:
        data.load_instruction_data(path)
    msg = str(err.value)
    assert "instruction-data.json: entry 17: key 'input' must be a string, got int" in msg


def test_validation_collects_all_problems(tmp_path):
    entries = make_entries(30)
    del entries[2]["output"]
    entries[5] = ["not", "an", "object"]
    entries[9]["instruction"] = None
    for i in range(12, 30):
        entries[i]["output"] = 1.5
    path = write_json(tmp_path / "bad.json", entries)
    with pytest.raises(data.DatasetError) as err:
        data.load_instruction_data(path)
    msg = str(err.value)
    assert "21 problem(s) in 30 entries" in msg
    assert "entry 2: missing key 'output'" in msg
    assert "entry 5: must be an object, got list" in msg
    assert "entry 9: key 'instruction' must be a string, got NoneType" in msg
    assert "... and 11 more" in msg  # 10 listed of 21


@pytest.mark.parametrize("top", [{"instruction": "x"}, "text", 3])
def test_non_list_top_level(tmp_path, top):
    path = write_json(tmp_path / "d.json", top)
    with pytest.raises(data.DatasetError, match=r"d\.json: the top level must be a JSON list"):
        data.load_instruction_data(path)


def test_empty_list_is_an_error(tmp_path):
    with pytest.raises(data.DatasetError, match="empty"):
        data.load_instruction_data(write_json(tmp_path / "d.json", []))


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n  {oops}\n]\n')
    with pytest.raises(data.DatasetError, match=r"broken\.json: invalid JSON at line 3"):
        data.load_instruction_data(path)


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(data.DatasetError, match=r"latin1\.json: not UTF-8"):
        data.load_instruction_data(path)


def test_missing_file(tmp_path):
    with pytest.raises(data.DatasetError, match="no such file"):
        data.load_instruction_data(tmp_path / "nope.json")


def test_a_folder_is_named_as_one(tmp_path):
    with pytest.raises(data.DatasetError, match="is a folder; pass a JSON or JSON Lines file"):
        data.load_instruction_data(tmp_path)


def test_dataset_errors_are_chapter_errors_and_value_errors():
    assert issubclass(data.DatasetError, data.ChapterError)
    assert issubclass(data.DatasetError, ValueError)
    assert issubclass(data.ConfigError, data.ChapterError)


# --- JSON Lines ------------------------------------------------------------------------------


def write_lines(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.ndjson", "d.json"])
def test_json_lines_are_read_one_entry_per_line(tmp_path, name):
    entries = make_entries(4)
    lines = (
        [json.dumps(e) for e in entries[:2]] + ["", "   "] + [json.dumps(e) for e in entries[2:]]
    )
    # .json: recognised by its content, objects one per line
    assert data.load_instruction_data(write_lines(tmp_path / name, lines)) == entries


def test_a_one_line_json_lines_file(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ENTRY_NO_INPUT)])
    assert data.load_instruction_data(path) == [ENTRY_NO_INPUT]


def test_a_single_object_in_a_json_file_mentions_json_lines(tmp_path):
    path = write_json(tmp_path / "d.json", ENTRY_NO_INPUT)
    with pytest.raises(data.DatasetError, match=r"JSON list of entries \(or JSON Lines"):
        data.load_instruction_data(path)


def test_a_bad_json_line_is_named_by_its_line_number(tmp_path):
    lines = [json.dumps(e) for e in make_entries(3)]
    lines.insert(2, "")
    lines.insert(3, '{"instruction": "a", "input": "", "output": "b"')  # line 4: cut short
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(data.DatasetError) as err:
        data.load_instruction_data(path)
    message = str(err.value)
    assert "d.jsonl: 1 problem(s) in 4 lines" in message
    assert "d.jsonl: line 4: invalid JSON at column 48: Expecting ',' delimiter" in message


def test_json_lines_problems_are_all_collected(tmp_path):
    lines = [json.dumps(e) for e in make_entries(6)]
    lines[1] = "{oops}"
    lines[3] = json.dumps(["not", "an", "object"])
    lines[4] = json.dumps({"instruction": "a", "input": 3})
    path = write_lines(tmp_path / "mixed.json", lines)  # found by content, not by name
    with pytest.raises(data.DatasetError) as err:
        data.load_instruction_data(path)
    message = str(err.value)
    assert "mixed.json: 4 problem(s) in 6 lines" in message
    assert "line 2: invalid JSON at column 2: Expecting property name" in message
    assert "line 4: must be an object, got list" in message
    assert "line 5: key 'input' must be a string, got int" in message
    assert "line 5: missing key 'output'" in message


def test_an_empty_json_lines_file(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["", "  "])
    with pytest.raises(data.DatasetError, match=r"d\.jsonl: the file holds no entries"):
        data.load_instruction_data(path)


def test_json_lines_from_a_url_are_cached_and_read_back(tmp_path, serve):
    entries = make_entries(3)
    server = serve("".join(json.dumps(e) + "\n" for e in entries).encode())
    cache = tmp_path / "d.jsonl"
    assert data.load_instruction_data(server.url, cache_path=cache) == entries
    assert data.load_instruction_data(server.url, cache_path=cache) == entries
    assert server.requests == 1


# --- split ---------------------------------------------------------------------------------


def test_split_real_dataset_935_110_55(shared_dir):
    entries = data.load_instruction_data(shared_dir / "data" / "instruction-data.json")
    train, test, val = data.split_data(entries)
    assert (len(entries), len(train), len(test), len(val)) == (1100, 935, 110, 55)
    assert train == entries[:935] and test == entries[935:1045] and val == entries[1045:]


@pytest.mark.parametrize(("n", "sizes"), [(40, (34, 4, 2)), (7, (5, 0, 2)), (100, (85, 10, 5))])
def test_split_sizes_follow_int_truncation(n, sizes):
    entries = make_entries(n)
    train, test, val = data.split_data(entries)
    assert (len(train), len(test), len(val)) == sizes
    assert train + test + val == entries


def test_seeded_split_is_a_deterministic_shuffled_copy():
    entries = make_entries(50)
    before = json.dumps(entries)
    a = data.split_data(entries, seed=1)
    b = data.split_data(entries, seed=1)
    c = data.split_data(entries, seed=2)
    assert a == b and a != c
    assert json.dumps(entries) == before  # input untouched
    assert sorted(x["instruction"] for part in a for x in part) == sorted(
        x["instruction"] for x in entries
    )
    assert a[0] != entries[: len(a[0])]


@pytest.mark.parametrize(("train_frac", "test_frac"), [(0.9, 0.2), (-0.1, 0.1), (0.5, 1.5)])
def test_split_refuses_impossible_fractions(train_frac, test_frac):
    with pytest.raises(ValueError, match="train_frac"):
        data.split_data(make_entries(10), train_frac, test_frac)


# --- download and cache --------------------------------------------------------------------


@pytest.fixture
def serve():
    servers = []

    def start(body: bytes, status: int = 200) -> DataServer:
        servers.append(DataServer(body, status))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_download_once_then_reuse_offline(tmp_path, serve):
    entries = make_entries(5)
    server = serve(json.dumps(entries).encode())
    cache = tmp_path / "sub" / "instruction-data.json"
    assert data.download_and_load_file(cache, server.url) == entries
    assert server.requests == 1 and json.loads(cache.read_text()) == entries
    record = tmp_path / "sub" / "instruction-data.json.source"
    assert record.read_text() == server.url + "\n"  # where the cached data came from
    assert sorted(cache.parent.iterdir()) == [cache, record]  # no temporary files left
    assert data.download_and_load_file(cache, server.url) == entries
    assert server.requests == 1  # the second call read the cached file


def test_default_cache_is_keyed_by_the_url(tmp_path, serve, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = make_entries(3), make_entries(4)
    server1, server2 = serve(json.dumps(first).encode()), serve(json.dumps(second).encode())
    assert server1.url != server2.url and server1.url.endswith("/instruction-data.json")
    assert data.load_instruction_data(server1.url) == first
    assert data.load_instruction_data(server2.url) == second  # not the first URL's data
    assert data.load_instruction_data(server1.url) == first
    assert (server1.requests, server2.requests) == (1, 1)
    caches = sorted(p.name for p in tmp_path.iterdir())
    assert caches == sorted(str(data.default_cache_path(s.url)) for s in (server1, server2))
    assert all(re.fullmatch(r"instruction-data-[0-9a-f]{8}\.json", name) for name in caches)


def test_a_cache_recorded_for_another_url_is_refused(tmp_path, serve):
    server1, server2 = serve(json.dumps(make_entries(3)).encode()), serve(b"[]")
    cache = tmp_path / "data.json"
    data.load_instruction_data(server1.url, cache_path=cache)
    with pytest.raises(data.DatasetError) as err:
        data.load_instruction_data(server2.url, cache_path=cache)
    message = str(err.value)
    assert f"data cache {cache} holds the data of {server1.url}" in message
    assert f"not of {server2.url}" in message and "another cache path" in message
    assert "delete both files" in message and server2.requests == 0


def test_a_cache_placed_by_hand_is_used_as_it_is(tmp_path):
    cache = tmp_path / "mine.json"
    write_json(cache, make_entries(2))  # no .source record: nothing to compare with
    assert data.load_instruction_data(closed_port_url(), cache_path=cache) == make_entries(2)


def test_the_course_loader_uses_an_existing_file_whatever_its_url(tmp_path, serve):
    server1, server2 = serve(json.dumps(make_entries(3)).encode()), serve(b"[]")
    path = tmp_path / "instruction-data.json"
    assert data.download_and_load_file(path, server1.url) == make_entries(3)
    assert data.download_and_load_file(path, server2.url) == make_entries(3)  # as the course
    assert server2.requests == 0


def test_a_folder_as_data_cache_is_refused(tmp_path, serve):
    server = serve(json.dumps(make_entries(3)).encode())
    with pytest.raises(data.DatasetError, match=r"data cache .* is a folder; pass a file path"):
        data.load_instruction_data(server.url, cache_path=tmp_path)
    assert server.requests == 0


def test_a_cache_that_cannot_be_written_is_a_disk_error(tmp_path, serve, monkeypatch):
    server = serve(json.dumps(make_entries(3)).encode())
    cache = tmp_path / "d.json"

    real_replace = os.replace

    def disk_full(source, target):  # moving the checked download into the cache fails
        if Path(target) == cache:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(data.os, "replace", disk_full)
    with pytest.raises(gpt_download.DiskError) as err:
        data.load_instruction_data(server.url, cache_path=cache)
    message = str(err.value)
    assert f"could not write {cache}: No space left on device" in message
    assert "not the network" in message and server.requests == 1


def test_invalid_download_is_not_cached(tmp_path, serve):
    server = serve(b"<html>rate limited</html>")
    cache = tmp_path / "d.json"
    with pytest.raises(data.DatasetError, match=r"invalid JSON at line 1") as err:
        data.load_instruction_data(server.url, cache_path=cache)
    assert server.url in str(err.value)  # named by its URL, not by the temporary file
    assert not cache.exists() and list(tmp_path.iterdir()) == []


def test_http_error_names_url_and_status_and_is_not_retried(tmp_path, serve, download_sleeps):
    server = serve(b"not found", status=404)
    with pytest.raises(gpt_download.DownloadError, match=r"404") as err:
        data.load_instruction_data(server.url, cache_path=tmp_path / "d.json")
    message = str(err.value)
    assert message.startswith("could not download")
    assert server.url in message and data.SMOKE_HINT in message
    assert server.requests == 1 and download_sleeps == []  # a 404 will not go away by retrying


def test_unreachable_url_fails_fast_with_smoke_hint(tmp_path, download_sleeps, request_timeouts):
    url = closed_port_url()
    with pytest.raises(gpt_download.DownloadError) as err:
        data.load_instruction_data(url, cache_path=tmp_path / "d.json")
    msg = str(err.value)
    assert url in msg and "Connection" in msg and "--smoke" in msg and "SMOKE = True" in msg
    # what keeps it fast: two attempts with a bounded timeout, one short back-off between
    assert "2 attempt(s)" in msg
    assert request_timeouts == [gpt_download.DOWNLOAD_TIMEOUT] * 2
    assert len(download_sleeps) == 1 and download_sleeps[0] <= 1.0
    assert not (tmp_path / "d.json").exists()


def test_blocked_internet_fails_on_the_course_url_with_the_smoke_hint(tmp_path, download_sleeps):
    # the conftest guard refuses the DNS lookup, like a machine without internet
    with pytest.raises(gpt_download.DownloadError, match="--smoke") as err:
        data.load_instruction_data(data.DATA_URL, cache_path=tmp_path / "d.json")
    assert data.DATA_URL in str(err.value) and "test network guard" in str(err.value)
    assert len(download_sleeps) == 1 and download_sleeps[0] <= 1.0


def test_first_few_lists_the_first_indices_and_says_when_there_are_more():
    assert data.first_few([4, 9, 12]) == "4, 9, 12"
    assert data.first_few(list(range(12))) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 ..."
    assert data.first_few([7, 8, 9], 2) == "7, 8 ..."


def test_long_entries_are_reported_once_with_their_first_indices(capsys):
    assert data.report_long_entries("training", [3, 9, 4, 12, 9, 9, 9, 9], 8) == [1, 3, 4, 5, 6, 7]
    assert capsys.readouterr().out == (
        "6 of 8 training entries are longer than 8 tokens and are cut to 8 "
        "(entries 1, 3, 4, 5, 6 ...)\n"
    )
    assert data.report_long_entries("validation", [8, 2], 8, kind="pairs") == []
    assert capsys.readouterr().out == ""  # nothing cut: nothing said
