"""Reading a fine-tuned model file, and exporting it to transformers and to GGUF.

The model files are tiny random GPTs with GPT-2's vocabulary (``helpers.tiny_model_file``).
What transformers makes of the Hugging Face folder is compared with our model (logits, greedy
tokens, tokenizer, chat template); the GGUF file is read back with the ``gguf`` package's own
reader. llama.cpp itself runs the GGUF file in ``test_llama_cpp.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import export_model as ex
import previous_chapters as pc
from chat import chat_prompt
from course.instruction_data import PROMPT_STYLES, ConfigError
from helpers import REPO_ROOT, TINY_GPT2_VOCAB, needs_transformers, tiny_model, tiny_model_file
from runtime.gpt2_tokenizer import get_tokenizer
from runtime.model_file import (
    ModelFileError,
    config_from_state_dict,
    find_model_file,
    load_model_file,
)
from runtime.outputs import save_json, save_model, write_folder_atomically

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "Rewrite the sentence using a simile.\n\nThe car is very fast.",
    "  café, naïve and 日本語 — a test<|endoftext|>after",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def hf_folder(model_path, tmp_path_factory):
    return ex.export_model(model_path, "hf", tmp_path_factory.mktemp("hf") / "out")


@pytest.fixture(scope="module")
def gguf_folder(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "out"
    return ex.export_model(model_path, "gguf", out, dtype="f16", progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(offline=True)


# --- reading a model file ---------------------------------------------------------------------


@pytest.mark.parametrize("size", list(pc.MODEL_CONFIGS))
def test_the_config_of_each_gpt2_size_is_read_from_its_shapes(size):
    with torch.device("meta"):  # shapes only
        state = pc.GPTModel(pc.gpt2_config(size)).state_dict()
    cfg = config_from_state_dict(state, f"{size}.pth")
    assert cfg == {**pc.gpt2_config(size), "drop_rate": 0.0}


def test_a_loaded_model_file_gives_the_saved_models_logits(model_path):
    loaded = load_model_file(model_path)
    saved = pc.GPTModel({**pc.GPT_CONFIG_124M, **TINY_GPT2_VOCAB})
    saved.load_state_dict(torch.load(model_path, weights_only=True))
    ids = torch.tensor([[15496, 995, 11, 314]])
    torch.testing.assert_close(loaded.model(ids), saved.eval()(ids), rtol=0, atol=0)
    assert loaded.prompt_style.name == "alpaca" and not loaded.model.training


def test_the_prompt_style_comes_from_the_run_unless_given(tmp_path):
    path = tiny_model_file(tmp_path, prompt_style="phi3")
    assert load_model_file(path).prompt_style is PROMPT_STYLES["phi3"]
    assert load_model_file(path, prompt_style="alpaca").prompt_style is PROMPT_STYLES["alpaca"]


def test_an_unknown_prompt_style_is_a_setting_error_that_lists_the_styles(tmp_path):
    path = tiny_model_file(tmp_path, prompt_style="phi3")
    with pytest.raises(ConfigError, match=r"unknown prompt style 'chatml'; .*alpaca, phi3"):
        load_model_file(path, prompt_style="chatml")
    with pytest.raises(ConfigError, match=r"unknown prompt style 'chatml'"):
        ex.export_model(path, "hf", tmp_path / "hf", prompt_style="chatml")
    assert not (tmp_path / "hf").exists()  # refused before any work


def test_a_width_that_is_no_gpt2_size_needs_the_runs_settings_or_n_heads(tmp_path):
    path = tiny_model_file(tmp_path, run_config=False)
    with pytest.raises(ModelFileError, match="64 wide is no GPT-2 size.*--n-heads"):
        load_model_file(path)
    assert load_model_file(path, n_heads=4).config["n_heads"] == 4


def test_a_missing_model_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ModelFileError, match=r"no model file at .*instruction_finetuning.py"):
        load_model_file(tmp_path / "nothing.pth")
    with pytest.raises(ModelFileError, match=r"latest/ holds no \*-sft.pth; pass --model"):
        find_model_file(tmp_path)
    (tmp_path / "latest").mkdir()
    for name in ("a-sft.pth", "b-sft.pth"):  # which one? the user says
        (tmp_path / "latest" / name).write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"latest/ holds 2 \*-sft.pth files: pass the model"):
        find_model_file(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a zip file at all", "is not a PyTorch state dict file"),
        ({"model": {"w": torch.zeros(1)}, "optimizer": {}}, "is a training checkpoint"),
        ({"format": "lora-adapter-v1", "rank": 8, "tensors": {}}, "is a LoRA adapter file"),
        ({"tok_emb.weight": [1, 2]}, "does not hold a state dict"),
        ({"encoder.weight": torch.zeros(2, 2)}, "not a GPTModel state dict: it has no tok_emb"),
        (
            {"trf_blocks.0.att.qkv.lora_query.A": torch.zeros(2, 2)},
            "with LoRA adapters .* lora.save_merged_model",
        ),
    ],
)
def test_a_file_that_is_not_a_gptmodel_state_dict_is_refused(tmp_path, content, message):
    path = tmp_path / "model.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ModelFileError, match=message) as error:
        load_model_file(path, n_heads=4)
    assert str(path) in str(error.value)


def test_a_layer_of_the_wrong_shape_is_named(tmp_path):
    state = tiny_model(**TINY_GPT2_VOCAB).state_dict()
    state["trf_blocks.1.ff.layers.0.weight"] = torch.zeros(128, 64)
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(ModelFileError, match=r"layer trf_blocks.1.ff.layers.0.weight has shape"):
        load_model_file(tmp_path / "model.pth", n_heads=4)


def test_a_size_mismatch_is_refused(model_path, tmp_path):
    with pytest.raises(ModelFileError, match="size mismatch: .* --model-size 355M says"):
        load_model_file(model_path, model_size="355M")
    # a run-config.json of another model beside the file
    torch.save(torch.load(model_path, weights_only=True), tmp_path / "model.pth")
    save_json(
        {"model_size": "gpt2-medium (355M)", "model_overrides": {}}, tmp_path / "run-config.json"
    )
    with pytest.raises(
        ModelFileError, match="n_layers 2.*run-config.json beside it says.*n_layers 24"
    ):
        load_model_file(tmp_path / "model.pth")


# --- writing a folder atomically --------------------------------------------------------------


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"

    def fail(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder_atomically(out, fail)
    assert list(tmp_path.iterdir()) == []
    write_folder_atomically(out, lambda folder: (folder / "a.txt").write_text("first"))
    with pytest.raises(FileExistsError):
        write_folder_atomically(out, lambda folder: None)
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the earlier folder
        write_folder_atomically(out, fail, overwrite=True)
    assert (out / "a.txt").read_text() == "first"
    write_folder_atomically(out, lambda folder: (folder / "b.txt").write_text("2"), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["b.txt"]


def test_a_folder_and_its_files_get_ordinary_permissions(tmp_path):
    """As every output: the umask decides, even for a file its writer made private."""
    umask = os.umask(0o022)
    os.umask(umask)

    def fill(folder):
        os.close(os.open(folder / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600))

    out = write_folder_atomically(tmp_path / "out", fill)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "private.bin").stat().st_mode & 0o777 == 0o666 & ~umask


# --- Hugging Face transformers ----------------------------------------------------------------


def test_the_hf_tensors_are_ours_with_gpt2s_conv1d_layout(model_path):
    model = load_model_file(model_path).model
    tensors = ex.renamed_tensors(model, "hf")
    qkv = model.trf_blocks[1].att.qkv.weight  # [W_query | W_key | W_value], [out, in]
    torch.testing.assert_close(tensors["transformer.h.1.attn.c_attn.weight"], qkv.T)
    assert not torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])
    assert len(tensors) == len(model.state_dict())


def test_a_model_without_qkv_biases_gets_zero_biases(tmp_path):
    model = tiny_model(2, qkv_bias=False, **TINY_GPT2_VOCAB)
    for fmt, name in [("hf", "transformer.h.0.attn.c_attn.bias"), ("gguf", "blk.0.attn_qkv.bias")]:
        tensors = ex.renamed_tensors(model, fmt)
        assert torch.equal(tensors[name], torch.zeros(3 * 64))
        assert len(tensors) == len(model.state_dict()) + 2  # one bias per layer


@needs_transformers
def test_transformers_loads_the_folder_and_gives_our_logits_and_tokens(model_path, hf_folder):
    from transformers import GPT2LMHeadModel

    ours = load_model_file(model_path).model
    theirs = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    assert not theirs.config.tie_word_embeddings
    torch.testing.assert_close(theirs.lm_head.weight, ours.out_head.weight, rtol=0, atol=0)
    ids = torch.tensor([[15496, 995, 11, 314, 716, 257, 1332, 13]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    greedy = theirs.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert greedy.tolist() == pc.generate(ours, ids, 30, 512).tolist()


@needs_transformers
def test_transformers_tokenizer_and_chat_template_match_ours(hf_folder, tokenizer):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(hf_folder)
    for text in TEXTS:
        assert theirs.encode(text) == tokenizer.encode(text, allowed_special="all")
    assert theirs.eos_token_id == 50256
    messages = [{"role": "user", "content": "Name a prime number."}]
    rendered = theirs.apply_chat_template(messages, tokenize=False)
    assert rendered == chat_prompt("Name a prime number.", PROMPT_STYLES["alpaca"])


# --- GGUF and the Modelfile -------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_the_gguf_file_holds_gpt2s_metadata_tokenizer_and_our_tensors(model_path, gguf_folder):
    reader = gguf.GGUFReader(next(gguf_folder.glob("*.gguf")))
    assert _field(reader, "general.architecture") == "gpt2"
    shape = {"context_length": 512, "embedding_length": 64, "block_count": 2}
    for key, value in {**shape, "feed_forward_length": 256, "attention.head_count": 4}.items():
        assert _field(reader, f"gpt2.{key}") == value
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 50256
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and tokens[0] == "!"
    assert _field(reader, "tokenizer.ggml.merges")[0] == "Ġ t"  # GPT-2's first merge
    # the tensors: gguf's own list of GPT-2 tensor names, our values (2-D ones in f16)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]}
    state = load_model_file(model_path).model.state_dict()
    for tensor in reader.tensors:  # "blk.1.attn_qkv.weight" -> "blk.{bid}.attn_qkv"
        assert re.sub(r"\.\d+\.", ".{bid}.", tensor.name).rsplit(".", 1)[0] in allowed
    named = {t.name: t for t in reader.tensors}
    assert len(named) == len(state)
    out = named["output.weight"]
    assert out.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(out.data, state["out_head.weight"].half().numpy())
    norm = named["blk.1.ffn_norm.bias"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(norm.data, state["trf_blocks.1.norm2.bias"].numpy())


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """Ollama's Modelfile commands: {command: [arguments]} (a triple-quoted argument whole)."""
    commands: dict[str, list[str]] = {}
    pattern = r'^(FROM|TEMPLATE|PARAMETER) (?:"""(.*?)"""|(.*?))$'
    for match in re.finditer(pattern, text, re.M | re.S):
        value = match[2] if match[2] is not None else match[3]
        commands.setdefault(match[1], []).append(value)
    return commands


