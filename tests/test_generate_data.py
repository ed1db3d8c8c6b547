"""generate_instruction_data.py: Magpie-style generation, validation, dedup, resume, reflection.

Against a loopback server that speaks Ollama's /api/generate and the OpenAI-compatible
/v1/completions (the raw completions Magpie needs), and against the real llama_cpp.server
running a GGUF file this project exported.
"""

from __future__ import annotations

import json
import re

import pytest
from test_llama_cpp import gguf_file, llama_cpp, llama_server, model_path  # noqa: F401

import generate_instruction_data as gd
from course.instruction_data import load_instruction_data
from helpers import LoopbackServer, _QuietHandler, closed_port

LLAMA3 = gd.TEMPLATES["llama3"]
TOPICS = ["rivers", "planets", "birds", "rivers", "colours", "", "trees", "LONG", "stones"]


class FakeCompletions(LoopbackServer):
    """Raw text completion on loopback: ``reply(prompt, body)`` gives (text, finish reason).

    ``completions=False``: a server with chat only (404 for the completion endpoints)."""

    def __init__(self, reply, *, completions: bool = True, models=("llama3:latest",)):
        self.bodies: list[dict] = []
        fake = self

        class Handler(_QuietHandler):
            def do_GET(self):
                if self.path == "/api/tags":
                    listed = [{"name": m, "model": m} for m in models]
                    return self.send_body(200, json.dumps({"models": listed}).encode())
                self.send_body(200, json.dumps({"data": [{"id": m} for m in models]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                if not completions or self.path not in ("/api/generate", "/v1/completions"):
                    return self.send_body(404, b'{"error": "404 page not found"}')
                try:
                    text, finish = reply(body["prompt"], body)
                except Exception as exc:
                    return self.send_body(500, json.dumps({"error": str(exc)}).encode())
                if finish == "garbage":  # a reply that is not the API's JSON
                    return self.send_body(200, text.encode(), "text/html")
                if self.path == "/api/generate":
                    answer = {"response": text, "done": True, "done_reason": finish}
                else:
                    answer = {"choices": [{"text": text, "finish_reason": finish}]}
                self.send_body(200, json.dumps(answer).encode())

        super().__init__(Handler)


def seed_of(body: dict) -> int:
    return body["options"]["seed"] if "options" in body else body["seed"]


def scripted(prompt: str, body: dict) -> tuple[str, str]:
    """A model: after the bare user turn it asks about TOPICS[seed % 9]; else it answers."""
    if prompt == LLAMA3.user_start:
        topic = TOPICS[(seed_of(body) - 123) % len(TOPICS)]
        if topic == "LONG":
            return "Describe the history of", "length"
        return (f"Name three {topic}." if topic else "  "), "stop"
    user = prompt.removeprefix(LLAMA3.user_start).removesuffix(LLAMA3.assistant_start)
    if user.startswith("Here is an instruction") and "Rewrite" in user:
        return "Name three " + re.search(r"three (\w+)", user).group(
            1
        ) + ", with a fact each.", "stop"
    if "Critique" in user:
        return "It could ask for more detail.", "stop"
    if user.startswith("Instruction:"):
        return "Three, each with a fact.", "stop"
    return f"Here are three {user.split()[-1].rstrip('.')}.", "stop"


def run(server, out, n, *extra) -> int:
    argv = ["--model", "llama3", "--url", server.base, "--num_entries", str(n)]
    return gd.main([*argv, "--output", str(out), *extra])


def test_generates_validated_deduplicated_entries_that_feed_the_chapter(tmp_path, capsys):
    server = FakeCompletions(scripted)
    with server:
        assert run(server, tmp_path / "data.json", 5) == 0
    entries = json.loads((tmp_path / "data.json").read_text())
    assert [e["instruction"] for e in entries] == [
        "Name three rivers.",
        "Name three planets.",
        "Name three birds.",
        "Name three colours.",
        "Name three trees.",
    ]
    assert entries[0]["output"] == "Here are three rivers." and entries[0]["input"] == ""
    rejected = json.loads(gd.rejected_path(tmp_path / "data.json").read_text())
    assert [(r["attempt"], r["reason"]) for r in rejected] == [
        (3, "near-duplicate of entry 0"),
        (5, "empty"),
    ]
    magpie_asks = [b for b in server.bodies if b["prompt"] == LLAMA3.user_start]
    assert all(b["raw"] is True and b["options"]["temperature"] == 1.0 for b in magpie_asks)
    assert [seed_of(b) for b in magpie_asks] == list(range(123, 130))
    assert load_instruction_data(str(tmp_path / "data.json")) == entries  # --data takes it
    assert "5 entries in" in capsys.readouterr().out


def test_a_rerun_continues_and_gives_what_an_uninterrupted_run_gives(tmp_path, capsys):
    calls = {"n": 0}

    def dies_after_nine(prompt, body):
        calls["n"] += 1
        if calls["n"] > 9:
            raise RuntimeError("model runner stopped")
        return scripted(prompt, body)

    with FakeCompletions(dies_after_nine) as flaky:
        assert run(flaky, tmp_path / "a.json", 6, "--max_failures", "2") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "model runner stopped" in err
    saved = json.loads((tmp_path / "a.json").read_text())
    assert len(saved) == 4  # nothing kept was lost
    with FakeCompletions(scripted) as server:
        assert run(server, tmp_path / "a.json", 6) == 0
        assert run(server, tmp_path / "b.json", 6) == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert json.loads((tmp_path / "a.json").read_text())[:4] == saved


def test_a_damaged_output_file_is_refused_on_a_rerun_and_kept(tmp_path, capsys):
    """Issue 16: a file the command reads back (its output, its rejected attempts) carries a
    checksum; a rerun refuses a damaged one in one line and changes nothing."""
    out = tmp_path / "data.json"
    with FakeCompletions(scripted) as server:
        assert run(server, out, 5) == 0
        assert (tmp_path / "data.json.sha256").is_file()
        for path in (out, gd.rejected_path(out)):
            good = path.read_bytes()
            flipped = bytearray(good)
            flipped[len(good) // 2] ^= 1  # one bit of one byte
            path.write_bytes(bytes(flipped))
            damaged = path.read_bytes()
            capsys.readouterr()
            assert run(server, out, 6) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("error:") and len(err.splitlines()) == 1, err
            assert f"{path} is damaged" in err and "choose another --output" in err
            assert path.read_bytes() == damaged  # nothing was overwritten
            path.write_bytes(good)
        assert run(server, out, 6) == 0  # restored: the rerun continues
    assert len(json.loads(out.read_text())) == 6


def test_too_many_rejections_end_in_one_line_with_the_reasons(tmp_path, capsys):
    with FakeCompletions(lambda p, b: ("Describe the", "length")) as server:
        assert run(server, tmp_path / "d.json", 2, "--max_attempts", "3") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error:")
    err = errors[0]
    assert "0 of 2 entries after 3 attempts" in err and "truncated" in err


def test_reflect_keeps_the_original_beside_the_improved_entry_openai_api(tmp_path):
    with FakeCompletions(scripted) as server:
        path = tmp_path / "r.json"
        assert run(server, path, 2, "--api", "openai", "--reflect") == 0
        assert all(b.get("seed") is not None for b in server.bodies)
    first = json.loads(path.read_text())[0]
    assert first["instruction"] == "Name three rivers, with a fact each."
    assert first["output"] == "Three, each with a fact."
    assert first["original"]["instruction"] == "Name three rivers."
    assert first["original"]["output"] == "Here are three rivers."
    assert first["original"]["critique_of_instruction"] == "It could ask for more detail."


def test_reflect_on_a_rerun_improves_the_saved_entries(tmp_path):
    with FakeCompletions(scripted) as server:
        path = tmp_path / "r.json"
        assert run(server, path, 2) == 0
        assert run(server, path, 2, "--reflect") == 0
    assert all("original" in e for e in json.loads(path.read_text()))


def test_a_server_without_raw_completion_says_so(tmp_path, capsys):
    with FakeCompletions(scripted, completions=False) as server:
        assert run(server, tmp_path / "x.json", 2, "--max_failures", "1") == 2
    err = capsys.readouterr().err
    assert "no raw text completion" in err and "/api/generate" in err
    assert not (tmp_path / "x.json").exists()


def test_unreachable_and_bad_settings_end_in_one_line(tmp_path, capsys):
    argv = ["--model", "llama3", "--url", f"127.0.0.1:{closed_port()}", "--num_entries", "2"]
    assert gd.main([*argv, "--output", str(tmp_path / "x.json")]) == 2
    assert "ollama serve" in capsys.readouterr().err
    assert gd.main([*argv, "--output", str(tmp_path), "--threshold", "0.5"]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    with FakeCompletions(scripted) as server:
        assert run(server, tmp_path / "bad.json", 1) == 2
    assert "bad.json: not a JSON file" in capsys.readouterr().err


def test_text_problem() -> None:
    assert gd.text_problem("", "stop", LLAMA3) == "empty"
    assert gd.text_problem("Write a", "length", LLAMA3).startswith("truncated")
    assert "template" in gd.text_problem("Hi<|eot_id|><|start_header_id|>user", "stop", LLAMA3)
    assert gd.text_problem("Name a colour.", "stop", LLAMA3) is None


@pytest.mark.slow
def test_the_real_llama_cpp_server_runs_the_pipeline(llama_server, tmp_path):  # noqa: F811
    """The tiny random model writes nonsense, but every step runs for real: the template's
    start is completed, each attempt is kept or rejected with a reason, and a rerun goes on."""
    path = tmp_path / "real.json"
    argv = ["--model", "tiny-sft", "--url", llama_server, "--api", "openai"]
    argv += ["--template", "alpaca", "--num_entries", "2", "--max_tokens", "12"]
    argv += ["--output", str(path), "--timeout", "300"]
    status = gd.main([*argv, "--max_attempts", "3"])
    kept = json.loads(path.read_text()) if path.exists() else []
    rejected = json.loads(gd.rejected_path(path).read_text()) if status else []
    assert status == (0 if len(kept) == 2 else 2)
    attempts = sorted([e["attempt"] for e in kept] + [r["attempt"] for r in rejected])
    assert attempts == list(range(len(attempts))) and len(attempts) <= 3
    known = ("empty", "truncated", "holds the chat template", "near-duplicate")
    assert all(r["reason"].startswith(known) for r in rejected)
    assert all(
        gd.text_problem(e["instruction"], "stop", gd.TEMPLATES["alpaca"]) is None for e in kept
    )
    if status:
        gd.main([*argv, "--max_attempts", "5"])
        again = json.loads(gd.rejected_path(path).read_text())
        kept = json.loads(path.read_text()) if path.exists() else []
        assert sorted([r["attempt"] for r in again] + [e["attempt"] for e in kept])[-1] >= 3


def test_an_unparsable_server_reply_ends_in_one_line_and_keeps_what_was_saved(tmp_path, capsys):
    path = tmp_path / "g.json"
    with FakeCompletions(scripted) as server:
        assert run(server, path, 2) == 0
    saved = path.read_text()
    with FakeCompletions(lambda p, b: ("<html>proxy error</html>", "garbage")) as broken:
        assert run(broken, path, 4, "--max_failures", "2") == 2
    err = capsys.readouterr().err
    assert "not the API's JSON" in err and "counts as down" in err
    assert path.read_text() == saved
