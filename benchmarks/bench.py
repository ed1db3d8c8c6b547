"""Our chapter-7 code against Hugging Face transformers, side by side, on this machine.

    python benchmarks/bench.py              # default sizes: under 10 minutes on 2 CPU cores
    python benchmarks/bench.py --quick      # about a minute
    python benchmarks/bench.py --full-epoch # time one epoch over the whole training split

GPT-2 124M-shaped models with random weights; transformers' GPT2LMHeadModel gets exactly
our weights. Four measurements, the contenders taking turns (A B, B A, ...; warm-up rounds
dropped, medians reported) so that the machine's drift cancels out:

1. training step: non-padding tokens/s of forward + backward + AdamW at batch 8 on the
   same batches, and the useful FLOP/s as a share of this machine's measured matmul peak;
2. one epoch of fine-tuning with all our options against the course-style loop;
3. greedy generation of test responses: ``generate_batch`` against transformers'
   ``generate()`` and against the naive loop; ours and transformers' tokens must agree;
4. peak memory of fine-tuning, each contender in a fresh subprocess.

Results: one table on stdout, and benchmarks/results/bench-<device>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "main")]

import instruction_finetuning as ift  # noqa: E402
import previous_chapters as pc  # noqa: E402

SEED = 123
LR, WEIGHT_DECAY = 5e-5, 0.1  # the chapter's AdamW settings
BATCH_SIZE = 8
EVAL_FREQ, EVAL_ITER = 5, 5  # the chapter's evaluation schedule
SAMPLE_TOKENS = 50  # the course prints a 50-token sample after each epoch
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "instruction-data.json"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Sizes:
    train_rounds: int = 6  # measured training steps per contender
    epoch_entries: int | None = 96  # training entries of the timed epoch (None: all)
    epoch_rounds: int = 2
    gen_prompts: int = 32
    gen_tokens: int = 128
    gen_rounds: int = 3
    naive_prompts: int = 1  # the naive loop is slow: fewer prompts, reported as tokens/s
    memory_steps: int = 3
    warmup: int = 1


QUICK = Sizes(
    train_rounds=2,
    epoch_entries=32,
    epoch_rounds=1,
    gen_prompts=8,
    gen_tokens=32,
    gen_rounds=2,
    memory_steps=2,
)


# --------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------


@dataclass
class Data:
    source: str
    train: list[dict]
    val: list[dict]
    test: list[dict]
    tokenizer: object

    def prompts(self, n: int) -> list[list[int]]:
        """Token ids of ``n`` prompts: the test split first, then the other entries, cycling."""
        entries = self.test + self.val + self.train
        return [
            self.tokenizer.encode(ift.format_input(entries[i % len(entries)])) for i in range(n)
        ]


def load_data() -> Data:
    """The chapter's dataset when ../shared has it, else the project's sample data."""
    path = SHARED_DATA if SHARED_DATA.is_file() else ift.SAMPLE_DATA_PATH
    train, test, val = ift.split_data(ift.load_instruction_data(path))
    return Data(str(path), train, val, test, pc.get_tokenizer(offline=True))


def training_batches(data: Data, n: int, device: torch.device) -> list[tuple]:
    """``n`` random batches of 8 training entries, padded by the chapter's collate function."""
    dataset = ift.InstructionDataset(data.train, data.tokenizer)
    g = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(n):
        rows = torch.randint(len(dataset), (BATCH_SIZE,), generator=g).tolist()
        batches.append(ift.custom_collate_fn([dataset[i] for i in rows], device=device))
    return batches


def n_tokens(batch: tuple) -> int:
    """Non-padding tokens of a batch: the positions whose target is not ignored."""
    return int((batch[1] != ift.IGNORE_INDEX).sum())


