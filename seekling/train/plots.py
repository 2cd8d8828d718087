"""PNG plots of a run, drawn from its metrics.jsonl alone (so they work mid-run, after a crash, or
for someone else's run directory):

    loss.png         train loss (and MTP loss) per logged step, validation loss at evaluations
    lr.png           the learning-rate schedule as it ran
    throughput.png   tokens/s and MFU
    expert_load.png  per MoE layer: each expert's share of the routed tokens over time, and at the
                     last logged step as a layers x experts map; 1.0 = perfectly balanced (white).
                     Routers are numbered in forward order: the main MoE layers, then the MTP blocks.

Matplotlib's Agg backend: no display needed, nothing opens a window.
Left out: live or interactive plots; rerun plot_run (or `seekling plot`) to refresh.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm

from seekling.train.state import read_metrics


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write the run's PNGs next to its metrics.jsonl; returns their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir} has no logged steps in metrics.jsonl yet; train for at least log_every steps")
    step = np.array([r["step"] for r in rows])
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(step, [r["loss"] for r in rows], label="train loss", lw=1.2)
    mtp = [(r["step"], r["mtp_loss"]) for r in rows if r.get("mtp_loss") is not None]
    if mtp:
        ax.plot(*zip(*mtp), label="MTP loss (depth mean)", lw=1.0, alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(run_dir / "loss.png")
    _save(fig, written[-1])

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(step, [r["lr"] for r in rows])
    ax.set(xlabel="step", ylabel="learning rate", title=f"{run_dir.name}: learning rate")
    ax.grid(alpha=0.3)
    written.append(run_dir / "lr.png")
    _save(fig, written[-1])

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(step, [r["tok_per_s"] for r in rows], color="tab:blue")
    ax.set(xlabel="step", ylabel="tokens / s", title=f"{run_dir.name}: throughput")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(step, [100 * r["mfu"] for r in rows], color="tab:orange", alpha=0.6)
    ax2.set_ylabel("MFU (%)", color="tab:orange")
    written.append(run_dir / "throughput.png")
    _save(fig, written[-1])

    loads = [(r["step"], np.asarray(r["expert_load"], dtype=float)) for r in rows if r.get("expert_load")]
    if loads:
        written.append(run_dir / "expert_load.png")
        _save(_expert_load_figure(run_dir.name, loads), written[-1])
    return written


def _expert_load_figure(name: str, loads: list[tuple[int, np.ndarray]]):
    steps = [s for s, _ in loads]
    arr = np.stack([c for _, c in loads])  # (time, layers, E)
    n_layers, n_exp = arr.shape[1:]
    # share of routed tokens x E: 1.0 everywhere is perfect balance
    share = arr / np.maximum(arr.sum(-1, keepdims=True), 1) * n_exp
    # white = balanced (1.0), red = overloaded, blue = starved
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(share.max())))
    cols = min(3, n_layers)
    rows_over_time = -(-n_layers // cols)
    fig = plt.figure(figsize=(4 * cols, 2.6 * rows_over_time + 3.2), constrained_layout=True)
    grid = fig.add_gridspec(rows_over_time + 1, cols)
    image = None
    for layer in range(n_layers):
        ax = fig.add_subplot(grid[layer // cols, layer % cols])
        image = ax.imshow(share[:, layer].T, aspect="auto", origin="lower", cmap="RdBu_r", norm=norm,
                          extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, n_exp - 0.5), interpolation="nearest")
        ax.set(title=f"MoE router {layer}", xlabel="step", ylabel="expert")
    ax = fig.add_subplot(grid[rows_over_time, :])
    ax.imshow(share[-1], aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set_yticks(range(n_layers))
    ax.set(title=f"step {steps[-1]}: load per expert (x E; 1 = balanced), max {share[-1].max():.2f}",
           xlabel="expert", ylabel="MoE router")
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="tokens routed, x E")
    fig.suptitle(f"{name}: expert load")
    return fig
