"""Drawings for chapter 16: what each rank holds before and after a collective, and the ring all-reduce step by step.

Ranks are rows, elements (or chunks) are boxes; a box's colour says which ranks' data it holds, so a sum of all
ranks is the darkest. The ring drawing is computed from `ring_steps`, the schedule the real `ring_all_reduce`
follows, so the picture cannot drift from the code.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from minillm.distributed.collectives import ring_steps


def _boxes(ax, rows: list[list[str]], shades: list[list[float]], title: str, rank_labels: bool = True,
           width: int | None = None) -> None:
    """One panel: rows[r][c] is the label of rank r's box c, shades[r][c] in [0, 1] its colour depth; `width`
    boxes fit across (default: the longest row)."""
    cmap = plt.get_cmap("Blues")
    for r, (labels, depths) in enumerate(zip(rows, shades)):
        if rank_labels:
            ax.text(-0.6, -r, f"rank {r}", ha="right", va="center", fontsize=9)
        for c, (label, depth) in enumerate(zip(labels, depths)):
            ax.add_patch(Rectangle((c - 0.45, -r - 0.4), 0.9, 0.8, facecolor=cmap(0.15 + 0.7 * depth),
                                   edgecolor="black", linewidth=0.8))
            ax.text(c, -r, label, ha="center", va="center", fontsize=7,
                    color="white" if depth > 0.6 else "black")
    width = width or max(len(labels) for labels in rows)
    ax.set_xlim(-2.0 if rank_labels else -0.6, width - 0.4)
    ax.set_ylim(-len(rows) + 0.4, 0.8)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def draw_collectives(examples: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]) -> plt.Figure:
    """One row of panels per collective: {name: ([rank r's tensor before], [rank r's tensor after])}.

    Values are drawn as numbers; the colour grows with the value, so sums stand out from single inputs.
    """
    fig, axes = plt.subplots(len(examples), 2, figsize=(9, 1.3 * sum(len(b) for b, _ in examples.values()) / 2 + 1),
                             squeeze=False)
    for (name, (before, after)), (left, right) in zip(examples.items(), axes):
        values = [t.tolist() for t in before + after]
        top = max(max(v) for v in values if v) or 1
        width = max(len(v) for v in values)
        for ax, tensors, when in ((left, before, "before"), (right, after, "after")):
            rows = [[f"{v:g}" for v in t.tolist()] for t in tensors]
            shades = [[v / top for v in t.tolist()] for t in tensors]
            _boxes(ax, rows, shades, f"{name}: {when}", width=width)
    fig.tight_layout()
    return fig


def ring_contributions(world_size: int) -> list[list[list[set[int]]]]:
    """snapshots[s][r][c] = the ranks whose chunk c is summed in rank r's copy after step s (s = 0: the start).

    Replays `ring_steps` on sets instead of tensors: a received chunk is added (set union) in the
    reduce-scatter and overwrites (replaces) in the all-gather.
    """
    state = [[{r} for _ in range(world_size)] for r in range(world_size)]
    snapshots = [[[set(s) for s in row] for row in state]]
    schedules = [ring_steps(r, world_size) for r in range(world_size)]
    for step in range(2 * (world_size - 1)):
        sent = [set(state[r][schedules[r][step][1]]) for r in range(world_size)]  # all send at once
        for r in range(world_size):
            phase, _, recv_index = schedules[r][step]
            incoming = sent[(r - 1) % world_size]
            state[r][recv_index] = state[r][recv_index] | incoming if phase == "reduce" else incoming
        snapshots.append([[set(s) for s in row] for row in state])
    return snapshots


def draw_ring(world_size: int = 4) -> plt.Figure:
    """The state of every rank after each step of a ring all-reduce. Each box is one chunk, labelled with the
    ranks summed into it so far; Σ marks a finished chunk (all ranks)."""
    snapshots = ring_contributions(world_size)
    fig, axes = plt.subplots(1, len(snapshots), figsize=(2.3 * len(snapshots), 0.55 * world_size + 0.8))
    for step, (ax, state) in enumerate(zip(np.atleast_1d(axes), snapshots)):
        rows = [["Σ" if len(s) == world_size else "+".join(str(r) for r in sorted(s)) for s in row]
                for row in state]
        shades = [[len(s) / world_size for s in row] for row in state]
        if step == 0:
            title = "start"
        elif step < world_size:
            title = f"reduce-scatter {step}"
        else:
            title = f"all-gather {step - world_size + 1}"
        _boxes(ax, rows, shades, title, rank_labels=step == 0)
    fig.tight_layout()
    return fig