def hf_model(cfg: dict):
    """transformers' GPT-2 in its fastest CPU/GPU setting: SDPA attention, dropout 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg["vocab_size"],
        n_positions=cfg["context_length"],
        n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"],
        n_head=cfg["n_heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # its default, named (else it warns that none is set)
    return model


def course_params_from_hf(hf) -> dict:
    """transformers' GPT-2 weights in the course's params layout (Conv1D is [in, out] too)."""
    sd = {k: v.detach().cpu().numpy() for k, v in hf.transformer.state_dict().items()}

    def layer(prefix: str, w: str = "w", b: str = "b") -> dict:
        return {w: sd[f"{prefix}.weight"], b: sd[f"{prefix}.bias"]}

    blocks = [
        {
            "attn": {"c_attn": layer(f"h.{i}.attn.c_attn"), "c_proj": layer(f"h.{i}.attn.c_proj")},
            "mlp": {"c_fc": layer(f"h.{i}.mlp.c_fc"), "c_proj": layer(f"h.{i}.mlp.c_proj")},
            "ln_1": layer(f"h.{i}.ln_1", "g"),
            "ln_2": layer(f"h.{i}.ln_2", "g"),
        }
        for i in range(hf.config.n_layer)
    ]
    return {
        "wte": sd["wte.weight"],
        "wpe": sd["wpe.weight"],
        "blocks": blocks,
        **layer("ln_f", "g"),
    }


def build_models(cfg: dict, device: torch.device):
    """(ours, transformers') with the same random weights, in eval mode."""
    torch.manual_seed(SEED)
    hf = hf_model(cfg)
    ours = pc.GPTModel(cfg)
    pc.load_weights_into_gpt(ours, course_params_from_hf(hf))
    return ours.to(device).eval(), hf.to(device).eval()


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


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best fp32 FLOP/s of an n x n matmul, by torch.matmul and (CPU) by oneDNN directly."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    kernels = {"torch.matmul": lambda: a @ b}
    if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    rates = {}
    for name, kernel in kernels.items():
        kernel()
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            kernel()
            sync(device)
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * n**3 / best
    return rates


def train_step_flops(cfg: dict, batch: tuple) -> float:
    """Useful FLOPs of one training step (forward 1x, backward 2x) on a batch.

    Only real tokens count (not padding): for each row with n of them,
      matmul weights of the blocks: 6 * (12 * n_layers * emb_dim^2) * n
      output head at the positions with a target: 6 * emb_dim * vocab_size * n
      causal attention, q.k and p.v over n(n+1)/2 pairs: 6 * n_layers * emb_dim * n(n+1)
    """
    d, layers, vocab = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    lengths = (batch[1] != ift.IGNORE_INDEX).sum(dim=1).tolist()
    tokens = sum(lengths)
    dense = 6 * 12 * layers * d * d * tokens
    head = 6 * d * vocab * tokens
    attention = 6 * layers * d * sum(n * (n + 1) for n in lengths)
    return float(dense + head + attention)


# --------------------------------------------------------------------------------------
# 1. Training step
# --------------------------------------------------------------------------------------


def hf_loss(hf, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """transformers' own causal-LM loss on our (already shifted) targets, -100 ignored."""
    return hf(input_ids=inputs, labels=targets, shift_labels=targets).loss


def make_train_step(model, kind: str, device: torch.device) -> Callable[[tuple], float]:
    """One fine-tuning step (zero_grad, loss, backward, AdamW) of ours or transformers'.

    Both use fused AdamW: ours through ``make_optimizer``, transformers' because its Trainer
    defaults to ``adamw_torch_fused`` with torch >= 2.8.
    """
    if kind == "ours":
        optimizer = ift.make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)
        loss_fn = lambda x, y: pc.calc_loss_batch(x, y, model, device)  # noqa: E731
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True
        )
        loss_fn = lambda x, y: hf_loss(model, x, y)  # noqa: E731

    def step(batch: tuple) -> float:
        optimizer.zero_grad()
        loss = loss_fn(*batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def check_same_loss(ours, hf, batch: tuple, device: torch.device) -> tuple[float, float]:
    """Both models give the same loss on the first batch (they share their weights)."""
    with torch.no_grad():
        a = pc.calc_loss_batch(*batch, ours, device).item()
        b = hf_loss(hf, *batch).item()
    if abs(a - b) > 1e-5 * max(1.0, abs(b)):
        raise AssertionError(f"losses differ on the first batch: ours {a!r}, transformers {b!r}")
    return a, b


def bench_train_step(ours, hf, batches, cfg, sizes: Sizes, device, peak: float) -> dict:
    loss_ours, loss_hf = check_same_loss(ours, hf, batches[0], device)
    ours.train()
    hf.train()
    steps = {"ours": make_train_step(ours, "ours", device), "hf": make_train_step(hf, "hf", device)}
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
        tok_s = statistics.median(n_tokens(b) / t for b, t in zip(measured, seconds, strict=True))
        flop_s = statistics.median(
            train_step_flops(cfg, b) / t for b, t in zip(measured, seconds, strict=True)
        )
        result[name] = {"tokens_per_s": tok_s, "flop_per_s": flop_s, "peak_share": flop_s / peak}
    result["padded_lengths"] = [int(b[0].shape[1]) for b in measured]
    result["tokens"] = [n_tokens(b) for b in measured]
    return result


# --------------------------------------------------------------------------------------
# 2. One epoch: all our options against the course-style loop
# --------------------------------------------------------------------------------------


def course_loss(model, inputs, targets, device) -> torch.Tensor:
    """The course's calc_loss_batch: full-vocabulary logits at every position."""
    logits = model(inputs.to(device))
    return F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())


