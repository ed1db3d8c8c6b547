"""The figures of DPO (``course/dpo.py``): what training tracked, and the loss's shape.

matplotlib is imported when a figure is drawn, so that importing ``course.dpo`` stays quick.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from course.dpo import DPOHistory

LN2 = math.log(2)  # the DPO loss while the policy equals the reference


def plot_dpo_tracking(history: DPOHistory, *, title: str | None = None):
    """Four panels over training steps: the loss, the chosen and rejected rewards, the
    reward margin and the preference accuracy; training solid, validation dashed."""
    import matplotlib.pyplot as plt

    h = history
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    panels = [  # (title, [(train values, val values, label, colour)])
        ("DPO loss", [(h.train_losses, h.val_losses, "loss", "C0")]),
        (
            "rewards",
            [
                (h.train_chosen_rewards, h.val_chosen_rewards, "chosen", "C2"),
                (h.train_rejected_rewards, h.val_rejected_rewards, "rejected", "C3"),
            ],
        ),
        (
            "reward margin (chosen - rejected)",
            [(h.train_reward_margins, h.val_reward_margins, "margin", "C1")],
        ),
        ("preference accuracy", [(h.train_accuracies, h.val_accuracies, "accuracy", "C4")]),
    ]
    for ax, (name, curves) in zip(axes, panels, strict=True):
        for train, val, label, colour in curves:
            ax.plot(h.steps, train, color=colour, label=f"train {label}")
            ax.plot(h.steps, val, color=colour, ls="--", label=f"val {label}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    axes[0].axhline(LN2, color="grey", lw=0.8, ls=":")  # the policy equals the reference
    axes[3].set_ylim(-0.05, 1.05)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_loss_against_margin(betas: Iterable[float] = (0.1, 0.5, 2.0)):
    """The DPO loss of one pair, -log sigmoid(beta * margin), against the reward margin,
    for several betas: where it stops pushing (flattens) is where training stops moving the
    policy away from the reference."""
    import matplotlib.pyplot as plt

    margins = torch.linspace(-10, 25, 300)
    fig, ax = plt.subplots(figsize=(6, 3))
    for beta in betas:
        ax.plot(margins, -F.logsigmoid(beta * margins), label=f"beta = {beta:g}")
    ax.axhline(LN2, color="grey", lw=0.8, ls=":")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("reward margin: chosen reward - rejected reward (nats)")
    ax.set_ylabel("DPO loss of the pair")
    ax.set_title("ln 2 at margin 0; the larger beta, the sooner the loss is flat", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
