"""One code tree's side of ``revisions.py``: a process that builds the model and times the
chapter's fast paths with the code of one tree (a revision's checkout, or the working tree).

``revisions.py`` starts it with only that tree on ``PYTHONPATH`` (its root and ``main/``), so
``previous_chapters`` and ``engine`` come from that tree: ``runtime/engine.py`` after the
reorganisation of issue 15, ``main/engine.py`` before it. This file imports nothing of the
project at its top (the parent imports it for ``REPLY`` and ``random_params``), and the
worker imports nothing from ``benchmarks`` (an old tree's package lacks this file).

Commands come one JSON line at a time on stdin; each answer is one line on stdout,
``REPLY`` + JSON (anything else a tree prints is not an answer). The worker times its own
work, so the pipe is not in the times:

* ``{"cmd": "check"}``: the loss of the first batch under ``no_grad``, before any training;
* ``{"cmd": "generate"}``: greedy ``engine.generate_batch`` of all prompts, EOS ignored:
  seconds and the new tokens;
* ``{"cmd": "step", "batch": i}``: one training step on batch ``i`` (``packed_loss_batch``,
  backward, the fused AdamW of ``make_optimizer``): seconds and the loss;
* ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import importlib
import json
import site
import sys
import time
from pathlib import Path

import torch

REPLY = "@revisions "  # a worker's answer line: REPLY + JSON


def random_params(cfg: dict, seed: int) -> dict:
    """GPT-2 weights in the course's ``params`` layout (OpenAI's, matrices [in, out]) drawn
    from ``seed``: N(0, 0.02) matrices and embeddings, unit norm gains, zero biases. Every
    tree's ``load_weights_into_gpt`` reads this layout, so both sides get the same weights
    whatever their modules look like inside."""
    g = torch.Generator().manual_seed(seed)
    d, vocab, ctx = cfg["emb_dim"], cfg["vocab_size"], cfg["context_length"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    def linear(n_in: int, n_out: int) -> dict:
        return {"w": normal(n_in, n_out), "b": torch.zeros(n_out)}

    def norm() -> dict:
        return {"g": torch.ones(d), "b": torch.zeros(d)}

    blocks = [
        {
            "attn": {"c_attn": linear(d, 3 * d), "c_proj": linear(d, d)},
            "mlp": {"c_fc": linear(d, 4 * d), "c_proj": linear(4 * d, d)},
            "ln_1": norm(),
            "ln_2": norm(),
        }
        for _ in range(cfg["n_layers"])
    ]
    return {"wte": normal(vocab, d), "wpe": normal(ctx, d), "blocks": blocks, **norm()}


def project_modules() -> dict[str, str]:
    """The file of every loaded module that is neither Python's nor an installed package's
    (this file excepted): the project's code, which must all come from the tree under test."""
    places = {sys.prefix, sys.base_prefix, sys.exec_prefix, site.getusersitepackages()}
    places.update(site.getsitepackages())
    prefixes = tuple(str(Path(p).resolve()) for p in places)
    files = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()}
    paths = {  # (torch.ops and torch.classes name a relative file that is none)
        name: str(Path(file).resolve())
        for name, file in sorted(files.items())
        if file and Path(file).is_absolute()
    }
    here = str(Path(__file__).resolve())
    return {
        name: path for name, path in paths.items() if path != here and not path.startswith(prefixes)
    }


def load_engine(root: Path):
    """The tree's engine: ``runtime/engine.py`` (after issue 15) or ``main/engine.py``."""
    if (root / "runtime" / "engine.py").is_file():
        return importlib.import_module("runtime.engine")
    return importlib.import_module("engine")


class Side:
    """The model, optimizer, batches and prompts of one tree, and its three timed commands."""

    def __init__(self, setup: dict):
        self.device = torch.device(setup["device"])
        pc = importlib.import_module("previous_chapters")
        self.engine = load_engine(Path(setup["root"]))
        torch.manual_seed(setup["seed"])
        model = pc.GPTModel(setup["cfg"])
        pc.load_weights_into_gpt(model, random_params(setup["cfg"], setup["seed"]))
        self.model = model.to(self.device)
        self.optimizer = self.engine.make_optimizer(
            model, lr=setup["lr"], weight_decay=setup["weight_decay"]
        )
        self.batches = [(x.to(self.device), y.to(self.device)) for x, y in setup["batches"]]
        self.prompts = setup["prompts"]
        self.new_tokens = setup["new_tokens"]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check(self) -> dict:
        self.model.eval()
        with torch.no_grad():
            loss = self.engine.packed_loss_batch(*self.batches[0], self.model, self.device)
        return {"loss": loss.item()}

    def generate(self) -> dict:
        self.model.eval()
        ctx = self.model.context_length
        self.sync()
        start = time.perf_counter()
        tokens = self.engine.generate_batch(
            self.model, self.prompts, self.new_tokens, ctx, eos_id=None
        )
        self.sync()
        return {"seconds": time.perf_counter() - start, "tokens": tokens}

    def step(self, batch: int) -> dict:
        self.model.train()
        inputs, targets = self.batches[batch]
        self.sync()
        start = time.perf_counter()
        self.optimizer.zero_grad()
        loss = self.engine.packed_loss_batch(inputs, targets, self.model, self.device)
        loss.backward()
        self.optimizer.step()
        value = loss.item()
        self.sync()
        return {"seconds": time.perf_counter() - start, "loss": value}


def reply(**answer: object) -> None:
    print(REPLY + json.dumps(answer), flush=True)


def serve(setup_path: str, root: str) -> None:
    """Build the side of the tree at ``root`` from the setup file, then answer commands until
    ``quit``."""
    setup = {**torch.load(setup_path, weights_only=True), "root": root}
    torch.set_num_threads(setup["threads"])
    side = Side(setup)
    reply(modules=project_modules(), threads=torch.get_num_threads())
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        if command["cmd"] == "step":
            reply(**side.step(command["batch"]))
        elif command["cmd"] in ("check", "generate"):
            reply(**getattr(side, command["cmd"])())
        else:
            raise ValueError(f"unknown command {command!r}")


if __name__ == "__main__":
    # Python put this file's folder first on sys.path: take it off, so that nothing of the
    # current tree's benchmarks/ shadows the modules of the tree under test
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]
    serve(sys.argv[1], sys.argv[2])