def course_eval_loss(model, loader, device) -> float:
    """The course's calc_loss_loader over the first EVAL_ITER batches, under no_grad."""
    losses = []
    with torch.no_grad():
        for i, (inputs, targets) in enumerate(loader):
            if i >= EVAL_ITER:
                break
            losses.append(course_loss(model, inputs, targets, device).item())
    return sum(losses) / len(losses)


def course_style_epoch(model, train_loader, val_loader, data: Data, device) -> dict:
    """One epoch the way the course's train_model_simple runs it: default (for-loop) AdamW,
    full-vocabulary logits and loss at all positions, evaluation on 5 + 5 batches every 5
    steps, then a 50-token sample that re-runs the whole context for every token."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses = {}
    for step, (inputs, targets) in enumerate(train_loader):
        model.train()
        optimizer.zero_grad()
        course_loss(model, inputs, targets, device).backward()
        optimizer.step()
        if step % EVAL_FREQ == 0:
            model.eval()
            losses = {
                "train": course_eval_loss(model, train_loader, device),
                "val": course_eval_loss(model, val_loader, device),
            }
    model.eval()
    context = pc.text_to_token_ids(ift.format_input(data.val[0]), data.tokenizer).to(device)
    pc.generate(model, context, SAMPLE_TOKENS, model.context_length, use_cache=False)
    return losses


def our_epoch(model, train_loader, val_loader, data: Data, device) -> dict:
    """One epoch of the chapter's train_model_simple with our options (see bench_epoch)."""
    optimizer = ift.make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines and sample text
        train_losses, val_losses, _ = pc.train_model_simple(
            model,
            train_loader,
            val_loader,
            optimizer,
            device,
            num_epochs=1,
            eval_freq=EVAL_FREQ,
            eval_iter=EVAL_ITER,
            start_context=ift.format_input(data.val[0]),
            tokenizer=data.tokenizer,
            progress=False,
            max_new_tokens_sample=SAMPLE_TOKENS,
        )
    return {"train": train_losses[-1], "val": val_losses[-1]}


def bench_epoch(initial_state: dict, cfg: dict, data: Data, sizes: Sizes, device) -> dict:
    """Seconds per epoch over ``sizes.epoch_entries`` training entries (all when None).

    Both start from the same weights and see the same entries; ours groups them by length.
    """
    train = data.train[: sizes.epoch_entries] if sizes.epoch_entries else data.train
    runs = {"course": (course_style_epoch, False), "ours": (our_epoch, True)}
    final_losses: dict[str, dict] = {}

    def contender(name: str):
        def prepare(r: int):
            run, grouped = runs[name]
            train_loader, val_loader, _ = ift.create_dataloaders(
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


def hf_generate(hf, prompts: list[list[int]], max_new_tokens: int, cache: str | None) -> list:
    """transformers' batched greedy generate(): left padding, attention mask, KV cache, no EOS."""
    device = hf.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), ift.EOS_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=None,  # no stopping: every prompt gets exactly max_new_tokens
            pad_token_id=ift.EOS_TOKEN_ID,
            use_cache=True,
            cache_implementation=cache,
        )
    return out[:, width:].tolist()


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
        {c: (lambda r, c=c: lambda: hf_generate(hf, prompts, n, c)) for c in ("dynamic", "static")},
        rounds=1,
        warmup=1,
        device=device,
    )
    return min(times, key=lambda c: times[c][0])


