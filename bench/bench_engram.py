"""Does Engram pay? The issue's sparsity-allocation ablation (Cheng et al., arXiv 2601.07372, section 3):
a fixed budget of inactive parameters split between routed experts and Engram tables.

    python bench/bench_engram.py [--steps 400] [--shares 0.25,0.5,0.75] [--mhc-share 0.25] [--batch 8]
                                 [--seq 256] [--dtype auto] [--threads 1] [--out runs/bench-engram]
    python bench/bench_engram.py --quick          # smoke test: a micro model, 6 steps per arm, ~10 s

Every arm trains through seekling's own trainer (train/trainer.py: TrainStep, build_optimizer, so
Engram tables train with RowSparseAdam) with the same TrainConfig: the same seed, the same tokens of
the embedded corpus in the same order, the same schedule. The arms:

- `moe`: the MoE baseline (`ablation_base`, printed), with its dense FFN widened by exactly the
  active parameters that Engram's projections, norms and conv add to the other arms (to within one
  unit of width, 3 * dim parameters), so that the comparison is at equal active parameters and so at
  equal matmul FLOPs per token (stats.py: 2 per active weight).
- `engram-XX`: a share rho of the baseline's *inactive* routed-expert parameters moved into Engram
  tables: round(rho * (E - k)) routed experts removed from every MoE layer, top-k unchanged, and the
  tables' rows sized (head_rows, searched over the primes the heads get) so that the total equals the
  baseline's to within a few hundred parameters. The active parameters stay, less the removed
  experts' router rows (dim each per layer, < 0.2%). rho is then the paper's allocation ratio counted
  from the Engram side: table / (table + remaining inactive experts); rho = 0 is the baseline, the
  paper's optimum is at about 0.2-0.25 (its U-curve). Engram sits at blocks 1 and 2 with
  presets.with_engram's other defaults (orders 2..3, 8 heads per order, 8-float rows at dim 128).
- `engram-XX+mhc`: the arm at `--mhc-share` with mHC (4 streams, presets.with_mhc): Engram gates per
  stream. mHC adds its own active parameters (its mixing projections, and W_K per stream); the table
  says how many, so this arm is not at equal FLOPs.

The MTP depth is off (n_mtp_layers = 0) in every arm: its block would lose experts without getting
a table, so the totals would no longer be equal (and it saves its block's time).

The table gives total / active / table parameters (main model, from stats.py, which the test holds
to the built models' own counts), validation bits per byte on the held-out plays at the end, the
median tokens/s each run logged, tokens/s from a short interleaved timing (A, B, C, ... full training
steps, median; a busy machine cannot tilt it toward one arm), and each arm's tokens/s against the
baseline from that timing. Writes `engram.png` (val bpb against rho, and the loss curves) and
`results.json` under --out/<time>.

Length: 5 arms of 400 steps of 8 x 256 tokens (0.8M tokens each, about half an epoch of the corpus).
Measured on a shared 2-core AMD EPYC (AVX-512 bf16) at one thread, quiet: ~0.33 s per step for
`moe` and the allocation arms and ~0.6 s for the mHC arm in bf16 (what --dtype auto picks there),
~0.45 / 0.7 s in fp32; with evaluation and start-up the whole script takes ~16 minutes (bf16),
~21 (fp32), and up to twice that when other jobs load the machine. A corpus of ~1.5M tokens may well
not show DeepSeek's gain; the script reports what it measures, whichever arm wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from seekling.config import ModelConfig
from seekling.model.engram import engram_primes
from seekling.presets import tiny, with_engram, with_mhc
from seekling.stats import model_stats
from seekling.train.config import train_preset
from seekling.train.state import read_metrics
from seekling.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from bench_moe_vs_dense import interleaved_step_times  # noqa: E402  (one timing loop for every bench)


def ablation_base() -> ModelConfig:
    """tiny at half width and two thirds of the depth, no MTP: 16 routed experts top-4 in 3 MoE layers,
    so that five arms train 0.8M tokens each in ~20 minutes on one CPU thread (a step of tiny itself
    takes ~2.5x as long, measured beside it)."""
    return tiny().replace(dim=128, n_layers=4, inter_dim=384, kv_lora_rank=32, moe_inter_dim=64, n_mtp_layers=0)


def quick_base() -> ModelConfig:
    """A micro MoE for --quick: 8 routed experts top-2 in one MoE layer."""
    return tiny().replace(dim=64, n_layers=2, inter_dim=128, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=16,
                          qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32, n_routed_experts=8,
                          n_activated_experts=2, n_mtp_layers=0)


def main_params(c: ModelConfig) -> int:
    """Total parameters of the main model (MTP excluded), tables included."""
    s = model_stats(c)
    return s.total_params - s.mtp_params


def table_params(c: ModelConfig) -> int:
    return model_stats(c).table_params


def with_table_total(cfg: ModelConfig, target: int) -> ModelConfig:
    """cfg (with Engram) with head_rows chosen so that its tables hold as close to `target` parameters as
    the primes allow (each of the G heads per layer gets its own prime >= head_rows)."""
    e = cfg.engram

    def table(rows: int) -> int:
        return sum(sum(p) for p in engram_primes(dataclasses.replace(e, head_rows=rows)).values()) * e.head_dim

    heads = len(e.layers) * e.n_hash_heads
    if target < table(2):
        raise ValueError(f"a table budget of {target} parameters is below the smallest table ({table(2)}); "
                         "move more experts (a larger share) or use fewer Engram heads")
    lo, hi = 2, max(3, 2 * target // (heads * e.head_dim) + 2)  # table(hi) >= target
    while lo < hi:  # the smallest rows with table(rows) >= target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if table(mid) < target else (lo, mid)
    rows = min((lo - 1, lo), key=lambda r: (abs(table(r) - target), r)) if lo > 2 else lo
    return cfg.replace(engram=dataclasses.replace(e, head_rows=rows))


def moved_experts(base: ModelConfig, share: float) -> int:
    """Routed experts per MoE layer that a share of the inactive ones (E - k) becomes."""
    inactive = base.n_routed_experts - base.n_activated_experts
    moved = round(share * inactive)
    if not 0 < moved <= inactive:
        raise ValueError(f"share {share} moves {moved} of the {inactive} inactive routed experts per layer; "
                         f"pick shares between {1 / inactive:.3f} and 1")
    return moved


def engram_share(cfg: ModelConfig) -> float:
    """The allocation ratio from the Engram side: table / (table + inactive routed-expert parameters)."""
    n_moe = cfg.n_layers - cfg.n_dense_layers
    inactive = n_moe * (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * cfg.dim * cfg.moe_inter_dim
    table = table_params(cfg)
    return table / (table + inactive)


def allocation_arms(base: ModelConfig, shares: list[float], mhc_share: float = 0.0, hc_mult: int = 4,
                    **engram_options) -> dict[str, ModelConfig]:
    """The arms: `moe` (base, dense FFN widened by Engram's active parameters), one Engram arm per share at
    the baseline's active and total parameters, and, if mhc_share, that arm with mHC."""
    if base.n_dense_layers < 1:
        raise ValueError("the baseline needs a dense layer to absorb Engram's active parameters (n_dense_layers >= 1)")
    with_mem = with_engram(base, **engram_options)
    extra = model_stats(with_mem).active_params - model_stats(base).active_params
    per_width = 3 * base.dim * base.n_dense_layers  # one more unit of dense FFN width
    moe = base.replace(inter_dim=base.inter_dim + round(extra / per_width))
    arms = {"moe": moe}
    for share in shares:
        cut = with_mem.replace(n_routed_experts=base.n_routed_experts - moved_experts(base, share))
        budget = main_params(moe) - (main_params(cut) - table_params(cut))
        arms[f"engram-{share * 100:.0f}"] = with_table_total(cut, budget)
    if mhc_share:
        name = f"engram-{mhc_share * 100:.0f}"
        cfg = arms.get(name) or allocation_arms(base, [mhc_share], **engram_options)[name]
        arms[f"{name}+mhc"] = with_mhc(cfg, hc_mult)
    return arms


def describe(base: ModelConfig) -> str:
    fields = ("vocab_size", "dim", "n_layers", "n_dense_layers", "inter_dim", "n_heads", "kv_lora_rank",
              "moe_inter_dim", "n_routed_experts", "n_activated_experts", "n_shared_experts", "n_mtp_layers")
    return ", ".join(f"{f}={getattr(base, f)}" for f in fields)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shares", default="0.25,0.5,0.75",
                    help="shares rho of the inactive routed-expert parameters moved into Engram tables")
    ap.add_argument("--mhc-share", type=float, default=0.25, help="the share trained again with mHC (0: no mHC arm)")
    ap.add_argument("--hc", type=int, default=4, help="mHC streams (DeepSeek-V4: 4)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--timing-rounds", type=int, default=4)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the figures of the docstring)")
    ap.add_argument("--out", default="runs/bench-engram")
    ap.add_argument("--quick", action="store_true", help="smoke test: micro model, 6 steps of 2x64 tokens")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.seq, args.eval_batches, args.timing_rounds = 6, 2, 64, 2, 1
    torch.set_num_threads(args.threads)
    base = quick_base() if args.quick else ablation_base()
    shares = [float(s) for s in args.shares.split(",")]
    arms = allocation_arms(base, shares, args.mhc_share, args.hc)
    out_root = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    print(f"base MoE: {describe(base)}")
    eng = arms[next(n for n in arms if n != "moe")].engram
    print(f"Engram: layers {eng.layers}, orders 2..{eng.max_ngram}, {eng.n_heads} heads per order, "
          f"{eng.head_dim}-wide rows, kernel {eng.kernel_size}; baseline dense inter_dim {arms['moe'].inter_dim}")
    print_params(arms)

    results = {}
    for name, cfg in arms.items():
        out = out_root / name
        tcfg = train_preset("tiny", model=cfg, out_dir=str(out), max_steps=args.steps, batch_size=args.batch,
                            seq_len=args.seq, warmup_steps=max(1, args.steps // 15), eval_every=max(1, args.steps // 5),
                            ckpt_every=0, log_every=max(1, args.steps // 30), eval_batches=args.eval_batches,
                            dtype=args.dtype)
        print(f"\n=== {name}: training {args.steps} steps into {out}", flush=True)
        t = time.perf_counter()
        result = train(tcfg, live=False, plots=False)
        wall = time.perf_counter() - t
        if result["stopped"]:
            raise SystemExit(f"{name} run stopped early ({result['stopped']}); no comparison")
        rows = read_metrics(out)
        tps = statistics.median(r["tok_per_s"] for r in rows if "tok_per_s" in r)
        results[name] = dict(cfg=cfg, tcfg=tcfg, result=result, tps=tps, wall=wall, rows=rows)

    print("\ntiming the arms in alternation ...", flush=True)
    step_s = interleaved_step_times({n: r["tcfg"] for n, r in results.items()}, rounds=args.timing_rounds)
    table = report(results, step_s, args)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.json").write_text(json.dumps(dict(
        args=vars(args), base=dataclasses.asdict(base), results=table,
        configs={n: dataclasses.asdict(c) for n, c in arms.items()}), indent=2) + "\n")
    plot(results, table, out_root / "engram.png", args)
    print(f"wrote {out_root / 'results.json'} and {out_root / 'engram.png'}")


