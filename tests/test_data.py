"""Data (7.2) and prompt format: loading, validation, download cache, split, prompt styles."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import instruction_finetuning as ift

ENTRY_WITH_INPUT = {
    "instruction": "Rewrite the sentence in the past tense.",
    "input": "She walks home.",
    "output": "She walked home.",
}
ENTRY_NO_INPUT = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


def make_entries(n: int) -> list[dict]:
    return [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(n)]


# --- prompt format -------------------------------------------------------------------------


def test_format_input_alpaca_with_and_without_input():
    preamble = (
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request."
    )
    assert ift.format_input(ENTRY_WITH_INPUT) == (
        f"{preamble}\n\n### Instruction:\nRewrite the sentence in the past tense."
        "\n\n### Input:\nShe walks home."
    )
    assert ift.format_input(ENTRY_NO_INPUT) == (
        f"{preamble}\n\n### Instruction:\nName a primary color."
    )
    assert ift.format_response(ENTRY_NO_INPUT) == "\n\n### Response:\nRed."


def test_format_input_phi3_with_and_without_input():
    assert ift.format_input(ENTRY_WITH_INPUT, "phi3") == (
        "<|user|>\nRewrite the sentence in the past tense.\nShe walks home."
    )
    assert ift.format_input(ENTRY_NO_INPUT, style="phi3") == "<|user|>\nName a primary color."
    assert ift.format_response(ENTRY_WITH_INPUT, "phi3") == "\n<|assistant|>:\nShe walked home."


def test_unknown_style_lists_the_styles():
    with pytest.raises(ValueError, match=r"unknown prompt style 'chatml'.*alpaca, phi3"):
        ift.format_input(ENTRY_NO_INPUT, style="chatml")


@pytest.mark.parametrize(
    ("style", "generated", "expected"),
    [
        ("alpaca", "### Response:\nShe walked home.  ", "She walked home."),
        ("alpaca", "\n  She walked home.", "She walked home."),
        ("phi3", "<|assistant|>:\nRed.\n", "Red."),
    ],
)
def test_extract_response_strips_marker_and_space(style, generated, expected):
    assert ift.extract_response(generated, style) == expected


# --- validation ----------------------------------------------------------------------------


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def test_valid_file_loads_unchanged(tmp_path):
    data = [ENTRY_WITH_INPUT, {**ENTRY_NO_INPUT, "extra": 1}]
    assert ift.load_instruction_data(write_json(tmp_path / "d.json", data)) == data


def test_validation_names_index_and_key(tmp_path):
    data = make_entries(20)
    data[17]["input"] = 3
    path = write_json(tmp_path / "instruction-data.json", data)
    with pytest.raises(ValueError) as err:
        ift.load_instruction_data(path)
    msg = str(err.value)
    assert "instruction-data.json: entry 17: key 'input' must be a string, got int" in msg


def test_validation_collects_all_problems(tmp_path):
    data = make_entries(30)
    del data[2]["output"]
    data[5] = ["not", "an", "object"]
    data[9]["instruction"] = None
    for i in range(12, 30):
        data[i]["output"] = 1.5
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(ift.DatasetError) as err:
        ift.load_instruction_data(path)
    msg = str(err.value)
    assert "21 problem(s) in 30 entries" in msg
    assert "entry 2: missing key 'output'" in msg
    assert "entry 5: must be an object, got list" in msg
    assert "entry 9: key 'instruction' must be a string, got NoneType" in msg
    assert "... and 11 more" in msg  # 10 listed of 21


@pytest.mark.parametrize("top", [{"instruction": "x"}, "text", 3])
def test_non_list_top_level(tmp_path, top):
    path = write_json(tmp_path / "d.json", top)
    with pytest.raises(ValueError, match=r"d\.json: the top level must be a JSON list"):
        ift.load_instruction_data(path)


def test_empty_list_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        ift.load_instruction_data(write_json(tmp_path / "d.json", []))


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n  {oops}\n]\n')
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON at line 3"):
        ift.load_instruction_data(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        ift.load_instruction_data(tmp_path / "nope.json")


# --- split ---------------------------------------------------------------------------------


def test_split_real_dataset_935_110_55(shared_dir):
    data = ift.load_instruction_data(shared_dir / "data" / "instruction-data.json")
    train, test, val = ift.split_data(data)
    assert (len(data), len(train), len(test), len(val)) == (1100, 935, 110, 55)
    assert train == data[:935] and test == data[935:1045] and val == data[1045:]


@pytest.mark.parametrize(("n", "sizes"), [(40, (34, 4, 2)), (7, (5, 0, 2)), (100, (85, 10, 5))])
def test_split_sizes_follow_int_truncation(n, sizes):
    data = make_entries(n)
    train, test, val = ift.split_data(data)
    assert (len(train), len(test), len(val)) == sizes
    assert train + test + val == data


def test_seeded_split_is_a_deterministic_shuffled_copy():
    data = make_entries(50)
    before = json.dumps(data)
    a = ift.split_data(data, seed=1)
    b = ift.split_data(data, seed=1)
    c = ift.split_data(data, seed=2)
    assert a == b and a != c
    assert json.dumps(data) == before  # input untouched
    assert sorted(x["instruction"] for part in a for x in part) == sorted(
        x["instruction"] for x in data
    )
    assert a[0] != data[: len(a[0])]


# --- download and cache --------------------------------------------------------------------


class _Server:
    """A loopback HTTP server that serves ``body`` and counts GET requests."""

    def __init__(self, body: bytes, status: int = 200):
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/instruction-data.json"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(body: bytes, status: int = 200) -> _Server:
        servers.append(_Server(body, status))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/instruction-data.json"


def test_download_once_then_reuse_offline(tmp_path, serve):
    data = make_entries(5)
    server = serve(json.dumps(data).encode())
    cache = tmp_path / "sub" / "instruction-data.json"
    assert ift.download_and_load_file(cache, server.url) == data
    assert server.requests == 1 and json.loads(cache.read_text()) == data
    assert not [p for p in cache.parent.iterdir() if p != cache]  # no temporary files left
    assert ift.download_and_load_file(cache, server.url) == data
    assert server.requests == 1  # the second call read the cached file


def test_default_cache_is_the_url_file_name_in_cwd(tmp_path, serve, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = serve(json.dumps(make_entries(3)).encode())
    ift.load_instruction_data(server.url)
    assert (tmp_path / "instruction-data.json").is_file()


def test_invalid_download_is_not_cached(tmp_path, serve):
    server = serve(b"<html>rate limited</html>")
    cache = tmp_path / "d.json"
    with pytest.raises(ift.DatasetError, match=r"invalid JSON at line 1"):
        ift.load_instruction_data(server.url, cache_path=cache)
    assert not cache.exists()


def test_http_error_names_url_and_status(tmp_path, serve):
    server = serve(b"not found", status=404)
    with pytest.raises(ift.DownloadError, match=r"404") as err:
        ift.load_instruction_data(server.url, cache_path=tmp_path / "d.json")
    assert server.url in str(err.value)


def test_unreachable_url_fails_fast_with_smoke_hint(tmp_path):
    url = closed_port_url()
    start = time.monotonic()
    with pytest.raises(ift.DownloadError) as err:
        ift.load_instruction_data(url, cache_path=tmp_path / "d.json")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert url in msg and "Connection" in msg and "--smoke" in msg and "SMOKE = True" in msg


def test_blocked_internet_fails_fast_on_the_course_url(tmp_path):
    # the conftest guard refuses the DNS lookup, like a machine without internet
    with pytest.raises(ift.DownloadError, match="--smoke") as err:
        ift.load_instruction_data(ift.DATA_URL, cache_path=tmp_path / "d.json")
    assert ift.DATA_URL in str(err.value)
