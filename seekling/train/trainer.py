"""The training loop, readable top to bottom (nanoGPT's train.py is the model).

    train(cfg)        start a run in cfg.out_dir
    resume(run_dir)   continue a run from its newest complete checkpoint, bit-exactly on CPU

One optimizer step: for each of `grad_accum` micro-batches, forward with a RouterTrace, loss =
next-token CE + mtp_lambda * mean MTP CE (+ the optional sequence-wise balance loss), backward;
then clip, AdamW step, and the aux-loss-free expert-bias update from the routing counts summed over
the micro-batches (so accumulation sees one update per step, as a bigger batch would).

Everything that decides the numbers is a function of (config, step): the batches (TrainLoader is
pure in seed and step), the learning rate, the weights and AdamW moments restored from the
checkpoint. That is what makes a resumed run repeat the uninterrupted one exactly - on the same
machine, torch version and thread count (a different thread count changes float summation order).
Left out: data/tensor/expert parallelism (they would live beside this file) and gradient
checkpointing (the presets fit without it).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seekling.data.dataset import TrainLoader, ValLoader, bits_per_byte, prepare_tokens
from seekling.device import cpu_has_fast_bf16
from seekling.model.moe import RouterTrace
from seekling.model.transformer import Transformer
from seekling.tokenizer import load_default_tokenizer
from seekling.train import state as run_state
from seekling.train.balance import moe_gates, sequence_balance_loss, update_expert_bias
from seekling.train.config import TrainConfig
from seekling.train.optim import build_optimizer, lr_at, set_lr
from seekling.train.progress import Display, MetricsLog, fmt_duration
from seekling.train.speed import (
    autocast,
    compile_model,
    measure_peak_flops,
    resolve_dtype,
    train_flops_per_token,
)


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


def compute_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor, trace: RouterTrace | None, cfg: TrainConfig):
    """(total loss, main CE, mean MTP CE or None) for one micro-batch; x, y (B,T)."""
    h = model.hidden(x, trace=trace)
    main = F.cross_entropy(model.head(h).flatten(0, 1).float(), y.flatten())
    loss, mtp = main, None
    if cfg.mtp_lambda > 0 and model.cfg.n_mtp_layers > 0:
        # depth k's hidden at position i predicts token i+k+1, which is y[:, i+k]
        depths = model.mtp_hidden(h, x, trace)
        mtp = sum(F.cross_entropy(model.head(hk).flatten(0, 1).float(), y[:, k:].flatten())
                  for k, hk in enumerate(depths, start=1)) / len(depths)
        loss = loss + cfg.mtp_lambda * mtp
    if cfg.seq_aux_alpha > 0 and trace is not None and trace.layers:
        loss = loss + sequence_balance_loss(trace, cfg.seq_aux_alpha)
    return loss, main, mtp


@torch.no_grad()
def evaluate(model: Transformer, val: ValLoader, n_bytes: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """Mean next-token loss (nats) over the fixed validation windows, and bits per byte."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    for x, y in val:
        with autocast(dtype, device):
            logits = model(x.to(device))
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum").double().cpu()
    model.train()
    mean = total.item() / val.n_target_tokens
    return mean, bits_per_byte(mean, val.n_target_tokens, n_bytes)


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


