"""The bookkeeping every training driver shares around its steps: logs, evaluation, checkpoints, stops.

    result = run_loop(driver, Cadence(steps=400, log_every=10, eval_every=100, ckpt_every=100),
                      run_dir=run_dir, start=Progress(step=0, tokens=0, elapsed=0.0))

A driver (pretraining in trainer.py, SFT in r1/sft.py) owns its data, model and loss; it hands the
loop three callables: `step(i)` runs optimizer step i and returns its metrics (with "lr") and the
tokens it trained on, `evaluate()` returns validation metrics and a line to show, and
`save(progress, finished)` writes a checkpoint. The loop decides when to log (metrics.jsonl and the
progress display), evaluate and save, and stops cleanly on SIGINT/SIGTERM, on `on_step` returning
True, or at the time limit, always with a checkpoint.
In a torchrun job every rank runs the loop (steps, evaluation and saves are collectives); only the
`primary` rank writes metrics.jsonl and shows progress, and `agree_stop` makes a stop wanted by one
rank (a signal, the time limit) a stop of all of them at the same step.
Left out: anything about what a step computes (train/core.py) or how a checkpoint is laid out (state.py).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from seekling.train import state as run_state
from seekling.train.plots import plot_run
from seekling.train.progress import Display, MetricsLog, fmt_duration


class StopSignals:
    """SIGINT/SIGTERM ask the loop to finish its step, save and exit; a second SIGINT aborts at once."""

    def __enter__(self):
        self.reason, self._old = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass(frozen=True, kw_only=True)
class Cadence:
    """How long a run is and how often it logs, evaluates and saves (0: only at the end)."""

    steps: int
    log_every: int
    eval_every: int
    ckpt_every: int
    time_limit_s: float | None = None

    @classmethod
    def of(cls, cfg) -> Cadence:
        """From a run config with the usual fields (steps, log_every, eval_every, ckpt_every, time_limit_s)."""
        return cls(steps=cfg.steps, log_every=cfg.log_every, eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every,
                   time_limit_s=cfg.time_limit_s)


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, tokens trained, training time of all sessions."""

    step: int
    tokens: int
    elapsed: float

    def state(self, dtype, finished: bool) -> dict:
        """The checkpoint's state.json fields a driver resumes from (it adds its own config)."""
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                "dtype": str(dtype).removeprefix("torch."), "finished": finished}


@dataclass
class LoopResult:
    progress: Progress
    stopped: str | None  # why the run stopped early, or None


def restore(run_dir: Path, ckpt: Path | None, model, optimizer, steps: int, dtype) -> tuple[Progress, object]:
    """Where a run starts: step 0 for a new run; for a resumed one, the checkpoint's weights and
    optimizer state loaded, its progress and compute dtype. Either way metrics.jsonl keeps only the
    rows up to that step (a crash may have logged steps after the last checkpoint)."""
    start = Progress(0, 0, 0.0)
    if ckpt is not None:
        st = run_state.load_checkpoint(ckpt, model, optimizer)
        start = Progress(st["step"], st["tokens"], st["elapsed"])
        dtype = getattr(torch, st.get("dtype", str(dtype).removeprefix("torch.")))
        print(f"resuming {run_dir} from {ckpt.name} (step {start.step}/{steps})")
    run_state.truncate_metrics(run_dir, start.step)
    return start, dtype


