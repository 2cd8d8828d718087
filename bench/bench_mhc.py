"""Does mHC pay? A preset with the plain residual vs the same model with manifold-constrained
hyper-connections (n streams, DeepSeek-V4's formulation, seekling/model/mhc.py), and vs
unconstrained hyper-connections (the same streams with the Sinkhorn projection off).

    python bench/bench_mhc.py [--preset tiny] [--hc 4] [--steps 300] [--batch 8] [--seq 256]
                              [--variants baseline,wide,mhc,hc] [--compile] [--out runs/bench-mhc]
    python bench/bench_mhc.py --overhead [--modes eager-fp32,eager-bf16,...] [--timing-rounds 6]

Every variant trains through seekling's own trainer with the same TrainConfig (same tokens in the same
order, same schedule, same seed). `baseline` is the preset itself; mHC adds only its mixing projections
(all active), so `wide` is the plain model with its dense layers' MLP widened until its active
parameters equal mHC's: the comparison at equal active parameters. The table gives validation
loss and bits per byte on the held-out plays, the median tokens/s each run logged, and tokens/s from a
timing in alternation as `--overhead` takes it (each variant's training step in a process of its own,
`--warmup-steps` untimed steps, then A, B, C, C, B, A, ... for `--timing-rounds`, CPU time at
`--threads`; a busy machine cannot tilt it toward one run) with each variant's change in tokens/s
against the baseline from the median of the per-round ratios.

The stability measure is the paper's (Xie et al., arXiv 2512.24880, section 3.1, "Amax Gain Magnitude"):
the residual mixing over depth is x_L = A x_0 with A = C_L^T ... C_1^T (one comb matrix C per
sublayer, per token). Its forward gain is A's largest absolute row sum, its backward gain the largest
absolute column sum. Doubly-stochastic C keep both at 1; without the projection they drift. It is
measured on one fixed held-out batch every `--probe-every` steps (outside the timed steps); the
table reports the largest value over tokens at the end, the plot its course.

`--compile` trains every variant with TrainConfig(compile=True) (torch.compile graphs per step; mHC's
fused CPU kernels are ops inside them). Defaults: ~35 minutes on a 2-core CPU.
Writes metrics, `mhc.png` and `results.json` under --out.

`--overhead` only prices mHC, with no training run: the preset and the preset with mHC, full training
steps (seekling's own, train/core.py), each model in a process of its own (as in training; sharing one
process's heap cost one of them fresh pages) and their steps taken in alternation (plain, mHC, mHC,
plain, ...), for each of eager and compiled, fp32 and bf16 autocast, with mHC's fused CPU kernels, and eager fp32
on PyTorch ops (`-ops`: the path without a C compiler) (`--modes`), and prints the median step
time of each and mHC's change in tokens/s from the median of the per-round ratios. Times are the
thread's CPU time at `--threads` 1 (the default): on a shared machine another process's load then
costs wall time but not the step's own CPU time. Beside each mode it prints the floor measured in
the same run (`stream_floor_ms`: the projection products at this machine's fp32 matmul peak and the
few sweeps over the streams that no implementation can avoid), and for eager fp32 (either path) where
the time goes (`eager_breakdown_ms`: each op of one HyperConnection, forward and backward, timed
alone, times the number of HyperConnections, against the measured difference of the steps).
~5 minutes on a 2-core CPU with the default rounds, the compiles included.
"""

import argparse
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

from seekling.config import ModelConfig
from seekling.data.dataset import TrainLoader, prepare_tokens
from seekling.device import keep_freed_memory, resolve_dtype
from seekling.model import mhc, mhc_kernels
from seekling.model.mhc import HyperConnection
from seekling.model.transformer import Transformer
from seekling.presets import get_preset, with_mhc
from seekling.stats import model_stats
from seekling.tokenizer import load_default_tokenizer
from seekling.train.config import TrainConfig, train_preset
from seekling.train.flops import measure_peak_flops
from seekling.train.state import read_metrics
from seekling.train.trainer import pretraining_step, train

