"""Decoding at batch 1 against the memory-bandwidth bound, prompt lookup, and bf16 inference.

With one prompt, each new token reads every weight once (the token and position tables
aside: one row each) and the cached keys and values of the text so far, and does little
arithmetic, so the machine's memory bandwidth bounds the tokens/s. ``bench_decoding``
measures that bandwidth in the same turns as the decoding (a large read-only ``sum`` and a
copy, next to each round of each front end) and reports each front end's tokens/s as a
share of the bound. The same section times prompt
lookup (``draft_tokens``) and bf16 weights and cache against fp32 and transformers.
"""

from __future__ import annotations

import copy
import statistics

import torch

import previous_chapters as pc
from benchmarks import contenders as c
from benchmarks.measure import alternate, compare_outputs, fastest_hf_cache
from benchmarks.report import yes
from benchmarks.workload import Data, Sizes
from runtime.engine import generate_batch, stream_tokens
from runtime.run_config import check_precision

TARGET_SHARE = 0.8  # of the bandwidth bound, fp32, batch 1
DRAFT_TOKENS = 4


def bytes_per_token(model: torch.nn.Module, prompt_len: int, new_tokens: int) -> float:
    """Bytes a batch-1 decoding step reads, averaged over the steps: every weight once (one
    row of each embedding table), and the cached keys and values of the text so far."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for table in (model.tok_emb.weight, model.pos_emb.weight):
        weights -= (table.shape[0] - 1) * table.shape[1] * table.element_size()
    cfg, size = model.cfg, model.tok_emb.weight.element_size()
    mean_cached = prompt_len + (new_tokens - 1) / 2
    return weights + 2 * cfg["n_layers"] * cfg["emb_dim"] * mean_cached * size


def front_end_shares(model, prompt: list[int], n: int, rounds: int, device) -> dict:
    """Batch-1 greedy tokens/s of the course's generate, stream_tokens and generate_batch, and
    each as a share of the bandwidth bound, the bandwidth timed in the same turns.

    The machine's bandwidth drifts (other work shares it: 30-55 GB/s within minutes here), so
    each round times a read-only sum and a copy of as many bytes as a token reads, next to the
    three front ends, and each round's share divides by that round's bandwidth (the faster of
    the two kernels); the reported share is the median over the rounds.
    """
    ctx, per_token = model.context_length, bytes_per_token(model, len(prompt), n)
    idx = torch.tensor([prompt], device=device)
    src = torch.ones(int(per_token) // 4, device=device)  # float32: 4 bytes each
    dst, size = torch.empty_like(src), src.numel() * 4
    runs = {
        "generate": lambda: pc.generate(model, idx, n, ctx),
        "stream_tokens": lambda: list(stream_tokens(model, prompt, n, ctx)),
        "generate_batch": lambda: generate_batch(model, [prompt], n, ctx, eos_id=None),
        "read": lambda: src.sum(),
        "copy": lambda: dst.copy_(src),
    }
    turns = {name: (lambda r, run=run: run) for name, run in runs.items()}
    times = alternate(turns, rounds, 1, device)
    pairs = zip(times["read"], times["copy"], strict=True)
    bandwidth = [max(size / read, 2 * size / copied) for read, copied in pairs]
    fronts = list(runs)[:3]
    return {
        "bandwidth": statistics.median(bandwidth),
        "bytes_per_token": per_token,
        "tokens_per_s": {name: n / statistics.median(times[name]) for name in fronts},
        "share": {
            name: statistics.median(
                per_token * n / t / bw for t, bw in zip(times[name], bandwidth, strict=True)
            )
            for name in fronts
        },
    }


def lookup_row(model, prompt: list[int], n: int, rounds: int, device) -> dict:
    """Prompt lookup against plain greedy on one input: tokens per forward, speed-up."""
    ctx, stats = model.context_length, {}
    drafted = list(stream_tokens(model, prompt, n, ctx, draft_tokens=DRAFT_TOKENS, stats=stats))
    plain = list(stream_tokens(model, prompt, n, ctx))
    runs = {
        "plain": lambda r: lambda: list(stream_tokens(model, prompt, n, ctx)),
        "lookup": lambda r: (
            lambda: list(stream_tokens(model, prompt, n, ctx, draft_tokens=DRAFT_TOKENS))
        ),
    }
    times = alternate(runs, rounds, 1, device)
    return {
        "identical": drafted == plain,
        "tokens_per_forward": stats["tokens"] / stats["forwards"],
        "speedup": statistics.median(times["plain"]) / statistics.median(times["lookup"]),
    }


def bf16_rows(ours, hf, data: Data, sizes: Sizes, device, hf_cache: str) -> dict:
    """bf16 weights and cache: greedy agreement with fp32 on the test prompts, and batch-1
    tokens/s of ours and transformers in fp32 and in bf16 (ratios are fair pairwise)."""
    try:
        check_precision("bf16", device)
    except Exception as error:  # the chapter's rule: no bf16 where it would be emulated
        return {"refused": str(error)}
    ours16 = copy.deepcopy(ours).to(torch.bfloat16)
    hf16 = c.hf_copy(hf, torch.bfloat16)
    n, ctx = sizes.decode_tokens, ours.context_length
    prompts = data.prompts(sizes.agreement_prompts)
    fp32 = generate_batch(ours, prompts, n, ctx, eos_id=None)
    bf16 = generate_batch(ours16, prompts, n, ctx, eos_id=None)
    prompt = prompts[0]
    runs = {
        "ours_fp32": lambda: list(stream_tokens(ours, prompt, n, ctx)),
        "ours_bf16": lambda: list(stream_tokens(ours16, prompt, n, ctx)),
        "hf_fp32": lambda: c.hf_generate(hf, [prompt], n, hf_cache),
        "hf_bf16": lambda: c.hf_generate(hf16, [prompt], n, hf_cache),
    }
    times = alternate(
        {name: (lambda r, run=run: run) for name, run in runs.items()},
        sizes.gen_rounds,
        1,
        device,
    )
    rates = {name: n / statistics.median(t) for name, t in times.items()}
    return {"agreement": compare_outputs(bf16, fp32), "tokens_per_s": rates}


def copying_prompt(data: Data) -> list[int]:
    """A prompt whose answer copies it: "Correct the spelling" of a test entry's text twice."""
    text = data.test[0]["instruction"] + " " + data.test[0].get("input", "")
    prompt = f"Correct the spelling of this text:\n\n{text}\n\n### Response:\n{text}\n{text}"
    return data.tokenizer.encode(prompt)


