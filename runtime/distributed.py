"""More than one process: torchrun, DistributedDataParallel, and what the ranks agree on.

``torchrun --nproc_per_node=N main/instruction_finetuning.py ...`` starts N copies of the
program and tells each its place through environment variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); ``ranks_from_env`` reads them. Without torchrun there is one process and
everything here does nothing.

How the work is shared (see ``trainer.py`` for the loss):

- every rank builds the same loaders, and the training loader yields *global* batches of
  per-device batch x ranks x accumulation steps entries, in the same order on every rank
  (the order's random generator is copied from rank 0 at the start of every epoch);
- each rank trains on its own slice of every global batch (``rank_rows``), so each rank
  sees its own shard of every epoch's order;
- ``DistributedDataParallel`` averages the gradients, so every rank takes the same step;
- only rank 0 evaluates, prints, plots, writes files and saves checkpoints;
- after each step the ranks add up the step's loss and their stop requests in one
  reduction (``sum_across``), so that a Ctrl-C, a SIGTERM or a non-finite loss on one rank
  stops them all at the same step.

The process group uses NCCL when training on CUDA GPUs and Gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from course.instruction_data import ConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank among the processes on this machine: which GPU to use

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = Ranks()


def ranks_from_env(environ: dict | None = None) -> Ranks:
    """The ranks torchrun sets in the environment (none set: a single process)."""
    env = os.environ if environ is None else environ
    try:
        ranks = Ranks(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers") from None
    if not 0 <= ranks.rank < ranks.world_size:
        raise ConfigError(f"RANK {ranks.rank} is outside WORLD_SIZE {ranks.world_size}")
    return ranks


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device of this rank: under torchrun each process on a machine takes its own GPU."""
    if not ranks.distributed or device.type != "cuda":
        return device
    if device.index not in (None, ranks.local_rank):
        raise ConfigError(
            f"under torchrun each process uses the GPU of its LOCAL_RANK; drop --device "
            f"{device} or pass --device cuda"
        )
    if ranks.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {ranks.local_rank} has no GPU: this machine has "
            f"{torch.cuda.device_count()}; start at most that many processes per machine"
        )
    return torch.device("cuda", ranks.local_rank)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """The process group of a torchrun launch while the block runs (nothing for one process).

    NCCL for CUDA GPUs, Gloo on the CPU; torchrun's ``MASTER_ADDR`` and ``MASTER_PORT`` say
    where the ranks meet.
    """
    if not ranks.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where tensors must be for a collective: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


@contextlib.contextmanager
def quiet_unless_main(ranks: Ranks) -> Iterator[None]:
    """Only rank 0 prints: the other ranks' standard output is dropped inside this block
    (their errors still reach standard error)."""
    if ranks.is_main:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


@contextlib.contextmanager
def main_process_first(ranks: Ranks) -> Iterator[None]:
    """Run the block on each machine's first process, then on the others: a download is made
    once per machine, and the other processes find it done."""
    if ranks.local_rank != 0:
        barrier(ranks)
    yield
    if ranks.local_rank == 0:
        barrier(ranks)


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def sum_across(values: list[float] | torch.Tensor, ranks: Ranks) -> list[float]:
    """Each of ``values`` (floats, or a tensor on any device) added up over all ranks, in
    float64: one all-reduce, and one wait for the device."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if ranks.distributed:
        tensor = tensor.to(_collective_device())
        dist.all_reduce(tensor)
    return tensor.tolist()


def sync_generator(generator: torch.Generator | None, ranks: Ranks) -> None:
    """Give every rank rank 0's random generator state (the same data order everywhere)."""
    if generator is not None and ranks.distributed:
        generator.set_state(broadcast(generator.get_state(), ranks))


def rank_rows(batch_rows: int, ranks: Ranks) -> slice:
    """This rank's rows of a global batch: an equal, contiguous share."""
    if batch_rows % ranks.world_size:
        raise ValueError(
            f"a global batch of {batch_rows} rows does not split over {ranks.world_size} ranks"
        )
    share = batch_rows // ranks.world_size
    return slice(ranks.rank * share, (ranks.rank + 1) * share)


class StepLoss:
    """``step_loss(*batch) = loss_fn(*batch, model, device)`` (``batch``: inputs and targets,
    or DPO's batch of pairs), where ``model`` is the model or the ``DistributedDataParallel``
    that wraps it: every loss reaches the model only by calling it (``GPTModel.forward`` takes
    what the fast losses need), so DDP sees each forward and averages the gradients.
    ``no_sync`` is DDP's (None: one process)."""

    def __init__(self, model: nn.Module, loss_fn: Any, device: torch.device | str) -> None:
        self.model, self.loss_fn, self.device = model, loss_fn, device
        self.no_sync = getattr(model, "no_sync", None)

    def __call__(self, *batch: Any) -> torch.Tensor:
        return self.loss_fn(*batch, self.model, self.device)


def data_parallel(
    model: nn.Module, loss_fn: Any, device: torch.device | str, ranks: Ranks
) -> StepLoss:
    """The step's loss, with ``model`` wrapped in ``DistributedDataParallel`` when there are
    several ranks (which also copies rank 0's weights to every rank)."""
    if not ranks.distributed:
        return StepLoss(model, loss_fn, device)
    device = torch.device(device)
    device_ids = [device.index] if device.type == "cuda" else None
    # (gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy)
    wrapped = nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, gradient_as_bucket_view=True
    )
    return StepLoss(wrapped, loss_fn, device)
