"""What a person watching a run sees, and what a script reading it gets.

On a terminal: a live rich progress bar (step, loss, tokens/s, MFU, elapsed, ETA) with messages
(evaluations, checkpoints, samples) printed above it. Anywhere else (a pipe, a CI log, a file):
plain lines at each logged step, no control characters. Either way every logged step is also one
JSON object in `metrics.jsonl`, flushed as it is written, so a crash loses no logged line.
Left out: TensorBoard / W&B writers; metrics.jsonl is easy to feed to either.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def fmt_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class MetricsLog:
    """Appends one JSON line per logged step to metrics.jsonl."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Display:
    """A live bar on a TTY, periodic plain lines otherwise."""

    def __init__(self, total_steps: int, first_step: int, live: bool | None = None):
        self.total, self.live = total_steps, sys.stdout.isatty() if live is None else live
        self._bar = None
        self._t0, self._step0 = time.perf_counter(), first_step
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("MFU {task.fields[mfu]}"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                console=Console(), transient=False)
            self._task = self._bar.add_task("train", total=total_steps, completed=first_step,
                                            loss="-", tps="-", mfu="-", eta="-")
            self._bar.start()

    def eta(self, step: int) -> float | None:
        done = step - self._step0
        if done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * (self.total - step)

    def update(self, step: int, row: dict | None = None) -> None:
        """Advance to `step`; with a logged row, show its numbers (and print a line when not live)."""
        eta = self.eta(step)
        if self._bar is not None:
            fields = {"eta": fmt_duration(eta) if eta is not None else "-"}
            if row is not None:
                fields |= {"loss": f"{row['loss']:.4f}", "tps": f"{row['tok_per_s']:,.0f}", "mfu": f"{row['mfu']:.1%}"}
            self._bar.update(self._task, completed=step, **fields)
        elif row is not None:
            parts = [f"step {step:>{len(str(self.total))}}/{self.total}", f"loss {row['loss']:.4f}"]
            if row.get("mtp_loss") is not None:
                parts.append(f"mtp {row['mtp_loss']:.4f}")
            parts += [f"lr {row['lr']:.2e}", f"{row['tok_per_s']:,.0f} tok/s", f"MFU {row['mfu']:.1%}",
                      f"elapsed {fmt_duration(row['elapsed'])}"]
            if eta is not None:
                parts.append(f"ETA {fmt_duration(eta)}")
            print(" | ".join(parts), flush=True)

    def message(self, text: str) -> None:
        """A line above the bar (or just a line)."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
