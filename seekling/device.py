"""What this machine's matmul units are good at, so callers pick a fast compute dtype.

bf16 is only fast on CPUs with native bf16 dot products (AMX or AVX512-BF16). On an AVX2-only CPU
PyTorch emulates it: measured here (AMD EPYC, AVX2) a bf16 matmul ran ~10x slower than fp32.
"""

import functools

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run a matmul in for activations of `dtype`: fp32 instead of emulated bf16/fp16."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_fast_bf16():
        return torch.float32
    return dtype
