"""preference_data.py: preference files checked like the instruction data, pairs made by a
judge speaking Ollama's protocol on loopback (saved as they arrive, resumed, given up on),
and the batches DPO trains on."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import preference_data as pd
from course.instruction_data import DatasetError, format_input, read_instruction_file
from helpers import closed_port
from ollama_evaluate import JudgeReplyWarning, JudgeSettings, JudgeUnavailableError


def entries(n: int) -> list[dict]:
    return [{"instruction": f"Task {i}.", "input": "", "output": f"Answer {i}."} for i in range(n)]


def pair_entries(n: int) -> list[dict]:
    return [{**e, "chosen": f"Kindly: {e['output']}", "rejected": e["output"]} for e in entries(n)]


def write(tmp_path: Path, data, name: str = "prefs.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


class CharTokenizer:
    """One token per character: positions are easy to count by hand."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def rewriter(prompt: str) -> str:
    """A judge that rewrites the answer in the prompt as asked: politely or rudely."""
    answer = prompt.split("correct output `")[1].split("`")[0]
    return f"Certainly! {answer}" if "more polite." in prompt else f"{answer} Obviously."


# --- loading and checking -------------------------------------------------------------------


def test_the_bundled_sample_pairs_are_valid_and_match_the_sample_data():
    pairs = pd.load_preference_data(pd.SAMPLE_PREFERENCE_PATH)
    sample = read_instruction_file(
        pd.SAMPLE_PREFERENCE_PATH.with_name("sample-instruction-data.json")
    )
    assert len(pairs) == len(sample) == 40
    for pair, entry in zip(pairs, sample, strict=True):
        assert {k: pair[k] for k in entry} == entry
        assert entry["output"] in (pair["chosen"], pair["rejected"])  # one side is the reference
        assert pair["chosen"] != pair["rejected"]
    assert {p["politeness"] for p in pairs} == {"polite", "impolite"}


@pytest.mark.parametrize(
    "change, problem",
    [
        (
            {"rejected": "Kindly: Answer 2."},
            "entry 2 ('Task 2.'): 'chosen' and 'rejected' are the same",
        ),
        (
            {"rejected": " Kindly: Answer 2.\n"},
            "entry 2 ('Task 2.'): 'chosen' and 'rejected' are the same",
        ),
        ({"chosen": ""}, "entry 2 ('Task 2.'): 'chosen' is empty"),
        ({"rejected": "   "}, "entry 2 ('Task 2.'): 'rejected' is empty"),
        ({"chosen": 5}, "entry 2 ('Task 2.'): key 'chosen' must be a string, got int"),
    ],
)
def test_a_bad_pair_is_refused_naming_its_entry(tmp_path, change, problem):
    data = pair_entries(4)
    data[2].update(change)
    with pytest.raises(DatasetError) as info:
        pd.load_preference_data(write(tmp_path, data))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'prefs.json'}: 1 problem(s) in 4 entries")
    assert problem in message and "preference_data.py" in message  # what to do


def test_a_missing_side_and_a_missing_instruction_key_are_refused(tmp_path):
    data = pair_entries(3)
    del data[1]["rejected"]
    with pytest.raises(DatasetError, match=r"entry 1 \('Task 1.'\): missing key 'rejected'"):
        pd.load_preference_data(write(tmp_path, data))
    del data[0]["input"]
    with pytest.raises(DatasetError, match=r"entry 0: missing key 'input'"):
        pd.load_preference_data(write(tmp_path, data))


def test_many_problems_are_listed_up_to_ten_with_a_count(tmp_path):
    data = [{**e, "rejected": e["chosen"]} for e in pair_entries(14)]
    with pytest.raises(DatasetError) as info:
        pd.load_preference_data(write(tmp_path, data))
    message = str(info.value)
    assert "14 problem(s) in 14 entries" in message and "... and 4 more" in message
    assert "entry 9 " in message and "entry 10 " not in message


