"""One rank of a multi-process training run, for tests/test_distributed.py.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/distributed_worker.py SPEC

SPEC is a JSON file: the tiny run to train (``helpers.train_tiny``: its batch size,
``grad_accum``, checkpoint, failures to cause) and where to write what happened. Each rank writes
``<out>.rank<r>.pt``: the state it returned (or the error it raised), the rows it trained
on, and (rank 0) the final weights.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from dataclasses import asdict

import torch

from course.instruction_data import create_dataloaders, custom_collate_fn
from helpers import CharTokenizer, tiny_model, train_tiny, varied_entries
from runtime import distributed, engine


def tiny_training_setup(batch_size: int, *, group_by_length: bool = False, seed: int = 0):
    """(model, train_loader, val_loader, optimizer, loss_fn) of a tiny run, the same in every
    process: 40 entries of varied lengths, one token per character, global batches of
    ``batch_size``.

    The model is float64. In float32, runs that add the same numbers in another order end
    up apart by more than rounding: a parameter whose gradient is zero in exact arithmetic
    (the key biases: softmax ignores a shift of every score) gets a gradient of pure rounding
    noise, which AdamW normalises into full-size steps. In float64 that noise stays far below
    AdamW's eps, and the runs agree to about 1e-10.
    """
    data = varied_entries(40)
    train_loader, val_loader, _ = create_dataloaders(
        data,
        data[:12],
        data[:4],
        CharTokenizer(),
        batch_size=batch_size,
        group_by_length=group_by_length,
    )
    for loader in (train_loader, val_loader):  # pad with 0 (no character of the texts)
        loader.collate_fn = functools.partial(custom_collate_fn, pad_token_id=0)
    model = tiny_model(seed, vocab_size=128, context_length=192).double()
    optimizer = engine.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    return model, train_loader, val_loader, optimizer, engine.packed_loss_batch


class Recorder:
    """The loss function, recording the rows each training call saw; on request it asks for a
    stop (as Ctrl-C would) or returns NaN at its ``n``-th call."""

    def __init__(self, spec: dict, rank: int, loss_fn) -> None:
        self.spec, self.rank, self.loss_fn = spec, rank, loss_fn
        self.calls, self.rows = 0, []

    def __call__(self, inputs, targets, model, device):
        self.calls += 1
        if torch.is_grad_enabled():  # training, not evaluation
            self.rows += [tuple(row) for row in inputs.tolist()]
        if self.spec.get("stop_rank") == self.rank and self.calls == self.spec["stop_call"]:
            os.kill(os.getpid(), signal.SIGINT)
        loss = self.loss_fn(inputs, targets, model, device)
        if self.spec.get("nan_rank") == self.rank and self.calls == self.spec["nan_call"]:
            loss = loss * float("nan")
        return loss


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path, encoding="utf-8").read())
    torch.set_num_threads(1)
    ranks = distributed.ranks_from_env()
    model, train_loader, val_loader, optimizer, loss_fn = tiny_training_setup(
        spec["batch"], group_by_length=spec.get("group_by_length", False)
    )
    recorder = Recorder(spec, ranks.rank, loss_fn)
    result = {"rank": ranks.rank}
    with distributed.process_group(ranks, torch.device("cpu")):
        try:
            state = train_tiny(
                model,
                train_loader,
                val_loader,
                optimizer,
                recorder,
                grad_accum=spec.get("grad_accum", 1),
                ranks=ranks,
                checkpoint_path=spec.get("checkpoint"),
                resume=spec.get("resume", False),
            )
            result["state"] = asdict(state)
        except Exception as exc:  # what the test checks: which error, on which rank
            result["error"] = f"{type(exc).__name__}: {exc}"
    result["rows"] = recorder.rows
    if ranks.is_main:
        result["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(result, f"{spec['out']}.rank{ranks.rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
