"""Our chapter-7 code against Hugging Face transformers, side by side, on this machine.

    python benchmarks/bench.py              # default sizes: about 7.5 minutes
    python benchmarks/bench.py --quick      # smaller sizes: about 2 minutes
    python benchmarks/bench.py --full-epoch # time one epoch over the whole training split

Wall times measured on this project's 2-core AMD EPYC machine (CPU, 2 torch threads) while
nothing else ran: the default sizes 452-456 s (measured before the code base was split into
previous_chapters.py and runtime/engine.py; the work is the same), --quick 112-123 s
(2026-11-25). The machine is shared: while other work ran, --quick took 3.2-5.4 minutes.
--quick measures the same model the same way with less of everything, so its ratios are
noisy; judge the targets by a default run.

GPT-2 124M-shaped models with random weights; transformers' GPT2LMHeadModel gets exactly
our weights. Four measurements, the contenders taking turns (A B, B A, ...; warm-up rounds
dropped, medians reported) so that the machine's drift cancels out:

1. training step: non-padding tokens/s of forward + backward + AdamW at batch 8 on the
   same batches, and the useful FLOP/s as a share of this machine's measured matmul peak;
2. one epoch of fine-tuning with all our options against the course-style loop;
3. greedy generation of test responses: ``engine.generate_batch`` against transformers'
   ``generate()`` and against the course's naive loop; ours and transformers' tokens must agree;
4. peak memory of fine-tuning, each contender in a fresh subprocess;
5. LoRA (exercise 7.4, rank 16) against full fine-tuning: seconds per training step on the
   same batches, and peak memory (a third memory subprocess).

Ours is ``previous_chapters.GPTModel`` with the fast engine chosen explicitly
(``engine.packed_loss_batch``, ``make_optimizer``, ``generate_batch``); the course-style side
is the same model with the course functions of ``previous_chapters``. The code is split by
concern: workload.py (sizes, data, FLOPs), contenders.py (the models and each side's way of
training and generating), measure.py (timing and the four measurements), report.py (table,
plot, files).

Results: one table on stdout, and benchmarks/results/bench-<device>.{md,json,png}
(bench-<device>-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import previous_chapters as pc  # noqa: E402
from benchmarks import contenders, decoding, measure, report  # noqa: E402
from benchmarks.workload import QUICK, Sizes, load_data, training_batches  # noqa: E402
from course.instruction_data import ConfigError  # noqa: E402
from runtime.run_config import check_precision  # noqa: E402

RESULTS_DIR = report.RESULTS_DIR
MODEL = "gpt2-small (124M)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Wall time on 2 CPU cores (AMD EPYC, quiet machine): default sizes about "
        "7.5 minutes (452-456 s), --quick about 2 minutes (112-123 s); up to 3x longer "
        "while other work shares the machine.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes, same model and measurements: about 2 minutes on 2 CPU cores",
    )
    p.add_argument("--full-epoch", action="store_true", help="time an epoch over all train data")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="bf16: also time bf16 inference, refused where the hardware lacks bf16; fp32: "
        "skip it (default: bf16 where the hardware has it)",
    )
    p.add_argument(
        "--decoding-only",
        action="store_true",
        help="only the batch-1 decoding section (bandwidth share, prompt lookup, bf16)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results")
    p.add_argument("--memory-worker", choices=["ours", "hf", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--memory-steps", type=int, default=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def stage(name: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


def run(args: argparse.Namespace, device: torch.device) -> dict:
    """All five measurements; the results as one dict."""
    sizes = QUICK if args.quick else Sizes()
    if args.full_epoch:
        sizes = Sizes(**{**asdict(sizes), "epoch_entries": None})
    cfg = pc.gpt2_config(MODEL)
    data = load_data()
    r = {"machine": report.machine_info(device), "sizes": asdict(sizes), "data": data.source}
    r["command"] = " ".join(["python benchmarks/bench.py", *sys.argv[1:]]).strip()
    r["model"] = f"GPT-2 {MODEL.split()[1].strip('()')} shapes, random weights"

    stage("matmul peak")
    r["matmul_peak"] = measure.matmul_peak(device)
    ours, hf = contenders.build_models(cfg, device)
    initial = copy.deepcopy(ours.state_dict())
    stage("decoding at batch 1: bandwidth share, prompt lookup, bf16")
    r["decoding"] = decoding.bench_decoding(ours, hf, data, sizes, device, args.precision)
    if args.decoding_only:
        return r
    stage("generation")
    r["generation"] = measure.bench_generation(ours, hf, data, sizes, device)
    stage("training step")
    batches = training_batches(data, sizes.warmup + sizes.train_rounds, device)
    peak = max(r["matmul_peak"].values())
    r["train_step"] = measure.bench_train_step(ours, hf, batches, cfg, sizes, device, peak)
    del ours, hf
    gc.collect()
    stage("LoRA against full fine-tuning")
    r["lora"] = measure.bench_lora(initial, cfg, batches, sizes, device)
    stage("epoch")
    r["epoch"] = measure.bench_epoch(initial, cfg, data, sizes, device)
    stage("memory")
    r["memory"] = measure.bench_memory(sizes, device)
    return r


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.precision == "bf16":
        try:
            check_precision("bf16", device)
        except ConfigError as error:
            print(f"bench.py: --precision bf16: {error}", file=sys.stderr)
            return 2
    if args.memory_worker:
        cfg = pc.gpt2_config(MODEL)
        print(json.dumps(measure.memory_worker(args.memory_worker, cfg, device, args.memory_steps)))
        return 0
    start = time.perf_counter()
    r = run(args, device)
    r["wall_seconds"] = time.perf_counter() - start
    rows = decoding.rows(r) if args.decoding_only else report.table_rows(r) + decoding.rows(r)
    print()
    print(report.markdown_table(rows))
    stem = args.out / f"bench-{device.type}{'-quick' if args.quick else ''}"
    if args.decoding_only:
        stem = stem.with_name(stem.name + "-decoding")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    else:
        report.save(r, rows, stem)
    print(f"\n{r['wall_seconds']:.0f} s; results in {stem}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
