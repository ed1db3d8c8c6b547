"""At scale: the 52k Alpaca data of exercise 7.3, measured on this machine.

    python benchmarks/scale.py                  # everything on 52,002 entries (about 10 minutes)
    python benchmarks/scale.py --only tokenize  # one part: tokenize, dedup, generate, bf16
    python benchmarks/scale.py --entries 5000   # a smaller synthetic file, for a quick look

The data is ``synthetic_alpaca.make_entries``: Alpaca's size and length distribution, made
offline (written once to benchmarks/results/alpaca-52k.json, which git ignores). Four parts:

1. tokenizing: ``InstructionDataset`` (batches into one flat array) against the course's way
   (a list per entry, prompts encoded apart), each in a fresh subprocess, taking turns;
   seconds and peak memory above the loaded data (VmHWM after resetting it);
2. near-duplicates: ``find_near_duplicates.find_print_and_remove_near_duplicates`` on all
   three fields with removal, in a subprocess: seconds, peak memory, entries removed; the
   course's full similarity matrix would need n^2 float64 numbers (21.6 GB at 52k);
3. responses: ``engine.generate_batch`` on prompts of the 5,200-entry test split with GPT-2
   medium's shapes (random weights: no row stops early, so the work is fixed); new tokens
   per second, and the time projected for every test entry answering as long as its
   reference output (at most 256 tokens, the run's limit);
4. bf16 on the CPU: a training step of GPT-2 small's shapes in fp32 and under bf16 autocast,
   taking turns; whether bf16 pays on this CPU (``run_config.check_precision`` allows it on
   CPUs with bf16 instructions).

Results: a table on stdout and benchmarks/results/scale-<device>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import synthetic_alpaca  # noqa: E402
from benchmarks.measure import alternate, current_rss, peak_rss  # noqa: E402
from benchmarks.report import RESULTS_DIR, cpu_name  # noqa: E402
from benchmarks.report import markdown_table as report_table  # noqa: E402
from runtime.run_config import RunConfig  # noqa: E402

MAX_NEW_TOKENS = RunConfig.max_new_tokens  # the run's response limit


# --------------------------------------------------------------------------------------
# Workers: one measurement in a fresh process
# --------------------------------------------------------------------------------------


def reset_peak_rss() -> int:
    """Make VmHWM start again from the current size (Linux); returns the current RSS."""
    gc.collect()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return current_rss()


def course_style_tokens(data, tokenizer) -> list:
    """``InstructionDataset`` as the course builds it: a list of ids per entry, each prompt
    encoded again to find its length."""
    from course.instruction_data import InstructionDataset

    dataset = InstructionDataset(data, tokenizer)
    return [dataset.encoded_texts, dataset.prompt_lengths]


def worker(kind: str, data_path: str) -> dict:
    """Time and peak memory (above the loaded data) of one job on the data file."""
    from course.instruction_data import InstructionDataset, read_instruction_file
    from find_near_duplicates import find_print_and_remove_near_duplicates
    from runtime.gpt2_tokenizer import get_tokenizer

    data = read_instruction_file(data_path)
    tokenizer = get_tokenizer(offline=True)
    tokenizer.encode("warm up")
    jobs = {
        "tokenize-ours": lambda: InstructionDataset(data, tokenizer, compact=True),
        "tokenize-course": lambda: course_style_tokens(data, tokenizer),
        "dedup": lambda: len(
            find_print_and_remove_near_duplicates(data, True, 0.9, progress=False)
        ),
    }
    base = reset_peak_rss()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = jobs[kind]()
    seconds = time.perf_counter() - started
    out = {"seconds": seconds, "peak_mb": (peak_rss() - base) / 1e6}
    if kind == "dedup":
        out["kept"], out["entries"] = result, len(data)
    if kind == "tokenize-ours":
        out["ids_mb"] = result.encoded_texts.nbytes / 1e6
        out["tokens"] = len(result.encoded_texts.flat)
    return out


def in_subprocess(kind: str, data_path: Path) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--data", str(data_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# The four measurements
# --------------------------------------------------------------------------------------


def bench_tokenize(data_path: Path, rounds: int = 3) -> dict:
    """Both ways, taking turns (A B, B A, ...), medians."""
    runs: dict[str, list[dict]] = {"tokenize-ours": [], "tokenize-course": []}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for kind in order:
            runs[kind].append(in_subprocess(kind, data_path))
            print(f"  {kind}: {runs[kind][-1]}", flush=True)
    median = {
        kind: {key: statistics.median(run[key] for run in results) for key in results[0]}
        for kind, results in runs.items()
    }
    return {"ours": median["tokenize-ours"], "course": median["tokenize-course"]}


def bench_dedup(data_path: Path) -> dict:
    result = in_subprocess("dedup", data_path)
    result["full_matrix_gb"] = result["entries"] ** 2 * 8 / 1e9
    print(f"  dedup: {result}", flush=True)
    return result


def bench_generate(data: list[dict], prompts: int = 16, new_tokens: int = 33) -> dict:
    """generate_batch's speed at batch 8 (the run's) and 16, and the projection.

    Each batch costs a prefill (the prompts) and then one step per new token, so both are
    measured: 1 new token (about the prefill alone) and ``new_tokens``. The projection adds
    one prefill per batch of the test split and its new tokens at the per-token rate.
    """
    from course.finetuning import fit_prompt
    from course.instruction_data import format_response, split_data
    from previous_chapters import GPTModel, gpt2_config
    from runtime import engine
    from runtime.gpt2_tokenizer import get_tokenizer

    tokenizer = get_tokenizer(offline=True)
    _, test, _ = split_data(data)
    cfg = gpt2_config("gpt2-medium (355M)", qkv_bias=True)
    torch.manual_seed(123)
    model = GPTModel(cfg).eval()
    budget = cfg["context_length"] - MAX_NEW_TOKENS
    step = max(len(test) // prompts, 1)
    sample = [fit_prompt(e, tokenizer, "alpaca", budget)[0] for e in test[::step][:prompts]]
    lengths = [len(tokenizer.encode(format_response(e))) for e in test]
    total = sum(min(n + 1, MAX_NEW_TOKENS) for n in lengths)
    out = {"model": "gpt2-medium (355M) shapes, random weights", "test_entries": len(test)}
    out["projected_new_tokens"] = total

    def timed(n: int, batch: int) -> float:
        started = time.perf_counter()
        engine.generate_batch(model, sample, n, cfg["context_length"], batch_size=batch)
        return time.perf_counter() - started

    for batch in (8, 16):
        timed(1, batch)  # warm-up
        prefill, full = timed(1, batch), timed(new_tokens, batch)
        batches = -(-len(sample) // batch)
        per_token = (full - prefill) / ((new_tokens - 1) * len(sample))
        out[f"prefill_s_batch{batch}"] = prefill / batches
        out[f"tokens_per_s_batch{batch}"] = 1 / per_token
        hours = (-(-len(test) // batch) * prefill / batches + total * per_token) / 3600
        out[f"projected_hours_batch{batch}"] = hours
        print(
            f"  generate, batch {batch}: {1 / per_token:.1f} tokens/s after a prefill of "
            f"{prefill / batches:.1f} s per batch; {hours:.1f} h for the test split",
            flush=True,
        )
    return out


def bench_bf16(rounds: int = 4) -> dict:
    """A training step (GPT-2 small shapes, batch 8 x 256 tokens) in fp32 and bf16 autocast."""
    from previous_chapters import GPTModel, gpt2_config
    from runtime import engine

    torch.manual_seed(0)
    model = GPTModel(gpt2_config("gpt2-small (124M)", qkv_bias=True))
    optimizer = engine.make_optimizer(model, lr=1e-5)
    x, y = torch.randint(0, 50257, (8, 256)), torch.randint(0, 50257, (8, 256))

    def step(bf16: bool) -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = engine.packed_loss_batch(x, y, model, "cpu")
        loss.backward()
        optimizer.step()

    contenders = {"fp32": lambda r: lambda: step(False), "bf16": lambda r: lambda: step(True)}
    times = alternate(contenders, rounds, 1, torch.device("cpu"))  # the first round warms up
    out = {name: statistics.median(values) for name, values in times.items()}
    out["speedup"] = out["fp32"] / out["bf16"]
    print(f"  bf16: {out}", flush=True)
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
    }


def tokenize_rows(t: dict, n: int) -> list[list[str]]:
    """The rows of tokenizing ``n`` entries: ours against the course's."""
    ours, course = t["ours"], t["course"]
    return [
        [
            f"Tokenizing {n:,} entries: seconds",
            f"{ours['seconds']:.2f}",
            f"{course['seconds']:.2f} (a list per entry)",
            "< 3 s",
            "yes" if ours["seconds"] < 3 else "**no**",
        ],
        [
            "Tokenizing: peak memory above the data, MB",
            f"{ours['peak_mb']:.0f}",
            f"{course['peak_mb']:.0f}",
            "< 100 MB",
            "yes" if ours["peak_mb"] < 100 else "**no**",
        ],
        [
            f"Token ids held ({ours['tokens']:,.0f} tokens), MB",
            f"{ours['ids_mb']:.1f}",
            "",
            "",
            "",
        ],
    ]


