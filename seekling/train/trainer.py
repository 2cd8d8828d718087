"""`seekling train`: the pretraining driver, a thin loop over the shared training step (core.py).

    train(cfg)        start a run in cfg.out_dir
    resume(run_dir)   continue a run from its newest complete checkpoint, bit-exactly

The driver owns what is particular to a pretraining run: the data (TrainLoader is pure in seed and
step), the learning-rate schedule, evaluation, logs, samples via `on_step`, checkpoints and signals.
The step itself (forward/loss, backward with accumulation, clip, AdamW, expert-bias update) is
`core.TrainStep`, shared with SFT, RL and distributed drivers.

Everything that decides the numbers is a function of (config, step): the batches, the learning
rate, the weights and AdamW moments restored from the checkpoint. That is what makes a resumed run
repeat the uninterrupted one exactly - on the same machine, torch version and thread count (a
different thread count changes float summation order).
Left out: data/tensor/expert parallelism (they would live beside this file) and gradient
checkpointing (the presets fit without it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from seekling.data.dataset import TrainLoader, ValLoader, bits_per_byte, prepare_tokens
from seekling.device import cpu_has_fast_bf16, default_device, resolve_dtype
from seekling.model.transformer import Transformer
from seekling.tokenizer import SeeklingTokenizer, load_default_tokenizer
from seekling.train import state as run_state
from seekling.train.config import TrainConfig
from seekling.train.core import StepConfig, TrainStep, evaluate, next_token_loss
from seekling.train.flops import measure_peak_flops, train_flops_per_token
from seekling.train.loop import Cadence, Progress, run_loop, summarize
from seekling.train.optim import build_optimizer, lr_at
from seekling.train.progress import fmt_duration


def train(cfg: TrainConfig, *, on_step=None, live: bool | None = None, plots: bool = True) -> dict:
    """Start a new run in cfg.out_dir and train it to cfg.steps (or until stopped); returns final metrics.

    `on_step(step, model, display)` runs after every optimizer step (the demo prints samples from it);
    returning True stops the run cleanly, as SIGINT does. `live` forces the progress bar on or off;
    `plots=False` skips the PNGs at the end (plot_run draws them any time).
    """
    run_dir = Path(cfg.out_dir)
    run_state.init_run(run_dir, cfg)
    return _fit(cfg, run_dir, None, on_step=on_step, live=live, plots=plots)


def resume(run_dir: str, *, on_step=None, live: bool | None = None, plots: bool = True) -> dict:
    """Continue the run in run_dir from its newest complete checkpoint (from step 0 if it has none)."""
    run_dir = Path(run_dir)
    cfg = run_state.read_train_config(run_dir)
    ckpt = run_state.find_checkpoint(run_dir)
    return _fit(cfg, run_dir, ckpt, on_step=on_step, live=live, plots=plots)


def pretraining_step(model: Transformer, cfg: TrainConfig, dtype: torch.dtype,
                     optimizer: torch.optim.Optimizer | None = None) -> TrainStep:
    """The step `seekling train` runs for cfg: next-token (+MTP, + balance) loss, cfg's clipping,
    expert balancing and compilation; a fresh AdamW unless `optimizer` is given."""
    return TrainStep(model, optimizer or build_optimizer(model, cfg), next_token_loss(cfg.mtp_lambda, cfg.seq_aux_alpha),
                     StepConfig(dtype=dtype, grad_clip=cfg.grad_clip, bias_update_gamma=cfg.bias_update_gamma,
                                compile=cfg.compile))


@dataclass
class _Run:
    """Everything one training session holds: built fresh, or restored from a checkpoint."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: SeeklingTokenizer
    train_data: TrainLoader
    val_data: ValLoader
    source: str  # where the data came from, for the header line
    model: Transformer
    optimizer: torch.optim.Optimizer
    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0  # training time of earlier sessions


def _open_run(cfg: TrainConfig, run_dir: Path, ckpt: Path | None) -> _Run:
    """Data (tokenized once and cached; batches are a pure function of (seed, step)), model and optimizer."""
    device = default_device()
    tokenizer = load_default_tokenizer()
    model_cfg = cfg.model_config
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's "
                         f"({tokenizer.vocab_size}); use a model config with vocab_size >= {tokenizer.vocab_size}")
    shards = prepare_tokens(cfg.data, tokenizer, cache_dir=cfg.token_cache_dir)
    model = Transformer(model_cfg)
    model.init_weights(cfg.seed)
    model.to(device).train()
    run = _Run(cfg=cfg, run_dir=run_dir, device=device, dtype=resolve_dtype(cfg.dtype, device), tokenizer=tokenizer,
               train_data=TrainLoader(data=shards.split("train"), batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                      seed=cfg.seed),
               val_data=ValLoader(data=shards.split("val"), batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                  max_batches=cfg.eval_batches),
               source=shards.source, model=model, optimizer=build_optimizer(model, cfg))
    if ckpt is not None:
        st = run_state.load_checkpoint(ckpt, model, run.optimizer)
        run.step, run.tokens, run.elapsed_before = st["step"], st["tokens"], st["elapsed"]
        run.dtype = getattr(torch, st.get("dtype", str(run.dtype).removeprefix("torch.")))  # the dtype the run started with
        print(f"resuming {run_dir} from {ckpt.name} (step {run.step}/{cfg.steps}, {run.tokens:,} tokens)")
    return run