sys.path.insert(0, str(Path(__file__).parent))
from bench_floor import timed_ms  # noqa: E402


def wide_baseline(base: ModelConfig, target_active: int) -> ModelConfig:
    """The plain model with the dense layers' MLP (or, with none, the experts') widened to `target_active`."""
    field = "inter_dim" if base.n_dense_layers else "moe_inter_dim"
    start = getattr(base, field)
    width = min(range(start, 4 * start), key=lambda w: abs(model_stats(base.replace(**{field: w})).active_params - target_active))
    return base.replace(**{field: width})


@torch.no_grad()
def amax_gains(model, x: torch.Tensor) -> tuple[float, float] | None:
    """(forward, backward) Amax gain of the composite residual mixing of the main model, largest over tokens."""
    combs = []
    # comb from the streams each HyperConnection reads (its output carries the mixed streams, not comb)
    hooks = [m.register_forward_hook(lambda mod, inp, out: combs.append(mod.coefficients(inp[0])[2]))
             for name, m in model.named_modules() if isinstance(m, HyperConnection) and name.startswith("layers.")]
    if not hooks:
        return None
    try:
        model.hidden(x)
    finally:
        for h in hooks:
            h.remove()
    A = None
    for c in combs:  # in execution order: sublayer 1 first
        ct = c.double().transpose(-1, -2)  # x' = C^T x (plus the sublayer's output)
        A = ct if A is None else ct @ A
    A = A.abs()
    return A.sum(-1).amax().item(), A.sum(-2).amax().item()