def bench_decoding(ours, hf, data: Data, sizes: Sizes, device, precision: str | None) -> dict:
    """Bandwidth share of batch-1 decoding (fp32), prompt lookup rows and bf16 rows (unless
    ``precision`` is "fp32")."""
    n = sizes.decode_tokens
    prompt = data.prompts(1)[0]
    hf_cache = fastest_hf_cache(hf, [prompt], n, device)
    return {
        **front_end_shares(ours, prompt, n, sizes.gen_rounds, device),
        "lookup": {
            name: lookup_row(ours, p, n, sizes.gen_rounds, device)
            for name, p in (("non-copying", prompt), ("copying", copying_prompt(data)))
        },
        "bf16": {"refused": "--precision fp32"}
        if precision == "fp32"
        else bf16_rows(ours, hf, data, sizes, device, hf_cache),
        "new_tokens": n,
    }  # fmt: skip


def rows(r: dict) -> list[list[str]]:
    """The decoding section's rows of bench.py's table."""
    d = r["decoding"]
    gb = f"{d['bandwidth'] / 1e9:.1f} GB/s"
    out = [
        [
            f"Batch-1 decoding, {name}: share of the bandwidth bound ({gb}, "
            f"{d['bytes_per_token'] / 2**20:.0f} MiB/token)",
            f"{d['tokens_per_s'][name]:.1f} tok/s = {share:.0%}",
            "",
            "",
            f">= {TARGET_SHARE:.0%}",
            yes(share >= TARGET_SHARE),
        ]
        for name, share in d["share"].items()
    ]
    for name, lk in d["lookup"].items():
        out.append(
            [
                f"Prompt lookup ({DRAFT_TOKENS} drafts), {name} input: tokens per forward, speed-up",
                f"{lk['tokens_per_forward']:.2f}",
                "1.00 (plain greedy)",
                f"{lk['speedup']:.2f}x",
                "identical tokens",
                yes(lk["identical"]),
            ]
        )
    bf = d["bf16"]
    if "refused" in bf:
        return out + [["bf16 inference", "refused", bf["refused"], "", "", ""]]
    t, agree = bf["tokens_per_s"], bf["agreement"]
    return out + [
        ["bf16 greedy tokens identical to fp32 (test prompts; first divergences)",
         f"{agree['identical']}/{agree['prompts']}",
         str(sorted(agree["first_divergence"].values())), "", "report", ""],
        ["Batch-1 decoding, bf16: tokens/s against transformers fp32",
         f"{t['ours_bf16']:.1f}", f"{t['hf_fp32']:.1f}", f"{t['ours_bf16'] / t['hf_fp32']:.2f}x",
         ">= 1.6x", yes(t["ours_bf16"] / t["hf_fp32"] >= 1.6)],
        ["Batch-1 decoding, bf16: tokens/s against transformers bf16",
         f"{t['ours_bf16']:.1f}", f"{t['hf_bf16']:.1f}", f"{t['ours_bf16'] / t['hf_bf16']:.2f}x",
         ">= 1.2x", yes(t["ours_bf16"] / t["hf_bf16"] >= 1.2)],
        ["Batch-1 decoding, fp32: tokens/s against transformers fp32",
         f"{t['ours_fp32']:.1f}", f"{t['hf_fp32']:.1f}", f"{t['ours_fp32'] / t['hf_fp32']:.2f}x",
         "", ""],
    ]  # fmt: skip
