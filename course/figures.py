"""The figures and code listings of the notebook (``main/main.ipynb``).

Each plotting function takes plain data (token counts, tensors, lists of responses or
scores), draws one matplotlib figure and returns it. ``show_source`` displays the source of
a function or class from its module, syntax-highlighted: the code the notebook shows is the
code that runs.
"""

from __future__ import annotations

import ast
import html
import inspect
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

# --------------------------------------------------------------------------------------
# Code listings
# --------------------------------------------------------------------------------------


def source_of(obj: Any) -> str:
    """The source code of a function or class (a decorated function's, including decorators)."""
    return inspect.getsource(inspect.unwrap(obj))


def assignment_source(module: ModuleType, name: str) -> str:
    """The source lines of the module-level assignment ``name = ...`` in ``module``."""
    text = inspect.getsource(module)
    for node in ast.parse(text).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return "\n".join(text.splitlines()[node.lineno - 1 : node.end_lineno]) + "\n"
    raise ValueError(f"{module.__name__} has no module-level assignment to {name!r}")


def show_source(*objects: Any) -> Any:
    """Display the source of functions and classes, or ``(module, "NAME")`` assignments.

    Returns an ``IPython.display.Code`` object, which a notebook shows with syntax
    highlighting (and whose plain-text form is the code itself).
    """
    from IPython.display import Code

    parts = [
        assignment_source(*obj) if isinstance(obj, tuple) else source_of(obj) for obj in objects
    ]
    return Code("\n\n".join(part.rstrip("\n") for part in parts), language="python")


# --------------------------------------------------------------------------------------
# 7.3 The data: lengths and batches
# --------------------------------------------------------------------------------------


def _finish(fig: Any, ax: Any, title: str, xlabel: str, ylabel: str) -> Any:
    """A one-panel figure's title, axis labels and legend, laid out; returns the figure."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_token_lengths(
    lengths_by_split: dict[str, Sequence[int]], context_length: int, allowed_max_length: int
):
    """Histogram of the entries' lengths in tokens (prompt + response), with the limits."""
    fig, ax = plt.subplots(figsize=(7, 3))
    all_lengths = [n for lengths in lengths_by_split.values() for n in lengths]
    bins = np.linspace(0, max(max(all_lengths), context_length) * 1.02, 60)
    ax.hist(list(lengths_by_split.values()), bins=bins, stacked=True, label=list(lengths_by_split))
    ax.axvline(context_length, color="black", linestyle="--", label=f"context: {context_length}")
    if allowed_max_length < context_length:
        ax.axvline(allowed_max_length, color="red", linestyle=":", label="allowed_max_length")
    over = sum(n + 1 > allowed_max_length for n in all_lengths)  # +1: the end-of-text token
    title = (
        f"{len(all_lengths)} entries: longest {max(all_lengths)} tokens, "
        f"median {int(np.median(all_lengths))}; {over} would be cut"
    )
    return _finish(fig, ax, title, "tokens per entry (prompt + response)", "entries")


# categories of a cell in a drawn batch: (label, colour)
_CELLS = [
    ("token", "#9ecae1"),
    ("<|endoftext|> as padding", "#d9d9d9"),
    ("target <|endoftext|>: learn to stop", "#fd8d3c"),
    ("target -100: padding, ignored", "#f0f0f0"),
    ("target -100: prompt, ignored (mask_prompt)", "#c7a4d6"),
    ("target token, in the loss", "#41ab5d"),
]


def _input_cells(inputs: torch.Tensor, pad_token_id: int) -> np.ndarray:
    """0 for a token, 1 for the end-of-text/padding run at the end of each row."""
    cells = np.zeros(inputs.shape, dtype=int)
    for r, row in enumerate(inputs.tolist()):
        end = len(row)
        while end > 0 and row[end - 1] == pad_token_id:
            end -= 1
        cells[r, end:] = 1
    return cells


def _target_cells(targets: torch.Tensor, pad_token_id: int, ignore_index: int) -> np.ndarray:
    """Target categories: in the loss (5), end-of-text (2), ignored padding (3) or prompt (4)."""
    cells = np.full(targets.shape, 5, dtype=int)
    for r, row in enumerate(targets.tolist()):
        kept = [j for j, t in enumerate(row) if t != ignore_index]
        first = kept[0] if kept else len(row)
        for j, t in enumerate(row):
            if t == ignore_index:
                cells[r, j] = 4 if j < first else 3
            elif t == pad_token_id:
                cells[r, j] = 2
    return cells