def bench_generation(ours, hf, data: Data, sizes: Sizes, device) -> dict:
    prompts = data.prompts(sizes.gen_prompts)
    n = sizes.gen_tokens
    ctx = ours.context_length
    outputs: dict[str, list] = {}
    cache = fastest_hf_cache(hf, prompts[:8], n, device)

    def contender(name: str, run: Callable[[], list]):
        def prepare(r: int):
            return lambda: outputs.__setitem__(name, run())

        return prepare

    times = alternate(
        {
            "ours": contender(
                "ours", lambda: pc.generate_batch(ours, prompts, n, ctx, eos_id=None)
            ),
            "hf": contender("hf", lambda: hf_generate(hf, prompts, n, cache)),
        },
        sizes.gen_rounds,
        sizes.warmup,
        device,
    )
    tokens = len(prompts) * n
    result = {name: {"tokens_per_s": tokens / statistics.median(t)} for name, t in times.items()}
    result["hf"]["cache"] = cache
    result["vs_hf"] = compare_outputs(outputs["ours"], outputs["hf"])

    naive = prompts[: sizes.naive_prompts]
    start = time.perf_counter()
    naive_out = [
        pc.generate(ours, torch.tensor([p], device=device), n, ctx, use_cache=False)[
            0, len(p) :
        ].tolist()
        for p in naive
    ]
    sync(device)
    result["naive"] = {
        "tokens_per_s": len(naive) * n / (time.perf_counter() - start),
        "prompts": len(naive),
    }
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


