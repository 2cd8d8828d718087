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
Under torchrun (`train(cfg, ep=2)` in every process) the same driver runs data parallelism (FSDP2)
and expert parallelism, both applied by seekling.distributed by wrapping the built model. batch_size
stays the global batch: each of the dp ranks reads its batch_size/dp rows of every micro-batch, the
very rows one process would read, so a run resumes at another world size on the same data stream.
The step's counts, metrics and gradient norm are reduced over ranks; rank 0 logs, prints and writes
the shared files; checkpoints are DCP (state.save_checkpoint_sharded).
Left out: tensor/pipeline parallelism and gradient checkpointing (the presets fit without them).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from seekling.data.dataset import TrainLoader, ValLoader, bits_per_byte, prepare_tokens
from seekling.device import cpu_has_fast_bf16, default_device, resolve_dtype
from seekling.distributed.expert_parallel import check_expert_parallel
from seekling.distributed.parallelize import Parallel, clip_grad_norm, close_parallel, init_parallel, parallelize
from seekling.engram_vocab import install_engram_vocab
from seekling.model.transformer import Transformer
from seekling.tokenizer import SeeklingTokenizer, load_default_tokenizer
from seekling.train import state as run_state
from seekling.train.config import TrainConfig
from seekling.train.core import StepConfig, TrainStep, evaluate, next_token_loss
from seekling.train.flops import measure_peak_flops, train_flops_per_token
from seekling.train.loop import Cadence, Progress, run_loop, summarize
from seekling.train.optim import build_optimizer, lr_at
from seekling.train.progress import fmt_duration


def train(cfg: TrainConfig, *, on_step=None, live: bool | None = None, plots: bool = True,
          dp: int | None = None, ep: int = 1) -> dict:
    """Start a new run in cfg.out_dir and train it to cfg.steps (or until stopped); returns final metrics.

    `on_step(step, model, display)` runs after every optimizer step (the demo prints samples from it);
    returning True stops the run cleanly, as SIGINT does. `live` forces the progress bar on or off;
    `plots=False` skips the PNGs at the end (plot_run draws them any time). Under torchrun, `ep` is
    the expert-parallel size and `dp` (optional) a check of the world size.
    """
    par = init_parallel(dp, ep)
    try:
        run_dir = Path(cfg.out_dir)
        _check_layout(cfg, par)
        _on_primary(par, lambda: run_state.init_run(run_dir, cfg))
        return _fit(cfg, run_dir, None, par, on_step=on_step, live=live, plots=plots)
    finally:
        close_parallel(par)


def resume(run_dir: str, *, on_step=None, live: bool | None = None, plots: bool = True,
           dp: int | None = None, ep: int = 1) -> dict:
    """Continue the run in run_dir from its newest complete checkpoint (from step 0 if it has none),
    at any world and ep size (a checkpoint holds no trace of the layout that wrote it)."""
    par = init_parallel(dp, ep)
    try:
        run_dir = Path(run_dir)
        cfg = _on_primary(par, lambda: run_state.read_train_config(run_dir))
        ckpt = run_state.find_checkpoint(run_dir)
        return _fit(cfg, run_dir, ckpt, par, on_step=on_step, live=live, plots=plots)
    finally:
        close_parallel(par)


def _check_layout(cfg: TrainConfig, par: Parallel | None) -> None:
    """What the job's layout asks of the run's config; checked on every rank, before anything is written."""
    if par is None:
        return
    if cfg.batch_size % par.dp:
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch and must split evenly over the {par.dp} "
                         f"data-parallel ranks; pass a --batch-size that is a multiple of {par.dp}")
    if cfg.compile:
        raise ValueError("--compile is single-process only for now; leave it out under torchrun")
    check_expert_parallel(cfg.model_config.n_routed_experts, par.ep)