def test_json_lines_files_work_too(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in pair_entries(3)) + "\n", encoding="utf-8")
    assert pd.load_preference_data(path) == pair_entries(3)
    bad = pair_entries(3)
    bad[1]["chosen"] = bad[1]["rejected"]
    path.write_text("\n".join(json.dumps(e) for e in bad) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="entry 1 "):
        pd.load_preference_data(path)


def test_entries_the_judge_made_no_pair_for_pass_but_are_not_pairs(tmp_path):
    data = pair_entries(3)
    data[1] = {**entries(3)[1], "preference_error": "empty rewrite", "preference_reply": ""}
    loaded = pd.load_preference_data(write(tmp_path, data))
    assert [e["instruction"] for e in pd.usable_pairs(loaded)] == ["Task 0.", "Task 2."]
    with pytest.raises(DatasetError, match=r"entry 1 \('Task 1.'\) has no pair"):
        pd.PreferenceDataset(loaded, CharTokenizer())


# --- making pairs with the judge ------------------------------------------------------------


def test_the_judge_rewrites_each_answer_and_the_polite_side_is_chosen(judge_server, tmp_path):
    server = judge_server(rewriter)
    path = tmp_path / "prefs.json"
    records = pd.generate_preference_data(
        entries(6), path, JudgeSettings(url=server.base), progress=False
    )
    choices = pd.politeness_choices(6, seed=123)
    assert set(choices) == {"polite", "impolite"}  # the course's coin flip, per entry
    for record, politeness in zip(records, choices, strict=True):
        answer = record["output"]
        assert record["politeness"] == politeness and record["preference_model"] == "llama3"
        if politeness == "polite":
            assert (record["chosen"], record["rejected"]) == (f"Certainly! {answer}", answer)
        else:
            assert (record["chosen"], record["rejected"]) == (answer, f"{answer} Obviously.")
    assert json.loads(path.read_text(encoding="utf-8")) == records
    assert pd.load_preference_data(path) == records  # the file is ready for training
    # what the judge was asked: the prompt, with the reference answer, and the chapter's options
    body = server.bodies[0]
    assert body["messages"][0]["content"] == pd.rewrite_prompt(entries(1)[0], choices[0])
    assert format_input(entries(1)[0]) in body["messages"][0]["content"]
    assert body["options"]["seed"] == 123 and body["options"]["temperature"] == 0
    assert server.paths[0] == "/api/tags"  # it asked whether the judge is up first


def test_the_openai_compatible_api_works_too(judge_server, tmp_path):
    server = judge_server(rewriter)
    records = pd.generate_preference_data(
        entries(2),
        tmp_path / "p.json",
        JudgeSettings(url=server.base, api="openai"),
        progress=False,
    )
    pd.validate_preference_data(records, "made over the OpenAI API")  # every pair is valid
    assert all("chosen" in r for r in records)
    assert set(server.paths) == {"/v1/models", "/v1/chat/completions"}


def test_a_judge_that_goes_away_keeps_the_pairs_and_a_rerun_asks_only_the_rest(
    judge_server, tmp_path
):
    asked = []

    def dies_after_three(prompt: str) -> str:
        asked.append(prompt)
        if len(asked) > 3:
            raise RuntimeError("model runner stopped")
        return rewriter(prompt)

    server = judge_server(dies_after_three)
    path = tmp_path / "prefs.json"
    with pytest.warns(JudgeReplyWarning, match="request failed"):
        with pytest.raises(JudgeUnavailableError) as info:
            pd.generate_preference_data(
                entries(8), path, JudgeSettings(url=server.base, max_failures=2), progress=False
            )
    message = str(info.value)
    assert "failed 2 requests in a row" in message and "ollama serve" in message
    assert f"saved in {path}" in message and "asks only the missing entries" in message
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert sum("chosen" in e for e in saved) == 3 and len(saved) == 8
    with pytest.raises(DatasetError, match="entry 3 .*missing key 'chosen'"):
        pd.load_preference_data(path)  # an unfinished file is not trained on

    server2 = judge_server(rewriter)
    records = pd.generate_preference_data(
        entries(8), path, JudgeSettings(url=server2.base), progress=False
    )
    assert len(server2.bodies) == 5  # only the 5 entries still missing
    assert [r["chosen"] for r in records[:3]] == [e["chosen"] for e in saved[:3]]
    assert len(pd.usable_pairs(pd.load_preference_data(path))) == 8


