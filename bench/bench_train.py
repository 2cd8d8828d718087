"""Training throughput: seekling vs transformers' DeepseekV3ForCausalLM, same config, same weights.

    python bench/bench_train.py [--preset tiny] [--batch 8] [--seq 256] [--dtype float32,bfloat16] [--rounds 8] [--compile]

One "step" is what a trainer does per optimizer step: forward, next-token cross-entropy,
backward, grad clipping, AdamW (fused) and zero_grad; seekling's step (train/core.py) also runs its router trace
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

from seekling.checkpoint import save
from seekling.device import default_device, resolve_dtype
from seekling.model.transformer import Transformer
from seekling.presets import get_preset
from seekling.train.config import TrainConfig
from seekling.train.core import autocast
from seekling.train.flops import measure_peak_flops, train_flops_per_token
from seekling.train.optim import build_optimizer
from seekling.train.trainer import pretraining_step


def seekling_step(model, tcfg, dtype, compile=False):
    """The trainer's own step (train/core.py), as `seekling train` runs it."""
    step = pretraining_step(model, tcfg.replace(compile=compile), dtype)
    return lambda x, y: step([(x, y)])


def hf_step(model, opt, dtype):
    return lambda x, y: _hf_step(model, opt, x, y, dtype)


def _hf_step(model, opt, x, y, dtype):
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
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, or several joined by commas "
                    "(e.g. float32,bfloat16: every contestant in each dtype, interleaved, and the bf16/fp32 ratio)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time seekling with torch.compile (cold compile ~1 min on CPU)")
    ap.add_argument("--no-mtp", action="store_true", help="skip the seekling +MTP row")
    args = ap.parse_args()
    from transformers import DeepseekV3ForCausalLM

    device = torch.device(args.device) if args.device else default_device()
    dtypes = list(dict.fromkeys(resolve_dtype(d.strip(), device) for d in args.dtype.split(",")))
    cfg_mtp = get_preset(args.preset)
    cfg = cfg_mtp.replace(n_mtp_layers=0)
    tcfg = TrainConfig(model=cfg, batch_size=args.batch, seq_len=args.seq, max_steps=10, warmup_steps=0)
    tcfg_mtp = tcfg.replace(model=cfg_mtp)

    ours = Transformer(cfg)
    ours.init_weights(0)
    with tempfile.TemporaryDirectory() as d:
        save(ours, d)
        theirs = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    ours_mtp = Transformer(cfg_mtp)
    ours_mtp.init_weights(0)
    runs = {}  # (name, dtype) -> step function; every contestant has its own copy of the weights
    for dtype in dtypes:
        tag = str(dtype).removeprefix("torch.")
        runs[("seekling", tag)] = seekling_step(copy.deepcopy(ours).to(device).train(), tcfg, dtype)
        hf = copy.deepcopy(theirs).to(device).train()
        runs[("transformers", tag)] = hf_step(hf, build_optimizer(hf, tcfg), dtype)
        if not args.no_mtp:
            runs[("seekling +MTP", tag)] = seekling_step(copy.deepcopy(ours_mtp).to(device).train(), tcfg_mtp, dtype)
        if args.compile:
            runs[("seekling compiled", tag)] = seekling_step(copy.deepcopy(ours).to(device).train(), tcfg, dtype,
                                                             compile=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    times = {key: [] for key in runs}
    for r in range(args.warmup + args.rounds):
        for key, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= args.warmup:
                times[key].append(time.perf_counter() - t)

    peaks = {str(d).removeprefix("torch."): measure_peak_flops(d, device) for d in (torch.float32, torch.bfloat16)}
    tokens = args.batch * args.seq
    med = {key: statistics.median(ts) for key, ts in times.items()}
    print(f"\npreset {args.preset}, batch {args.batch}x{args.seq} on {device.type}, {args.rounds} interleaved rounds "
          f"after {args.warmup} warm-up; measured matmul peak "
          + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()) + "\n")
    print("| contestant | dtype | median step ms | best step ms | tokens/s | MFU | vs transformers | vs fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (name, tag), ts in times.items():
        flops = train_flops_per_token(cfg_mtp if "MTP" in name else cfg, args.seq)
        fp32 = med.get((name, "float32"))
        print(f"| {name} | {tag} | {med[(name, tag)] * 1e3:.0f} | {min(ts) * 1e3:.0f} | {tokens / med[(name, tag)]:,.0f} "
              f"| {tokens / med[(name, tag)] * flops / peaks[tag]:.1%} | {med[('transformers', tag)] / med[(name, tag)]:.2f}x "
              f"| {f'{fp32 / med[(name, tag)]:.2f}x' if fp32 else '-'} |")


if __name__ == "__main__":
    main()