def print_params(arms: dict[str, ModelConfig]) -> None:
    ref = arms["moe"]
    print(f"\n{'arm':<16}{'experts':>8}{'rho':>7}{'total':>12}{'active':>11}{'table':>11}"
          f"{'d total':>9}{'d active':>10}")
    for name, c in arms.items():
        s = model_stats(c)
        print(f"{name:<16}{c.n_routed_experts:>8}{engram_share(c):>7.3f}{main_params(c):>12,}{s.active_params:>11,}"
              f"{s.table_params:>11,}{main_params(c) - main_params(ref):>+9,}"
              f"{s.active_params - model_stats(ref).active_params:>+10,}")
    print("(main-model parameters from stats.py; d: against the baseline; experts: routed per MoE layer, top-"
          f"{ref.n_activated_experts} in every arm)")


def report(results: dict, step_s: dict, args) -> dict:
    tokens = args.steps * args.batch * args.seq
    ref = step_s["moe"]
    print(f"\n{args.steps} steps x {args.batch}x{args.seq} = {tokens / 1e6:.2f}M tokens per arm, same seed and order; "
          f"validation on {args.eval_batches} held-out batches; {args.threads} thread(s), "
          f"{next(iter(results.values()))['result']['dtype']}\n")
    print(f"{'arm':<16}{'rho':>7}{'total':>9}{'active':>9}{'table':>9}{'val loss':>10}{'val bpb':>9}"
          f"{'tok/s (run)':>13}{'tok/s (alt.)':>14}{'vs moe':>8}{'wall':>7}")
    table = {}
    for name, r in results.items():
        c, s = r["cfg"], model_stats(r["cfg"])
        alt = args.batch * args.seq / step_s[name]
        row = dict(rho=engram_share(c), routed_experts=c.n_routed_experts, total=main_params(c), active=s.active_params,
                   table=s.table_params, val_loss=r["result"]["val_loss"], val_bpb=r["result"]["val_bpb"],
                   tok_per_s_run=r["tps"], tok_per_s_alternating=alt, tok_per_s_ratio=ref / step_s[name],
                   wall_s=r["wall"], val_curve=[(x["step"], x["val_bpb"]) for x in r["rows"] if "val_bpb" in x])
        table[name] = row
        print(f"{name:<16}{row['rho']:>7.3f}{row['total'] / 1e6:>8.2f}M{row['active'] / 1e6:>8.2f}M"
              f"{row['table'] / 1e6:>8.2f}M{row['val_loss']:>10.4f}{row['val_bpb']:>9.4f}{row['tok_per_s_run']:>13,.0f}"
              f"{alt:>14,.0f}{row['tok_per_s_ratio']:>8.2f}{row['wall_s']:>6.0f}s")
    print("\nrho: the share of the inactive parameters in Engram tables (0: pure MoE); 'vs moe': tokens/s against "
          "the baseline from the alternating timing (1.00 = as fast).")
    return table


