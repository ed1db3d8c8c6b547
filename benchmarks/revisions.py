"""An older revision's code against the current working tree, side by side, in one run.

    python benchmarks/revisions.py --base bff3b81            # default sizes
    python benchmarks/revisions.py --base bff3b81 --quick    # smaller sizes, a smoke run

Issue 15 reorganised the code (bff3b81 is the last commit before it) and asks that the
training step and generation be at least as fast as before. Ratios against transformers
move with the machine's speed, so this compares the two code trees directly: ``--base`` is
checked out into a temporary detached git worktree (removed at the end, also on an error or
Ctrl-C), and two worker processes (``revision_worker.py``) start, one per tree, each with only
its tree on ``PYTHONPATH`` (its root and ``main/``: ``previous_chapters`` and the engine,
``main/engine.py`` before the reorganisation, ``runtime/engine.py`` after it).

Both build GPT-2 124M's shapes (dropout 0, qkv_bias) with the same random weights, get the
same training batches and prompts (bench.py's: the chapter's data, ``workload.py``), and time
on command, taking turns (A B, B A, ...; warm-up rounds dropped, medians reported):

1. a training step at batch 8 as the chapter's fast path does it: ``engine.packed_loss_batch``,
   backward, the fused AdamW of ``engine.make_optimizer``: non-padding tokens/s;
2. greedy ``engine.generate_batch`` of 32 prompts x 128 new tokens, EOS ignored: tokens/s.

The table gives both trees' speeds, the ratio current/base and whether current is as fast
(>= 0.97x base: within the noise), and checks that both trees compute the same: the first
batch's loss, every training step's loss, and the greedy tokens of every prompt.

Results: the table on stdout and benchmarks/results/revisions-<device>.{md,json}
(revisions-<device>-quick.* with --quick), or in the folder given by --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import previous_chapters as pc  # noqa: E402
from benchmarks import REPO_ROOT, measure, report  # noqa: E402
from benchmarks.revision_worker import REPLY  # noqa: E402
from benchmarks.worker_processes import error_line, stop_process  # noqa: E402
from benchmarks.workload import (  # noqa: E402
    BATCH_SIZE,
    LR,
    QUICK,
    SEED,
    WEIGHT_DECAY,
    Sizes,
    load_data,
    n_tokens,
    training_batches,
)

WORKER_FILE = Path(__file__).resolve().with_name("revision_worker.py")
MODEL = "gpt2-small (124M)"
AS_FAST = 0.97  # current >= 0.97x base: as fast, within the noise of this machine
TINY_CFG = {"context_length": 256, "emb_dim": 32, "n_heads": 4, "n_layers": 2}
# bench.py's sizes with even numbers of measured rounds: turns go A B, B A, so that each side
# runs twice in a row every other round (the second run of a pair can find warmer caches), and
# an even count gives each side as many first as second runs of a pair
DEFAULT = replace(Sizes(), gen_rounds=4)
SMOKE = replace(QUICK, gen_rounds=2)
TINY = Sizes(train_rounds=2, gen_prompts=2, gen_tokens=4, gen_rounds=2, warmup=1)  # tests


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the revision to compare with, e.g. bff3b81")
    p.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    p.add_argument(
        "--rounds",
        type=int,
        help="measured rounds of each measurement, best even (default: 6 training steps, 4 "
        "generations; --quick 2 and 2)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="worker pairs, one after the other, whose rounds are pooled (default: 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of each worker (default: this process's, %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--data", type=Path, help="instruction data (default: bench.py's)")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="folder for the results")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny model
    return p.parse_args(argv)


def stage(name: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


# --------------------------------------------------------------------------------------
# The two code trees
# --------------------------------------------------------------------------------------


def git(*args: str) -> str:
    """``git args`` in this repository; its output, stripped (CalledProcessError if it fails)."""
    out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def why_not(base: str) -> str | None:
    """Why ``base`` cannot be compared here (no git, no repository, no such revision)."""
    if shutil.which("git") is None:
        return "git is not installed"
    try:
        git("rev-parse", "--git-dir")
    except subprocess.CalledProcessError:
        return f"{REPO_ROOT} is not a git checkout"
    try:
        git("rev-parse", "--verify", "--quiet", f"{base}^{{commit}}")
    except subprocess.CalledProcessError:
        return f"no revision {base!r} in this repository"
    return None


def revision(rev: str) -> dict:
    """A commit's hash, short hash and subject."""
    commit = git("rev-parse", f"{rev}^{{commit}}")
    return {
        "commit": commit,
        "short": commit[:7],
        "subject": git("log", "-1", "--format=%s", commit),
    }


