"""Does an Engram training step cost time in the table's size? The real training step (train/core.py's
TrainStep: forward, backward, clipping, optimizer) as the table grows, against the dense-table peer
measured in the same run.

    OMP_NUM_THREADS=1 python bench/bench_engram_table.py [--rows 1e5,1e6,1e7] [--width 32] [--steps 5]
                                                        [--batch 8] [--seq 256] [--threads 1] [--no-dense]
    OMP_NUM_THREADS=1 python bench/bench_engram_table.py --quick      # smoke test, a few seconds

The model is bench_engram.py's ablation base (dim 128, 4 layers, 16 routed experts top-4) with one
Engram layer (block 1, orders 2..3, 8 heads per order) whose single table has ~`rows` rows of `--width`
floats (the 16 heads each get a prime >= rows / 16). The batches are the embedded corpus's, through
the tokenizer's compressed-id map, as `seekling train` feeds them.

- sparse (what `seekling train` runs): the table's gradient is the looked-up rows only (at most
  batch * seq * 16 of them), clipping counts it in the global norm without densifying it
  (clip_grad_norm_with_sparse), and train/optim.py's build_optimizer steps it with RowSparseAdam
  (moments and weights of the touched rows) beside fused AdamW for the rest (MixedOptimizer).
- dense (the peer): the same model and step with `table.sparse = False` and one fused torch AdamW
  over everything (the table undecayed): a full (rows, width) gradient each step, and AdamW walks
  every row of the weights and both moments.

Memory: the table, its two Adam moments and (dense) its gradient are 3-4 copies of rows * width fp32:
at 1e7 rows and the default width 32, 3.6 GiB sparse, 4.8 GiB dense (printed per size, with the
process's peak RSS). The sizes run one after the other, each model freed before the next.
Prints the median milliseconds per step and of that the optimizer's step, per size and mode, and the
dense / sparse ratio. Not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from seekling.config import ModelConfig
from seekling.data.dataset import TrainLoader, prepare_tokens
from seekling.engram_vocab import build_compressed_vocab
from seekling.model.engram import Engram, table_parameters
from seekling.model.transformer import Transformer
from seekling.presets import with_engram
from seekling.tokenizer import load_default_tokenizer
from seekling.train.config import TrainConfig, train_preset
from seekling.train.optim import param_groups
from seekling.train.trainer import pretraining_step

sys.path.insert(0, str(Path(__file__).parent))
from bench_engram import ablation_base, quick_base  # noqa: E402  (the same base model as the ablation)

N_HEADS = 8  # per order; orders 2..3, so one table holds 16 heads


def table_config(base: ModelConfig, rows: int, width: int) -> ModelConfig:
    """base with one Engram layer (block 1) whose table has ~rows rows of `width` floats."""
    heads = 2 * N_HEADS
    return with_engram(base, layers=(1,), max_ngram=3, n_heads=N_HEADS, embed_dim=N_HEADS * width,
                       head_rows=max(2, rows // heads))


class TimedOptimizer:
    """An optimizer whose step() records its wall time; everything else is the optimizer's own."""

    def __init__(self, optimizer):
        self.optimizer, self.times = optimizer, []

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self, closure=None):
        t = time.perf_counter()
        self.optimizer.step()
        self.times.append(time.perf_counter() - t)


def table_step(cfg: ModelConfig, tcfg: TrainConfig, sparse: bool, compress: torch.Tensor | None = None):
    """(model, TrainStep, TimedOptimizer): `seekling train`'s step for cfg, or its dense-table peer.
    `compress`: the tokenizer's compressed-id map (identity if None)."""
    model = Transformer(cfg)
    model.init_weights(tcfg.seed)
    if compress is not None:
        model.engram_vocab.load_map(compress)
    model.train()
    if sparse:
        opt = None  # build_optimizer: fused AdamW + RowSparseAdam for the table
    else:
        tables = [p for _, p in table_parameters(model)]
        for m in model.modules():
            if isinstance(m, Engram):
                m.table.sparse = False  # nn.Embedding then builds a full (rows, width) gradient
        opt = torch.optim.AdamW(param_groups(model, tcfg.weight_decay) + [{"params": tables, "weight_decay": 0.0}],
                                lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps, fused=True)
    step = pretraining_step(model, tcfg, torch.float32, opt)
    timed = TimedOptimizer(step.optimizer)
    step.optimizer = timed
    return model, step, timed


