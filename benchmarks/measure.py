"""The measurements: alternating turns, the matmul peak, and the four comparisons.

Each ``bench_*`` function returns a plain dict (it goes into the JSON as it is).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import previous_chapters as pc
from benchmarks import contenders as c
from benchmarks.workload import (
    BATCH_SIZE,
    SEED,
    Data,
    Sizes,
    load_data,
    n_tokens,
    train_step_flops,
    training_batches,
)
from course.instruction_data import create_dataloaders
from course.lora import count_parameters
from runtime.engine import generate_batch, packed_loss_batch

BENCH_SCRIPT = Path(__file__).resolve().with_name("bench.py")

# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    contenders: dict[str, Callable[[int], Callable[[], object]]],
    rounds: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Seconds per measured round of each contender, taking turns A B, B A, A B, ...

    ``contenders[name](round)`` prepares a round (untimed) and returns the work to time.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            work = contenders[name](r)
            sync(device)
            start = time.perf_counter()
            work()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def best_seconds(kernel: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` timed runs of ``kernel``, after one untimed run."""
    return min(alternate({"kernel": lambda r: kernel}, repeats, 1, device)["kernel"])


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best fp32 FLOP/s of an n x n matmul, by torch.matmul and (CPU) by oneDNN directly."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    kernels = {"torch.matmul": lambda: a @ b}
    if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return {
        name: 2 * n**3 / best_seconds(kernel, device, repeats) for name, kernel in kernels.items()
    }


# --------------------------------------------------------------------------------------
# 1. Training step
# --------------------------------------------------------------------------------------


def bench_train_step(ours, hf, batches, cfg, sizes: Sizes, device, peak: float) -> dict:
    """Non-padding tokens/s and useful FLOP/s of ours and transformers' training steps."""
    loss_ours, loss_hf = c.check_same_loss(ours, hf, batches[0], device)
    ours.train()
    hf.train()
    steps = {
        "ours": c.make_train_step(ours, "ours", device),
        "hf": c.make_train_step(hf, "hf", device),
    }
    contenders = {
        name: (lambda r, step=step: lambda: step(batches[r % len(batches)]))
        for name, step in steps.items()
    }
    times = alternate(contenders, sizes.train_rounds, sizes.warmup, device)
    measured = [
        batches[r % len(batches)] for r in range(sizes.warmup, sizes.warmup + sizes.train_rounds)
    ]
    result = {"first_batch_loss": {"ours": loss_ours, "hf": loss_hf}}
    for name, seconds in times.items():
        runs = list(zip(measured, seconds, strict=True))
        tok_s = statistics.median(n_tokens(b) / t for b, t in runs)
        flop_s = statistics.median(train_step_flops(cfg, b) / t for b, t in runs)
        result[name] = {"tokens_per_s": tok_s, "flop_per_s": flop_s, "peak_share": flop_s / peak}
    result["padded_lengths"] = [int(b[0].shape[1]) for b in measured]
    result["tokens"] = [n_tokens(b) for b in measured]
    return result


# --------------------------------------------------------------------------------------
# 2. One epoch: all our options against the course-style loop
# --------------------------------------------------------------------------------------


def bench_epoch(initial_state: dict, cfg: dict, data: Data, sizes: Sizes, device) -> dict:
    """Seconds per epoch over ``sizes.epoch_entries`` training entries (all when None).

    Both start from the same weights and see the same entries; ours groups them by length.
    """
    train = data.train[: sizes.epoch_entries] if sizes.epoch_entries else data.train
    runs = {"course": (c.course_style_epoch, False), "ours": (c.our_epoch, True)}
    final_losses: dict[str, dict] = {}

    def contender(name: str):
        def prepare(r: int):
            run, grouped = runs[name]
            train_loader, val_loader, _ = create_dataloaders(
                train,
                data.val,
                data.test[:1],
                data.tokenizer,
                device=device,
                group_by_length=grouped,
            )
            model = pc.GPTModel(cfg).to(device)
            model.load_state_dict(initial_state)

            def work():
                final_losses[name] = run(model, train_loader, val_loader, data, device)

            return work

        return prepare

    times = alternate({name: contender(name) for name in runs}, sizes.epoch_rounds, 0, device)
    return {
        "entries": len(train),
        "steps": len(train) // BATCH_SIZE,
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "final_losses": final_losses,
    }


# --------------------------------------------------------------------------------------
# 3. Generation
# --------------------------------------------------------------------------------------


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def compare_outputs(ours: list[list[int]], other: list[list[int]]) -> dict:
    """How many prompts differ, and where the first differing token of each is."""
    diverged = {i: first_divergence(a, b) for i, (a, b) in enumerate(zip(ours, other, strict=True))}
    diverged = {i: pos for i, pos in diverged.items() if pos is not None}
    return {
        "prompts": len(ours),
        "identical": len(ours) - len(diverged),
        "first_divergence": diverged,
    }


