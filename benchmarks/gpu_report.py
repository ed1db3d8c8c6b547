"""The GPU check's report (``gpu_check.py``): the machine, and the results as a Markdown table
with the course's time and the goals on one H100/H200 marked met or not met."""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import torch

from benchmarks.report import cpu_name

COURSE_SECONDS = 0.86 * 60  # the course: 355M, 2 epochs, 0.86 min on an A100
GOALS = {"train": 20.0, "responses": 10.0}  # seconds on one H100/H200


def machine(args: argparse.Namespace) -> dict:
    info = {"device": args.device, "cpu": cpu_name(), "cores": os.cpu_count()}
    info.update(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        info["gpus"] = torch.cuda.device_count()
    return info


def workload_cells(row: dict, goals: bool) -> list[str]:
    """[what, seconds, the course, goal, met] of a workload row; the course's time and the
    goals apply to the chapter's sizes (not to --tiny or to other data)."""
    seconds, goal = row["seconds"], GOALS[row["step"]]
    goals = goals and row.get("entries", 935) == 935 and row.get("responses", 110) == 110
    course = f"{COURSE_SECONDS:.1f} s: {COURSE_SECONDS / seconds:.1f}x" if goals else ""
    if row["step"] == "train":
        layers, emb, heads = row["layers_emb_heads"]
        what = (
            f"{row['parameters'] / 1e6:.0f}M parameters ({layers} layers, {emb} wide, {heads} "
            f"heads), {row['epochs']} epochs over {row['entries']} entries: {row['steps']} "
            f"steps of {row['batch_size']}"
        ) + (f"; peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] else "")
    else:
        tokens, course = row.get("new_tokens"), ""
        what = (
            f"{row['responses']} response(s) of up to {row['max_new_tokens']} tokens (batch "
            f"{row['batch_size']}, stopped at end-of-text), {row['generation']}"
        ) + (f": {tokens:,} new tokens, {tokens / seconds:,.0f}/s" if tokens else "")
    met = ("met" if seconds <= goal else "**not met**") if goals else "n/a"
    return [what, f"{seconds:.1f}", course, f"<= {goal:g} s", met]


def table_rows(result: dict) -> list[list[str]]:
    """[part, what, seconds, the course, goal, met] rows: every measurement, then the parts
    that measured nothing (bench: its own table follows)."""
    rows, parts = [], result["parts"]
    for row in parts.get("workload", {}).get("rows", []):
        name = f"{row['step']}, {row['precision']}"
        if row["status"] == "ok":
            rows.append([name, *workload_cells(row, result["goals_apply"])])
        else:
            rows.append([name, f"{row['status']}: {row['error']}", "", "", "", ""])
    torchrun = parts.get("torchrun", {})
    for row in torchrun.get("rows", []):
        if row["status"] != "ok":
            result_text = f"{row['status']}: {row['error']}"
        elif row["step"] == "all_reduce":
            result_text = f"sum correct; {row['all_reduce_s'] * 1e3:.0f} ms with set-up"
        else:
            result_text = f"ran on {row['device']}"
        what = f"{torchrun['processes']} process(es), {torchrun['backend']}: {result_text}"
        rows.append([f"torchrun: {row['step']}", what, f"{row['seconds']:.1f}", "", "", ""])
    for name, part in parts.items():
        if name == "bench" or not part.get("rows"):
            detail = part.get("error") or part.get("command")
            what = part["status"] + (f": {detail}" if detail else "")
            seconds = f"{part['seconds']:.1f}" if "seconds" in part else ""
            rows.append([name, what, seconds, "", "", ""])
    return rows


def markdown(result: dict) -> str:
    m, data = result["machine"], result["data"]
    head = ["part", "what", "seconds", "the course (A100): ours faster", "goal", "met"]
    table = [head, ["---"] * len(head), *table_rows(result)]
    lines = [
        f"# GPU check: {m.get('gpu', m['device'])}",
        "",
        f"`{result['command']}`, {m['date']}: {m.get('gpu', m['device'])}, {m['cpu']} "
        f"({m['cores']} cores), torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}. "
        f"Data: {data['source']}, {data['entries']} entries. Random weights. Wall time "
        f"{result['wall_seconds']:.0f} s of a {result['budget_s']:.0f} s budget.",
        "",
        *("| " + " | ".join(cells) + " |" for cells in table),
        "",
        "Goals on one H100/H200: 355M, 2 epochs in 20 s or less; the 110 responses in 10 s or "
        f"less. fp32 is plain fp32 (float32 matmul precision '{m['float32_matmul_precision']}'"
        "); bf16 is the chapter's --precision bf16. The first precision also pays CUDA's "
        "one-time start-up (cuBLAS, kernels). Training time includes the chapter's "
        "evaluations (every 5 steps) and its sample after each epoch.",
    ]
    if result["parts"].get("bench", {}).get("table"):
        lines += ["", "## bench.py", "", result["parts"]["bench"]["table"].strip()]
    return "\n".join(lines) + "\n"
