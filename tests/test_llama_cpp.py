"""llama.cpp runs the exported GGUF file as we run the model: same tokens, and a real server.

llama.cpp comes through ``llama-cpp-python`` (requirements-dev.txt), which pip builds from
source the first time. These tests never skip: without llama.cpp they FAIL and say how to
install it, because a GGUF export nobody ran is not checked.

How close is close enough:

* **f32**: greedy decoding must give our tokens, token for token. llama.cpp is not bit-equal
  to PyTorch even in f32 (its GELU reads a table of f16 values, its sums run in another
  order), so the logits differ a little: by at most 0.3% of their range here (checked: 0.5%).
* **f16**: the weights keep 11 significant bits, which moves the logits more (under 0.5% of
  their range here; checked: 1%). A greedy choice can flip only where the two best tokens are nearly tied,
  and after one flip a free-running continuation differs everywhere, which says nothing about
  the rest. So each position is checked on its own, teacher-forced: llama.cpp reads our
  prompt and continuation in one pass, and its most likely next token at each position must be
  ours in at least 97% of positions, with every difference a near tie (our own two
  candidates less than 0.05 apart, less than f16's rounding moves a logit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import torch

import export_model as ex
import ollama_evaluate as oe
from chat import chat_prompt
from course.instruction_data import EOS_TOKEN_ID
from helpers import closed_port, tiny_model_file
from runtime.engine import stream_tokens
from runtime.gpt2_tokenizer import get_tokenizer
from runtime.model_file import load_model_file
from runtime.outputs import save_json

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_CPP_MISSING = (
    "llama-cpp-python is not installed, so the GGUF export cannot be checked with llama.cpp. "
    "Install it with `pip install -r requirements-dev.txt` (or `pip install "
    "'llama-cpp-python[server]==0.3.36'`): pip builds llama.cpp from source, which needs a C++ "
    "compiler and cmake and takes about 5-25 minutes the first time on a 2-core CPU; later "
    "installs reuse the wheel pip cached."
)
INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Rewrite the sentence using a simile.",
    "Translate 'thank you' into German.",
    "Name a prime number.",
    "Explain photosynthesis.",
]
NEW_TOKENS = 64
N_CTX = 512  # the tiny model's context


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail(LLAMA_CPP_MISSING, pytrace=False)
    return llama_cpp


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def loaded(model_path):
    return load_model_file(model_path)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(offline=True)


@pytest.fixture(scope="module")
def gguf_file(model_path, tmp_path_factory):
    """The model exported at each precision: {"f32": path, "f16": path}."""
    files = {}
    for dtype in ("f32", "f16"):
        out = ex.export_model(
            model_path, "gguf", tmp_path_factory.mktemp(dtype) / "out", dtype=dtype, progress=False
        )
        files[dtype] = next(out.glob("*.gguf"))
    return files


def open_gguf(llama_cpp, path):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=N_CTX, logits_all=True, n_threads=1, verbose=False
    )


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation of ``prompt``: up to ``n`` tokens, stopping at eos."""
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token == EOS_TOKEN_ID or len(tokens) == n:
            break
        tokens.append(token)
    return tokens


def prompts_and_ours(loaded, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, our greedy continuation) for each instruction, in the model's prompt style."""
    pairs = []
    for instruction in INSTRUCTIONS:
        ids = tokenizer.encode(chat_prompt(instruction, loaded.prompt_style))
        ours = list(stream_tokens(loaded.model, ids, NEW_TOKENS, N_CTX, eos_id=EOS_TOKEN_ID))
        pairs.append((ids, ours))
    return pairs


def teacher_forced(llm, model, prompt: list[int], continuation: list[int]):
    """Both engines' logits at the positions that predict ``continuation`` (llama.cpp, ours)."""
    llm.reset()
    llm.eval(prompt + continuation)
    n = len(prompt) + len(continuation)
    theirs = np.array(llm.scores[:n])[len(prompt) - 1 : -1]
    with torch.no_grad():
        ours = model(torch.tensor([prompt + continuation]))[0].numpy()[len(prompt) - 1 : -1]
    return theirs, ours


def test_llama_cpp_tokenizes_text_as_tiktoken(llama_cpp, gguf_file, loaded, tokenizer):
    llm = open_gguf(llama_cpp, gguf_file["f16"])
    texts = [
        chat_prompt("Rewrite the sentence using a simile.", loaded.prompt_style),
        "  café, naïve and 日本語 — a test<|endoftext|>after\n\n\tend  !!",
    ]
    for text in texts:
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert theirs == tokenizer.encode(text, allowed_special="all")
    assert llm.token_eos() == EOS_TOKEN_ID