def _on_primary(par: Parallel | None, fn):
    """fn() on rank 0 only (a write to the shared run directory); its result, or its ValueError /
    FileNotFoundError, on every rank, so that no rank waits forever for one that failed."""
    if par is None:
        return fn()
    result, error = None, None
    if par.primary:
        try:
            result = fn()
        except (ValueError, FileNotFoundError) as e:
            error = (type(e), str(e))
    result, error = par.broadcast((result, error))
    if error is not None:
        raise error[0](error[1])
    return result


def pretraining_step(model: Transformer, cfg: TrainConfig, dtype: torch.dtype,
                     optimizer: torch.optim.Optimizer | None = None, par: Parallel | None = None) -> TrainStep:
    """The step `seekling train` runs for cfg: next-token (+MTP, + balance) loss, cfg's clipping,
    expert balancing and compilation; a fresh AdamW unless `optimizer` is given. With `par`, expert
    counts, logged metrics and the gradient norm are global."""
    hooks = dict(reduce_counts=par.sum, reduce_metrics=par.mean, reduce_grads=par.mean_sparse_grads,
                 clip_grad_norm=clip_grad_norm) if par else {}
    return TrainStep(model, optimizer or build_optimizer(model, cfg), next_token_loss(cfg.mtp_lambda, cfg.seq_aux_alpha),
                     StepConfig(dtype=dtype, grad_clip=cfg.grad_clip, bias_update_gamma=cfg.bias_update_gamma,
                                compile=cfg.compile), **hooks)


@dataclass
class _Run:
    """Everything one training session holds: built fresh, or restored from a checkpoint."""

    cfg: TrainConfig
    par: Parallel | None
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


def _open_run(cfg: TrainConfig, run_dir: Path, ckpt: Path | None, par: Parallel | None) -> _Run:
    """Data (tokenized once and cached; batches are a pure function of (seed, step)), model and optimizer."""
    device = par.device if par else default_device()
    dp, rank = (par.dp, par.rank) if par else (1, 0)
    _check_layout(cfg, par)
    st = run_state.read_state(ckpt) if ckpt is not None else None
    # the dtype the run started with; a sharded model needs it before its mixed-precision wrapping
    dtype = getattr(torch, st["dtype"]) if st and "dtype" in st else resolve_dtype(cfg.dtype, device)
    tokenizer = load_default_tokenizer()
    model_cfg = cfg.model_config
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's "
                         f"({tokenizer.vocab_size}); use a model config with vocab_size >= {tokenizer.vocab_size}")
    # rank 0 tokenizes (and caches) first: the others then read its cache instead of racing to write it
    if par:
        _on_primary(par, lambda: _tokenize(cfg, tokenizer))
    shards = prepare_tokens(cfg.data, tokenizer, cache_dir=cfg.token_cache_dir)
    model = Transformer(model_cfg)
    model.init_weights(cfg.seed)  # the same weights on every rank, before they are sharded
    if model_cfg.has_engram:
        install_engram_vocab(model, tokenizer)  # a resumed run then loads the same map from its checkpoint
    model.to(device).train()
    if par:
        parallelize(model, par, dtype)
    run = _Run(cfg=cfg, par=par, run_dir=run_dir, device=device, dtype=dtype, tokenizer=tokenizer,
               train_data=TrainLoader(data=shards.split("train"), batch_size=cfg.batch_size // dp, seq_len=cfg.seq_len,
                                      seed=cfg.seed, rank=rank, world_size=dp),
               val_data=ValLoader(data=shards.split("val"), batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                  max_batches=cfg.eval_batches),
               source=shards.source, model=model, optimizer=build_optimizer(model, cfg))
    if ckpt is not None:
        st = run_state.load_checkpoint(ckpt, model, run.optimizer, sharded=par is not None)
        run.step, run.tokens, run.elapsed_before = st["step"], st["tokens"], st["elapsed"]
        print(f"resuming {run_dir} from {ckpt.name} (step {run.step}/{cfg.steps}, {run.tokens:,} tokens)")
    return run