def working_tree() -> dict:
    """HEAD's commit, and whether tracked files have uncommitted changes."""
    changes = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {**revision("HEAD"), "uncommitted_changes": changes}


@contextlib.contextmanager
def checkout(commit: str, folder: Path) -> Iterator[Path]:
    """``commit`` checked out into a detached git worktree in ``folder``, removed afterwards."""
    tree = folder / "base"
    git("worktree", "add", "--quiet", "--detach", str(tree), commit)
    try:
        yield tree
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            git("worktree", "remove", "--force", str(tree))
        with contextlib.suppress(subprocess.CalledProcessError):
            git("worktree", "prune")


def engine_file(root: Path) -> Path | None:
    """The tree's engine module, wherever its layout puts it (None: it has none)."""
    for path in (root / "runtime" / "engine.py", root / "main" / "engine.py"):
        if path.is_file():
            return path
    return None


# --------------------------------------------------------------------------------------
# The workers
# --------------------------------------------------------------------------------------


class Worker:
    """A ``revision_worker.py`` process running on one tree's code; ``ask`` sends a command
    and returns its answer."""

    def __init__(self, name: str, root: Path, setup: Path, log: Path):
        self.name, self.root, self.log = name, root, log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "main")])}
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER_FILE), str(setup), str(root)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=root,
                env=env,
                text=True,
                start_new_session=True,  # Ctrl-C reaches the parent, which stops it
            )
        self.ready: dict = {}

    def wait_ready(self) -> None:
        """Wait for its model; RuntimeError unless the project's modules it loaded (all but
        Python's and installed packages') come from its own tree, not, say, an editable
        install of another checkout."""
        self.ready = self.answer()
        for module, file in self.ready["modules"].items():
            if not Path(file).resolve().is_relative_to(self.root.resolve()):
                raise RuntimeError(
                    f"the {self.name} worker imported {module} from {file}, not {self.root}"
                )

    def answer(self) -> dict:
        """The worker's next answer line; RuntimeError with its error if it has stopped."""
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        self.proc.wait()
        text = self.log.read_text(errors="replace")
        raise RuntimeError(f"the {self.name} worker ({self.root}) stopped: {error_line(text)}")

    def ask(self, **command: object) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        """Ask it to quit; stop it (and anything it started) if it has not within 10 s."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        stop_process(self.proc)
        self.proc.stdout.close()


@contextlib.contextmanager
def workers(trees: dict[str, Path], setup: Path, folder: Path):
    """One started ``Worker`` per tree (name -> worker), all closed afterwards."""
    started: dict[str, Worker] = {}
    try:
        for name, root in trees.items():  # both build their models at the same time
            stage(f"starting the {name} worker ({root})")
            started[name] = Worker(name, root, setup, folder / f"{name}.log")
        for worker in started.values():
            worker.wait_ready()
        yield started
    finally:
        for worker in started.values():
            worker.close()


# --------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------


def turns(
    sides: dict[str, Worker], command: Callable[[int], dict], rounds: int, warmup: int
) -> dict[str, list[dict]]:
    """Every round's answer of each worker to ``command(round)``, taking turns A B, B A, ...
    (``measure.alternate``; its times, which include the pipe, are not used: each worker
    times its own work). Warm-up rounds included."""
    answers: dict[str, list[dict]] = {name: [] for name in sides}

    def contender(name: str):
        return lambda r: lambda: answers[name].append(sides[name].ask(**command(r)))

    measure.alternate(
        {name: contender(name) for name in sides}, rounds, warmup, torch.device("cpu")
    )
    return answers


def bench_generation(sides: dict[str, Worker], sizes: Sizes) -> dict:
    """Seconds per round of greedy ``generate_batch``; the tokens of both trees compared."""
    answers = turns(sides, lambda r: {"cmd": "generate"}, sizes.gen_rounds, sizes.warmup)
    result: dict = {"shape": {"prompts": sizes.gen_prompts, "new_tokens": sizes.gen_tokens}}
    result["tokens"] = [sizes.gen_prompts * sizes.gen_tokens] * sizes.gen_rounds
    for name, runs in answers.items():
        result[name] = {"seconds": [a["seconds"] for a in runs[sizes.warmup :]]}
    base, current = (answers[name][-1]["tokens"] for name in ("base", "current"))
    result["same_tokens"] = measure.compare_outputs(current, base)
    return result


def bench_train_step(sides: dict[str, Worker], batches: list[tuple], sizes: Sizes) -> dict:
    """Seconds per training step on the same batches; the losses compared."""
    answers = turns(
        sides,
        lambda r: {"cmd": "step", "batch": r % len(batches)},
        sizes.train_rounds,
        sizes.warmup,
    )
    rounds = range(sizes.warmup, sizes.warmup + sizes.train_rounds)
    result: dict = {"tokens": [n_tokens(batches[r % len(batches)]) for r in rounds]}
    for name, runs in answers.items():
        seconds = [a["seconds"] for a in runs[sizes.warmup :]]
        result[name] = {"seconds": seconds, "losses": [a["loss"] for a in runs]}
    base, current = result["base"]["losses"], result["current"]["losses"]
    result["max_loss_difference"] = max(abs(a - b) for a, b in zip(base, current, strict=True))
    return result


def pooled(results: list[dict]) -> dict:
    """One measurement over several worker pairs: every pair's rounds together, each side's
    tokens/s the median over all of them (a process can be slower as a whole, by where its
    memory landed, so one pair of processes is not enough); the checks of the first pair,
    with the largest loss difference and the fewest identical outputs of any pair."""
    r = copy.deepcopy(results[0])
    r["pairs"], r["tokens"] = len(results), [n for x in results for n in x["tokens"]]
    for name in ("base", "current"):
        r[name]["seconds"] = [t for x in results for t in x[name]["seconds"]]
        rates = [n / t for n, t in zip(r["tokens"], r[name]["seconds"], strict=True)]
        r[name]["tokens_per_s"] = statistics.median(rates)
    if "max_loss_difference" in r:
        r["max_loss_difference"] = max(x["max_loss_difference"] for x in results)
    if "same_tokens" in r:
        r["same_tokens"] = min((x["same_tokens"] for x in results), key=lambda s: s["identical"])
    return r


# --------------------------------------------------------------------------------------
# The run, the table, the files
# --------------------------------------------------------------------------------------


def setup_file(args: argparse.Namespace, sizes: Sizes, cfg: dict, folder: Path) -> tuple:
    """The workers' common setup (config, seed, batches, prompts, ...) saved in ``folder``;
    (its path, the batches, the data's source)."""
    data = load_data(args.data)
    batches = training_batches(data, sizes.warmup + sizes.train_rounds, torch.device("cpu"))
    setup = {
        "cfg": cfg,
        "seed": SEED,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "batches": batches,
        "prompts": data.prompts(sizes.gen_prompts),
        "new_tokens": sizes.gen_tokens,
        "threads": args.threads,
        "device": args.device,
    }
    path = folder / "setup.pt"
    torch.save(setup, path)
    return path, batches, data.source


def run(args: argparse.Namespace, folder: Path) -> dict:
    """Check out the base, start both workers, and take the two measurements."""
    sizes = TINY if args.tiny else SMOKE if args.quick else DEFAULT
    if args.rounds:
        sizes = replace(sizes, train_rounds=args.rounds, gen_rounds=args.rounds)
    cfg = pc.gpt2_config(MODEL, **(TINY_CFG if args.tiny else {}))
    r: dict = {"machine": report.machine_info(torch.device(args.device)), "sizes": asdict(sizes)}
    r["machine"]["torch_threads"] = args.threads
    r["command"] = " ".join(["python benchmarks/revisions.py", *sys.argv[1:]]).strip()
    r["model"] = f"GPT-2 {MODEL.split()[1].strip('()')} shapes, random weights"
    if args.tiny:
        r["model"] = f"tiny GPT ({TINY_CFG}), random weights"
    r["base"], r["current"] = revision(args.base), working_tree()
    setup, batches, r["data"] = setup_file(args, sizes, cfg, folder)
    with checkout(r["base"]["commit"], folder) as base_root:
        if engine_file(base_root) is None or not (base_root / "previous_chapters.py").is_file():
            raise RuntimeError(f"{args.base} has no previous_chapters.py and engine.py to time")
        trees = {"base": base_root, "current": REPO_ROOT}
        generation, train_step = [], []
        for pair in range(1, args.pairs + 1):
            with workers(trees, setup, folder) as sides:
                r["modules"] = {name: w.ready["modules"] for name, w in sides.items()}
                r["first_batch_loss"] = {n: w.ask(cmd="check")["loss"] for n, w in sides.items()}
                stage(f"generation (worker pair {pair} of {args.pairs})")
                generation.append(bench_generation(sides, sizes))
                stage(f"training step (worker pair {pair} of {args.pairs})")
                train_step.append(bench_train_step(sides, batches, sizes))
    r["generation"], r["train_step"] = pooled(generation), pooled(train_step)
    return r


def speed_row(label: str, base: float, current: float) -> list[str]:
    ratio = current / base
    return [label, f"{base:.1f}", f"{current:.1f}", f"{ratio:.3f}x", report.yes(ratio >= AS_FAST)]


def table_rows(r: dict) -> list[list[str]]:
    """[measurement, base, current, current/base, as fast or identical] rows."""
    ts, gen, first = r["train_step"], r["generation"], r["first_batch_loss"]
    same = gen["same_tokens"]
    shape = f"{gen['shape']['prompts']} prompts x {gen['shape']['new_tokens']} tokens"
    steps = len(ts["base"]["losses"])
    return [
        speed_row(f"Training step, batch {BATCH_SIZE}: non-padding tokens/s",
                  ts["base"]["tokens_per_s"], ts["current"]["tokens_per_s"]),
        speed_row(f"Greedy generation, {shape}: new tokens/s",
                  gen["base"]["tokens_per_s"], gen["current"]["tokens_per_s"]),
        ["Same loss on the first batch (no_grad, before training)", f"{first['base']!r}",
         f"{first['current']!r}", "", report.yes(first["base"] == first["current"])],
        [f"Same loss at every training step ({steps} steps; largest difference)", "", "",
         f"{ts['max_loss_difference']:.3g}", report.yes(ts["max_loss_difference"] == 0)],
        ["Same greedy tokens (prompts)", "", f"{same['identical']}/{same['prompts']}", "",
         report.yes(same["identical"] == same["prompts"])],
    ]  # fmt: skip


def header(r: dict) -> tuple[str, ...]:
    current = r["current"]["short"] + (" + changes" if r["current"]["uncommitted_changes"] else "")
    return (
        "Measurement",
        f"Base ({r['base']['short']})",
        f"Current ({current})",
        "Current/base",
        f"As fast (>= {AS_FAST}x) / identical",
    )


def save(r: dict, rows: list[list[str]], stem: Path) -> None:
    """``stem``.json (all results) and .md (the table)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    m, base, current = r["machine"], r["base"], r["current"]
    md = [
        f"# Before and after: `{r['command']}`",
        "",
        f"Base: {base['commit']} ({base['subject']}).",
        f"Current: the working tree at {current['commit']}"
        + (" with uncommitted changes." if current["uncommitted_changes"] else "."),
        "",
        f"{m['date']}; {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads per "
        f"worker), device {m['device']}, torch {m['torch']}, Python {m['python']}. "
        f"Model: {r['model']}. Data: {r['data']}. "
        f"Worker pairs: {r['train_step'].get('pairs', 1)}, one after the other, rounds pooled.",
        "",
        report.markdown_table(rows, header(r)),
        "",
        f"({r['wall_seconds']:.0f} s wall time for the whole run.)",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = why_not(args.base)
    if problem is None and args.data is not None and not args.data.is_file():
        problem = f"no data file {args.data}"
    if problem is None and args.pairs < 1:
        problem = f"--pairs must be at least 1, got {args.pairs}"
    if problem:
        print(f"revisions.py: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="revisions-") as folder:
        try:
            r = run(args, Path(folder))
        except RuntimeError as error:
            print(f"revisions.py: {error}", file=sys.stderr)
            return 1
        except subprocess.CalledProcessError as error:
            print(f"revisions.py: {error.cmd[:3]} failed: {error.stderr.strip()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(
                "revisions.py: interrupted; the workers and the worktree are gone", file=sys.stderr
            )
            return 130
    r["wall_seconds"] = time.perf_counter() - start
    rows = table_rows(r)
    print()
    print(report.markdown_table(rows, header(r)))
    suffix = "-tiny" if args.tiny else "-quick" if args.quick else ""
    stem = args.out / f"revisions-{torch.device(args.device).type}{suffix}"
    save(r, rows, stem)
    print(f"\n{r['wall_seconds']:.0f} s; results in {stem}.*")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    sys.exit(main())