def run_loop(*, step: Callable[[int], tuple[dict, int]], evaluate: Callable[[], tuple[dict, str]],
             save: Callable[[Progress, bool], None], cadence: Cadence, run_dir: Path, start: Progress,
             model=None, flops_per_token: float | None = None, peak: float | None = None,
             on_step=None, live: bool | None = None, session_start: float | None = None,
             primary: bool = True, agree_stop: Callable[[bool], bool] | None = None) -> LoopResult:
    """Run steps start.step .. cadence.steps with logging, evaluation, checkpoints and clean stops.

    `session_start` (perf_counter) is when this session began, setup included: elapsed time and the
    time limit count from it.
    """
    session_start = time.perf_counter() if session_start is None else session_start
    progress = Progress(start.step, start.tokens, start.elapsed)
    first_step = start.step

    def now() -> Progress:
        progress.elapsed = start.elapsed + time.perf_counter() - session_start
        return progress

    log = MetricsLog(run_dir / run_state.METRICS) if primary else None
    display = Display(cadence.steps, progress.step, live=live) if primary else _Quiet()
    saved_at, stop_reason = None, None
    t_log, tokens_log = time.perf_counter(), 0
    try:
        with StopSignals() as signals:
            while progress.step < cadence.steps:
                metrics, n_tokens = step(progress.step)
                progress.step += 1
                progress.tokens += n_tokens
                tokens_log += n_tokens
                i = progress.step

                last = i == cadence.steps
                evaluating = last or (cadence.eval_every > 0 and i % cadence.eval_every == 0)
                if i % cadence.log_every == 0 or evaluating:
                    tps = tokens_log / (time.perf_counter() - t_log)
                    row = {"step": i, "tokens": progress.tokens, **metrics, "tok_per_s": tps,
                           "mfu": tps * flops_per_token / peak if flops_per_token and peak else None,
                           "elapsed": now().elapsed}
                    if evaluating:  # after the throughput reading: evaluation is not training speed
                        val, message = evaluate()
                        row |= val
                        display.message(f"step {i}: {message}")
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"training loss became {row['loss']} at step {i}; lower the "
                                                 "learning rate or raise the warmup, then start a new run")
                    if log is not None:
                        log.write(row)
                    display.update(i, row)
                    t_log, tokens_log = time.perf_counter(), 0
                else:
                    display.update(i)
                t_aside = time.perf_counter()  # hooks and checkpoints do not count as training throughput
                stop_reason = signals.reason
                if on_step is not None and on_step(i, model, display) and not last:
                    stop_reason = stop_reason or "stopped by the caller"
                session = time.perf_counter() - session_start
                if stop_reason is None and cadence.time_limit_s is not None and session > cadence.time_limit_s and not last:
                    stop_reason = f"time limit of {fmt_duration(cadence.time_limit_s)} reached"
                if agree_stop is not None and agree_stop(stop_reason is not None) and stop_reason is None:
                    stop_reason = "another rank stopped"
                if last or stop_reason or (cadence.ckpt_every > 0 and i % cadence.ckpt_every == 0):
                    save(now(), i >= cadence.steps)
                    saved_at = i
                t_log += time.perf_counter() - t_aside
                if stop_reason:
                    break
    finally:
        display.close()
        if log is not None:
            log.close()
    if saved_at != progress.step and progress.step != first_step:  # a finished run resumed trains and saves nothing
        save(now(), progress.step >= cadence.steps)
    return LoopResult(progress=now(), stopped=stop_reason)


class _Quiet:
    """The display of a rank that does not show progress."""

    def update(self, step, row=None):
        pass

    def message(self, text):
        pass

    def close(self):
        pass


def summarize(result: LoopResult, *, first_step: int, steps: int, run_dir: Path, command: str,
              plots: bool) -> tuple[dict, list[dict], bool]:
    """How a run ended, for its driver to return: (outcome dict, the logged rows, whether it trained
    to its end in this session). Prints why it stopped early, or that it had nothing left to train;
    draws the plots when it finished here (the driver then prints its own closing line)."""
    p = result.progress
    out = {"step": p.step, "tokens": p.tokens, "elapsed": p.elapsed, "finished": p.step >= steps,
           "stopped": result.stopped, "run_dir": str(run_dir), "model_dir": str(run_dir / run_state.MODEL_DIR)}
    rows = run_state.read_metrics(run_dir)
    if result.stopped:
        print(f"stopped at step {p.step}/{steps} ({result.stopped}); checkpoint saved. Continue with:\n"
              f"  {command} --resume {run_dir}")
    elif p.step == first_step:
        print(f"{run_dir} already finished its {steps} steps; nothing to train (model in {run_dir / run_state.MODEL_DIR})")
    elif plots:
        plot_run(run_dir)
    return out, rows, not result.stopped and p.step != first_step
