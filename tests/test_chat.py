"""Streaming generation (``engine.stream_tokens``) and the terminal chat (``main/chat.py``).

``stream_tokens`` must give exactly the course's ``generate`` tokens (greedy and sampled, in and
beyond the context, with and without end-of-text); the chat must turn them into text without
breaking a character, answer in the model's prompt style, and stop at end-of-text. The
terminal chat runs as a real process fed through a pipe.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import chat
import previous_chapters as pc
from chat import chat_prompt, chat_tokenizer, repl, stream_reply
from course.instruction_data import EOS_TOKEN_ID, format_input
from helpers import REPO_ROOT, random_prompts, tiny_model, tiny_model_file
from runtime.engine import stream_tokens
from runtime.model_file import load_model_file
from runtime.outputs import save_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(3, sharpen=0.3).eval()  # vocabulary 97, context 48


def reference(model, prompt, n, context, **sampling):
    out = pc.generate(model, torch.tensor([prompt]), n, context, **sampling)
    return out[0, len(prompt) :].tolist()


# --- stream_tokens = generate --------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "new", "context"),
    [(5, 20, 48), (30, 30, 48), (48, 5, 48), (60, 8, 48), (1, 70, 48), (7, 12, 8)],
    ids=["fits", "slides-later", "full-prompt", "prompt-too-long", "long-run", "tiny-context"],
)
def test_stream_tokens_gives_generates_greedy_tokens(model, prompt_len, new, context):
    (prompt,) = random_prompts([prompt_len], 97, seed=prompt_len)
    assert list(stream_tokens(model, prompt, new, context)) == reference(
        model, prompt, new, context
    )


@pytest.mark.parametrize("top_k", [None, 5])
def test_stream_tokens_samples_as_generate_from_the_same_generator(model, top_k):
    (prompt,) = random_prompts([9], 97, seed=1)
    theirs = torch.Generator().manual_seed(42)
    ours = torch.Generator().manual_seed(42)
    expected = reference(model, prompt, 60, 48, temperature=1.3, top_k=top_k, generator=theirs)
    got = list(stream_tokens(model, prompt, 60, 48, temperature=1.3, top_k=top_k, generator=ours))
    assert got == expected


def test_stream_tokens_stops_before_eos(model):
    (prompt,) = random_prompts([6], 97, seed=2)
    free = reference(model, prompt, 12, 48)
    eos = free[4]  # a token the model writes at step 4 (and maybe earlier)
    got = list(stream_tokens(model, prompt, 12, 48, eos_id=eos))
    assert got == free[: free.index(eos)]
    assert got == reference(model, prompt, 12, 48, eos_id=eos)


def test_stream_tokens_yields_each_token_as_soon_as_it_is_picked(model):
    stream = stream_tokens(model, [1, 2, 3], 1000, 48)
    first = next(stream)  # without running the other 999 steps first
    assert first == reference(model, [1, 2, 3], 1, 48)[0]
    stream.close()


def test_stream_tokens_refuses_bad_settings(model):
    with pytest.raises(ValueError, match="empty"):
        list(stream_tokens(model, [], 3, 48))
    with pytest.raises(ValueError, match="top_k"):
        list(stream_tokens(model, [1], 3, 48, top_k=0))


# --- from tokens to text ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model_file(tiny_model_file(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


def test_the_reply_is_the_greedy_continuation_of_the_prompt_style(loaded, tokenizer):
    instruction = "Give three tips for staying healthy."
    prompt = chat_prompt(instruction, loaded.prompt_style)
    assert prompt == format_input({"instruction": instruction, "input": ""}) + (
        "\n\n### Response:\n"
    )
    ids = tokenizer.encode(prompt)
    expected = reference(loaded.model, ids, 30, 512, eos_id=EOS_TOKEN_ID)
    assert "".join(stream_reply(loaded, tokenizer, instruction, max_new_tokens=30)) == (
        tokenizer.decode(expected)
    )


def test_a_character_split_across_tokens_is_sent_whole(loaded, tokenizer, monkeypatch):
    """GPT-2 writes "日本" as bytes spread over several tokens: no piece holds half a character."""
    text = "日本 café ✓"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # (some characters do span tokens)
    monkeypatch.setattr("chat.stream_tokens", lambda *args, **kwargs: iter(ids))
    pieces = list(stream_reply(loaded, tokenizer, "anything"))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_the_reply_stops_at_end_of_text(tmp_path, tokenizer):
    """A model whose favourite token is end-of-text answers nothing, not "<|endoftext|>"."""
    model = tiny_model(0, vocab_size=50257, context_length=64)
    with torch.no_grad():
        model.final_norm.weight.zero_()  # the final hidden state is the norm's bias, always
        model.final_norm.bias.fill_(1.0)
        model.out_head.weight[EOS_TOKEN_ID] = 1.0
    path = save_model(model, tmp_path / "eos-sft.pth")
    eos_model = load_model_file(path, n_heads=4)
    assert list(stream_reply(eos_model, tokenizer, "Say something.")) == []


# --- the read-eval-print loop ------------------------------------------------------------------


def test_the_repl_answers_each_line_until_exit():
    lines = iter(["first question", "", "  second  ", "exit", "never read"])
    out = io.StringIO()
    answered = repl(lambda text: iter([f"<{text}>", "!"]), read=lambda _: next(lines), out=out)
    assert answered == 2
    assert out.getvalue() == "<first question>!\n\n<second>!\n\n"


def test_the_repl_echoes_each_line_read_when_asked():
    lines = iter(["first question", "exit"])
    out = io.StringIO()

    def read(prompt):
        out.write(prompt)  # as input() does
        return next(lines)

    assert repl(lambda text: iter([f"<{text}>"]), read=read, out=out, echo=True) == 1
    assert out.getvalue() == ">> first question\n<first question>\n\n>> exit\n"


def test_the_repl_ends_at_end_of_input_and_ctrl_c_stops_one_answer():
    lines = ["go"]

    def read(prompt):
        if not lines:
            raise EOFError  # Ctrl-D, or the end of piped input
        return lines.pop(0)

    def reply(text):
        yield "partial"
        raise KeyboardInterrupt  # Ctrl-C while the answer is being written

    out = io.StringIO()
    assert repl(reply, read=read, out=out) == 1
    assert out.getvalue() == "partial [stopped]\n\n\n"


@pytest.mark.slow
def test_the_terminal_chat_answers_through_a_pipe(tmp_path, tokenizer):
    """`python main/chat.py --model FILE` with two instructions piped in, then end of input;
    in the prompt style of the model's run (Phi-3 here, not the default)."""
    style = "phi3"
    path = tiny_model_file(tmp_path, prompt_style=style)
    loaded = load_model_file(path)
    questions = ["Name a prime number.", "What is the capital of France?"]
    env = {**os.environ, "GPT2_TOKENIZER_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the script finds its modules by itself
    result = subprocess.run(
        [sys.executable, "main/chat.py", "--model", str(path), "--max-new-tokens", "12"],
        input="\n".join(questions) + "\n",
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"({style} prompts)" in result.stdout
    answers = ["".join(stream_reply(loaded, tokenizer, q, max_new_tokens=12)) for q in questions]
    # each piped question is echoed after its prompt, so the transcript shows both sides
    transcript = "".join(f">> {q}\n{a}\n\n" for q, a in zip(questions, answers, strict=True))
    assert result.stdout.endswith(transcript + ">> \n")


def test_the_terminal_chat_says_when_there_is_no_model_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no outputs/latest here
    assert chat.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model file found: outputs/latest/ holds no")
    assert "pass --model FILE" in err and err.count("\n") == 1


def test_the_terminal_chat_refuses_bad_settings_before_loading(tmp_path, capsys):
    for flag, value, message in [
        ("--max-new-tokens", "0", "give at least 1"),
        ("--temperature", "-1", "give 0 (greedy) or more"),
        ("--device", "gpu7", "use cpu, cuda or cuda:N"),
    ]:
        assert chat.main(["--model", str(tmp_path / "absent.pth"), flag, value]) == 2
        assert message in capsys.readouterr().err


def test_bf16_is_refused_in_one_line_where_the_cpu_lacks_it(tmp_path, capsys, monkeypatch):
    from runtime import run_config

    monkeypatch.setattr(run_config, "cpu_has_fast_bf16", lambda: False)
    assert chat.main(["--model", str(tmp_path / "absent.pth"), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --precision bf16: bf16 on this CPU would be emulated")
    assert err.count("\n") == 1


def test_bf16_chat_holds_weights_and_cache_in_bf16(tmp_path, tokenizer, monkeypatch):
    """--precision bf16 loads the model in bf16 (run_config's rule allowing it here), and the
    answer is the greedy continuation of that bf16 model."""
    from runtime import run_config

    monkeypatch.setattr(run_config, "cpu_has_fast_bf16", lambda: True)
    path = tiny_model_file(tmp_path)
    args = chat.build_arg_parser().parse_args(["--model", str(path), "--precision", "bf16"])
    loaded16, _ = chat.load_for_chat(args)
    assert {p.dtype for p in loaded16.model.parameters()} == {torch.bfloat16}
    ids = tokenizer.encode(chat_prompt("Name a color.", loaded16.prompt_style))
    expected = reference(loaded16.model, ids, 12, 512, eos_id=EOS_TOKEN_ID)
    got = "".join(stream_reply(loaded16, tokenizer, "Name a color.", max_new_tokens=12))
    assert got == tokenizer.decode(expected)
    cache = pc.KVCache(loaded16.model, 1, 4)
    assert cache.keys.dtype == torch.bfloat16  # the cache follows the weights
