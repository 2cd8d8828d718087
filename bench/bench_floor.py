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
  so the floor reads as the best ratio any engine could reach against this peer;
* the **speculation bound** at batch 1: verifying K drafts feeds K+1 tokens through every weight,
  and with MoE they mostly route to different experts. It is read here as seekling's compiled step
  at batch K+1 (the same rows through the same GEMMs; a slight overestimate, it also reads K more
  contexts) against its step at batch 1; with the measured acceptance a, a round emits 1 + K*a
  tokens, so speculation is at most (1 + K*a) * t(1) / t(K+1) faster, even with free drafting.

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
from bench_decode import best, launch  # noqa: E402  (a sibling script)


def timed_ms(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
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
             if budget > floor else f"below the GEMM floor itself, so no engine reaches it on this machine."))

    if args.spec and cfg.n_mtp_layers:
        K = args.spec
        job1 = dict(job, ctx=ctx)
        cells = [(launch(system="seekling", compile=True, batch=1, **job1),
                  launch(system="seekling", compile=True, batch=K + 1, **job1),
                  launch(system="seekling", spec=K, batch=1, **job1)) for _ in range(args.repeats)]
        one, many, spec = (best([c[i] for c in cells]) for i in range(3))
        if one and many and spec:
            a = spec["acceptance"]
            bound = (1 + K * a) * one["ms_step"] / many["ms_step"]
            print(f"\nSpeculation bound at batch 1, context {ctx}, {K} draft token(s): compiled step "
                  f"{one['ms_step']:.2f} ms for 1 token, {many['ms_step']:.2f} ms for {K + 1} "
                  f"({many['ms_step'] / one['ms_step']:.2f}x); acceptance {a:.1%}, so a round emits "
                  f"{1 + K * a:.2f} tokens: at most {bound:.2f}x over plain decoding, with drafting free.")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
