"""Training throughput of 1 process against 2 torchrun processes (FSDP2, and FSDP2 + expert parallelism).

    .venv/bin/python bench/bench_distributed.py                  # tiny preset, 8 steps per run
    .venv/bin/python bench/bench_distributed.py --preset small --steps 6 --threads 2

Every run is `seekling train` itself (one process, or `torch.distributed.run --nproc_per_node 2 -m
seekling train`) on the embedded corpus with the same global batch, fp32 and --threads threads per
process; tokens/s is the global figure the run logs, the median over its steps after the first two
(start-up, first all-gathers). On a CPU with as many cores as processes x threads the 2-process run
measures the cost of the collectives (gloo) against a second core's work; on a 2-core machine shared
with other jobs the numbers are noisy - compare within one run of this script, not across machines.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(name: str, nproc: int, ep: int, args, out: Path) -> dict:
    run_dir = out / name
    train = ["train", "--preset", args.preset, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--seq-len", str(args.seq_len), "--dtype", "float32", "--out", str(run_dir), "--eval-every", "0",
             "--ckpt-every", "0", "--warmup", "1"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "seekling", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "seekling", *train, "--ep", str(ep)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in rows if r["step"] > 2]
    return {"name": name, "procs": nproc, "ep": ep, "tok_s": statistics.median(tps), "wall": wall,
            "loss": rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (each of 2 ranks reads half)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows = [run("1 process", 1, 1, args, out), run("2 processes, FSDP2", 2, 1, args, out),
                run("2 processes, FSDP2 + EP 2", 2, 2, args, out)]
    base = rows[0]["tok_s"]
    print(f"{args.preset}, global batch {args.batch_size}x{args.seq_len}, fp32, {args.threads} thread(s) per process, "
          f"{args.steps} steps, {os.cpu_count()} CPUs")
    print(f"{'run':28} {'tok/s':>8} {'vs 1 proc':>10} {'wall s':>8} {'last loss':>10}")
    for r in rows:
        print(f"{r['name']:28} {r['tok_s']:8.0f} {r['tok_s'] / base:9.2f}x {r['wall']:8.1f} {r['loss']:10.4f}")


if __name__ == "__main__":
    main()
