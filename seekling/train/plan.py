"""Run planning: how long one optimizer step takes here, and how many fit in a time budget.

`seekling train --time-limit` and `seekling demo` fix a run's step count up front from a few timed
steps, so the learning-rate schedule knows its end from step 0 and a resumed run stays on it.
The probe runs the real training step (train/core.py) on a throwaway copy of the model.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from seekling.data.dataset import TrainLoader, prepare_tokens
from seekling.device import default_device, resolve_dtype
from seekling.model.transformer import Transformer
from seekling.tokenizer import load_default_tokenizer
from seekling.train.config import TrainConfig
from seekling.train.trainer import pretraining_step


def measure_step_time(cfg: TrainConfig, loader: TrainLoader, model: nn.Module, n: int = 3) -> float:
    """Fastest of n optimizer steps of `cfg`, timed on a copy of `model` (which stays untouched).

    The fastest, not the median: another busy process makes single steps slow for a moment, and
    a probe that lands in such a moment would shrink a whole planned run (measured: 8.7 s instead
    of ~1 s per step). A run that turns out slower is stopped cleanly by its time limit.
    """
    device = next(model.parameters()).device
    probe = copy.deepcopy(model).train()
    step = pretraining_step(probe, cfg.replace(compile=False), resolve_dtype(cfg.dtype, device))
    times = []
    for i in range(n + 1):  # the first step warms up kernels and allocations
        t = time.perf_counter()
        step([loader.batch(i * cfg.grad_accum + micro) for micro in range(cfg.grad_accum)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return min(times)


def plan_steps(cfg: TrainConfig, seconds: float) -> tuple[int, float]:
    """How many steps of `cfg` fit in `seconds` of training here (evaluations included), and the measured s/step."""
    data = prepare_tokens(cfg.data, load_default_tokenizer(), cache_dir=cfg.token_cache_dir).split("train")
    loader = TrainLoader(data=data, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
    model = Transformer(cfg.model_config).to(default_device())
    step_s = measure_step_time(cfg, loader, model)
    # an evaluation is eval_batches forward passes, each under a third of a training step
    eval_share = cfg.eval_batches / 3 / cfg.eval_every if cfg.eval_every else 0.0
    return max(1, int(seconds / (step_s * (1 + eval_share)))), step_s
