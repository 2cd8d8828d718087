"""`seekling demo`: train the tiny preset on the embedded Shakespeare corpus within a time budget,
show samples as it learns, save a checkpoint transformers can load, plot the run, and print what
to try next.

The run length is fixed up front: a few timed steps on a throwaway copy of the model measure this
machine, and the step count that fits the budget is written into the run's config. The learning
-rate schedule therefore knows its end from step 0, and an interrupted demo resumes on the same
schedule (`seekling demo` again, or `seekling train --resume runs/demo`). If the machine turns out slower
than measured, the time limit stops training cleanly with a resumable checkpoint.
Left out: a budget that adapts mid-run; it would make the schedule depend on wall-clock time.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from seekling.checkpoint import load
from seekling.data.dataset import TrainLoader, prepare_tokens
from seekling.model.transformer import Transformer
from seekling.tokenizer import load_default_tokenizer
from seekling.train import state as run_state
from seekling.train.config import train_preset
from seekling.train.plots import plot_run
from seekling.train.progress import fmt_duration
from seekling.train.samples import sample
from seekling.train.plan import measure_step_time
from seekling.train.trainer import resume, train

DEMO_PROMPT = "ROMEO:"
# Wall time not spent in training steps, as measured on a 2-core laptop CPU: imports and token
# cache (~10 s on first use), the throughput probe (~5 s), 4 checkpoints, 3 samples and the plots
# (~25 s together); evaluations are budgeted from the measured step time. Kept generous: the
# budget is a promise.
_OVERHEAD_S = 45.0


def _clear_run(run_dir: Path) -> None:
    """Remove an earlier demo's files (only names the trainer writes) so a new demo can start."""
    for p in run_dir.iterdir():
        if p.name.startswith("ckpt-") or p.name == run_state.MODEL_DIR:
            shutil.rmtree(p)
        elif p.name in (run_state.TRAIN_CONFIG, run_state.METRICS, run_state.LATEST) or p.suffix == ".png":
            p.unlink()


def run_demo(out_dir: str = "runs/demo", time_budget_s: float = 450.0, prompt: str = DEMO_PROMPT,
             max_new_tokens: int = 60, live: bool | None = None) -> dict:
    """Train `tiny` for about time_budget_s seconds in total, with samples, checkpoint and plots; returns final metrics."""
    if time_budget_s < 60:
        raise ValueError(f"time_budget_s must be at least 60 seconds for a meaningful demo, got {time_budget_s}")
    t0 = time.perf_counter()
    run_dir = Path(out_dir)
    tokenizer = load_default_tokenizer()
    print(f"seekling demo: a DeepSeek-V3-style MoE ('tiny' preset) learns Shakespeare on this machine, "
          f"in about {fmt_duration(time_budget_s)}.", flush=True)

    def show(when: str, model, out=None) -> None:
        text = sample(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=0)
        msg = f"\n--- sample {when} ---\n{prompt}{text}\n---"
        (out.message if out is not None else print)(msg)

    ckpt = run_state.find_checkpoint(run_dir)
    if ckpt is not None and not run_state.read_state(ckpt).get("finished"):
        cfg = run_state.read_train_config(run_dir)
        print(f"{run_dir} holds an interrupted demo at {ckpt.name}: resuming it "
              f"(delete {run_dir} to start over)", flush=True)
        resuming = True
    else:
        if run_dir.exists() and (run_dir / run_state.TRAIN_CONFIG).exists():
            print(f"replacing the earlier demo in {run_dir}", flush=True)
            _clear_run(run_dir)
        cfg = train_preset("tiny", out_dir=str(run_dir), max_steps=50, warmup_steps=10)
        resuming = False

    shards = prepare_tokens(cfg.data, tokenizer, cache_dir=cfg.token_cache_dir)
    loader = TrainLoader(data=shards.split("train"), batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
    model = Transformer(cfg.model_config)
    model.init_weights(cfg.seed)  # exactly the trainer's initial model, so the first sample is the run's start
    if not resuming:
        step_s = measure_step_time(cfg, loader, model)
        left = time_budget_s - (time.perf_counter() - t0) - _OVERHEAD_S
        # four evaluations of eval_batches forward passes, each under 1/3 of a training step
        steps = int((left - 4 * cfg.eval_batches * step_s / 3) / step_s)
        steps = max(60, min(3000, steps - steps % 10))
        cfg = train_preset("tiny", out_dir=str(run_dir), max_steps=steps, warmup_steps=max(10, steps // 15),
                           eval_every=max(1, steps // 4), ckpt_every=max(1, steps // 4),
                           log_every=max(1, steps // 50),
                           time_limit_s=max(30.0, left * 1.15))
        print(f"measured {step_s:.2f} s per step of {cfg.tokens_per_step:,} tokens: training {steps} steps "
              f"({steps * cfg.tokens_per_step / 1e6:.2f}M tokens)", flush=True)
        show("before training (random weights)", model)

    def on_step(step, trained, display):
        if step == cfg.steps // 2:
            show(f"at step {step} of {cfg.steps}", trained, display)

    result = (resume(str(run_dir), on_step=on_step, live=live) if resuming
              else train(cfg, on_step=on_step, live=live))
    if result["stopped"] and "time limit" not in result["stopped"]:
        return result  # SIGINT/SIGTERM: the trainer said how to continue
    show(f"after {result['step']} steps", load(run_dir / run_state.MODEL_DIR))
    if result["stopped"]:  # this machine ran slower than measured (another busy process?): keep the promise
        plot_run(run_dir)
        print(f"\nthe time budget ran out at step {result['step']} of {cfg.steps}; the model so far is saved. "
              "Run `seekling demo` again to finish the schedule.", flush=True)
    total = time.perf_counter() - t0
    val = (f"validation loss {result['val_loss']:.3f} nats/token, {result['val_bpb']:.3f} bits/byte; "
           if "val_loss" in result else "")
    model_dir = run_dir / run_state.MODEL_DIR
    print(f"\ndemo {'stopped' if result['stopped'] else 'finished'} in {fmt_duration(total)}: {val}plots in {run_dir}/*.png\n"
          f"next:\n"
          f"  seekling generate --model {model_dir} \"{prompt}\"\n"
          f"  seekling chat --model {model_dir}\n"
          f"  seekling serve --model {model_dir}\n"
          f"  seekling train --preset small     (about an hour on a laptop CPU)", flush=True)
    return result | {"demo_wall_s": total}
