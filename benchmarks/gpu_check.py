"""The GPU check of issue 19: the chapter's workload, bench.py and a torchrun NCCL smoke.

    python benchmarks/gpu_check.py                       # one GPU: 7.5 minutes at most
    bash benchmarks/gpu_check.sh                         # the same; results into $OUT if set
    python benchmarks/gpu_check.py --device cpu --tiny   # the same parts, tiny, on the CPU

Three parts, each in processes of its own, so that one that fails (one line) or runs out of
its share of the budget (stopped, keeping what it measured) leaves the others running:

1. workload: the chapter's own steps (``instruction_finetuning.prepare_*``,
   ``finetuning.finetune`` as its ``train`` step calls it, ``finetuning.generate_responses``)
   with GPT-2 medium's shapes and random weights, in fp32 and in bf16: 2 epochs over the 935
   training entries, then the 110 test responses (up to 256 new tokens, each stopped at its
   end-of-text token as in the chapter), each timed with the device synchronised;
2. torchrun: the chapter's smoke run under ``torchrun --nproc_per_node=N`` (N: the GPUs;
   2 with Gloo on the CPU), then an all_reduce among N processes in an NCCL group;
3. bench: ``python benchmarks/bench.py --device cuda --out RESULTS``.

Results: a table, and RESULTS/gpu-<gpu>.{json,md,log} (RESULTS: benchmarks/results), with the
course's time (355M, 2 epochs: 0.86 min on an A100) and the goals on one H100/H200 marked met
or not met. benchmarks/README.md ("GPU check") says more.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import REPO_ROOT  # noqa: E402  (puts main/ on sys.path)
from benchmarks.gpu_report import COURSE_SECONDS, GOALS, machine, markdown  # noqa: E402
from benchmarks.report import RESULTS_DIR  # noqa: E402
from benchmarks.synthetic_alpaca import make_entries  # noqa: E402
from benchmarks.worker_processes import emit, run_process  # noqa: E402
from course.instruction_data import ChapterError, ConfigError, load_instruction_data  # noqa: E402
from runtime.outputs import save_json, write_atomically  # noqa: E402

SCRIPT = Path(__file__).resolve()
DATA_CANDIDATES = [
    REPO_ROOT.parent / "shared" / "data" / "instruction-data.json",
    REPO_ROOT / "shared" / "data" / "instruction-data.json",
]
PART_ENDS = {"workload": 0.70, "torchrun": 0.85, "bench": 1.0}  # shares of the budget
TINY_ENTRIES = 40
# Words per field of the chapter's 1,100 entries (median, log-sigma, min, max), times 1.3
# GPT-2 tokens per English word (the synthetic words are one token each); 30% have an input.
# Formatted with their responses the chapter's entries have 56 tokens on average, 95% at
# most 71, the longest 91; these synthetic ones 57, 75 and 100.
CHAPTER_FIELD_WORDS = {
    "instruction": (9, 0.31, 3, 28),
    "input": (6, 0.5, 1, 16),
    "output": (9, 0.5, 1, 45),
}
CHAPTER_INPUT_SHARE = 0.3


def chapter_like_entries(n: int = 1100, seed: int = 123) -> list[dict]:
    """``n`` synthetic entries with the lengths of the chapter's dataset: the words of
    ``synthetic_alpaca.make_entries`` (GPT-2's own words), cut to ``CHAPTER_FIELD_WORDS``."""
    rng = np.random.default_rng(seed)
    entries = []
    for entry in make_entries(n, seed=seed, dup_rate=0.0):
        pool = " ".join(text for text in entry.values() if text).split()
        counts = {
            key: int(np.clip(round(rng.lognormal(np.log(median), sigma)), low, high))
            for key, (median, sigma, low, high) in CHAPTER_FIELD_WORDS.items()
        }
        if rng.random() >= CHAPTER_INPUT_SHARE:
            counts["input"] = 0
        words = pool * (sum(counts.values()) // len(pool) + 1)
        new, used = {}, 0
        for key, k in counts.items():
            new[key], used = " ".join(words[used : used + k]), used + k
        entries.append(new)
    return entries


def prepare_data_file(args: argparse.Namespace, work: Path) -> dict:
    """The entries to run on, written into ``work``; where they came from."""
    found = next((p for p in DATA_CANDIDATES if p.is_file()), None)
    n = TINY_ENTRIES if args.tiny else None
    if args.data:
        entries, source = load_instruction_data(args.data), args.data
    elif found is not None and not args.synthetic:
        entries, source = load_instruction_data(found), f"the chapter's dataset, {found}"
    else:
        entries = chapter_like_entries(n or 1100)
        source = "synthetic, with the chapter's lengths (gpu_check.chapter_like_entries)"
    path = save_json(entries[:n], work / "instruction-data.json")
    return {"file": str(path), "source": source, "entries": len(entries[:n])}


# --------------------------------------------------------------------------------------
# Workers: the processes that measure
# --------------------------------------------------------------------------------------


def synchronized_seconds(device: torch.device, work) -> tuple[float, object]:
    """``work()``'s wall time, the device's queue drained before and after; its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


class CountingTokenizer:
    """A tokenizer that records the length of each token list it decodes (the responses are
    decoded last, one each: the last ``n`` lengths are their new tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, []

    def decode(self, ids):
        self.decoded.append(len(ids))
        return self.tokenizer.decode(ids)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def chapter_config(args: argparse.Namespace, precision: str):
    """The chapter's settings: GPT-2 medium with random weights (tiny: the smoke preset's
    GPT and 8 new tokens), the data file, no judge, run folders in the work folder."""
    from runtime.run_config import make_config

    common = dict(data=args.data_file, device=args.device, precision=precision, use_judge=False)
    common["output_dir"] = str(Path(args.work) / "runs")
    if args.tiny:
        return make_config(smoke=True, max_new_tokens=8, **common)
    return make_config(model_size="gpt2-medium (355M)", pretrained=False, **common)


def timed_training(args: argparse.Namespace, cfg, device, model, loaders, tokenizer) -> dict:
    """``finetune`` with the arguments the chapter's ``train`` step passes; its row."""
    from course.finetuning import finetune

    settings = dict(num_epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay)
    settings.update(eval_freq=cfg.eval_freq, eval_iter=cfg.eval_iter, seed=cfg.seed)
    settings.update(device=device, grad_accum=cfg.grad_accum, precision=cfg.precision)
    if args.checkpoints:  # as the chapter's train step: every 100 steps and after each epoch
        settings["checkpoint_path"] = Path(args.work) / f"checkpoint-{cfg.precision}.pt"
        settings["checkpoint_every"] = cfg.checkpoint_every
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, result = synchronized_seconds(
        device, lambda: finetune(model, *loaders, tokenizer, progress=False, **settings)
    )
    row = {"seconds": seconds, "epochs": cfg.epochs, "batch_size": cfg.batch_size}
    row.update(parameters=sum(p.numel() for p in model.parameters()), checkpoints=args.checkpoints)
    row.update(entries=len(loaders[0].dataset), steps=cfg.epochs * len(loaders[0]))
    row["final_losses"] = [result.final_train_loss, result.final_val_loss]
    row["peak_gib"] = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
    )
    return row


def timed_responses(cfg, device, model, test_data, tokenizer: CountingTokenizer) -> dict:
    """The responses as the chapter's ``write_responses`` step makes them
    (``generate_test_responses``, in the run's precision), timed."""
    from course.finetuning import generate_test_responses

    seconds, _ = synchronized_seconds(
        device,
        lambda: generate_test_responses(
            cfg, model, test_data, tokenizer, progress=False, precision=cfg.precision
        ),
    )
    how = f"{cfg.precision} model and KV cache"
    n, ends = len(test_data), tokenizer.decoded[-len(test_data) :]
    row = {"seconds": seconds, "responses": n, "max_new_tokens": cfg.max_new_tokens}
    row.update(batch_size=cfg.gen_batch_size, generation=how)
    row["new_tokens"] = sum(ends) if len(ends) == n else None
    return row


def workload_worker(args: argparse.Namespace) -> int:
    """Part 1: each precision in turn, a row for its training and one for its responses;
    a precision the hardware lacks, or a failure, is one row."""
    import instruction_finetuning as chapter
    from runtime.run_config import check_settings
    from runtime.trainer import TrainingInterrupted

    for precision in args.precisions:
        step = "train"
        try:
            cfg = chapter_config(args, precision)
            device = check_settings(cfg)  # e.g. bf16 where the hardware has none: refused
            splits = chapter.prepare_data(cfg)
            tokenizer = chapter.prepare_tokenizer(cfg)
            loaders = chapter.prepare_loaders(cfg, splits, tokenizer, device)[:2]
            model, model_cfg = chapter.prepare_model(cfg, device)
            shape = [model_cfg[key] for key in ("n_layers", "emb_dim", "n_heads")]
            row = timed_training(args, cfg, device, model, loaders, tokenizer)
            emit(step=step, precision=precision, status="ok", layers_emb_heads=shape, **row)
            step = "responses"
            row = timed_responses(cfg, device, model, splits.test, CountingTokenizer(tokenizer))
            emit(step=step, precision=precision, status="ok", **row)
        except TrainingInterrupted as exc:  # SIGTERM: the budget ran out
            emit(step=step, precision=precision, status="stopped", error=str(exc))
            return 1
        except Exception as exc:  # one line, then the next precision
            status = "refused" if isinstance(exc, ConfigError) else "failed"
            lines = str(exc).strip().splitlines() or [""]
            error = f"{type(exc).__name__}: {lines[0]}"[:300]
            emit(step=step, precision=precision, status=status, error=error)
        model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


def collective_worker(args: argparse.Namespace) -> int:
    """One rank of the torchrun all_reduce: every rank adds rank + 1 into 4 MB."""
    import torch.distributed as dist

    from runtime.distributed import ranks_from_env

    ranks = ranks_from_env()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size)
    try:
        x = torch.full((2**20,), float(ranks.rank + 1), device=device)
        seconds, _ = synchronized_seconds(device, lambda: dist.all_reduce(x))
        ok = bool((x == ranks.world_size * (ranks.world_size + 1) / 2).all())
        if ranks.is_main:
            emit(step="all_reduce", backend=backend, sum_ok=ok, all_reduce_s=seconds)
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# The parts: each runs its processes until its deadline
# --------------------------------------------------------------------------------------


def workload_part(args: argparse.Namespace, deadline: float, log: Path, env: dict) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--worker", "workload", "--device", args.device]
    cmd += ["--data-file", args.data_file, "--work", args.work, "--precisions", *args.precisions]
    cmd += ["--tiny"] * args.tiny + ["--checkpoints"] * args.checkpoints
    part = run_process(cmd, deadline, log, env)
    rows = {(row["precision"], row["step"]): row for row in part["rows"]}
    part["rows"] = []
    for precision in args.precisions:  # every measurement, in order; what did not run and why
        for step in ("train", "responses"):
            why = part.get("error") or "its training did not end"
            missing = {"step": step, "precision": precision, "status": "not run", "error": why}
            part["rows"].append(rows.get((precision, step), missing))
    if part["status"] == "ok" and any(row["status"] == "failed" for row in part["rows"]):
        part.update(status="failed", error="a measurement failed (see its row)")
    return part


def torchrun_launcher(n: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    from torch.distributed.run import get_args_parser

    if "--local-addr" in get_args_parser().format_help():  # (no host name lookup)
        cmd += ["--local-addr", "127.0.0.1"]
    return cmd + [f"--nproc_per_node={n}"]


def torchrun_part(args: argparse.Namespace, deadline: float, log: Path, env: dict) -> dict:
    """The chapter's smoke run under torchrun, then an all_reduce among the processes."""
    cuda = args.device.startswith("cuda")
    n = args.nproc or (torch.cuda.device_count() if cuda else 2)
    launcher, runs = torchrun_launcher(n), Path(args.work) / "torchrun"
    smoke = [str(REPO_ROOT / "main" / "instruction_finetuning.py"), "--smoke", "--no-judge"]
    smoke += ["--device", args.device.split(":")[0], "--output-dir", str(runs)]
    collective = [str(SCRIPT), "--worker", "collective", "--device", args.device]
    part = {"status": "ok", "processes": n, "backend": "nccl" if cuda else "gloo", "rows": []}
    for step, cmd in (("chapter smoke", launcher + smoke), ("all_reduce", launcher + collective)):
        done = run_process(cmd, deadline, log, env)
        row = {**(done["rows"] or [{}])[0], "step": step, "seconds": done["seconds"]}
        row.update(status=done["status"], error=done.get("error"), command=shlex.join(cmd[1:]))
        summaries = list(runs.glob("*/run-summary.json"))
        if step == "chapter smoke" and summaries:
            summary = json.loads(summaries[0].read_text(encoding="utf-8"))
            row.update(device=summary["device"], final_losses=summary["final_losses"])
        elif step == "chapter smoke" and row["status"] == "ok":
            row.update(status="failed", error="the smoke run wrote no run-summary.json")
        if row.get("sum_ok") is False:
            row.update(status="failed", error="all_reduce gave a wrong sum")
        part["rows"].append(row)
        if row["status"] != "ok" and part["status"] == "ok":
            part.update(status=row["status"], error=f"{step}: {row['error']}")
        if row["status"] == "stopped":
            break
    return part


def bench_part(args: argparse.Namespace, deadline: float, log: Path, env: dict) -> dict:
    """bench.py in its own process; its results table, if it wrote one."""
    if args.bench_args is not None:
        flags = shlex.split(args.bench_args)
    elif args.tiny:  # bench.py has no tiny sizes: one training step of its own model
        flags = ["--device", args.device, "--memory-worker", "ours", "--memory-steps", "1"]
    else:
        flags = ["--device", args.device, "--out", str(args.out)]
    started = time.time()
    part = run_process(
        [sys.executable, str(SCRIPT.parent / "bench.py"), *flags], deadline, log, env
    )
    part["command"] = shlex.join(["python", "benchmarks/bench.py", *flags])
    kind = args.device.split(":")[0]
    fresh = [p for p in sorted(args.out.glob(f"bench-{kind}*")) if p.stat().st_mtime >= started]
    part["files"] = [p.name for p in fresh]
    if args.out / f"bench-{kind}.md" in fresh:
        part["table"] = (args.out / f"bench-{kind}.md").read_text(encoding="utf-8")
    return part


PARTS = {"workload": workload_part, "torchrun": torchrun_part, "bench": bench_part}


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and data: seconds on a CPU")
    p.add_argument("--budget", type=float, default=450.0, help="seconds in all (default 450)")
    p.add_argument("--data", help="instruction data (default: the chapter's, else synthetic)")
    p.add_argument("--synthetic", action="store_true", help="synthetic data even if real exists")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results")
    p.add_argument("--skip", action="append", default=[], choices=list(PARTS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--checkpoints", action="store_true", help="train with the run's checkpoints")
    p.add_argument("--nproc", type=int, help="torchrun processes (default: the GPUs; CPU: 2)")
    p.add_argument("--bench-args", help="bench.py's flags instead of '--device D --out OUT'")
    p.add_argument("--worker", choices=["workload", "collective"], help=argparse.SUPPRESS)
    p.add_argument("--data-file", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget <= 0 or (args.nproc is not None and args.nproc < 1):
        p.error("--budget must be above 0 seconds and --nproc at least 1")
    return args


def run_parts(args: argparse.Namespace, result: dict, start: float, log: Path) -> None:
    """Each part in turn, until its share of the budget; one line each as it ends."""
    env = {**os.environ, "GPT2_TOKENIZER_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # The children (torchrun's workers too) import our modules without `pip install -e .`,
    # which a bare GPU machine has not run.
    paths = [str(REPO_ROOT), str(REPO_ROOT / "main"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    if not args.device.startswith("cuda"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # (Gloo on loopback)
    for name, part in PARTS.items():
        deadline = start + PART_ENDS[name] * args.budget - (3 if name == "bench" else 0)
        if name in args.skip:
            result["parts"][name] = {"status": "skipped"}
        elif deadline - time.monotonic() < 1:
            result["parts"][name] = {"status": "stopped", "error": "no time left in the budget"}
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            result["parts"][name] = part(args, deadline, log, env)
        done = result["parts"][name]
        print(f"  {name}: {done['status']}" + (f": {done['error']}" if "error" in done else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return (workload_worker if args.worker == "workload" else collective_worker)(args)
    start = time.monotonic()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: PyTorch sees no CUDA GPU (on a CPU: --device cpu --tiny)", file=sys.stderr)
        return 2
    info = machine(args)
    name = re.sub(r"[^a-z0-9]+", "-", info.get("gpu", args.device).lower()).strip("-")
    stem = args.out / f"gpu-{name.removeprefix('nvidia-')}{'-tiny' * args.tiny}"
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/gpu_check.py", *given])
    result = {"command": command, "machine": info, "budget_s": args.budget, "parts": {}}
    result.update(course_s=COURSE_SECONDS, goals_s=GOALS, goals_apply=not args.tiny)
    log = stem.with_suffix(".log")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        log.write_text(f"{command}\n", encoding="utf-8")
    except OSError as exc:
        print(f"error: results folder {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        try:
            result["data"] = prepare_data_file(args, Path(work))
        except ChapterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        args.work, args.data_file = work, result["data"]["file"]
        try:
            run_parts(args, result, start, log)
        except KeyboardInterrupt:
            interrupted = True
    result["wall_seconds"] = time.monotonic() - start
    save_json(result, stem.with_suffix(".json"))
    text = markdown(result)
    write_atomically(stem.with_suffix(".md"), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print("\n" + "\n".join(line for line in text.splitlines() if line.startswith("|")))
    print(f"\n{result['wall_seconds']:.0f} s; results in {stem}.json/.md, log {log}")
    if interrupted:
        return 130
    return 0 if all(p["status"] in ("ok", "skipped") for p in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