def test_llama_cpp_gives_our_greedy_tokens_at_f32(llama_cpp, gguf_file, loaded, tokenizer):
    llm = open_gguf(llama_cpp, gguf_file["f32"])
    for prompt, ours in prompts_and_ours(loaded, tokenizer):
        assert len(ours) == NEW_TOKENS  # (a random model rarely writes end-of-text)
        assert llama_greedy(llm, prompt, NEW_TOKENS) == ours
        theirs_logits, our_logits = teacher_forced(llm, loaded.model, prompt, ours)
        scale = np.abs(our_logits).max()
        np.testing.assert_allclose(theirs_logits, our_logits, rtol=0, atol=0.005 * scale)


def test_llama_cpp_agrees_with_us_at_f16(llama_cpp, gguf_file, loaded, tokenizer):
    llm = open_gguf(llama_cpp, gguf_file["f16"])
    agree = total = 0
    for prompt, ours in prompts_and_ours(loaded, tokenizer):
        theirs_logits, our_logits = teacher_forced(llm, loaded.model, prompt, ours)
        their_picks = theirs_logits.argmax(-1)
        for position, (mine, theirs) in enumerate(zip(ours, their_picks, strict=True)):
            if mine != theirs:  # only a near tie may flip
                gap = our_logits[position, mine] - our_logits[position, theirs]
                assert gap < 0.05, f"position {position}: our margin {gap:.3f} is no near tie"
        agree += int((their_picks == np.array(ours)).sum())
        total += len(ours)
        scale = np.abs(our_logits).max()
        np.testing.assert_allclose(theirs_logits, our_logits, rtol=0, atol=0.01 * scale)
    assert agree / total >= 0.97, f"{agree} of {total} greedy choices agree"


# --- llama-cpp-python's OpenAI-compatible server, and our judge client against it ---------


@pytest.fixture
def llama_server(llama_cpp, gguf_file):
    """``python -m llama_cpp.server`` with the f32 export, on a loopback port."""
    port = closed_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file["f32"])]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(N_CTX)]
    command += ["--n_threads", "1", "--model_alias", "tiny-sft", "--verbose", "False"]
    log = gguf_file["f32"].parent / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to a minute to load and listen
            if server.poll() is not None:
                pytest.fail(f"llama_cpp.server exited:\n{log.read_text()[-2000:]}", pytrace=False)
            try:
                if requests.get(f"{base}/v1/models", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.slow
def test_the_server_answers_in_our_prompt_style_with_our_tokens(llama_server, loaded, tokenizer):
    """The chat template in the GGUF file turns a chat message into our Alpaca prompt."""
    instruction = "Name a prime number."
    request = {
        "model": "tiny-sft",
        "messages": [{"role": "user", "content": instruction}],
        "temperature": 0,
        "max_tokens": 24,
    }
    reply = requests.post(f"{llama_server}/v1/chat/completions", json=request, timeout=120).json()
    ids = tokenizer.encode(chat_prompt(instruction, loaded.prompt_style))
    assert reply["usage"]["prompt_tokens"] == len(ids)
    ours = tokenizer.decode(list(stream_tokens(loaded.model, ids, 24, N_CTX, eos_id=EOS_TOKEN_ID)))
    assert reply["choices"][0]["message"]["content"] == ours


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ollama_evaluate.JudgeReplyWarning")  # nonsense replies
def test_our_judge_client_scores_against_the_real_server(llama_server, tmp_path, capsys):
    """``ollama_evaluate.py --api openai`` end to end: asks, saves every reply, reports.

    The tiny random model's replies are nonsense, so few have a score; every entry must get
    an answer from the server (saved in the file), none a failed request.
    """
    entries = [
        {"instruction": "Name a prime number.", "input": "", "output": "7", "model_response": "7"},
        {"instruction": "Add 2 and 3.", "input": "", "output": "5", "model_response": "6"},
        {"instruction": "Spell cat.", "input": "", "output": "c-a-t", "model_response": "cat"},
    ]
    path = save_json(entries, tmp_path / "responses.json")
    args = ["--file_path", str(path), "--url", llama_server, "--api", "openai"]
    status = oe.main([*args, "--model", "tiny-sft", "--timeout", "300"])
    out = capsys.readouterr().out
    assert status == 0, out
    saved = oe.read_responses(path)
    assert all(entry["judge_model"] == "tiny-sft" for entry in saved)
    assert all(isinstance(entry["judge_reply"], str) and entry["judge_reply"] for entry in saved)
    scored = [entry["judge_score"] for entry in saved if entry["judge_score"] is not None]
    assert f"Number of scores: {len(scored)} of 3" in out
