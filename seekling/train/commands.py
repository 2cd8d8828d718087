"""One function per training command, taking plain arguments, for `seekling/cli.py` to call.

Each builds the config and calls the one function that does the work (trainer.train / resume,
demo.run_demo, plots.plot_run); None means "the preset's default". Errors a user can cause
come out as ValueError / FileNotFoundError with a sentence saying what to change.
"""

from __future__ import annotations

from seekling.distributed.parallelize import launched_world_size
from seekling.train.config import train_preset
from seekling.train.demo import run_demo
from seekling.train.plan import plan_steps
from seekling.train.plots import plot_run
from seekling.train.trainer import resume, train


def train_command(preset: str = "tiny", *, out_dir: str | None = None, data: str | None = None,
                  max_steps: int | None = None, token_budget: int | None = None, batch_size: int | None = None,
                  seq_len: int | None = None, grad_accum: int | None = None, lr: float | None = None,
                  schedule: str | None = None, warmup_steps: int | None = None, dtype: str = "auto",
                  compile: bool = False, seed: int | None = None, eval_every: int | None = None,
                  ckpt_every: int | None = None, mtp_lambda: float | None = None, seq_aux_alpha: float | None = None,
                  bias_update_gamma: float | None = None, time_limit_s: float | None = None,
                  dp: int | None = None, ep: int = 1) -> dict:
    """`seekling train`: a new run of a preset with its training defaults, any of them overridden.

    time_limit_s without max_steps/token_budget sizes the run to the time: a few timed steps fix
    max_steps up front (written to the run's config, so the schedule and a resume stay
    deterministic), and the limit itself stops training cleanly if the machine then runs slower.
    `dp` / `ep`: data- and expert-parallel sizes under torchrun (trainer.train).
    """
    cfg = train_preset(preset, out_dir=out_dir, data=data, max_steps=max_steps, token_budget=token_budget,
                       batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr, schedule=schedule,
                       warmup_steps=warmup_steps, dtype=dtype, compile=compile, seed=seed, eval_every=eval_every,
                       ckpt_every=ckpt_every, mtp_lambda=mtp_lambda, seq_aux_alpha=seq_aux_alpha,
                       bias_update_gamma=bias_update_gamma, time_limit_s=time_limit_s)
    if time_limit_s is not None and max_steps is None and token_budget is None:
        if launched_world_size() > 1:
            raise ValueError("--time-limit alone sizes a run by timing one process; under torchrun give "
                             "--steps (or --tokens) with it")
        # plan for 90% of the limit: checkpoints, the final save and step-time noise take the rest
        steps, step_s = plan_steps(cfg, 0.9 * time_limit_s)
        warmup = cfg.warmup_steps if cfg.warmup_steps < steps // 2 else steps // 10
        cfg = cfg.replace(max_steps=steps, warmup_steps=warmup)
        print(f"measured {step_s:.2f} s per step: {steps} steps fit in {time_limit_s:.0f} s", flush=True)
    return train(cfg, dp=dp, ep=ep)


def resume_command(run_dir: str, dp: int | None = None, ep: int = 1) -> dict:
    """`seekling train --resume RUN_DIR`: continue a run from its newest complete checkpoint (at any
    world and ep size under torchrun)."""

    return resume(run_dir, dp=dp, ep=ep)


def demo_command(out_dir: str = "runs/demo", time_budget_s: float = 450.0, prompt: str = "ROMEO:") -> dict:
    """`seekling demo`: tiny model, embedded corpus, ~7.5 minutes, samples, plots, next steps."""

    return run_demo(out_dir, time_budget_s=time_budget_s, prompt=prompt)


def plot_command(run_dir: str) -> list[str]:
    """`seekling plot RUN_DIR`: (re)draw a run's PNGs from its metrics.jsonl; returns their paths."""

    paths = plot_run(run_dir)
    for p in paths:
        print(p)
    return [str(p) for p in paths]
