"""Talk to the fine-tuned model in the terminal; the answer appears as it is generated.

    python main/chat.py --model outputs/latest/gpt2-medium355M-sft.pth

Each line you type is one instruction; the model answers it in its prompt style (from the run's
``run-config.json``, or ``--prompt-style``) and stops at its end-of-text token. The model learned
single instructions, so every line starts afresh: earlier turns are not part of the prompt.
``exit``, ``quit`` or Ctrl-D ends the chat; Ctrl-C stops the answer being written.

``stream_reply`` is the piece the chat page (``chat_page.py``) shares: it turns the token ids
that ``engine.stream_tokens`` yields into text, never splitting a character that spans tokens.
"""

from __future__ import annotations

import sys

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import codecs
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import torch

from course.instruction_data import (
    EOS_TOKEN_ID,
    PROMPT_STYLES,
    ChapterError,
    PromptStyle,
    format_input,
)
from runtime.engine import in_precision, stream_tokens
from runtime.gpt2_tokenizer import get_tokenizer
from runtime.model_file import LoadedModel, find_model_file, load_model_file
from runtime.run_config import PRECISIONS, check_precision

QUIT_WORDS = ("exit", "quit", "/exit", "/quit")


def chat_prompt(instruction: str, style: PromptStyle) -> str:
    """The prompt for one instruction: the course's ``format_input``, then the response header.

    The model saw exactly this before every answer in training, so it writes the answer next.
    """
    return format_input({"instruction": instruction, "input": ""}, style) + style.response_sep


def stream_reply(
    loaded: LoadedModel,
    tokenizer: Any,
    instruction: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """The model's answer to ``instruction``, in pieces of text as its tokens are generated.

    Greedy with ``temperature=0`` (the chapter's choice); otherwise sampled from the ``top_k``
    most likely tokens. A token may end inside a multi-byte character (GPT-2's tokens are
    bytes): such bytes wait until the character is complete.
    """
    ids = tokenizer.encode(chat_prompt(instruction, loaded.prompt_style))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in stream_tokens(
        loaded.model,
        ids,
        max_new_tokens,
        loaded.config["context_length"],
        temperature=temperature,
        top_k=top_k,
        eos_id=EOS_TOKEN_ID,
        generator=generator,
    ):
        piece = decoder.decode(tokenizer.decode_single_token_bytes(token))
        if piece:
            yield piece
    rest = decoder.decode(b"", final=True)
    if rest:
        yield rest


def repl(
    reply: Callable[[str], Iterator[str]],
    *,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    echo: bool = False,
) -> int:
    """Read an instruction, stream the reply, repeat until exit/quit or end of input.

    ``echo`` writes each line read after the prompt, as a terminal would show it: with piped
    input, a transcript then holds the questions as well as the answers. Returns the number of
    instructions answered.
    """
    answered = 0
    while True:
        try:
            line = read(">> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return answered
        if echo:
            out.write(f"{line}\n")
        line = line.strip()
        if line.lower() in QUIT_WORDS:
            return answered
        if not line:
            continue
        try:
            for piece in reply(line):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n\n")
        out.flush()
        answered += 1


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chat.py", description="Chat with a fine-tuned model in the terminal."
    )
    add_generation_args(p)
    return p


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The options the terminal chat and the chat page share."""
    p.add_argument("--model", help="the model file (default: outputs/latest/*-sft.pth)")
    p.add_argument(
        "--prompt-style",
        choices=list(PROMPT_STYLES),
        help="the prompt style the model learned (default: its run's, else alpaca)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=123, help="the sampling seed (123)")
    p.add_argument("--n-heads", type=int, help="attention heads, for a width that is no GPT-2 size")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default), or bf16: weights and cache in bf16, half the bytes per token "
        "(where the hardware has bf16)",
    )


def check_generation_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work, before the model is loaded."""
    if args.max_new_tokens < 1:
        raise ChapterError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if not args.temperature >= 0:
        raise ChapterError(f"--temperature {args.temperature}: give 0 (greedy) or more")
    if args.top_k is not None and args.top_k < 1:
        raise ChapterError(f"--top-k {args.top_k}: give at least 1 (or leave it out)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ChapterError(f"--device {args.device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ChapterError(f"--device {args.device}: PyTorch sees no CUDA GPU; use cpu")
    try:
        check_precision(args.precision, device)
    except ChapterError as exc:
        raise ChapterError(f"--precision {args.precision}: {exc}") from None


def chat_tokenizer() -> Any:
    """GPT-2's tokenizer from the BPE files on disk (no network), else tiktoken's download."""
    try:
        return get_tokenizer(offline=True)
    except FileNotFoundError:
        return get_tokenizer()


def load_for_chat(args: argparse.Namespace) -> tuple[LoadedModel, Any]:
    """The model named by ``--model`` (or the latest run's) and GPT-2's tokenizer."""
    check_generation_args(args)
    path = args.model or find_model_file()
    loaded = load_model_file(
        path, prompt_style=args.prompt_style, n_heads=args.n_heads, device=args.device
    )
    loaded = dataclasses.replace(loaded, model=in_precision(loaded.model, args.precision))
    return loaded, chat_tokenizer()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; a problem prints one ``error:`` line and exits with 2."""
    args = build_arg_parser().parse_args(argv)
    try:
        loaded, tokenizer = load_for_chat(args)
    except ChapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    generator = torch.Generator(device=args.device).manual_seed(args.seed)

    def reply(instruction: str) -> Iterator[str]:
        return stream_reply(
            loaded,
            tokenizer,
            instruction,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            generator=generator,
        )

    print(
        f"Chatting with {loaded.path} ({loaded.prompt_style.name} prompts). Type an instruction; "
        "each line is answered on its own. exit, quit or Ctrl-D ends the chat."
    )
    repl(reply, echo=not sys.stdin.isatty())  # piped questions: show them with the answers
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