def time_steps(step, timed, loader: TrainLoader, steps: int) -> tuple[float, float]:
    """Median (whole step, optimizer step) milliseconds over `steps` steps after two warm-ups."""
    whole = []
    for i in range(steps + 2):
        t = time.perf_counter()
        step([loader.batch(i)])
        whole.append(time.perf_counter() - t)
    return 1e3 * statistics.median(whole[2:]), 1e3 * statistics.median(timed.times[2:])


def gib(n_floats: int) -> float:
    return n_floats * 4 / 2 ** 30


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1e5,1e6,1e7", help="comma-separated table sizes (rows)")
    ap.add_argument("--width", type=int, default=32, help="floats per row (one head's width)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per size and mode, after two warm-ups")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense-table peer")
    ap.add_argument("--quick", action="store_true", help="smoke test: micro model, 1e4 and 1e5 rows, 2x64 tokens")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.steps, args.batch, args.seq = "1e4,1e5", 2, 2, 64
    torch.set_num_threads(args.threads)
    base = quick_base() if args.quick else ablation_base()
    tok = load_default_tokenizer()
    tcfg = train_preset("tiny", model=base, batch_size=args.batch, seq_len=args.seq, dtype="float32")
    data = prepare_tokens(tcfg.data, tok, cache_dir=tcfg.token_cache_dir).split("train")
    loader = TrainLoader(data=data, batch_size=args.batch, seq_len=args.seq, seed=0)
    compress = build_compressed_vocab(tok).padded(base.vocab_size)  # what `seekling train` installs
    modes = (True,) if args.no_dense else (True, False)
    print(f"{args.batch} x {args.seq} tokens per step, fp32, {args.threads} thread(s); model dim {base.dim}, "
          f"{base.n_layers} layers; one Engram table of {args.width}-float rows (16 heads); median of "
          f"{args.steps} steps after 2 warm-ups", flush=True)
    rows_out = []
    for rows in [int(float(r)) for r in args.rows.split(",")]:
        cfg = table_config(base, rows, args.width)
        tcfg = tcfg.replace(model=cfg)
        res = {}
        for sparse in modes:
            model, step, timed = table_step(cfg, tcfg, sparse, compress)
            n_rows = model.table_params() // args.width
            res[sparse] = time_steps(step, timed, loader, args.steps)
            del model, step, timed
            print(f"  {n_rows:,} rows, {'sparse' if sparse else 'dense'}: {res[sparse][0]:.0f} ms per step; peak RSS "
                  f"so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB", flush=True)
        rows_out.append((n_rows, res))
    print(f"\n{'rows':>11} {'table':>8} {'+Adam':>8} | {'sparse ms':>9} {'opt':>6} | {'dense ms':>9} {'opt':>6} "
          f"{'+grad+Adam':>10} | {'dense/sparse':>12}")
    for n_rows, res in rows_out:
        floats = n_rows * args.width
        s, d = res[True], res.get(False)
        dense = (f"{d[0]:>9.0f} {d[1]:>6.0f} {gib(4 * floats):>9.2f}G | {d[0] / s[0]:>12.2f}" if d
                 else f"{'-':>28} | {'-':>12}")
        print(f"{n_rows:>11,} {gib(floats):>7.2f}G {gib(3 * floats):>7.2f}G | {s[0]:>9.0f} {s[1]:>6.0f} | {dense}")
    print("\nms: median wall time of the whole training step (forward, backward, clipping, optimizer); opt: of "
          "which the optimizer's step. table / +Adam: the table's fp32 weights, and with its two moments "
          "(RowSparseAdam allocates them full-size, touches the batch's rows); dense adds the full gradient.")


if __name__ == "__main__":
    main()
