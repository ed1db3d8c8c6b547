"""Training checkpoints: the file that lets a run stop and resume where it stood.

``save_checkpoint`` writes the model, the optimizer, ``TrainState`` (where training stands
and the losses so far), the data order's random states and the random-number states,
atomically and with a checksum, keeping the one before it; ``load_checkpoint`` checks and
restores one, falling back on the previous checkpoint when the newest is damaged.
``trainer.ResumableRun`` decides when to call them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from course.pretraining import LoopState
from runtime.errors import ChapterError
from runtime.outputs import keep_previous, load_failure, verify_file, write_atomically


@dataclass
class TrainState(LoopState):
    """Where training stands; a checkpoint holds it next to the model and optimizer."""

    initial_losses: list[float] = field(default_factory=list)  # [train, val] before training
    seconds: float = 0.0  # training time, over all sessions
    finished: bool = False
    world_size: int = 1  # processes that trained it (the global batch depends on it)


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    shuffle: dict,
) -> Path:
    """Write a checkpoint atomically: a crash while saving keeps the previous one whole.

    The checkpoint it replaces is kept as ``NAME.prev.pt``, and each has its checksum beside
    it (``outputs.checksum_path``), so that a damaged checkpoint can fall back on the one
    before it. A full disk raises ``outputs.OutputError``: the earlier checkpoints stay.
    """
    path = Path(path)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "shuffle": shuffle,
        "rng": _rng_states(),
    }
    keep_previous(path, path.with_name(f"{path.stem}.prev{path.suffix}"))
    return write_atomically(path, lambda tmp: torch.save(checkpoint, tmp), checksum=True)


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[TrainState, dict]:
    """Restore the model, optimizer and random states; returns (state, shuffle states).

    The file is checked first (its checksum, then its contents). A damaged checkpoint falls
    back on the previous one (``NAME.prev.pt``) when that one is whole, and says so;
    otherwise it raises ``ChapterError`` with one line that says what to do. The state's
    ``history`` comes back as a dict (``ResumableRun`` makes it its class again).
    """
    path = Path(path)
    previous = path.with_name(f"{path.stem}.prev{path.suffix}")
    defaults = asdict(TrainState())

    def restore(file: Path) -> tuple[TrainState, dict]:
        verify_file(file, "delete it (and its .sha256) to train from the start")
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            saved, shuffle = dict(checkpoint["state"]), dict(checkpoint["shuffle"])
            state = TrainState(**saved)
            wrong = [  # (a field's value of its default's type; a float may be an int)
                k
                for k, v in saved.items()
                if defaults[k] is not None
                and not isinstance(
                    v, (int, float) if isinstance(defaults[k], float) else type(defaults[k])
                )
            ]
            if wrong or not {"epoch_start", "now"} <= set(shuffle):
                raise ValueError(f"its training state is malformed ({(wrong or ['shuffle'])[0]})")
            _set_rng_states(checkpoint["rng"])
        except Exception as exc:  # pickle errors, a truncated zip, a wrong structure, ...
            raise ChapterError(
                f"{file} is not a usable checkpoint of this model ({load_failure(exc)}); "
                "delete it to train from the start"
            ) from None
        return state, shuffle

    try:
        return restore(path)
    except ChapterError as exc:
        if not previous.is_file():
            raise
        try:
            restored = restore(previous)
        except ChapterError:
            raise exc from None
        print(f"warning: {exc}; resuming from the previous checkpoint {previous} instead")
        return restored
