"""How fast could a decode step be on this machine? A floor from its own GEMMs, beside both systems' steps.

    python bench/bench_floor.py --model runs/demo/model               # batch 32, context 128
    python bench/bench_floor.py --model runs/demo/model --batch 8 --context 1024

The #4 targets ask for ratios against transformers (5x at batch 32, 1.3x from MTP speculation at
batch 1). Whether a ratio is reachable at all depends on the machine, so this script measures, in
one run:

* the **GEMM floor** of one decode step: every matrix product the absorbed-MLA step needs, at this
  batch and context, timed alone through PyTorch's own kernels (MKL/oneDNN) with its weights hot in
  cache, routed experts at the perfectly balanced share of rows (n * top_k / E each). Norms, RoPE,
  routing, softmax, sampling and scheduling are left out, so no implementation on this machine's
  BLAS can take a step shorter than this;
* transformers' and seekling's measured steps (`bench_decode.py`'s workers, same checkpoint, fp32),
  so the floor reads as the best ratio an engine on PyTorch's kernels could reach against this peer
  (a hand-written kernel could beat MKL at a few rows per expert, and nothing else);
* **MTP speculation** at batch 1. Verifying K drafts feeds K+1 tokens through every weight, and
  in an MoE they mostly route to different experts, so on a memory-bound CPU the verify step costs
  well over a plain one. Eager, a speculative run is measured and its round split into verification
  and drafting (the drafter's own time: the MTP block over the accepted positions, the output head
  for the draft row, its bookkeeping). Compiled, verification is not implemented, so a bound is
  given: the compiled step at batch K+1 (the same rows through the same GEMMs and experts; it also
  reads K more contexts) stands for the verify step, drafting is taken as free, and a round emits
  1 + K*a tokens at acceptance a: speculation is at most (1 + K*a) * t(1) / t(K+1) faster.

Prints tables; asserts nothing (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import best, launch  # a sibling script, found through the path set above


def timed_ms(fn, repeats: int = 200, *, warmup: int = 10, clock=time.perf_counter) -> float:
    """Median time of fn() in ms after `warmup` untimed calls; `clock=time.thread_time` for CPU time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return median(times) * 1e3


def mm(m: int, k: int, n: int, count: int = 1) -> tuple:
    return ("mm", m, k, n, count)


def bmm(b: int, m: int, k: int, n: int) -> tuple:
    return ("bmm", b, m, k, n)


def step_gemms(cfg, n: int, ctx: int) -> dict[str, list[tuple]]:
    """The matrix products of one absorbed-MLA decode step of n sequences at context ctx, by part."""
    D, H, C, R = cfg.dim, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Nd, V, qk = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = [mm(n, D, H * qk)] if cfg.q_lora_rank is None else [mm(n, D, cfg.q_lora_rank), mm(n, cfg.q_lora_rank, H * qk)]
    attention = q + [mm(n, D, C + R),  # the latent and the RoPE key
                     bmm(H, n, Nd, C),  # q_nope absorbed through W_UK
                     bmm(n, H, C + R, ctx + 1),  # scores over the latents
                     bmm(n, H, ctx + 1, C),  # weighted latents
                     bmm(H, n, C, V),  # W_UV
                     mm(n, H * V, D)]
    E, K, I = cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim
    rows = math.ceil(n * K / E) if n * K >= E else 1
    used = min(E, n * K)  # experts that see a token: all of them once n * K >= E
    moe = [mm(n, D, E)]
    if cfg.n_shared_experts:
        Is = cfg.n_shared_experts * I
        moe += [mm(n, D, 2 * Is), mm(n, Is, D)]
    moe += [mm(rows, D, 2 * I, count=used), mm(rows, I, D, count=used)]
    dense = [mm(n, D, 2 * cfg.inter_dim), mm(n, cfg.inter_dim, D)]
    n_dense = cfg.n_dense_layers if cfg.has_moe else cfg.n_layers
    parts = {f"attention x {cfg.n_layers} layers": attention * cfg.n_layers}
    if n_dense:
        parts[f"dense MLP x {n_dense}"] = dense * n_dense
    if cfg.n_layers - n_dense:
        parts[f"MoE x {cfg.n_layers - n_dense} (routed at {rows} rows x {used} experts)"] = moe * (cfg.n_layers - n_dense)
    parts["output head"] = [mm(n, D, cfg.vocab_size)]
    return parts