def _room_for_every_variant() -> None:
    """Let Dynamo keep compiled frames for every model of one process.

    The models share every forward's code object, so Dynamo keeps one cache of compiled frames per
    function for all of them: with its default of 8 entries, the mHC model's blocks (compiled after
    the plain model's, one entry per layer) fell back to eager and its "compiled" steps ran partly
    uncompiled (measured: -40% against -28% with room for both, bf16).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def _cpu_ms(fn) -> float:
    """Median thread CPU time of fn() in ms over 15 calls, after two untimed ones."""
    return timed_ms(fn, repeats=15, warmup=2, clock=time.thread_time)


def stream_floor_ms(cfg: ModelConfig, tokens: int) -> dict:
    """The least extra time an mHC training step can take over the plain one on this machine.

    Per HyperConnection, any implementation (V4's TileLang kernels, ours) has to do the three
    products of the mixing projection, forward (N, nD) x (nD, M) and backward into the streams and
    into `fn`: 6 N M nD flops, counted at this machine's fp32 matmul peak (a square GEMM's rate,
    train/flops.py), and four sweeps over the fp32 streams: the read (x in), the write x' = comb^T x
    + post F (x and F in, x' out), the write's backward (its gradient in) and the read's backward
    (x in, the streams' gradient out), each timed as an (N, n*D) fp32 add (two reads, one write).
    The plain residual's own two sweeps per sublayer (h + F forward, the gradient sum backward,
    (N, D) fp32) are subtracted, since mHC replaces them. HyperHeads (one per model and MTP block)
    count as their products and one sweep. Left out, so the figure is a floor: the per-token
    coefficient math (sigmoids, softmax, 20 Sinkhorn rounds on (n, n)) and the expansion of the
    embedding into n streams.
    """
    n, D = cfg.hc_mult, cfg.dim
    M = (2 + n) * n
    x, x2, out = (torch.randn(tokens, n * D) for _ in range(3))
    h, h2, hout = (torch.randn(tokens, D) for _ in range(3))
    peak = measure_peak_flops(torch.float32)  # this process's threads
    sweep = _cpu_ms(lambda: torch.add(x, x2, out=out))
    plain_sweep = _cpu_ms(lambda: torch.add(h, h2, out=hout))
    gemms = 6 * tokens * M * n * D / peak * 1e3
    head_gemms = 6 * tokens * n * n * D / peak * 1e3
    hcs, heads = 2 * (cfg.n_layers + cfg.n_mtp_layers), 1 + cfg.n_mtp_layers
    total = hcs * (gemms + 4 * sweep - 2 * plain_sweep) + heads * (head_gemms + sweep)
    return dict(sweep_ms=sweep, plain_sweep_ms=plain_sweep, gemms_ms=gemms, peak_gflops=peak / 1e9,
                hyper_connections=hcs, heads=heads, total_ms=total)


def eager_breakdown_ms(cfg: ModelConfig, tokens: int) -> dict:
    """Where eager mHC's time goes: each op of one HyperConnection, forward + backward, at the model's shapes.

    Times the module's own functions (seekling/model/mhc.py) on fp32 streams (N, n, D) with a fixed
    upstream gradient, thread CPU time; the sum times the number of HyperConnections, beside the
    measured difference of the two steps, says how much of the overhead these ops explain. With the
    fused kernels (mhc_kernels.py) a HyperConnection is two ops, the read (RMS scale, projection
    products, coefficients, Sinkhorn, the read and the mixing of the streams) and the write (post F
    added); on PyTorch ops it is split finer.
    """
    n, D = cfg.hc_mult, cfg.dim
    hc = HyperConnection(cfg)
    torch.nn.init.normal_(hc.fn, std=cfg.initializer_range)
    x = torch.randn(tokens, n, D, requires_grad=True)
    f = torch.randn(tokens, D, requires_grad=True)

    def fwd_bwd(fn_):
        def run():
            out = fn_()
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])
        return run

    with torch.no_grad():
        pre, post, comb = (t.detach().requires_grad_() for t in hc.coefficients(x))
    if mhc_kernels.applies(x, hc.fn):
        with torch.no_grad():
            mixed = hc(x)[2].requires_grad_()  # the read's mixed streams, what the fused write takes
        return {"read (fused)": _cpu_ms(fwd_bwd(lambda: hc(x))),
                "write (fused)": _cpu_ms(fwd_bwd(lambda: (mhc.hc_write(mixed, f, post),)))}

    def coefficients_only():
        return mhc.hc_coefficients(x, hc.fn, hc.base, hc.scale, sinkhorn_iters=0, hc_eps=cfg.hc_eps,
                                   norm_eps=cfg.norm_eps)

    comb_raw = comb.detach().clone().requires_grad_()
    parts = {
        "projection (mixes)": fwd_bwd(lambda: (mhc._mixes(x, hc.fn, cfg.norm_eps),)),
        "sigmoid/softmax": None,
        "sinkhorn": fwd_bwd(lambda: (mhc._Sinkhorn.apply(comb_raw, cfg.hc_sinkhorn_iters, cfg.hc_eps),)),
        "read (pre)": fwd_bwd(lambda: (mhc._read(x, pre),)),
        "write (post, comb)": fwd_bwd(lambda: (mhc.hc_write((x, comb), f, post),)),
    }
    ms = {name: _cpu_ms(run) for name, run in parts.items() if run is not None}
    # The coefficient math without Sinkhorn, minus the projection it starts from.
    ms["sigmoid/softmax"] = max(0.0, _cpu_ms(fwd_bwd(coefficients_only)) - ms["projection (mixes)"])
    return {name: ms[name] for name in parts}


# mode: (dtype, compile, fused kernels). "-ops": mHC on PyTorch ops (mhc_kernels.switched_off), the
# path a machine without a C compiler takes, for the comparison.
OVERHEAD_MODES = {"eager-fp32": ("float32", False, True), "eager-bf16": ("bfloat16", False, True),
                  "compiled-bf16": ("bfloat16", True, True), "compiled-fp32": ("float32", True, True),
                  "eager-fp32-ops": ("float32", False, False), "compiled-fp32-ops": ("float32", True, False)}


def _mhc_path(fused: bool):
    """The fused kernels as they are, or mHC on PyTorch ops for the block."""
    return contextlib.nullcontext() if fused else mhc_kernels.switched_off()


def _step_worker(conn, tcfg: TrainConfig, fused: bool, threads: int, warmup: int) -> None:
    """One model's training steps in a process of its own, one per command ("r": take the step on batch
    warmup + r and answer its CPU and wall times; None: stop). Two models in one process share its
    allocator, and the heap the other left behind made one model's steps pay fresh pages (measured in
    bf16: mHC 827 ms per step in the shared process, 723 ms alone, the plain step unchanged)."""
    torch.set_num_threads(threads)
    _room_for_every_variant()
    data = prepare_tokens(tcfg.data, load_default_tokenizer(), cache_dir=tcfg.token_cache_dir).split("train")
    loader = TrainLoader(data=data, batch_size=tcfg.batch_size, seq_len=tcfg.seq_len, seed=0)
    model = Transformer(tcfg.model_config)
    model.init_weights(0)
    with _mhc_path(fused):
        step = pretraining_step(model, tcfg, resolve_dtype(tcfg.dtype, torch.device("cpu")))
        # A compiled step compiles its graphs in the first; and the heap grows for tens of steps (tiny
        # + mHC in bf16: RSS 1691 MB after 10 steps, 1740 MB from 30 on), each growth paid in fresh
        # pages by the step that makes it, which a long run never sees again.
        for r in range(warmup):
            step([loader.batch(r)])
        conn.send("ready")
        cpu_clock = time.thread_time if threads == 1 else time.process_time  # every thread of the step
        while (r := conn.recv()) is not None:
            t, c = time.perf_counter(), cpu_clock()
            step([loader.batch(warmup + r)])
            conn.send((cpu_clock() - c, time.perf_counter() - t))


def alternating_step_times(tcfgs: dict[str, TrainConfig], *, rounds: int, warmup: int, threads: int,
                           fused: bool = True) -> dict[str, dict[str, list[float]]]:
    """Each model's full training steps (seekling's own, train/core.py), every model in its own
    process, after `warmup` untimed steps; the steps taken in alternation (A, B, C, C, B, A, ...) so
    that the machine's drift hits all alike. Per model, the CPU and the wall seconds of each round's
    step: CPU time is the step's own cost (at `threads` 1 the thread's, else the process's, all
    threads summed), which another process's load raises in wall time but not in CPU time."""
    ctx = multiprocessing.get_context("spawn")
    workers = {}
    for name, tcfg in tcfgs.items():
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_step_worker, daemon=True, args=(child, tcfg, fused, threads, warmup))
        proc.start()
        workers[name] = (proc, conn)

    def answer(name):
        proc, conn = workers[name]
        try:
            return conn.recv()
        except EOFError:
            proc.join()
            raise SystemExit(f"{name}'s timing process ended (exit code {proc.exitcode}) before answering; "
                             "its traceback is above") from None

    for name in workers:
        answer(name)
    times = {name: dict(cpu=[], wall=[]) for name in workers}
    for r in range(rounds):
        for name in (list(workers) if r % 2 == 0 else list(reversed(workers))):
            workers[name][1].send(r)
            c, w = answer(name)
            times[name]["cpu"].append(c)
            times[name]["wall"].append(w)
    for proc, conn in workers.values():
        conn.send(None)
        proc.join()
    return times


