"""One PNG of a reasoning run: training reward and accuracy, and held-out pass@1, over steps.

    plot_rl("runs/rl")                                           # runs/rl/reward.png
    plot_rl("runs/r1/rl", sft_dir="runs/r1/sft", out="runs/r1/r1.png")   # SFT then GRPO on one axis

Drawn from metrics.jsonl alone (and the GRPO run's baseline_eval.json for its step 0), so it works
mid-run and on someone else's run directory. With `sft_dir`, the SFT run's held-out pass@1 comes
first and the GRPO steps continue after its last step, a dashed line marking where GRPO began.
Left out: the loss, throughput and expert-load plots, which train/plots.py draws for every run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from seekling.train.state import read_metrics

SMOOTH = 10


def _evals(rows: list[dict], offset: int = 0) -> list[tuple[int, float]]:
    return [(r["step"] + offset, 100 * r["pass@1"]) for r in rows if r.get("pass@1") is not None]


def plot_rl(rl_dir: str | os.PathLike, *, sft_dir: str | os.PathLike | None = None,
            out: str | os.PathLike | None = None) -> Path:
    """Write the reward / accuracy / held-out pass@1 plot; returns its path (default RL_DIR/reward.png)."""
    rl_dir = Path(rl_dir)
    rows = read_metrics(rl_dir)
    if not rows:
        raise FileNotFoundError(f"{rl_dir} has no logged GRPO steps in metrics.jsonl yet")
    offset = 0
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if sft_dir is not None:
        sft_rows = read_metrics(Path(sft_dir))
        if sft_rows:
            offset = sft_rows[-1]["step"]
            sft = _evals(sft_rows)
            if sft:
                ax.plot(*zip(*sft), "s-", color="tab:gray", label="held-out pass@1 (SFT)")
            ax.axvline(offset, color="k", ls="--", lw=0.8)
            ax.text(offset, 101, " GRPO starts", va="bottom", fontsize=8)
    held = _evals(rows, offset)
    baseline = rl_dir / "baseline_eval.json"
    if baseline.is_file():
        held.insert(0, (offset, 100 * json.loads(baseline.read_text(encoding="utf-8"))["pass@1"]))
    steps = [r["step"] + offset for r in rows]
    # Each step's batch is a handful of fresh prompts: the raw values are drawn faint and a moving
    # mean over SMOOTH steps solid, so the trend is visible through the sampling noise.
    for key, color, label in (("accuracy", "tab:blue", "training samples correct (%)"),
                              ("reward", "tab:green", "training reward (x100)")):
        raw = np.array([100 * r[key] for r in rows])
        ax.plot(steps, raw, color=color, alpha=0.2, lw=0.8)
        k = min(SMOOTH, len(raw))
        ax.plot(steps[k - 1:], np.convolve(raw, np.ones(k) / k, mode="valid"), color=color, lw=1.5,
                label=f"{label}, mean of {k} steps")
    if held:
        ax.plot(*zip(*held), "o-", color="tab:red", lw=2, label="held-out pass@1 (GRPO, greedy)")
    ax.set(xlabel="optimizer step" if sft_dir is None else "step (SFT steps, then GRPO steps)",
           ylabel="%", ylim=(0, 105),
           title=f"{(rl_dir.parent if sft_dir is not None else rl_dir).name}: reward and held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    path = Path(out) if out is not None else rl_dir / "reward.png"
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
