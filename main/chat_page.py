"""A chat page for the fine-tuned model, in the browser, offline.

    python main/chat_page.py --model outputs/latest/gpt2-medium355M-sft.pth
    # then open http://127.0.0.1:7860

The page is made with Gradio rather than Chainlit, the course's choice for its bonus page: a
Gradio page is a plain Python script, so it starts with one ``python`` command that takes
``--model`` like every other command here, and its chat widget shows a reply while a generator
function is still yielding it, with sliders for the settings beside it. A Chainlit app starts
through ``chainlit run app.py``, which takes no arguments of the app's own and writes a
``.chainlit/`` settings folder into the working directory.

Offline: Gradio's page assets ship inside the package. What it would fetch from the internet
is switched off here: usage analytics and the version check (``GRADIO_ANALYTICS_ENABLED``),
Hugging Face Hub calls (``HF_HUB_OFFLINE``), web fonts (the theme uses the system's fonts),
server-side rendering and share links (``ssr_mode=False``, ``share=False``). The browser test
records every request the page makes and fails on any that leaves the machine.

Each message is one instruction in the model's prompt style (the model learned single
instructions; earlier turns are not part of the prompt). The answer streams token by token
from ``engine.stream_tokens`` (through ``chat.stream_reply``) and stops at end-of-text.
"""

from __future__ import annotations

import sys

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import errno
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import torch

from chat import add_generation_args, load_for_chat, stream_reply
from course.instruction_data import ChapterError
from runtime.model_file import LoadedModel

# Nothing is fetched from the internet (set before Gradio is imported, which reads them)
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
SYSTEM_MONO_FONTS = ["ui-monospace", "Consolas", "monospace"]
GRADIO_HINT = "the chat page needs Gradio: pip install -r requirements.txt (or pip install gradio)"


def import_gradio() -> Any:
    """Gradio, imported with its internet features switched off."""
    for name, value in OFFLINE_ENV.items():
        os.environ[name] = value
    try:
        import gradio
    except ImportError:
        raise ChapterError(GRADIO_HINT) from None
    return gradio


def build_page(
    loaded: LoadedModel,
    tokenizer: Any,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 123,
) -> Any:
    """The Gradio chat app (not started): a chat box and sliders for the generation settings."""
    gr = import_gradio()
    generator = torch.Generator(device=loaded.model.out_head.weight.device).manual_seed(seed)
    context = loaded.config["context_length"]

    def respond(message: str, history: list, temperature: float, top_k: int, max_new: int):
        text = ""
        for piece in stream_reply(
            loaded,
            tokenizer,
            message,
            max_new_tokens=int(max_new),
            temperature=float(temperature),
            top_k=int(top_k) or None,
            generator=generator,
        ):
            text += piece
            yield text
        if not text:
            yield "(the model ended its answer at once: it wrote the end-of-text token first)"

    sliders = [
        gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature (0: greedy)"),
        gr.Slider(0, 200, value=top_k or 0, step=1, label="Top-k (0: all tokens)"),
        gr.Slider(1, context, value=min(max_new_tokens, context), step=1, label="Max new tokens"),
    ]
    return gr.ChatInterface(
        respond,
        additional_inputs=sliders,
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        title=f"Chat with {loaded.name}",
        description=(
            f"{loaded.path} · {loaded.prompt_style.name} prompts · each message is a new "
            "instruction (the model learned single instructions)"
        ),
        analytics_enabled=False,
        flagging_mode="never",
        save_history=False,
    )


def launch(page: Any, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve the page on ``host:port``; returns its URL. ``block=False`` returns at once.

    Gradio's own start-up lines are left out (``quiet``): they end in advice to "set
    `share=True`", a public link through Gradio's servers that this offline page never makes.
    ``main`` prints the address and what to do instead."""
    gr = import_gradio()
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)
    _, url, _ = page.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        mcp_server=False,
        prevent_thread_lock=True,
        theme=theme,
        quiet=True,
    )
    if block:
        serve_until_interrupted(page)
    return url


def check_port(host: str, port: int) -> None:
    """Refuse a port that is out of range or that another program already listens on."""
    if not 0 < port < 65536:
        raise ChapterError(f"--port {port} is out of range; pass one from 1 to 65535, e.g. 7860")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        busy = exc.errno == errno.EADDRINUSE
        raise ChapterError(
            f"cannot serve on {host}:{port}: "
            + ("the port is in use (another chat page?)" if busy else str(exc.strerror or exc))
            + f"; pass another with --port, e.g. --port {port + 1 if port < 65535 else 7860}"
            + ("" if busy else ", or another --host")
        ) from None


def serve_until_interrupted(page: Any) -> None:
    """Wait while the page serves; Ctrl-C closes it and is raised on."""
    try:
        while page.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        page.close()
        raise


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chat_page.py", description="A chat page for a fine-tuned model (offline)."
    )
    add_generation_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (7860)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; a problem prints one ``error:`` line and exits with 2."""
    args = build_arg_parser().parse_args(argv)
    try:
        import_gradio()  # before loading a large model: is the page possible at all?
        loaded, tokenizer = load_for_chat(args)
        check_port(args.host, args.port)
        page = build_page(
            loaded,
            tokenizer,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
        url = launch(page, host=args.host, port=args.port, block=False)
        reach = (
            "only this machine can open it (--host 0.0.0.0 serves it to your network)"
            if args.host in ("127.0.0.1", "localhost")
            else "other machines open it through this machine's address"
        )
        print(f"Chat page for {loaded.path}: open {url} in a browser; {reach}. Ctrl-C stops it.")
        serve_until_interrupted(page)
    except (ChapterError, OSError, KeyboardInterrupt) as exc:
        return interrupts.stopped_or_failed(exc, "the chat page stopped")
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