def _fit(cfg: TrainConfig, run_dir: Path, ckpt: Path | None, *, on_step, live, plots) -> dict:
    session_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    say = print

    # ---- data: tokenized once and cached; batches are a pure function of (seed, step)
    tokenizer = load_default_tokenizer()
    model_cfg = cfg.model_config
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's "
                         f"({tokenizer.vocab_size}); use a model config with vocab_size >= {tokenizer.vocab_size}")
    shards = prepare_tokens(cfg.data, tokenizer, cache_dir=cfg.token_cache_dir)
    train_data = TrainLoader(data=shards.split("train"), batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
    val_data = ValLoader(data=shards.split("val"), batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches)
    val_bytes = val_data.n_target_bytes

    # ---- model and optimizer, fresh or restored
    model = Transformer(model_cfg)
    model.init_weights(cfg.seed)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    step, tokens, elapsed_before, dtype = 0, 0, 0.0, resolve_dtype(cfg.dtype, device)
    if ckpt is not None:
        st = run_state.load_checkpoint(ckpt, model, optimizer)
        step, tokens, elapsed_before = st["step"], st["tokens"], st["elapsed"]
        dtype = getattr(torch, st.get("dtype", str(dtype).removeprefix("torch.")))  # the dtype the run started with
        say(f"resuming {run_dir} from {ckpt.name} (step {step}/{cfg.steps}, {tokens:,} tokens)")
    run_state.truncate_metrics(run_dir, step)
    start_step = step
    n_gates = len(moe_gates(model))
    if cfg.compile:
        compile_model(model)
        say("torch.compile enabled: the first step includes compilation (about a minute on a laptop CPU)")

    flops_per_token = train_flops_per_token(model_cfg if cfg.mtp_lambda > 0 else model_cfg.replace(n_mtp_layers=0), cfg.seq_len)
    peak = measure_peak_flops(dtype, device)
    bf16_peak = peak if dtype == torch.bfloat16 else measure_peak_flops(torch.bfloat16, device)
    say(f"model {model.num_params() / 1e6:.1f}M parameters ({model.num_params(active=True) / 1e6:.1f}M active), "
        f"{cfg.tokens_per_step:,} tokens/step, {cfg.steps} steps, data: {shards.source} "
        f"({train_data.data.n_tokens:,} train tokens)")
    say(f"compute: {str(dtype).removeprefix('torch.')} on {device.type}; measured matmul peak "
        f"{peak / 1e12:.3f} TFLOP/s ({bf16_peak / 1e12:.3f} in bf16); MFU is relative to it")
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        say(f"warning: this CPU has no native bf16, so bf16 matmuls are emulated ({peak / measure_peak_flops(torch.float32):.0%} "
            "of the fp32 speed measured above); --dtype auto would train in fp32")

    def state_now() -> dict:
        # the data position is (seed, step): TrainLoader.batch is a pure function of them
        return {"step": step, "tokens": tokens, "elapsed": elapsed_before + time.perf_counter() - session_start,
                "dtype": str(dtype).removeprefix("torch."), "finished": step >= cfg.steps,
                "data": {"seed": cfg.seed, "next_micro_batch": step * cfg.grad_accum}, "train_config": cfg.to_dict()}

    # ---- the loop
    log = MetricsLog(run_dir / run_state.METRICS)
    display = Display(cfg.steps, step, live=live)
    last_val, saved_at, stop_reason = None, None, None
    t_log, tokens_log = time.perf_counter(), 0
    try:
        with StopSignals() as signals:
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                set_lr(optimizer, lr)
                loss_sum = torch.zeros(())
                mtp_sum = torch.zeros(())
                counts = torch.zeros(n_gates, model_cfg.n_routed_experts, dtype=torch.long) if n_gates else None
                for micro in range(cfg.grad_accum):
                    x, y = train_data.batch(step * cfg.grad_accum + micro)
                    x, y = x.to(device), y.to(device)
                    trace = RouterTrace() if n_gates else None
                    with autocast(dtype, device):
                        loss, main, mtp = compute_loss(model, x, y, trace, cfg)
                    (loss / cfg.grad_accum).backward()
                    loss_sum += main.detach().cpu()
                    if mtp is not None:
                        mtp_sum += mtp.detach().cpu()
                    if trace is not None:
                        c = trace.expert_counts().cpu()
                        counts[: c.shape[0]] += c  # MTP routers see no tokens when the MTP loss is off
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if counts is not None and cfg.bias_update_gamma > 0:
                    # after the step, from the whole step's loads: DeepSeek-V3 updates the bias "at the end of each step"
                    update_expert_bias(model, counts.to(device), cfg.bias_update_gamma)
                step += 1
                tokens += cfg.tokens_per_step
                tokens_log += cfg.tokens_per_step

                # ---- evaluate, log, checkpoint
                last = step == cfg.steps
                evaluating = last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
                if step % cfg.log_every == 0 or evaluating or last:
                    tps = tokens_log / (time.perf_counter() - t_log)
                    row = {"step": step, "tokens": tokens, "loss": loss_sum.item() / cfg.grad_accum,
                           "mtp_loss": mtp_sum.item() / cfg.grad_accum if model_cfg.n_mtp_layers and cfg.mtp_lambda > 0 else None,
                           "lr": lr, "tok_per_s": tps, "mfu": tps * flops_per_token / peak,
                           "elapsed": state_now()["elapsed"]}
                    if counts is not None:
                        row["expert_load"] = counts.tolist()
                    if evaluating:  # after the throughput reading: evaluation is not training speed
                        val_loss, val_bpb = evaluate(model, val_data, val_bytes, dtype, device)
                        row |= {"val_loss": val_loss, "val_bpb": val_bpb}
                        last_val = (val_loss, val_bpb)
                        display.message(f"step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte")
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"training loss became {row['loss']} at step {step}; lower lr "
                                                 f"(now {cfg.lr}) or raise warmup_steps, then start a new run")
                    log.write(row)
                    display.update(step, row)
                    t_log, tokens_log = time.perf_counter(), 0
                else:
                    display.update(step)
                t_aside = time.perf_counter()  # hooks and checkpoints do not count as training throughput
                stop_reason = signals.reason
                if on_step is not None and on_step(step, model, display) and not last:
                    stop_reason = stop_reason or "stopped by the caller"
                session = time.perf_counter() - session_start
                if stop_reason is None and cfg.time_limit_s is not None and session > cfg.time_limit_s and not last:
                    stop_reason = f"time limit of {fmt_duration(cfg.time_limit_s)} reached"
                if last or stop_reason or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0):
                    run_state.save_checkpoint(run_dir, model, optimizer, tokenizer, state_now())
                    saved_at = step
                t_log += time.perf_counter() - t_aside
                if stop_reason:
                    break
    finally:
        display.close()
        log.close()

    if saved_at != step and step != start_step:  # (a resumed finished run trains nothing and saves nothing)
        run_state.save_checkpoint(run_dir, model, optimizer, tokenizer, state_now())
    result = {k: v for k, v in state_now().items() if k not in ("data", "train_config")}
    result |= {"run_dir": str(run_dir), "model_dir": str(run_dir / run_state.MODEL_DIR), "stopped": stop_reason}
    rows = run_state.read_metrics(run_dir)
    if rows:
        result |= {k: rows[-1].get(k) for k in ("loss", "mtp_loss", "tok_per_s", "mfu")}
    vals = [r for r in rows if "val_loss" in r]
    if vals:
        result |= {"val_loss": vals[-1]["val_loss"], "val_bpb": vals[-1]["val_bpb"]}
    if stop_reason:
        say(f"stopped at step {step}/{cfg.steps} ({stop_reason}); checkpoint saved. Continue with:\n"
            f"  seekling train --resume {run_dir}")
    elif step == start_step:
        say(f"{run_dir} already finished its {cfg.steps} steps; nothing to train (model in {run_dir / run_state.MODEL_DIR})")
    else:
        if plots:
            from seekling.train.plots import plot_run

            plot_run(run_dir)
        say(f"done: {step} steps, {tokens:,} tokens in {fmt_duration(result['elapsed'])}"
            + (f"; val loss {last_val[0]:.4f}, {last_val[1]:.4f} bits/byte" if last_val else "")
            + f"; model in {run_dir / run_state.MODEL_DIR}, plots in {run_dir}")
    return result