def plot(results: dict, table: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_u, ax_loss, ax_val) = plt.subplots(1, 3, figsize=(15, 4))
    curve = sorted((t["rho"], t["val_bpb"]) for n, t in table.items() if not n.endswith("+mhc"))
    ax_u.plot(*zip(*curve), marker="o", color="tab:blue", label="MoE -> Engram (equal total and active)")
    for name, t in table.items():
        if name.endswith("+mhc"):
            ax_u.scatter([t["rho"]], [t["val_bpb"]], marker="*", s=150, color="tab:red", zorder=3,
                         label=f"{name} (+{(t['active'] - table['moe']['active']) / 1e6:.2f}M active)")
    ax_u.set(xlabel="rho: share of inactive parameters in Engram tables", ylabel="validation bits per byte",
             title="sparsity allocation")
    ax_u.legend(fontsize=8)
    colors = plt.cm.viridis([i / max(1, len(results) - 1) for i in range(len(results))])
    for color, (name, r) in zip(colors, results.items()):
        rows = [row for row in r["rows"] if "loss" in row]
        ax_loss.plot([row["step"] for row in rows], [row["loss"] for row in rows], color=color, label=name)
        ax_val.plot(*zip(*table[name]["val_curve"]), marker="o", color=color, label=name)
    ax_loss.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    ax_loss.legend(fontsize=8)
    ax_val.set(xlabel="step", ylabel="validation bits per byte", title="validation")
    ax_val.legend(fontsize=8)
    fig.suptitle(f"{args.steps} steps x {args.batch}x{args.seq} tokens per arm, same data order", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