def dedup_rows(d: dict) -> list[list[str]]:
    """The rows of the near-duplicate search."""
    return [
        [
            "Near-duplicates, 3 fields, removal: minutes",
            f"{d['seconds'] / 60:.1f}",
            "",
            "a few",
            "",
        ],
        [
            "Near-duplicates: peak memory, GB",
            f"{d['peak_mb'] / 1e3:.2f}",
            f"{d['full_matrix_gb']:.1f} (the full float64 matrix)",
            "a few GB",
            "yes" if d["peak_mb"] < 4e3 else "**no**",
        ],
        ["Near-duplicates: entries removed", f"{d['entries'] - d['kept']:,}", "", "", ""],
    ]


def generate_rows(g: dict) -> list[list[str]]:
    """The rows of the responses' speed and the projected time for the test set."""
    return [
        [
            f"Responses, {g['model']}: new tokens/s after the prefill, batch 8 / 16",
            f"{g['tokens_per_s_batch8']:.1f} / {g['tokens_per_s_batch16']:.1f}",
            "",
            "",
            "",
        ],
        [
            f"Projected time for all {g['test_entries']:,} test responses ({g['projected_new_tokens']:,} tokens): hours, batch 8 / 16",
            f"{g['projected_hours_batch8']:.1f} / {g['projected_hours_batch16']:.1f}",
            "2.9 (course: one at a time, L4 GPU)",
            "",
            "",
        ],
    ]