def change(times: dict, ref: str, name: str, clock: str = "cpu") -> float:
    """`name`'s change in tokens/s against `ref`: the median over rounds of the ratio of their steps."""
    return statistics.median(a / b for a, b in zip(times[ref][clock], times[name][clock])) - 1


def _time_mode(args, mode: str, cfgs: dict, dtype: str, compile_: bool, fused: bool) -> dict:
    """Median step times of the plain and the mHC model in one mode, and mHC's change in tokens/s."""
    print(f"{mode}: warming up{' (compiling)' if compile_ else ''} ...", flush=True)
    tcfgs = {name: train_preset(args.preset, model=cfg, batch_size=args.batch, seq_len=args.seq, dtype=dtype,
                                compile=compile_) for name, cfg in cfgs.items()}
    times = alternating_step_times(tcfgs, rounds=args.timing_rounds, warmup=args.warmup_steps, threads=args.threads,
                                   fused=fused)
    row = dict(plain_s=statistics.median(times["plain"]["cpu"]), mhc_s=statistics.median(times["mhc"]["cpu"]),
               change=change(times, "plain", "mhc"), wall_change=change(times, "plain", "mhc", "wall"))
    print(f"  plain {row['plain_s'] * 1e3:.0f} ms, mHC {row['mhc_s'] * 1e3:.0f} ms per step: "
          f"{row['change']:+.1%} tokens/s", flush=True)
    return row