def _val_metrics(run: _Run) -> dict:
    total, _ = evaluate(run.model, run.val_data, run.dtype)
    mean = total / run.val_data.n_target_tokens
    return {"val_loss": mean, "val_bpb": bits_per_byte(mean, run.val_data.n_target_tokens, run.val_data.n_target_bytes)}


def _fit(cfg: TrainConfig, run_dir: Path, ckpt: Path | None, *, on_step, live, plots) -> dict:
    session_start = time.perf_counter()
    run = _open_run(cfg, run_dir, ckpt)
    model, dtype, device = run.model, run.dtype, run.device
    run_state.truncate_metrics(run_dir, run.step)
    start_step = run.step
    train_step = pretraining_step(model, cfg, dtype, run.optimizer)
    if cfg.compile:
        print("torch.compile enabled: the first step includes compilation (about a minute on a laptop CPU)")

    model_cfg = cfg.model_config
    flops_per_token = train_flops_per_token(model_cfg if cfg.mtp_lambda > 0 else model_cfg.replace(n_mtp_layers=0), cfg.seq_len)
    peak = measure_peak_flops(dtype, device)
    bf16_peak = peak if dtype == torch.bfloat16 else measure_peak_flops(torch.bfloat16, device)
    print(f"model {model.num_params() / 1e6:.1f}M parameters ({model.num_params(active=True) / 1e6:.1f}M active), "
          f"{cfg.tokens_per_step:,} tokens/step, {cfg.steps} steps, data: {run.source} "
          f"({run.train_data.data.n_tokens:,} train tokens)")
    print(f"compute: {str(dtype).removeprefix('torch.')} on {device.type}; measured matmul peak "
          f"{peak / 1e12:.3f} TFLOP/s ({bf16_peak / 1e12:.3f} in bf16); MFU is relative to it")
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        print(f"warning: this CPU has no native bf16, so bf16 matmuls are emulated ({peak / measure_peak_flops(torch.float32):.0%} "
              "of the fp32 speed measured above); --dtype auto would train in fp32")

    def step(i: int) -> tuple[dict, int]:
        lr = lr_at(i, cfg)
        first = i * cfg.grad_accum  # batches are a pure function of (seed, micro-batch index)
        metrics = train_step([run.train_data.batch(first + micro) for micro in range(cfg.grad_accum)], lr)
        row = {"loss": metrics["loss"], "mtp_loss": metrics.get("mtp_loss"), "lr": lr,
               "grad_norm": metrics.get("grad_norm")}
        if "expert_load" in metrics:
            row["expert_load"] = metrics["expert_load"]
        return row, cfg.tokens_per_step

    def evaluate_now() -> tuple[dict, str]:
        val = _val_metrics(run)
        return val, f"val loss {val['val_loss']:.4f}, {val['val_bpb']:.4f} bits/byte"

    def save(progress: Progress, finished: bool) -> None:
        state = {"step": progress.step, "tokens": progress.tokens, "elapsed": progress.elapsed,
                 "dtype": str(dtype).removeprefix("torch."), "finished": finished,
                 "data": {"seed": cfg.seed, "next_micro_batch": progress.step * cfg.grad_accum},
                 "train_config": cfg.to_dict()}
        run_state.save_checkpoint(run_dir, model, run.optimizer, run.tokenizer, state)

    result = run_loop(step=step, evaluate=evaluate_now, save=save, run_dir=run_dir, model=model,
                      cadence=Cadence(steps=cfg.steps, log_every=cfg.log_every, eval_every=cfg.eval_every,
                                      ckpt_every=cfg.ckpt_every, time_limit_s=cfg.time_limit_s),
                      start=Progress(run.step, run.tokens, run.elapsed_before), flops_per_token=flops_per_token,
                      peak=peak, on_step=on_step, live=live, session_start=session_start)
    out, rows, trained = summarize(result, first_step=start_step, steps=cfg.steps, run_dir=run_dir,
                                   command="seekling train", plots=plots)
    out["dtype"] = str(dtype).removeprefix("torch.")
    if rows:
        out |= {k: rows[-1].get(k) for k in ("loss", "mtp_loss", "tok_per_s", "mfu")}
    vals = [r for r in rows if "val_loss" in r]
    if vals:
        out |= {"val_loss": vals[-1]["val_loss"], "val_bpb": vals[-1]["val_bpb"]}
    if trained:
        print(f"done: {out['step']} steps, {out['tokens']:,} tokens in {fmt_duration(out['elapsed'])}"
              + (f"; val loss {out['val_loss']:.4f}, {out['val_bpb']:.4f} bits/byte" if vals else "")
              + f"; model in {out['model_dir']}, plots in {run_dir}")
    return out
