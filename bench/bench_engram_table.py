"""Does an Engram training step cost time in the table's size? Step time as the table grows, sparse
table gradient + SparseAdam against the peer: dense gradient + AdamW, measured in the same run.

    OMP_NUM_THREADS=1 python bench/bench_engram_table.py [--rows 1e5,1e6] [--big] [--steps 8]
                                                        [--batch 8] [--seq 256] [--dim 256] [--threads 1]

One Engram layer (seekling/model/engram.py, N = 3, 8 heads per order, 16-wide rows) on random token ids
and random hidden states; a step is forward, backward and the optimizer step. With the sparse
gradient (the module's default) the table's gradient is the looked-up rows only (at most
batch * seq * 16 of them) and torch.optim.SparseAdam updates those rows' moments and values; the
rest of the layer goes to AdamW. The dense peer builds a full (rows, 16) gradient and AdamW walks
every row each step. `--big` adds 1e7 rows (~0.6 GB of table, ~2.6 GB with the dense peer's
gradient and moments). The table prints median milliseconds per step (forward + backward, optimizer)
and the dense / sparse ratio. Not a test: it asserts nothing about time.
"""

import argparse
import statistics
import time

import torch

from seekling.model.engram import Engram, EngramConfig, EngramVocab


def build(rows: int, dim: int, sparse: bool, V: int = 4096):
    N, H = 3, 8
    # Each of the (N-1)*H heads gets a prime at or above head_rows, so the table has ~rows rows.
    cfg = EngramConfig(layers=(0,), max_ngram=N, n_heads=H, head_rows=max(2, rows // ((N - 1) * H)), embed_dim=128)
    torch.manual_seed(0)
    m = Engram(cfg, 0, dim=dim, vocab_size=V)
    m.table.sparse = sparse
    rest = [p for n, p in m.named_parameters() if n != "table.weight"]
    if sparse:
        opts = [torch.optim.SparseAdam([m.table.weight], lr=1e-3), torch.optim.AdamW(rest, lr=1e-3)]
    else:
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-3)]
    return m, EngramVocab(cfg, V), opts


def time_steps(m, voc, opts, args) -> tuple[float, float]:
    """Median (forward+backward, optimizer) milliseconds over args.steps steps after two warm-ups."""
    g = torch.Generator().manual_seed(1)
    fb, op = [], []
    for i in range(args.steps + 2):
        ids = torch.randint(0, 4096, (args.batch, args.seq), generator=g)
        h = torch.randn(args.batch, args.seq, args.dim, generator=g)
        t0 = time.perf_counter()
        m(h, voc(ids)).square().mean().backward()
        t1 = time.perf_counter()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= 2:
            fb.append(1e3 * (t1 - t0))
            op.append(1e3 * (t2 - t1))
    return statistics.median(fb), statistics.median(op)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1e5,1e6", help="comma-separated table sizes")
    ap.add_argument("--big", action="store_true", help="also 1e7 rows (several GB with the dense peer)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(float(r)) for r in args.rows.split(",")] + ([10 ** 7] if args.big else [])
    print(f"{args.batch} x {args.seq} tokens, dim {args.dim}, {args.threads} thread(s); median ms per step")
    print(f"{'rows':>10} {'table MB':>9} | {'sparse fwd+bwd':>14} {'opt':>7} {'total':>7} | "
          f"{'dense fwd+bwd':>13} {'opt':>7} {'total':>7} | {'dense/sparse':>12}")
    for rows in sizes:
        res = {}
        for sparse in (True, False):
            m, voc, opts = build(rows, args.dim, sparse)
            res[sparse] = time_steps(m, voc, opts, args)
            n_rows, mb = m.table.weight.shape[0], m.table.weight.numel() * 4 / 2 ** 20
            del m, opts
        s, d = res[True], res[False]
        print(f"{n_rows:>10} {mb:>9.0f} | {s[0]:>14.1f} {s[1]:>7.1f} {sum(s):>7.1f} | "
              f"{d[0]:>13.1f} {d[1]:>7.1f} {sum(d):>7.1f} | {sum(d) / sum(s):>12.2f}")


if __name__ == "__main__":
    main()