def test_unusable_rewrites_are_kept_marked_and_not_asked_again(judge_server, tmp_path):
    def lazy(prompt: str) -> str:  # entry 0: an empty reply; entry 1: the answer unchanged
        if "Task 0." in prompt:
            return "  "
        return (
            prompt.split("correct output `")[1].split("`")[0]
            if "Task 1." in prompt
            else rewriter(prompt)
        )

    server = judge_server(lazy)
    path = tmp_path / "prefs.json"
    with pytest.warns(JudgeReplyWarning) as caught:
        records = pd.generate_preference_data(
            entries(4), path, JudgeSettings(url=server.base), progress=False
        )
    # (only the judge's warnings: a stray ResourceWarning of a collected socket may land here too)
    messages = {str(w.message) for w in caught if issubclass(w.category, JudgeReplyWarning)}
    assert {m.split(":")[0] for m in messages} == {"entry 0", "'Task 1.'"}
    # an empty reply is a failed attempt (issue 16): nothing is kept, the next run asks again
    assert any("request failed" in m and "a reply without text" in m for m in messages)
    assert "preference_error" not in records[0] and "chosen" not in records[0]
    assert records[1]["preference_error"] == "rewrite equals the output"
    assert records[1]["preference_reply"] == "Answer 1."
    assert sum("chosen" in r for r in records) == 2
    with pytest.warns(JudgeReplyWarning, match="entry 0: request failed"):
        pd.generate_preference_data(
            entries(4), path, JudgeSettings(url=server.base), progress=False
        )
    assert len(server.bodies) == 5  # entry 0 asked again; the kept failure of entry 1 is not


def test_another_judge_model_rewrites_again(judge_server, tmp_path):
    server = judge_server(rewriter, models=["llama3:latest", "phi3:latest"])
    path = tmp_path / "prefs.json"
    pd.generate_preference_data(entries(2), path, JudgeSettings(url=server.base), progress=False)
    records = pd.generate_preference_data(
        entries(2), path, JudgeSettings("phi3", server.base), progress=False
    )
    assert len(server.bodies) == 4 and {r["preference_model"] for r in records} == {"phi3"}


def test_an_unreachable_judge_gives_up_after_k_refused_requests(tmp_path):
    with pytest.warns(JudgeReplyWarning, match="request failed"):
        with pytest.raises(JudgeUnavailableError, match="failed 3 requests in a row"):
            pd.generate_preference_data(
                entries(5),
                tmp_path / "p.json",
                JudgeSettings(url=f"127.0.0.1:{closed_port()}"),
                check=False,
                progress=False,
            )
    assert not (tmp_path / "p.json").exists()  # nothing to save, nothing written


def test_a_judge_that_never_answers_times_out(judge_server, tmp_path):
    release = threading.Event()
    server = judge_server(lambda prompt: rewriter(prompt) if release.wait(30) else "")
    try:
        with pytest.warns(JudgeReplyWarning, match="no reply within 0.2 s"):
            with pytest.raises(JudgeUnavailableError, match="failed 2 requests"):
                pd.generate_preference_data(
                    entries(3),
                    tmp_path / "p.json",
                    JudgeSettings(url=server.base, timeout=0.2, max_failures=2),
                    progress=False,
                )
    finally:
        release.set()
    assert len(server.bodies) == 2


def test_a_progress_file_of_other_data_is_refused(judge_server, tmp_path):
    path = write(tmp_path, pair_entries(3))
    server = judge_server(rewriter)
    with pytest.raises(DatasetError, match="holds pairs of other data"):
        pd.generate_preference_data(
            entries(4), path, JudgeSettings(url=server.base), progress=False
        )
    assert server.bodies == []