def overhead(args) -> dict:
    """mHC's cost in tokens/s against the plain preset: alternating full training steps, per mode."""
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as a training process has it (TrainStep): the floor and the breakdown run here
    base = get_preset(args.preset)
    cfgs = {"plain": base, "mhc": with_mhc(base, args.hc)}
    rows = {}
    for mode in [m.strip() for m in args.modes.split(",")]:
        if mode not in OVERHEAD_MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(OVERHEAD_MODES)}")
        dtype, compile_, fused = OVERHEAD_MODES[mode]
        rows[mode] = _time_mode(args, mode, cfgs, dtype, compile_, fused)
    tokens = args.batch * args.seq
    floor = stream_floor_ms(cfgs["mhc"], tokens)
    for r in rows.values():
        r["floor_change"] = r["plain_s"] / (r["plain_s"] + floor["total_ms"] / 1e3) - 1
    print(f"\n{args.preset} vs {args.preset} + mHC (n = {args.hc}): full training steps of {args.batch}x{args.seq} "
          f"tokens in alternation, {args.timing_rounds} rounds, {args.threads} thread(s), median\n")
    print(f"{'mode':<18}{'plain ms/step':>15}{'mHC ms/step':>13}{'tokens/s (CPU)':>16}{'(wall)':>9}{'floor':>8}")
    for mode, r in rows.items():
        print(f"{mode:<18}{r['plain_s'] * 1e3:>15.0f}{r['mhc_s'] * 1e3:>13.0f}{r['change']:>+16.1%}"
              f"{r['wall_change']:>+9.1%}{r['floor_change']:>+8.1%}")
    print("\ntokens/s: mHC's change against the plain model, the median over rounds of the ratio of the two steps' "
          "thread CPU times (wall: of their wall times). Target: no worse than -15% (issue 13).\n"
          f"floor: the change if mHC cost only its floor, {floor['total_ms']:.0f} ms per step on this machine: "
          f"{floor['hyper_connections']} HyperConnections x (projection products fwd+bwd {floor['gemms_ms']:.2f} ms "
          f"at the fp32 matmul peak of {floor['peak_gflops']:.0f} GFLOP/s + 4 stream sweeps of {floor['sweep_ms']:.2f} "
          f"ms - the plain residual's 2 of {floor['plain_sweep_ms']:.2f} ms) + {floor['heads']} heads (see stream_floor_ms).")
    for mode in ("eager-fp32", "eager-fp32-ops"):
        if mode not in rows:
            continue
        with _mhc_path(OVERHEAD_MODES[mode][2]):
            parts = eager_breakdown_ms(cfgs["mhc"], tokens)
        n_hc = floor["hyper_connections"]
        measured = (rows[mode]["mhc_s"] - rows[mode]["plain_s"]) * 1e3
        print(f"\nwhere {mode} mHC's time goes, per step ({n_hc} HyperConnections x each op's forward + backward "
              f"at {tokens} tokens, timed alone):")
        for name, ms in parts.items():
            print(f"  {name:<22}{ms:>7.2f} ms x {n_hc} = {ms * n_hc:>6.0f} ms")
        print(f"  {'sum':<22}{'':>18}{sum(parts.values()) * n_hc:>6.0f} ms   (measured step difference "
              f"{measured:.0f} ms; the rest: the heads, the stream expansion, the optimizer over the mixing "
              f"parameters, and cache effects of the n-times larger residual on the sublayers)")
        rows[mode]["breakdown_ms"] = parts
    rows["floor"] = floor
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--hc", type=int, default=4, help="streams for the mHC and HC variants (DeepSeek-V4: 4)")
    ap.add_argument("--variants", default="baseline,wide,mhc,hc",
                    help="any of baseline, wide (plain, active parameters = mHC's), mhc, hc (Sinkhorn off)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--probe-every", type=int, default=0, help="steps between gain probes (default steps/10)")
    ap.add_argument("--timing-rounds", type=int, default=6)
    ap.add_argument("--warmup-steps", type=int, default=30,
                    help="timed steps' untimed steps first (compiles, and the heap's growth to its steady size)")
    ap.add_argument("--compile", action="store_true", help="train with TrainConfig(compile=True)")
    ap.add_argument("--out", default="runs/bench-mhc")
    ap.add_argument("--overhead", action="store_true", help="only time plain vs mHC steps (no training), per mode")
    ap.add_argument("--modes", default="eager-fp32,eager-bf16,compiled-fp32,compiled-bf16,eager-fp32-ops",
                    help=f"with --overhead: any of {', '.join(OVERHEAD_MODES)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the timed steps (not of training)")
    args = ap.parse_args()
    if args.overhead:
        overhead(args)
        return

    if args.compile:
        _room_for_every_variant()
    base = get_preset(args.preset)
    mhc = with_mhc(base, args.hc)
    all_variants = {"baseline": base, "wide": wide_baseline(base, model_stats(mhc).active_params), "mhc": mhc,
                    "hc": mhc.replace(hc_sinkhorn_iters=0)}
    names = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in names if v not in all_variants]:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(all_variants)}")
    probe_every = args.probe_every or max(1, args.steps // 10)
    out_root = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")

    tok = load_default_tokenizer()
    results = {}
    for name in names:
        cfg = all_variants[name]
        out = out_root / name
        tcfg = train_preset(args.preset, model=cfg, out_dir=str(out), max_steps=args.steps, batch_size=args.batch,
                            seq_len=args.seq, warmup_steps=max(1, args.steps // 15), eval_every=0, ckpt_every=0,
                            log_every=max(1, args.steps // 30), eval_batches=args.eval_batches, compile=args.compile)
        val = prepare_tokens(tcfg.data, tok, cache_dir=tcfg.token_cache_dir).split("val")
        probe_x, _ = TrainLoader(data=val, batch_size=4, seq_len=args.seq, seed=1).batch(0)
        gains = []

        def on_step(step, model, display, probe_x=probe_x, gains=gains):
            if step % probe_every == 0 or step == args.steps:
                g = amax_gains(model, probe_x)
                if g is not None:
                    gains.append((step, *g))

        print(f"\n=== {name}: training {args.steps} steps into {out}", flush=True)
        t = time.perf_counter()
        result = train(tcfg, on_step=on_step, live=False, plots=False)
        wall = time.perf_counter() - t
        if result["stopped"]:
            raise SystemExit(f"{name} run stopped early ({result['stopped']}); no comparison")
        rows = read_metrics(out)
        tps = statistics.median(r["tok_per_s"] for r in rows[1:] or rows)
        results[name] = dict(cfg=cfg, tcfg=tcfg, result=result, tps=tps, wall=wall, gains=gains, rows=rows)

    print(f"\ntiming the variants in alternation ({args.warmup_steps} untimed steps each first) ...", flush=True)
    times = alternating_step_times({n: r["tcfg"] for n, r in results.items()}, rounds=args.timing_rounds,
                                   warmup=args.warmup_steps, threads=args.threads)
    step_s = {name: statistics.median(t["cpu"]) for name, t in times.items()}
    tokens = args.steps * args.batch * args.seq
    ref = "baseline" if "baseline" in times else None

    print(f"\n{args.preset}: plain residual vs {args.hc} streams, {args.steps} steps x {args.batch}x{args.seq} = "
          f"{tokens / 1e6:.2f}M tokens each, validation on {args.eval_batches} held-out batches"
          f"{', compiled steps' if args.compile else ', eager'}\n")
    head = (f"{'variant':<10}{'params':>10}{'active':>10}{'val loss':>10}{'val bpb':>9}{'tok/s (run)':>13}"
            f"{'tok/s (alt.)':>14}{'vs base':>9}{'fwd gain':>10}{'bwd gain':>10}{'wall':>8}")
    print(head)
    table = {}
    for name, r in results.items():
        s = model_stats(r["cfg"])
        alt = args.batch * args.seq / step_s[name]
        vs_base = change(times, ref, name) if ref else None  # tokens/s change against the baseline
        over = f"{vs_base:+.1%}" if ref else "-"
        fwd, bwd = (r["gains"][-1][1], r["gains"][-1][2]) if r["gains"] else (float("nan"), float("nan"))
        print(f"{name:<10}{(s.total_params - s.mtp_params) / 1e6:>9.2f}M{s.active_params / 1e6:>9.2f}M"
              f"{r['result']['val_loss']:>10.4f}{r['result']['val_bpb']:>9.4f}{r['tps']:>13,.0f}{alt:>14,.0f}{over:>9}"
              f"{fwd:>10.3g}{bwd:>10.3g}{r['wall']:>7.0f}s")
        table[name] = dict(params=s.total_params - s.mtp_params, active=s.active_params, val_loss=r["result"]["val_loss"],
                           val_bpb=r["result"]["val_bpb"], tok_per_s_run=r["tps"], tok_per_s_alternating=alt,
                           gains=r["gains"], wall_s=r["wall"], change_vs_baseline=vs_base,
                           timed_steps_s=times[name])
    print("\nfwd / bwd gain: largest row / column sum of |C_L^T ... C_1^T| over the probe batch's tokens (1 = no "
          f"amplification); tok/s (alt.): per second of CPU time at --threads {args.threads} in the alternating "
          "timing; 'vs base': change in tokens/s against the baseline there, the median of the per-round ratios.")
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.json").write_text(json.dumps(dict(args=vars(args), results=table), indent=2) + "\n")
    plot(results, out_root / "mhc.png", args)
    print(f"wrote {out_root / 'results.json'} and {out_root / 'mhc.png'}")


def plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_gain) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"baseline": "tab:grey", "wide": "tab:green", "mhc": "tab:blue", "hc": "tab:red"}  # one color per variant in both panels
    for name, r in results.items():
        rows = [row for row in r["rows"] if "loss" in row]
        ax_loss.plot([row["step"] for row in rows], [row["loss"] for row in rows], color=colors[name],
                     label=f"{name}: val {r['result']['val_bpb']:.3f} bits/byte")
        if r["gains"]:
            steps, fwd, bwd = zip(*r["gains"])
            ax_gain.plot(steps, fwd, marker="o", color=colors[name], label=f"{name} forward")
            ax_gain.plot(steps, bwd, marker="x", linestyle="--", color=colors[name], label=f"{name} backward")
    ax_loss.set(xlabel="step", ylabel="training loss", title=f"{args.preset}: training loss")
    ax_loss.legend()
    ax_gain.set(xlabel="step", ylabel="Amax gain of the composite mixing", yscale="log",
                title="residual mixing over depth (1 = stable)")
    ax_gain.axhline(1.0, color="grey", linewidth=0.8)
    ax_gain.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