def time_gemm(g: tuple, cache: dict) -> float:
    if g not in cache:
        gen = torch.Generator().manual_seed(0)
        if g[0] == "mm":
            _, m, k, n, _ = g
            a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
            cache[g] = timed_ms(lambda: torch.nn.functional.linear(a, w))
        else:
            _, b, m, k, n = g
            a, w = torch.randn(b, m, k, generator=gen), torch.randn(b, k, n, generator=gen)
            cache[g] = timed_ms(lambda: torch.bmm(a, w))
    return cache[g] * (g[4] if g[0] == "mm" else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--target", type=float, default=5.0, help="the speed-up asked for at this batch")
    ap.add_argument("--spec", type=int, default=1, help="MTP draft tokens for the speculation bound (0 skips it)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs per measured cell; the best is kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from seekling.checkpoint import read_config

    cfg = read_config(args.model)
    n, ctx = args.batch, args.context
    print(f"decode-step floor: {args.model}, batch {n}, context {ctx}, fp32, {args.threads} threads, "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")

    job = dict(model_dir=args.model, ctx=ctx, new=args.new_tokens, threads=args.threads)
    runs = [(launch(system="seekling", compile=True, batch=n, **job), launch(system="transformers", batch=n, **job))
            for _ in range(args.repeats)]
    ours, theirs = best([o for o, _ in runs]), best([t for _, t in runs])
    if not (ours and theirs):
        sys.exit("a measured cell failed (see above)")

    cache: dict = {}
    parts = {name: sum(time_gemm(g, cache) for g in gemms) for name, gemms in step_gemms(cfg, n, ctx).items()}
    floor = sum(parts.values())
    print("\n| part of one decode step | GEMM floor ms |\n|---|---:|")
    for name, ms in parts.items():
        print(f"| {name} | {ms:.2f} |")
    print(f"| **all GEMMs** | **{floor:.2f}** |")

    peer, step = theirs["ms_step"], ours["ms_step"]
    print("\n| | ms per step | transformers / this |\n|---|---:|---:|")
    print(f"| transformers `generate` | {peer:.2f} | 1.00x |")
    print(f"| seekling, compiled | {step:.2f} | {peer / step:.2f}x |")
    print(f"| GEMM floor (nothing else costs anything) | {floor:.2f} | {peer / floor:.2f}x |")
    budget = peer / args.target
    print(f"\n{args.target:g}x needs a step of at most {budget:.2f} ms: "
          + (f"that leaves {budget - floor:.2f} ms for everything but the GEMMs (norms, RoPE, routing, softmax, "
             f"sampling, scheduling) and for GEMMs slower than their floor; seekling's step is "
             f"{max(step - floor, 0):.2f} ms above the floor now."
             if budget > floor else "below the GEMM floor itself, so no engine reaches it on this machine."))

    if args.spec and cfg.n_mtp_layers:
        K = args.spec
        one_job = dict(job, batch=1)
        print(f"\nMTP speculation at batch 1, context {ctx}, {K} draft token(s). Eager: a measured speculative run, "
              f"its round split into verification and drafting (the drafter's own time). Compiled: a bound, with the "
              f"verify step read as the compiled step at batch {K + 1} and drafting taken as free:")
        print("| steps | plain step ms | verify ms | drafting ms | round ms | tokens a round | speed-up |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
        kinds = [(True, 1), (True, K + 1), (False, 1)]
        cells = [[launch(system="seekling", compile=c, **dict(job, batch=b)) for c, b in kinds]
                 + [launch(system="seekling", spec=K, **one_job)] for _ in range(args.repeats)]
        steps = {kind: best([c[i] for c in cells]) for i, kind in enumerate(kinds)}
        spec = best([c[-1] for c in cells])
        if spec and all(steps.values()):
            n_round, d, r = 1 + K * spec["acceptance"], spec["ms_draft"], spec["ms_step"]
            t1 = steps[False, 1]["ms_step"]
            print(f"| eager, measured | {t1:.2f} | {r - d:.2f} | {d:.2f} | {r:.2f} | {n_round:.2f} | "
                  f"**{n_round * t1 / r:.2f}x** |")
            t1, tk = steps[True, 1]["ms_step"], steps[True, K + 1]["ms_step"]
            print(f"| compiled, bound | {t1:.2f} | {tk:.2f} | 0 | {tk:.2f} | {n_round:.2f} | **{n_round * t1 / tk:.2f}x** |")
            print(f"Acceptance {spec['acceptance']:.1%}. Compiled plain decoding runs {steps[True, 1]['tok_s']:.1f} tok/s, "
                  f"eager speculation {spec['tok_s']:.1f}.")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