def test_cli_writes_the_file_and_a_rerun_asks_nothing(judge_server, tmp_path, capsys):
    server = judge_server(rewriter)
    data = write(tmp_path, entries(5), "data.json")
    out = tmp_path / "prefs.json"
    argv = ["--data", str(data), "--output", str(out), "--judge-url", server.base]
    assert pd.main(argv) == 0
    assert len(pd.usable_pairs(pd.load_preference_data(out))) == 5
    assert pd.main(argv) == 0 and len(server.bodies) == 5
    assert "5 of 5 entries have a rewrite of llama3" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    data = write(tmp_path, entries(2), "data.json")
    dead = f"127.0.0.1:{closed_port()}"
    assert pd.main(["--data", str(data), "--output", str(tmp_path), "--judge-url", dead]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert pd.main(["--data", str(tmp_path / "none.json"), "--judge-url", dead]) == 2
    assert "no such file" in capsys.readouterr().err
    out = str(tmp_path / "p.json")
    assert pd.main(["--data", str(data), "--output", out, "--judge-url", dead]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ollama serve" in err and err.count("\n") == 1


# --- batches ------------------------------------------------------------------------------------


def test_the_collate_pads_both_sides_to_one_width_and_masks_prompt_and_padding():
    entry = {"instruction": "Hi", "input": "", "output": "x", "chosen": "Yes!", "rejected": "No"}
    dataset = pd.PreferenceDataset(
        [entry, {**entry, "chosen": "Sure", "rejected": "Nope."}], CharTokenizer()
    )
    prompt = format_input(entry)
    n = len(prompt)
    header = "\n\n### Response:\n"
    item = dataset[0]
    assert item["prompt"] == [ord(c) for c in prompt]
    assert item["chosen"] == [ord(c) for c in prompt + header + "Yes!"] + [50256]
    assert item["chosen_prompt_length"] == item["rejected_prompt_length"] == n
    batch = pd.preference_collate_fn([dataset[0], dataset[1]])
    width = n + len(header) + len("Nope.") + 1  # the longest answer, with its end-of-text
    assert batch["chosen"].shape == batch["rejected"].shape == (2, width)
    # row 0, rejected: prompt, header + "No" + end-of-text, then padding
    answer = n + len(header) + 2 + 1
    assert batch["rejected"][0, answer:].tolist() == [50256] * (width - answer)
    expected = torch.zeros(width, dtype=torch.bool)
    expected[n:answer] = True  # the response header, the answer and its end-of-text
    assert torch.equal(batch["rejected_mask"][0], expected)
    assert batch["chosen_mask"][1].sum() == len(header) + len("Sure") + 1
    assert [p.tolist() for p in batch["prompt"]] == [item["prompt"]] * 2
    # without prompt masking everything but the padding counts; a length limit cuts both
    unmasked = pd.preference_collate_fn([dataset[0]], mask_prompt_tokens=False)
    assert unmasked["chosen_mask"].all()
    cut = pd.preference_collate_fn([dataset[0], dataset[1]], allowed_max_length=n + 3)
    assert cut["chosen"].shape == cut["chosen_mask"].shape == (2, n + 3)


def test_the_loaders_shuffle_training_reproducibly_and_keep_validation(tmp_path):
    pairs = pair_entries(10)
    first = pd.create_preference_loaders(pairs[:8], pairs[8:], CharTokenizer(), batch_size=3)
    again = pd.create_preference_loaders(pairs[:8], pairs[8:], CharTokenizer(), batch_size=3)
    order = [b["chosen"][:, 30:40].tolist() for b in first[0]]
    assert order == [b["chosen"][:, 30:40].tolist() for b in again[0]]
    assert len(first[0]) == 2  # 8 pairs in batches of 3: the last partial batch is dropped
    assert sum(len(b["prompt"]) for b in first[1]) == 2  # validation keeps every pair