def bf16_rows(b: dict) -> list[list[str]]:
    """The row of the CPU training step under bf16 autocast."""
    return [
        [
            "Training step on the CPU, GPT-2 small, 8 x 256: seconds, bf16 autocast",
            f"{b['bf16']:.2f}",
            f"{b['fp32']:.2f} (fp32)",
            "faster than fp32",
            "yes" if b["speedup"] > 1 else "**no**",
        ],
    ]


def table_rows(r: dict) -> list[list[str]]:
    """[measurement, ours, reference, goal, met] rows, of the measurements in ``r``."""
    rows = tokenize_rows(r["tokenize"], r["entries"]) if "tokenize" in r else []
    for key, make_rows in (("dedup", dedup_rows), ("generate", generate_rows), ("bf16", bf16_rows)):
        rows += make_rows(r[key]) if key in r else []
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    return report_table(rows, ("Measurement", "Ours", "Reference", "Goal", "Met"))


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "tokenize" in r:
        t = r["tokenize"]
        panels.append(
            ("Tokenizing (s)", {"ours": t["ours"]["seconds"], "course": t["course"]["seconds"]})
        )
        panels.append(
            (
                "Tokenizing, peak memory (MB)",
                {"ours": t["ours"]["peak_mb"], "course": t["course"]["peak_mb"]},
            )
        )
    if "dedup" in r:
        d = r["dedup"]
        panels.append(
            (
                "Near-duplicates, memory (GB)",
                {"ours": d["peak_mb"] / 1e3, "full matrix": d["full_matrix_gb"]},
            )
        )
    if "bf16" in r:
        panels.append(
            ("CPU training step (s)", {"fp32": r["bf16"]["fp32"], "bf16": r["bf16"]["bf16"]})
        )
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        bars = ax.bar(list(values), list(values.values()), color=["C0", "C1"])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(title, fontsize=10)
    m = r["machine"]
    fig.suptitle(f"{r['entries']:,} Alpaca-shaped entries; {m['cpu']}, {m['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # fmt: skip


def save(r: dict, stem: Path) -> None:
    from runtime.outputs import save_json

    rows = table_rows(r)
    save_json(r, stem.with_suffix(".json"))
    m = r["machine"]
    text = [
        f"# Scale benchmark: `{r['command']}`",
        "",
        f"{m['date']}; {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}, load average {m['load_average_at_start']:.1f} at the start. "
        f"Data: {r['entries']:,} synthetic Alpaca-shaped entries.",
        "",
        markdown_table(rows),
        "",
        f"({r['wall_seconds']:.0f} s wall time for the whole run.)",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(text), encoding="utf-8")
    plot(r, stem.with_suffix(".png"))
    print(markdown_table(rows))


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------

PARTS = ("tokenize", "dedup", "generate", "bf16")


def data_file(entries: int) -> Path:
    """The synthetic file of ``entries`` entries, written once into results/."""
    path = RESULTS_DIR / f"alpaca-{entries}.json"
    if not path.is_file():
        print(f"writing {path} ...", flush=True)
        synthetic_alpaca.main(["--out", str(path), "--entries", str(entries)])
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=PARTS, action="append", help="run only this part")
    p.add_argument("--entries", type=int, default=synthetic_alpaca.ALPACA_ENTRIES)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.data)))
        return 0
    os.environ.setdefault("GPT2_TOKENIZER_OFFLINE", "1")
    started = time.perf_counter()
    path = data_file(args.entries)
    r = {"command": " ".join(["python benchmarks/scale.py", *(argv or sys.argv[1:])]),
         "entries": args.entries, "machine": machine()}  # fmt: skip
    parts = args.only or PARTS
    for part in parts:
        print(f"{part} ...", flush=True)
        if part == "tokenize":
            r["tokenize"] = bench_tokenize(path)
        elif part == "dedup":
            r["dedup"] = bench_dedup(path)
        elif part == "generate":
            r["generate"] = bench_generate(json.loads(path.read_text(encoding="utf-8")))
        else:
            r["bf16"] = bench_bf16()
    r["wall_seconds"] = time.perf_counter() - started
    suffix = "" if args.entries == synthetic_alpaca.ALPACA_ENTRIES else f"-{args.entries}"
    save(r, args.out / f"scale-cpu{suffix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