def _tokenize(cfg: TrainConfig, tokenizer: SeeklingTokenizer) -> None:
    prepare_tokens(cfg.data, tokenizer, cache_dir=cfg.token_cache_dir)


def _val_metrics(run: _Run) -> dict:
    total, _ = evaluate(run.model, run.val_data, run.dtype)
    mean = total / run.val_data.n_target_tokens
    return {"val_loss": mean, "val_bpb": bits_per_byte(mean, run.val_data.n_target_tokens, run.val_data.n_target_bytes)}


def _fit(cfg: TrainConfig, run_dir: Path, ckpt: Path | None, par: Parallel | None, *, on_step, live, plots) -> dict:
    if par is not None and not par.primary:
        # Only rank 0 speaks; the others' errors still reach stderr (torchrun prefixes each rank's).
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return _session(cfg, run_dir, ckpt, par, on_step=on_step, live=False, plots=False)
    return _session(cfg, run_dir, ckpt, par, on_step=on_step, live=live, plots=plots)


def _session(cfg: TrainConfig, run_dir: Path, ckpt: Path | None, par: Parallel | None, *, on_step, live,
               plots) -> dict:
    session_start = time.perf_counter()
    run = _open_run(cfg, run_dir, ckpt, par)
    model, dtype, device = run.model, run.dtype, run.device
    _on_primary(par, lambda: run_state.truncate_metrics(run_dir, run.step))
    start_step = run.step
    train_step = pretraining_step(model, cfg, dtype, run.optimizer, par)
    if cfg.compile:
        print("torch.compile enabled: the first step includes compilation (about a minute on a laptop CPU)")

    model_cfg = cfg.model_config
    flops_per_token = train_flops_per_token(model_cfg if cfg.mtp_lambda > 0 else model_cfg.replace(n_mtp_layers=0), cfg.seq_len)
    peak = measure_peak_flops(dtype, device)
    bf16_peak = peak if dtype == torch.bfloat16 else measure_peak_flops(torch.bfloat16, device)
    world = par.world_size if par else 1
    if par:
        print(f"torchrun: {world} processes, data parallel {par.dp} (FSDP2), expert parallel {par.ep}, "
              f"{cfg.batch_size // par.dp} of the {cfg.batch_size} rows per rank")
    print(f"model {model.num_params() / 1e6:.1f}M parameters ({model.num_params(active=True) / 1e6:.1f}M active), "
          f"{cfg.tokens_per_step:,} tokens/step, {cfg.steps} steps, data: {run.source} "
          f"({run.train_data.data.n_tokens:,} train tokens)")
    print(f"compute: {str(dtype).removeprefix('torch.')} on {device.type}; measured matmul peak "
          f"{peak / 1e12:.3f} TFLOP/s ({bf16_peak / 1e12:.3f} in bf16); MFU is relative to it")
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        print(f"warning: bf16 matmuls are not faster than fp32 on this CPU (emulated, or native but slower: "
              f"{peak / measure_peak_flops(torch.float32):.0%} of the fp32 speed measured above); "
              "--dtype auto would train in fp32")

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
        if par:
            run_state.save_checkpoint_sharded(run_dir, model, run.optimizer, run.tokenizer, state, par)
        else:
            run_state.save_checkpoint(run_dir, model, run.optimizer, run.tokenizer, state)

    result = run_loop(step=step, evaluate=evaluate_now, save=save, run_dir=run_dir, model=model,
                      cadence=Cadence(steps=cfg.steps, log_every=cfg.log_every, eval_every=cfg.eval_every,
                                      ckpt_every=cfg.ckpt_every, time_limit_s=cfg.time_limit_s),
                      start=Progress(run.step, run.tokens, run.elapsed_before), flops_per_token=flops_per_token,
                      peak=peak * world, on_step=on_step, live=live, session_start=session_start,
                      primary=par is None or par.primary, agree_stop=par.agree if par else None)
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
