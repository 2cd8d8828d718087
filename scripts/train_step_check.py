"""One device's training speed and memory for a preset: tokens/s, MFU and peak memory of `seekling train`'s step.

    python scripts/train_step_check.py --preset gpu_1b --batch 8 --seq 2048 --steps 6   # on a GPU, bf16
    python scripts/train_step_check.py --preset tiny --device cpu --dtype float32 --steps 3   # a dry run

The step is trainer.pretraining_step (the one `seekling train` runs: next-token + MTP loss, clip,
fused AdamW, expert-bias update) over random token ids, so no corpus or tokenizer is involved.
The first two steps (allocator warm-up, kernel selection) are not timed. MFU is 6N-style training
FLOPs per token (train/flops.py) times tokens/s over the matmul peak measured on this device in the
same dtype (and, on a known GPU, against its data-sheet bf16 peak). Peak memory is torch.cuda.max_memory_allocated (on a CPU: the process's max RSS).
Prints one JSON line (also written to --json).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from seekling.device import default_device
from seekling.model.transformer import Transformer
from seekling.train.config import train_preset
from seekling.train.flops import measure_peak_flops, train_flops_per_token
from seekling.train.trainer import pretraining_step

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (without sparsity): the measured peak above
# comes from a 1024^3 matmul, which does not fill a large GPU, so MFU is also given against these.
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu_1b")
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 2 untimed)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()

    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype)
    cfg = train_preset(args.preset, batch_size=args.batch, seq_len=args.seq, grad_accum=args.accum,
                       max_steps=args.steps + 2, warmup_steps=1)
    model_cfg = cfg.model_config
    model = Transformer(model_cfg)
    model.init_weights(0)
    model.to(device).train()
    step = pretraining_step(model, cfg, dtype)
    gen = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(0, model_cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        return ids[:, :-1], ids[:, 1:]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        metrics = step([batch() for _ in range(args.accum)], lr=cfg.lr)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        metrics = step([batch() for _ in range(args.accum)], lr=cfg.lr)
    sync()
    seconds = time.perf_counter() - t0
    tok_s = args.steps * cfg.tokens_per_step / seconds
    flops = train_flops_per_token(model_cfg, args.seq)
    peak = measure_peak_flops(dtype, device)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device)
        name = torch.cuda.get_device_name(device)
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        name = "cpu"
    out = {"preset": args.preset, "device": name, "dtype": args.dtype, "params": model.num_params(),
           "active_params": model.num_params(active=True), "micro_batch": [args.batch, args.seq], "accum": args.accum,
           "tok_s": round(tok_s, 1), "ms_per_step": round(1000 * seconds / args.steps, 1),
           "mfu": round(tok_s * flops / peak, 4), "peak_tflops": round(peak / 1e12, 1),
           "peak_mem_gib": round(peak_mem / 2**30, 2), "loss": round(metrics["loss"], 4)}
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)
    if spec and dtype == torch.bfloat16:
        out["mfu_vs_spec"] = round(tok_s * flops / (spec * 1e12), 4)
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
