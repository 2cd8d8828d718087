"""One MoE layer, forward + backward: seekling vs transformers' DeepseekV3MoE on identical weights and input.

    python bench/bench_moe.py [--tokens 4096] [--repeats 5]

Defaults follow the core issue: 64 routed experts, top-6, hidden 256, expert width 128, 4096
tokens, 1 shared expert; bf16 and fp32; transformers' default grouped_mm experts path and its
eager per-expert loop. Rounds are interleaved (A, B, C, A, B, C, ...) and the median kept, so a
busy machine slows every contestant alike. Prints ms per forward+backward and speed ratios.
"""

import argparse
import statistics
import time

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from seekling.checkpoint import config_to_hf
from seekling.config import ModelConfig
from seekling.model.moe import MoE


def build(cfg: ModelConfig, dtype):
    ours = MoE(cfg, 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        ours.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.01)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")})
    theirs = {}
    for impl in ("grouped_mm", "eager"):
        hf_cfg._experts_implementation = impl
        m = DeepseekV3MoE(hf_cfg)
        with torch.no_grad():
            m.gate.weight.copy_(ours.gate.weight)
            m.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
            m.experts.gate_up_proj.copy_(ours.experts.w13)
            m.experts.down_proj.copy_(ours.experts.w2)
            m.shared_experts.gate_proj.weight.copy_(ours.shared_experts.w1.weight)
            m.shared_experts.up_proj.weight.copy_(ours.shared_experts.w3.weight)
            m.shared_experts.down_proj.weight.copy_(ours.shared_experts.w2.weight)
        theirs[impl] = m
    # the router stays fp32 in both (transformers keeps e_score_correction_bias in fp32 too)
    mods = {"seekling": ours, "transformers grouped_mm": theirs["grouped_mm"], "transformers eager loop": theirs["eager"]}
    for m in mods.values():
        m.to(dtype)
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.data = b.data.float()
    return mods


def step(module, x, grad):
    x = x.detach().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    cfg = ModelConfig(dim=256, moe_inter_dim=128, n_routed_experts=64, n_activated_experts=6, n_shared_experts=1,
                      n_layers=1, n_dense_layers=0, n_expert_groups=1, n_limited_groups=1, route_scale=2.5)
    print(f"MoE layer fwd+bwd: {cfg.n_routed_experts} experts top-{cfg.n_activated_experts}, hidden {cfg.dim}, "
          f"expert width {cfg.moe_inter_dim}, {args.tokens} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    rows = []
    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        mods = build(cfg, dtype)
        x = torch.randn(1, args.tokens, cfg.dim, generator=torch.Generator().manual_seed(1)).to(dtype)
        grad = torch.randn(1, args.tokens, cfg.dim, generator=torch.Generator().manual_seed(2)).to(dtype)
        outs = {n: step(m, x, grad).detach().float() for n, m in mods.items()}  # warm-up, and a correctness check
        ref = outs["transformers eager loop"]
        times = {n: [] for n in mods}
        for _ in range(args.repeats):
            for n, m in mods.items():
                t0 = time.perf_counter()
                step(m, x, grad)
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        for n in mods:
            err = (outs[n] - ref).abs().max().item() / ref.abs().max().item()
            rows.append((dt_name, n, med[n], med["transformers grouped_mm"] / med[n], med["transformers eager loop"] / med[n], err))
    print(f"\n{'dtype':9} {'implementation':26} {'ms fwd+bwd':>11} {'vs tf grouped':>14} {'vs tf eager':>12} {'rel.err vs eager':>17}")
    for r in rows:
        print(f"{r[0]:9} {r[1]:26} {r[2]:11.1f} {r[3]:13.2f}x {r[4]:11.2f}x {r[5]:17.1e}")


if __name__ == "__main__":
    main()
