"""FLOP accounting for MFU: this machine's measured matmul peak and the FLOPs of one trained token.

MFU here is measured against what a plain 1024^3 matmul achieves on this machine in the chosen
dtype, not against a datasheet number: CPUs have no datasheet peak that PyTorch can reach (and a
CPU without native bf16 emulates it, measured ~10-50x slower than fp32 on an AVX2 EPYC), so a
matmul benchmark is the honest ceiling. On GPUs the same measurement lands near the datasheet.
Left out: per-op roofline accounting (memory-bound ops are simply part of the gap to 100%).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from seekling.config import ModelConfig
from seekling.device import cache_dir, cpu_name
from seekling.model.engram import EngramConfig
from seekling.stats import model_stats

_PEAKS: dict[tuple[str, torch.dtype], float] = {}


def _peak_cache() -> Path:
    return cache_dir() / "peak_flops.json"


def _machine_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
        name += f" x{torch.get_num_threads()} threads"
    return f"{name} | torch {torch.__version__} | {str(dtype).removeprefix('torch.')}"


def measure_peak_flops(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """FLOP/s of a square matmul (up to 1024^3) in `dtype`: best of 5 here and of earlier runs on this machine.

    A busy machine measures low, which would inflate MFU; keeping the best measurement ever seen
    (in ~/.cache/seekling/peak_flops.json, keyed by CPU/GPU, threads, torch version and dtype) fixes that.
    """
    device = torch.device(device)
    key = (str(device), dtype)
    if key in _PEAKS:
        return _PEAKS[key]
    g = torch.Generator(device="cpu").manual_seed(0)

    def timed(n: int, reps: int) -> float:
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        # Warm up for 0.1 s: the first few matmuls of a process ran ~50x slower here (thread-pool
        # start, kernel selection, page faults) and a single warm-up call was not enough.
        until = time.perf_counter() + 0.1
        while time.perf_counter() < until:
            a @ b
        best = float("inf")
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return 2 * n**3 / best

    # Emulated bf16 can run at ~1 GFLOP/s: size the test from a small probe so it stays well under a second.
    if device.type == "cuda":
        n = 8192  # a GPU needs a big matmul to approach its peak; 1024^3 would be launch-bound
    else:
        probe = timed(256, 3)
        n = 1024 if probe > 2e10 else 512 if probe > 4e9 else 256
    measured = timed(n, 5)
    cache, name = _peak_cache(), _machine_key(device, dtype)
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    best = max(measured, float(known.get(name, 0.0)))
    if known.get(name) != best:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(known | {name: best}, indent=2) + "\n")
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home: the in-process value still serves
    _PEAKS[key] = best
    return best


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one trained token: 3x the forward (backward is ~2x), main model plus MTP depths."""
    fwd = model_stats(cfg, context=seq_len).flops_per_token
    if cfg.n_mtp_layers:
        # One MTP depth = one block (MoE unless the model has no experts) + the shared head, plus eh_proj (2D -> D).
        # (no Engram: MTP depths have none)
        block = cfg.replace(n_layers=1, n_dense_layers=0 if cfg.n_routed_experts else 1, n_mtp_layers=0,
                            engram=EngramConfig())
        fwd += cfg.n_mtp_layers * (model_stats(block, context=seq_len).flops_per_token + 2 * 2 * cfg.dim * cfg.dim)
    return 3 * fwd