@pytest.mark.parametrize("style", list(PROMPT_STYLES))
def test_the_modelfile_uses_the_prompt_style_and_greedy_decoding(style, tmp_path):
    path = tiny_model_file(tmp_path / "run", prompt_style=style)
    out = ex.export_model(path, "gguf", tmp_path / "gguf", dtype="f32", progress=False)
    commands = parse_modelfile((out / "Modelfile").read_text())
    assert commands["FROM"] == ["./gpt-random-init-sft-f32.gguf"]
    assert (out / commands["FROM"][0]).is_file()
    rendered = commands["TEMPLATE"][0].replace("{{ .Prompt }}", "Name a prime number.")
    assert rendered == chat_prompt("Name a prime number.", PROMPT_STYLES[style])
    params = dict(p.split(" ", 1) for p in commands["PARAMETER"])
    assert params == {
        "stop": '"<|endoftext|>"',
        "temperature": "0",
        "num_ctx": "512",
        "num_predict": "256",
    }


# --- the command line -------------------------------------------------------------------------


def test_an_existing_output_needs_overwrite(model_path, gguf_folder, capsys):
    before = sorted(p.stat().st_mtime_ns for p in gguf_folder.iterdir())
    assert (
        ex.main(["--model", str(model_path), "--format", "gguf", "--output", str(gguf_folder)]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists; pass --overwrite" in err
    assert err.count("\n") == 1
    assert sorted(p.stat().st_mtime_ns for p in gguf_folder.iterdir()) == before


def test_bad_input_gives_one_error_line(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("hello")
    assert ex.main(["--model", str(tmp_path / "notes.pth"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a PyTorch state dict file" in err
    assert not (tmp_path / "notes-hf").exists()
    state = tiny_model(vocab_size=97).state_dict()  # not GPT-2's vocabulary
    torch.save(state, tmp_path / "small.pth")
    args = ["--model", str(tmp_path / "small.pth"), "--format", "gguf", "--n-heads", "4"]
    assert ex.main(args) == 2
    assert "its vocabulary has 97 tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_the_script_exports_with_one_command_and_overwrite_replaces(model_path, tmp_path):
    """`python main/export_model.py` in a fresh process, as the README shows it."""
    out = tmp_path / "exported"
    command = [sys.executable, "main/export_model.py", "--model", str(model_path)]
    command += ["--format", "hf", "--output", str(out)]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "GPT2LMHeadModel.from_pretrained" in first.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["tie_word_embeddings"]) == (2, 4, False)
    again = subprocess.run(
        [*command, "--overwrite", "--dtype", "f16"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_a_model_saved_by_save_model_exports(tmp_path):
    """The notebook's path: a GPTModel saved with outputs.save_model, exported by the function."""
    model = tiny_model(1, **TINY_GPT2_VOCAB)
    path = save_model(model, tmp_path / "model-sft.pth")
    out = ex.export_model(path, "gguf", n_heads=4, progress=False)
    assert out == tmp_path / "model-sft-gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model-sft-f16.gguf"]
