"""Does sparsity pay? The MoE `tiny` preset vs a dense model with the same ACTIVE parameters.

    python bench/bench_moe_vs_dense.py [--steps 300] [--batch 8] [--seq 256] [--out runs/bench-moe-vs-dense]

The dense model keeps everything of `tiny` (attention, embeddings, MTP depth) but makes every layer
a dense SwiGLU MLP, with the width chosen so that the parameters one token activates match the MoE
model's (shared + top-k routed experts + router). Both train with the same TrainConfig (same
tokens in the same order, same schedule, same seed) through seekling's trainer; the table shows
validation loss and bits per byte on the held-out plays, the median tokens/s each run logged, and
tokens/s from a short interleaved timing (A, B, A, B, ... full training steps, median), which a
busy machine cannot tilt toward whichever model happened to train in a quiet moment.
Default length: ~10-15 minutes in total on a 2-core laptop CPU.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from seekling.config import ModelConfig
from seekling.data.dataset import TrainLoader, prepare_tokens
from seekling.device import resolve_dtype
from seekling.model.transformer import Transformer
from seekling.presets import get_preset
from seekling.stats import model_stats
from seekling.tokenizer import load_default_tokenizer
from seekling.train.config import train_preset
from seekling.train.state import read_metrics
from seekling.train.trainer import pretraining_step, train


def dense_twin(moe: ModelConfig) -> ModelConfig:
    """All-dense layers, MLP width picked so active parameters per token match `moe`'s."""
    target = model_stats(moe).active_params

    def dense(width: int) -> ModelConfig:
        return moe.replace(n_dense_layers=moe.n_layers, inter_dim=width, n_routed_experts=0, n_shared_experts=0,
                           n_activated_experts=0, n_expert_groups=1, n_limited_groups=1)

    width = min(range(8, 8 * moe.inter_dim), key=lambda w: abs(model_stats(dense(w)).active_params - target))
    return dense(width)


def interleaved_step_times(tcfgs: dict, rounds: int = 6) -> dict[str, float]:
    """Median seconds per full training step (the trainer's own, train/core.py) for each config,
    timed in alternation after one warm-up."""
    tok = load_default_tokenizer()
    any_cfg = next(iter(tcfgs.values()))
    data = prepare_tokens(any_cfg.data, tok, cache_dir=any_cfg.token_cache_dir).split("train")
    loader = TrainLoader(data=data, batch_size=any_cfg.batch_size, seq_len=any_cfg.seq_len, seed=0)
    steps = {}
    for name, tcfg in tcfgs.items():
        model = Transformer(tcfg.model_config)
        model.init_weights(0)
        steps[name] = pretraining_step(model, tcfg, resolve_dtype(tcfg.dtype, torch.device("cpu")))
    times = {name: [] for name in steps}
    for r in range(rounds + 1):
        batch = loader.batch(r)
        for name, step in steps.items():
            t = time.perf_counter()
            step([batch])
            if r:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--out", default="runs/bench-moe-vs-dense")
    args = ap.parse_args()

    moe = get_preset(args.preset)
    models = {"MoE": moe, "dense": dense_twin(moe)}
    results = {}
    for name, cfg in models.items():
        out = Path(args.out) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tcfg = train_preset(args.preset, model=cfg, out_dir=str(out), max_steps=args.steps, batch_size=args.batch,
                            seq_len=args.seq, warmup_steps=max(1, args.steps // 15), eval_every=0, ckpt_every=0,
                            log_every=max(1, args.steps // 30), eval_batches=args.eval_batches)
        print(f"\n=== {name}: training {args.steps} steps into {out}", flush=True)
        t = time.perf_counter()
        result = train(tcfg, live=False, plots=False)
        wall = time.perf_counter() - t
        if result["stopped"]:
            raise SystemExit(f"{name} run stopped early ({result['stopped']}); no comparison")
        tps = statistics.median(r["tok_per_s"] for r in read_metrics(out)[1:] or read_metrics(out))
        mfu = statistics.median(r["mfu"] for r in read_metrics(out)[1:] or read_metrics(out))
        results[name] = (cfg, result, tps, mfu, wall, tcfg)

    print("\ntiming both models in alternation ...", flush=True)
    step_s = interleaved_step_times({name: r[5] for name, r in results.items()})

    tokens = args.steps * args.batch * args.seq
    print(f"\n{args.preset} MoE vs dense twin: {args.steps} steps x {args.batch}x{args.seq} = {tokens / 1e6:.2f}M tokens each, "
          f"validation on {args.eval_batches} batches of the held-out plays\n")
    print(f"{'model':<8}{'layers (dense/MoE)':>20}{'total params':>14}{'active':>10}{'val loss':>10}{'val bpb':>9}"
          f"{'tok/s (run)':>13}{'MFU':>7}{'tok/s (alternating)':>21}{'wall':>8}")
    for name, (cfg, result, tps, mfu, wall, _) in results.items():
        s = model_stats(cfg)
        main_total = s.total_params - s.mtp_params
        layers = f"{cfg.n_dense_layers}/{cfg.n_layers - cfg.n_dense_layers}" + ("" if cfg.has_moe else f" (w {cfg.inter_dim})")
        print(f"{name:<8}{layers:>20}{main_total / 1e6:>13.2f}M{s.active_params / 1e6:>9.2f}M{result['val_loss']:>10.4f}"
              f"{result['val_bpb']:>9.4f}{tps:>13,.0f}{mfu:>7.1%}{args.batch * args.seq / step_s[name]:>21,.0f}{wall:>7.0f}s")


if __name__ == "__main__":
    main()
