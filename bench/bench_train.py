"""Training throughput: seekling vs transformers' DeepseekV3ForCausalLM, same config, same weights.

    python bench/bench_train.py [--preset tiny] [--batch 8] [--seq 256] [--dtype auto] [--rounds 8] [--compile]

One "step" is what a trainer does per optimizer step: forward, next-token cross-entropy,
backward, grad clipping, AdamW (foreach) and zero_grad; seekling's step also runs its router trace
and the aux-loss-free bias update. MTP is off on both sides (transformers does not train it); a
third row shows seekling's step with the preset's MTP depth on, as the trainer runs it by default.
Rounds are interleaved (A, B, A, B, ...) after warm-up, and the median kept, so a busy machine
slows every contestant alike. MFU is against this machine's measured matmul peak in the same dtype.
"""

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from seekling.model.moe import RouterTrace
from seekling.model.transformer import Transformer
from seekling.presets import get_preset
from seekling.train.balance import update_expert_bias
from seekling.train.config import TrainConfig
from seekling.train.optim import build_optimizer
from seekling.train.speed import (
    autocast,
    compile_model,
    measure_peak_flops,
    resolve_dtype,
    train_flops_per_token,
)
from seekling.train.trainer import compute_loss


def seekling_step(model, opt, cfg, x, y, dtype):
    trace = RouterTrace()
    with autocast(dtype, x.device):
        loss, _, _ = compute_loss(model, x, y, trace, cfg)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if trace.layers:
        update_expert_bias(model, trace.expert_counts(), 1e-3)


def hf_step(model, opt, x, y, dtype):
    with autocast(dtype, x.device):
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time seekling with torch.compile (cold compile ~1 min on CPU)")
    args = ap.parse_args()
    from transformers import DeepseekV3ForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    cfg_mtp = get_preset(args.preset)
    cfg = cfg_mtp.replace(n_mtp_layers=0)
    tcfg = TrainConfig(model=cfg, batch_size=args.batch, seq_len=args.seq, max_steps=10, warmup_steps=0)
    tcfg_mtp = tcfg.replace(model=cfg_mtp)

    ours = Transformer(cfg)
    ours.init_weights(0)
    with tempfile.TemporaryDirectory() as d:
        ours.save(d)
        theirs = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    ours_mtp = Transformer(cfg_mtp)
    ours_mtp.init_weights(0)
    contestants = {
        "seekling": (ours, lambda m, o, x, y: seekling_step(m, o, tcfg, x, y, dtype)),
        "transformers": (theirs, lambda m, o, x, y: hf_step(m, o, x, y, dtype)),
        "seekling +MTP": (ours_mtp, lambda m, o, x, y: seekling_step(m, o, tcfg_mtp, x, y, dtype)),
    }
    if args.compile:
        compiled = copy.deepcopy(ours)
        compile_model(compiled)
        contestants["seekling compiled"] = (compiled, contestants["seekling"][1])
    runs = {}
    for name, (model, fn) in contestants.items():
        model.to(device).train()
        runs[name] = (model, build_optimizer(model, tcfg), fn)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    times = {name: [] for name in runs}
    for r in range(args.warmup + args.rounds):
        for name, (model, opt, fn) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(model, opt, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)

    peak = measure_peak_flops(dtype, device)
    bf16_peak = measure_peak_flops(torch.bfloat16, device)
    tokens = args.batch * args.seq
    base = statistics.median(times["transformers"])
    print(f"\npreset {args.preset}, batch {args.batch}x{args.seq}, {str(dtype).removeprefix('torch.')} on {device.type}, "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up; matmul peak {peak / 1e12:.3f} TFLOP/s "
          f"(bf16: {bf16_peak / 1e12:.3f})\n")
    print(f"{'':<20}{'median step':>12}{'best step':>11}{'tokens/s':>10}{'MFU':>7}{'vs transformers':>17}")
    for name, ts in times.items():
        med = statistics.median(ts)
        flops = train_flops_per_token(cfg_mtp if "MTP" in name else cfg, args.seq)
        print(f"{name:<20}{med * 1e3:>10.0f}ms{min(ts) * 1e3:>9.0f}ms{tokens / med:>10,.0f}"
              f"{tokens / med * flops / peak:>7.1%}{base / med:>16.2f}x")


if __name__ == "__main__":
    main()