def memory_worker(kind: str, device: torch.device, steps: int) -> dict:
    """Run ``steps`` training steps of one contender; bytes above the freshly built model."""
    data = load_data()
    batches = training_batches(data, steps, device)
    cfg = pc.gpt2_config("gpt2-small (124M)")
    torch.manual_seed(SEED)
    model = (pc.GPTModel(cfg) if kind == "ours" else hf_model(cfg)).to(device).train()
    step = make_train_step(model, kind, device)
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
    result = {}
    for kind in ("ours", "hf"):
        cmd = [sys.executable, __file__, "--memory-worker", kind, "--device", str(device)]
        cmd += ["--memory-steps", str(sizes.memory_steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    result["steps"] = sizes.memory_steps
    result["measure"] = (
        "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS, VmHWM"
    )
    return result


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": datetime.date.today().isoformat(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table_rows(r: dict) -> list[list[str]]:
    """[measurement, ours, reference, ratio, target, met] rows of the results table."""
    ts, ep, gen, mem = r["train_step"], r["epoch"], r["generation"], r["memory"]
    peak = max(r["matmul_peak"].values())
    train_ratio = ts["ours"]["tokens_per_s"] / ts["hf"]["tokens_per_s"]
    epoch_ratio = ep["seconds"]["course"] / ep["seconds"]["ours"]
    gen_ratio = gen["ours"]["tokens_per_s"] / gen["hf"]["tokens_per_s"]
    naive_ratio = gen["ours"]["tokens_per_s"] / gen["naive"]["tokens_per_s"]
    same = gen["vs_hf"]
    mem_ratio = mem["ours"]["training"] / mem["hf"]["training"]
    mib = 2**20
    shape = f"{gen['shape']['prompts']} prompts x {gen['shape']['new_tokens']} tokens"
    return [
        ["Training step, batch 8: non-padding tokens/s",
         f"{ts['ours']['tokens_per_s']:.0f}", f"{ts['hf']['tokens_per_s']:.0f} (transformers)",
         f"{train_ratio:.2f}x", ">= 1.2x", yes(train_ratio >= 1.2)],
        [f"Training step: useful FLOP/s, share of matmul peak ({peak / 1e9:.0f} GFLOP/s)",
         f"{ts['ours']['peak_share']:.0%}", f"{ts['hf']['peak_share']:.0%} (transformers)",
         "", ">= 50%", yes(ts["ours"]["peak_share"] >= 0.5)],
        [f"One epoch, {ep['entries']} training entries ({ep['steps']} steps): seconds",
         f"{ep['seconds']['ours']:.1f}", f"{ep['seconds']['course']:.1f} (course-style loop)",
         f"{epoch_ratio:.2f}x faster", ">= 1.5x", yes(epoch_ratio >= 1.5)],
        [f"Greedy generation, {shape}: new tokens/s",
         f"{gen['ours']['tokens_per_s']:.0f}",
         f"{gen['hf']['tokens_per_s']:.0f} (transformers generate, {gen['hf']['cache']} cache)",
         f"{gen_ratio:.2f}x", ">= 1.5x", yes(gen_ratio >= 1.5)],
        [f"Generation against the naive loop ({gen['naive']['prompts']} prompt): new tokens/s",
         f"{gen['ours']['tokens_per_s']:.0f}", f"{gen['naive']['tokens_per_s']:.1f} (naive)",
         f"{naive_ratio:.1f}x", ">= 10x", yes(naive_ratio >= 10)],
        ["Greedy outputs identical to transformers (prompts)",
         f"{same['identical']}/{same['prompts']}", "", "", "all",
         yes(same["identical"] == same["prompts"])],
        [f"Peak fine-tuning memory above the model ({mem['measure']}): MiB",
         f"{mem['ours']['training'] / mib:.0f}", f"{mem['hf']['training'] / mib:.0f} (transformers)",
         f"{mem_ratio:.2f}x", "<= 1.0x", yes(mem_ratio <= 1.0)],
    ]  # fmt: skip


def markdown_table(rows: list[list[str]]) -> str:
    header = ["Measurement", "Ours", "Reference", "Ratio", "Target", "Met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, ep, gen, mem = r["train_step"], r["epoch"], r["generation"], r["memory"]
    panels = [
        ("Training step (tokens/s)", {"ours": ts["ours"]["tokens_per_s"], "transformers": ts["hf"]["tokens_per_s"]}),
        (f"One epoch, {ep['entries']} entries (s)", {"ours": ep["seconds"]["ours"], "course-style": ep["seconds"]["course"]}),
        ("Generation (new tokens/s, log)", {"ours": gen["ours"]["tokens_per_s"], "transformers": gen["hf"]["tokens_per_s"], "naive": gen["naive"]["tokens_per_s"]}),
        ("Fine-tuning memory above model (MiB)", {"ours": mem["ours"]["training"] / 2**20, "transformers": mem["hf"]["training"] / 2**20}),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(list(values), list(values.values()), color=["C0", "C1", "C2"][: len(values)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(title, fontsize=10)
    axes[2].set_yscale("log")
    m = r["machine"]
    fig.suptitle(
        f"GPT-2 124M, {m['device']}: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(r: dict, rows: list[list[str]], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    m = r["machine"]
    md = [
        f"# Benchmark: `{r['command']}`",
        "",
        f"{m['date']}; {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
        f"device {m['device']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']}. Data: {r['data']}.",
        "",
        markdown_table(rows),
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    plot(r, stem.with_suffix(".png"))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    p.add_argument("--full-epoch", action="store_true", help="time an epoch over all train data")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results")
    p.add_argument("--memory-worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--memory-steps", type=int, default=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace, device: torch.device) -> dict:
    sizes = QUICK if args.quick else Sizes()
    if args.full_epoch:
        sizes = Sizes(**{**asdict(sizes), "epoch_entries": None})
    cfg = pc.gpt2_config("gpt2-small (124M)")
    data = load_data()
    r = {"machine": machine_info(device), "sizes": asdict(sizes), "data": data.source}
    r["command"] = " ".join(["python benchmarks/bench.py", *sys.argv[1:]]).strip()

    def stage(name: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)

    stage("matmul peak")
    r["matmul_peak"] = matmul_peak(device)
    ours, hf = build_models(cfg, device)
    initial = copy.deepcopy(ours.state_dict())
    stage("generation")
    r["generation"] = bench_generation(ours, hf, data, sizes, device)
    stage("training step")
    batches = training_batches(data, sizes.warmup + sizes.train_rounds, device)
    peak = max(r["matmul_peak"].values())
    r["train_step"] = bench_train_step(ours, hf, batches, cfg, sizes, device, peak)
    del ours, hf
    gc.collect()
    stage("epoch")
    r["epoch"] = bench_epoch(initial, cfg, data, sizes, device)
    stage("memory")
    r["memory"] = bench_memory(sizes, device)
    return r


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, device, args.memory_steps)))
        return 0
    start = time.perf_counter()
    r = run(args, device)
    r["wall_seconds"] = time.perf_counter() - start
    rows = table_rows(r)
    print()
    print(markdown_table(rows))
    stem = args.out / f"bench-{device.type}{'-quick' if args.quick else ''}"
    save(r, rows, stem)
    print(f"\n{r['wall_seconds']:.0f} s; results in {stem}.md/.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