def fastest_hf_cache(hf, prompts, n: int, device) -> str:
    """transformers' default dynamic cache or its static cache, whichever is faster here."""
    times = alternate(
        {
            cache: (lambda r, cache=cache: lambda: c.hf_generate(hf, prompts, n, cache))
            for cache in ("dynamic", "static")
        },
        rounds=1,
        warmup=1,
        device=device,
    )
    return min(times, key=lambda cache: times[cache][0])


def bench_generation(ours, hf, data: Data, sizes: Sizes, device) -> dict:
    """Greedy new tokens/s: ``generate_batch`` against transformers' generate() and the
    naive loop; the tokens of ours against each of theirs."""
    prompts = data.prompts(sizes.gen_prompts)
    n, ctx = sizes.gen_tokens, ours.context_length
    cache = fastest_hf_cache(hf, prompts[:8], n, device)
    runs = {
        "ours": lambda: generate_batch(ours, prompts, n, ctx, eos_id=None),
        "hf": lambda: c.hf_generate(hf, prompts, n, cache),
    }
    outputs: dict[str, list] = {}

    def contender(name: str):
        return lambda r: lambda: outputs.__setitem__(name, runs[name]())

    times = alternate(
        {name: contender(name) for name in runs}, sizes.gen_rounds, sizes.warmup, device
    )
    tokens = len(prompts) * n
    result = {name: {"tokens_per_s": tokens / statistics.median(t)} for name, t in times.items()}
    result["hf"]["cache"] = cache
    result["vs_hf"] = compare_outputs(outputs["ours"], outputs["hf"])

    naive = prompts[: sizes.naive_prompts]
    sync(device)
    start = time.perf_counter()
    naive_out = c.naive_generate(ours, naive, n, device)
    sync(device)
    seconds = time.perf_counter() - start
    result["naive"] = {"tokens_per_s": len(naive) * n / seconds, "prompts": len(naive)}
    result["vs_naive"] = compare_outputs(outputs["ours"][: len(naive)], naive_out)
    result["shape"] = {"prompts": len(prompts), "new_tokens": n}
    return result


# --------------------------------------------------------------------------------------
# 4. Peak memory of fine-tuning (fresh subprocess per contender)
# --------------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident memory of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes.

    Linux: VmHWM of /proc/self/status, because ru_maxrss of a freshly started subprocess
    still counts the parent's memory at fork time (kept across exec).
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_worker(kind: str, cfg: dict, device: torch.device, steps: int) -> dict:
    """Run ``steps`` training steps of one contender; bytes above the freshly built model."""
    data = load_data()
    batches = training_batches(data, steps, device)
    torch.manual_seed(SEED)
    model = (c.hf_model(cfg) if kind == "hf" else pc.GPTModel(cfg)).to(device).train()
    if kind == "lora":  # ours, frozen, with rank-16 adapters (exercise 7.4)
        model = c.lora_copy(model)
    step = c.make_train_step(model, "hf" if kind == "hf" else "ours", device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = current_rss()
    for batch in batches:
        step(batch)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    return {"baseline": baseline, "peak": peak, "training": peak - baseline}


def bench_memory(sizes: Sizes, device: torch.device) -> dict:
    """``memory_worker`` of each contender in a fresh ``bench.py --memory-worker`` process."""
    result = {}
    for kind in ("ours", "hf", "lora"):
        cmd = [sys.executable, str(BENCH_SCRIPT), "--memory-worker", kind, "--device", str(device)]
        cmd += ["--memory-steps", str(sizes.memory_steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    result["steps"] = sizes.memory_steps
    result["measure"] = (
        "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS, VmHWM"
    )
    return result


# --------------------------------------------------------------------------------------
# 5. LoRA (exercise 7.4) against full fine-tuning
# --------------------------------------------------------------------------------------


def bench_lora(initial_state: dict, cfg: dict, batches, sizes: Sizes, device) -> dict:
    """Seconds per training step of full fine-tuning and of LoRA (rank 16, alpha 16) on the
    same batches, from the same weights, with the same step (packed loss, fused AdamW).

    Peak memory is measured by ``bench_memory`` (its "lora" worker).
    """
    full = pc.GPTModel(cfg).to(device)
    full.load_state_dict(initial_state)
    lora = c.lora_copy(full)
    with torch.no_grad():  # B = 0: the adapters start out changing nothing
        first = {name: packed_loss_batch(*batches[0], m, device).item()
                 for name, m in (("full", full), ("lora", lora))}  # fmt: skip
    if first["full"] != first["lora"]:
        raise AssertionError(f"a fresh LoRA model changed the loss: {first}")
    steps = {}
    for name, model in (("full", full), ("lora", lora)):
        model.train()
        steps[name] = c.make_train_step(model, "ours", device)
    contenders = {
        name: (lambda r, step=step: lambda: step(batches[r % len(batches)]))
        for name, step in steps.items()
    }
    times = alternate(contenders, sizes.train_rounds, sizes.warmup, device)
    trainable = {name: count_parameters(m)[0] for name, m in (("full", full), ("lora", lora))}
    return {
        "seconds_per_step": {name: statistics.median(t) for name, t in times.items()},
        "trainable_parameters": trainable,
        "first_batch_loss": first["full"],
        "rank": 16,
        "alpha": 16.0,
    }