def plot_batch(
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    pad_token_id: int = 50256,
    ignore_index: int = -100,
    annotate: bool | None = None,
    title: str | None = None,
):
    """A padded batch as a grid: one row per example, one cell per position, coloured by role.

    ``annotate`` writes each token id in its cell (default: when the batch is narrow).
    """
    panels = [("inputs", inputs, _input_cells(inputs, pad_token_id))]
    if targets is not None:
        panels.append(("targets", targets, _target_cells(targets, pad_token_id, ignore_index)))
    rows, width = inputs.shape
    annotate = width <= 16 if annotate is None else annotate
    cell = 0.55 if annotate else min(0.55, 9 / width)
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(4.0, cell * width + 2.5), 0.9 + len(panels) * (0.35 * rows + 0.5)),
    )
    axes = np.atleast_1d(axes)
    cmap = ListedColormap([colour for _, colour in _CELLS])
    used = set()
    for ax, (name, values, cells) in zip(axes, panels, strict=True):
        ax.imshow(cells, cmap=cmap, vmin=0, vmax=len(_CELLS) - 1, aspect="auto")
        used |= set(np.unique(cells).tolist())
        if annotate:
            for (r, c), value in np.ndenumerate(values.cpu().numpy()):
                ax.text(c, r, str(value), ha="center", va="center", fontsize=7)
        ax.set_yticks(range(rows), [f"row {r}" for r in range(rows)])
        ax.set_xticks(np.arange(-0.5, width, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
        ax.set_title(name, fontsize=9, loc="left")
    axes[-1].set_xlabel("position")
    handles = [Patch(color=_CELLS[i][1], label=_CELLS[i][0]) for i in sorted(used)]
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.88 if len(handles) > 2 else 0.92))
    return fig


def plot_padding(loader: Any, ignore_index: int = -100):
    """Per training batch: the positions with a target against the positions of padding."""
    real, padded = [], []
    for _, targets in loader:
        n_real = int((targets != ignore_index).sum())
        real.append(n_real)
        padded.append(targets.numel() - n_real)
    fig, ax = plt.subplots(figsize=(7, 2.8))
    steps = np.arange(len(real))
    ax.bar(steps, real, width=1.0, label="positions with a target")
    ax.bar(steps, padded, bottom=real, width=1.0, color="#d9d9d9", label="padding (ignored)")
    share = sum(padded) / max(sum(real) + sum(padded), 1)
    title = f"one epoch of training batches: {share:.0%} of all positions are padding"
    return _finish(fig, ax, title, "batch", "positions")


# --------------------------------------------------------------------------------------
# 7.7 Responses
# --------------------------------------------------------------------------------------


def plot_response_lengths(
    entries: Sequence[dict], tokenizer: Any, max_new_tokens: int, json_key: str = "model_response"
):
    """Histogram of the responses' lengths in tokens, next to the reference answers'."""
    model = [len(tokenizer.encode(e[json_key])) for e in entries]
    reference = [len(tokenizer.encode(e["output"])) for e in entries]
    fig, ax = plt.subplots(figsize=(7, 3))
    top = max(model + reference + [max_new_tokens]) + 1
    bins = np.linspace(0, top, min(40, top) + 1)
    ax.hist([reference, model], bins=bins, label=["reference output", "model response"])
    ax.axvline(max_new_tokens, color="black", linestyle="--", label="max_new_tokens")
    title = (
        f"{len(entries)} test responses: median {int(np.median(model))} tokens "
        f"(references: {int(np.median(reference))})"
    )
    return _finish(fig, ax, title, "tokens", "entries")


def before_after_table(
    entries: Sequence[dict],
    before: Sequence[str],
    after: Sequence[str],
    *,
    headers: tuple[str, str] = ("before fine-tuning", "after fine-tuning"),
) -> Any:
    """An HTML table: each instruction, its reference answer, and the model's answer before
    and after fine-tuning (``headers`` names those two columns)."""
    from IPython.display import HTML

    head = "".join(
        f"<th style='text-align:left'>{name}</th>"
        for name in ("instruction", "reference", *headers)
    )
    rows = []
    for entry, old, new in zip(entries, before, after, strict=True):
        instruction = html.escape(entry["instruction"])
        if entry["input"]:
            instruction += f"<br><i>{html.escape(entry['input'])}</i>"
        cells = [instruction, html.escape(entry["output"]), html.escape(old), html.escape(new)]
        rows.append(
            "<tr>"
            + "".join(f"<td style='text-align:left;vertical-align:top'>{c}</td>" for c in cells)
            + "</tr>"
        )
    return HTML(f"<table><tr>{head}</tr>{''.join(rows)}</table>")


# --------------------------------------------------------------------------------------
# 7.8 Scores
# --------------------------------------------------------------------------------------


def plot_scores(scores: Sequence[float], *, upper: float, xlabel: str, title: str):
    """Histogram of per-entry scores in [0, upper], with their mean."""
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(scores, bins=np.linspace(0, upper, 21), edgecolor="black")
    if scores:
        mean = float(np.mean(scores))
        ax.axvline(mean, color="red", linestyle="--", label=f"mean {mean:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlim(0, upper)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test entries")
    ax.set_title(title)
    fig.tight_layout()
    return fig
