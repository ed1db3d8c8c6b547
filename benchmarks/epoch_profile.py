"""Where one epoch's time goes, for both contenders of the epoch measurement (bench.py, 2).

    python benchmarks/epoch_profile.py              # 96 training entries, as bench.py
    python benchmarks/epoch_profile.py --entries 32

Runs ``contenders.course_style_epoch`` and ``contenders.our_epoch`` once each on the same
weights and entries, and splits their time into the training forward (the loss of a step),
the backward, the optimizer, the evaluations, the sample after the epoch and the rest (the
loop itself, the loaders, collation). The pieces are timed by wrapping them
(``Tensor.backward``, the optimizers' step hooks, ``evaluate_model``, ``generate``), so the
profile costs nothing measurable; the loss is the time of the training step minus the rest.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import previous_chapters as pc  # noqa: E402
from benchmarks import contenders as c  # noqa: E402
from benchmarks.bench import MODEL  # noqa: E402
from benchmarks.workload import load_data  # noqa: E402
from course import pretraining  # noqa: E402
from course.instruction_data import create_dataloaders  # noqa: E402

PHASES = ("forward (loss)", "backward", "optimizer", "evaluation", "sample", "rest")


@contextmanager
def timed_pieces(seconds: dict[str, float]):
    """Add the wall time of each piece to ``seconds`` while the block runs."""

    def timing(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start

        return wrapper

    started: list[float] = []
    with ExitStack() as stack:
        for owner, name, phase in (
            (torch.Tensor, "backward", "backward"),
            (pretraining, "evaluate_model", "evaluation"),  # (pc's is served from there)
            (pc, "generate", "sample"),  # the course-style epoch's sample
            (pretraining, "generate", "sample"),  # the sample of train_model_simple
        ):
            real = getattr(owner, name)
            setattr(owner, name, timing(phase, real))
            stack.callback(setattr, owner, name, real)
        pre = register_optimizer_step_pre_hook(lambda *a: started.append(time.perf_counter()))
        post = register_optimizer_step_post_hook(
            lambda *a: seconds.__setitem__(
                "optimizer", seconds["optimizer"] + time.perf_counter() - started.pop()
            )
        )
        stack.callback(pre.remove)
        stack.callback(post.remove)
        yield


def profile(run, model, train_loader, val_loader, data, device) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with timed_pieces(seconds):
        run(model, train_loader, val_loader, data, device)
    total = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    rest = total - sum(seconds.values())
    # the forward of the training steps is in the rest; the loop, loaders and collation are
    # measured apart below (one pass over the loader) and what remains is the forward
    start = time.perf_counter()
    for _ in train_loader:
        pass
    seconds["rest"] = time.perf_counter() - start
    seconds["forward (loss)"] = rest - seconds["rest"]
    seconds["total"] = total
    seconds["system (page faults)"] = after.ru_stime - usage.ru_stime
    return dict(seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=96, help="training entries (default: 96)")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    data = load_data()
    train = data.train[: args.entries]
    torch.manual_seed(123)
    initial = copy.deepcopy(pc.GPTModel(pc.gpt2_config(MODEL)).state_dict())
    rows = {}
    for name, run, grouped in (
        ("course-style", c.course_style_epoch, False),
        ("ours", c.our_epoch, True),
    ):
        train_loader, val_loader, _ = create_dataloaders(
            train, data.val, data.test[:1], data.tokenizer, group_by_length=grouped
        )
        model = pc.GPTModel(pc.gpt2_config(MODEL))
        model.load_state_dict(initial)
        rows[name] = profile(run, model, train_loader, val_loader, data, device)
    print(f"One epoch, {len(train)} entries, {torch.get_num_threads()} thread(s): seconds (share)")
    print(f"| phase | {' | '.join(rows)} |\n|---|{'---|' * len(rows)}")
    for phase in (*PHASES, "total", "system (page faults)"):
        cells = [f"{r[phase]:.1f} ({r[phase] / r['total']:.0%})" for r in rows.values()]
        print(f"| {phase} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
