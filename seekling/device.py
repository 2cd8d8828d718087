"""Facts about this machine that callers act on: what its matmul units are good at (so they pick a
fast compute dtype), its CPU flags, where derived files are cached, and the allocator setting that
CPU training wants.

bf16 is only fast on CPUs with native bf16 dot products (AMX or AVX512-BF16). On an AVX2-only CPU
PyTorch emulates it: measured here (AMD EPYC, AVX2) a bf16 matmul ran ~10x slower than fp32.
The flag alone is not enough: on an Intel Xeon (family 6 model 207) that reports avx512_bf16 but
no AMX, a 2048x256x768 bf16 matmul ran at half the fp32 speed (79 against 156 GFLOP/s, 1 thread)
and a tiny training step took 1.47x as long under bf16 autocast (1863 against 1274 ms), while on
a Zen 4 EPYC with the same flag bf16 was the faster. So a CPU with the flag is also timed once.
"""

import ctypes
import functools
import os
import platform
import time
from pathlib import Path

import torch


# A constant to torch.compile: reading /proc/cpuinfo inside a traced MoE forward was a graph break
# in every compiled bf16 training step.
@functools.cache
@torch.compiler.assume_constant_result  # on the wrapped function: Dynamo traces through functools.cache
def cpu_has_fast_bf16() -> bool:
    """Native bf16 dot products (AMX or AVX512-BF16) that also beat fp32 in a measured matmul."""
    return cpu_has_bf16_flag() and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def cpu_has_bf16_flag() -> bool:
    """/proc/cpuinfo lists amx_bf16 or avx512_bf16 (False where there is no /proc/cpuinfo)."""
    return any(flag in cpu_flags().split() for flag in ("amx_bf16", "avx512_bf16"))


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ('' where there is none)."""
    return _cpuinfo_line("flags", "Features")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    line = _cpuinfo_line("model name")
    return line.split(":", 1)[1].strip() if line else platform.processor() or platform.machine()


def _cpuinfo_line(*keys: str) -> str:
    """The first /proc/cpuinfo line that starts with one of keys ('' if none, or no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(keys)), "")
    except OSError:
        return ""


def cache_dir() -> Path:
    """Where seekling keeps what it derives on this machine (token shards, built kernels, measured peaks):
    $SEEKLING_CACHE, else $XDG_CACHE_HOME/seekling, else ~/.cache/seekling."""
    if env := os.environ.get("SEEKLING_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "seekling"


# bf16 autocast also pays casts and, in the MoE, oneDNN kernel builds (group_rows_multiple): a bf16
# matmul only a little faster than fp32 does not make a faster step. The two machines measured so
# far sit far from this line on either side (0.5x and well above it), so the choice does not flicker.
BF16_MIN_SPEEDUP = 1.2


@functools.cache
def bf16_matmul_speedup() -> float:
    """fp32 time / bf16 time of one 512x512x512 CPU matmul at the current thread count (best of 5; ~50 ms with the warm-up)."""
    return _best_matmul_s(torch.float32)[0] / _best_matmul_s(torch.bfloat16)[0]


def _best_matmul_s(dtype: torch.dtype) -> tuple[float, torch.dtype]:
    """The best of 5 times of one 512x512x512 CPU matmul in dtype, and the dtype the product came out in."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=g).to(dtype), torch.randn(512, 512, generator=g).to(dtype)
    # Autocast off: the first caller can be a MoE forward inside a bf16 autocast region, where the
    # "fp32" matmul would run in bf16 as well, the ratio come out near 1 and the experts then run in
    # fp32 for the rest of the process (seen: bench runs whose bf16 steps spent 300 ms in fp32 GEMMs).
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        for _ in range(3):  # the first calls pay thread start-up and (bf16) oneDNN's kernel build
            out = a @ b
        times = []
        for _ in range(5):
            t = time.perf_counter()
            out = a @ b
            times.append(time.perf_counter() - t)
    return min(times), out.dtype


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run a matmul in for activations of `dtype`: fp32 instead of emulated bf16/fp16."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_fast_bf16():
        return torch.float32
    return dtype


def group_rows_multiple(dtype: torch.dtype, device: torch.device) -> int:
    """Pad each expert's rows in a grouped GEMM to a multiple of this (1: no padding).

    On a CPU, bf16/fp16 matmuls go through oneDNN, which builds (JIT-compiles) a kernel for every new
    shape and caches it. Routed experts get a different number of rows every step, so nearly every
    per-expert GEMM paid that build: measured on a Zen 4 EPYC (AVX512-BF16, 1 thread), 256x256
    products over 900-1100 rows ran at 90 GFLOP/s with a new row count each call against 209 with a
    repeated one. Multiples of 32 leave at most 64 shapes per GEMM up to 2048 rows (the cache holds
    1024 kernels) for ~3% zero rows. fp32 runs through MKL's GEMM, which builds nothing.
    """
    return 32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1


def default_device() -> torch.device:
    """Where a new training run goes: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A training compute dtype by name; 'auto' is bf16 autocast only where the hardware has native bf16.

    On a CPU, 'auto' is bf16 only with AVX512-BF16 or AMX: everywhere else bf16 is emulated (see
    above) and fp32 is several times faster. On CUDA it is bf16 where the GPU supports it.
    """
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"unknown compute dtype {name!r}; use 'auto', 'float32' or 'bfloat16'")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks up to 256 MiB for reuse; True if it took the settings.

    By default every allocation above a (dynamic) threshold is a fresh mmap and every free returns it,
    so a training step that allocates a multi-megabyte activation pays page faults to touch it anew
    each time, and in a VM a page fault is dear. Measured (tiny + mHC, whose residual is 4x the plain
    one, 8x256 tokens, 1 thread, 2-core AMD EPYC VM): the mHC step 1659 -> 1620 ms, the plain one
    unchanged (1353 / 1360 ms). The cost: the process keeps its peak heap instead of handing freed
    memory back to the OS, which jemalloc and tcmalloc (what PyTorch's CPU tuning guide suggests
    preloading) also do. A no-op where the C library has no mallopt (macOS, musl).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 256 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
