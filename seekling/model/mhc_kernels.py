"""mHC's fused CPU kernels (mhc_kernels.c) as PyTorch ops with their own backward.

Two ops cover a HyperConnection, one on each side of its sublayer:
    seekling::mhc_read    x, fn, base, scale -> y, post, mixed   (per block of 16 tokens in one
                          pass: RMS scale, projection, coefficients with Sinkhorn, the read y and
                          the mixed streams mixed_k = sum_j comb[j,k] x_j)
    seekling::mhc_write   mixed, f, post -> x' = mixed + post f
The HyperHead is mhc_read with head=True (M = n sigmoid weights, no post, mixing or Sinkhorn).
Each has a backward op; both are registered with torch.library, so they run eagerly and inside
torch.compile graphs alike (Inductor calls them as opaque kernels) with no graph break.

Measured, one HyperConnection's ops forward and backward at 2048 tokens, n = 4, D = 256, 1 thread of
a 2-core AMD EPYC (Zen 5), each timed alone (bench/bench_mhc.py --overhead, which also gives the
training-step figures): read 5.7 ms + write 2.6 ms, against 20.6 ms for the same work on PyTorch ops
(projection 7.2, coefficients 2.4, Sinkhorn 1.8, read 2.5, write 6.8) in an earlier run of the bench.

The C file is compiled once per machine with the system's C compiler (`cc`, or $CC; -O3
-march=native -fopenmp) into the cache (seekling.device.cache_dir(): ~/.cache/seekling/kernels),
named by a hash of the source, the flags and the CPU's feature flags, so a shared home directory
never hands a kernel built for one CPU to another. It is written to a temporary file and renamed into place,
so concurrent processes (torchrun) never load a half-written library. Without a compiler mHC still
runs, on PyTorch ops (mhc.py's autograd Functions), after one warning saying how to get the fast
path; SEEKLING_MHC_KERNELS=0 chooses that path for a process, `switched_off()` for a block.
Only CPU fp32 streams take this path: the fp32 residual of training and of fp32 inference.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from seekling.device import cache_dir, cpu_flags

_SOURCE = Path(__file__).with_name("mhc_kernels.c")
# -ffp-contract=fast: a * b + c as one fused multiply-add where the CPU has it (one rounding, not two).
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_lib: ctypes.CDLL | None = None
_state: str | None = None  # None: not tried; "ok"; otherwise why the kernels are off
_off = 0  # > 0 inside switched_off()


def _build(cc: str) -> Path:
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join((cc,) + _FLAGS).encode() + cpu_flags().encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"mhc_kernels_{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _load() -> None:
    global _lib, _state
    if os.environ.get("SEEKLING_MHC_KERNELS", "1") == "0":
        _state = "switched off by SEEKLING_MHC_KERNELS=0"  # asked for: no warning
        return
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        _state = f"no C compiler ({cc!r} is not on PATH)"
    else:
        try:
            _lib = ctypes.CDLL(str(_build(cc)))
            _state = "ok"
        except (OSError, RuntimeError) as e:
            _state = f"building {_SOURCE.name} failed: {e}"
    if _state != "ok":
        warnings.warn(f"mHC's fused CPU kernels are off: {_state}. mHC runs on PyTorch ops instead, which "
                      f"costs more (bench/bench_mhc.py --overhead measures both); install a C compiler with "
                      f"OpenMP (gcc) or set CC to one.", stacklevel=3)
        return
    P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "hc_read_fwd": [P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, F, F, I, I],
        "hc_read_bwd": [P, P, P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, F, I, I],
        "hc_write_fwd": [P, P, P, P, P, I64, I64, I64, I],
        "hc_write_bwd": [P, P, P, P, P, P, P, I64, I64, I64, I],
    }
    for name, argtypes in signatures.items():
        getattr(_lib, name).argtypes = argtypes
        getattr(_lib, name).restype = I if name.startswith("hc_read") else None


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the fused kernels are built and loaded (builds them on the first call)."""
    if _state is None:
        _load()
    return _state == "ok"


def status() -> str:
    """'ok', or why the kernels are off."""
    available()
    return _state


def applies(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether the kernels can take these streams: fp32 on the CPU, fp32 parameters, built here."""
    return (not _off and x.device.type == "cpu" and x.dtype == torch.float32
            and all(p.dtype == torch.float32 for p in params) and available())


@contextlib.contextmanager
def switched_off():
    """mHC on PyTorch ops for the duration, in this process (bench/bench_mhc.py and the tests compare
    the two paths). A graph torch.compile captured before keeps what it captured."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def _check(*tensors: torch.Tensor) -> None:
    if not available():  # builds and loads them on first use
        raise RuntimeError(f"mHC's CPU kernels are not available here: {_state}")
    # The C code reads raw fp32 memory: anything else would be silently wrong numbers.
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise TypeError(f"mHC's CPU kernels take fp32 CPU tensors, got {t.dtype} on {t.device}; "
                            "mhc.py routes other dtypes and devices to its PyTorch path (see applies())")


def _p(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _call(name: str, *args) -> None:
    if getattr(_lib, name)(*args, torch.get_num_threads()):
        raise MemoryError(f"mHC kernel {name}: could not allocate its per-thread scratch")


def _call_void(name: str, *args) -> None:
    getattr(_lib, name)(*args, torch.get_num_threads())


# ---------------------------------------------------------------- read: x -> (y, post, mixed)

@torch.library.custom_op("seekling::mhc_read", mutates_args=())
def _read(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int, hc_eps: float,
          norm_eps: float, head: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, torch.Tensor]:
    *lead, n, D = x.shape
    N, M, m = x.numel() // (n * D), fn.shape[0], 0 if head else n
    y, pre, post, mixed = x.new_empty(N, D), x.new_empty(N, n), x.new_empty(N, m), x.new_empty(N, m, D)
    raw, r = x.new_empty(N, M), x.new_empty(N)
    _call("hc_read_fwd", _p(x), _p(fn), _p(base), _p(scale), _p(y), _p(pre), _p(post), _p(mixed), _p(raw), _p(r),
          N, n, D, iters, hc_eps, norm_eps, int(head))
    return (y.view(*lead, D), post.view(*lead, m), mixed.view(*lead, m, D), pre, raw, r)


@_read.register_fake
def _(x, fn, base, scale, iters, hc_eps, norm_eps, head):
    *lead, n, D = x.shape
    N, m = x.numel() // (n * D), 0 if head else n
    return (x.new_empty(*lead, D), x.new_empty(*lead, m), x.new_empty(*lead, m, D), x.new_empty(N, n),
            x.new_empty(N, fn.shape[0]), x.new_empty(N))


_CHUNK = 256  # tokens per partial sum of the parameters' gradients (CHUNK in mhc_kernels.c)


@torch.library.custom_op("seekling::mhc_read_backward", mutates_args=())
def _read_backward(gy: torch.Tensor, gpost: torch.Tensor, gmixed: torch.Tensor, x: torch.Tensor, fn: torch.Tensor,
                   base: torch.Tensor, scale: torch.Tensor, pre: torch.Tensor, raw: torch.Tensor, r: torch.Tensor,
                   iters: int, hc_eps: float, head: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    *lead, n, D = x.shape
    N, (M, K) = x.numel() // (n * D), fn.shape
    gy, gpost, gmixed = gy.contiguous(), gpost.contiguous(), gmixed.contiguous()
    gx = torch.empty_like(x)
    parts = x.new_zeros(-(-N // _CHUNK), M * K + 2 * M)  # per chunk of tokens: fn's, base's, scale's gradients
    _call("hc_read_bwd", _p(x), _p(fn), _p(base), _p(scale), _p(pre), _p(raw), _p(r), _p(gy), _p(gmixed), _p(gpost),
          _p(gx), _p(parts), N, n, D, iters, hc_eps, int(head))
    total = parts[0]
    gfn, gbase, gs = total[:M * K].view(M, K).clone(), total[M * K:M * K + M].clone(), total[M * K + M:]
    # scale[0] multiplies the pre logits, [1] the post ones, [2] comb's (the head has one scale for all)
    gscale = gs.sum(0, keepdim=True) if head else torch.stack([gs[:n].sum(), gs[n:2 * n].sum(), gs[2 * n:].sum()])
    return gx, gfn, gbase, gscale


@_read_backward.register_fake
def _(gy, gpost, gmixed, x, fn, base, scale, pre, raw, r, iters, hc_eps, head):
    return torch.empty_like(x), torch.empty_like(fn), torch.empty_like(base), torch.empty_like(scale)


def _read_setup(ctx, inputs, output):
    x, fn, base, scale, iters, hc_eps, _, head = inputs
    _, _, _, pre, raw, r = output
    ctx.save_for_backward(x, fn, base, scale, pre, raw, r)
    ctx.args = iters, hc_eps, head


def _read_grad(ctx, gy, gpost, gmixed, *_):
    x, fn, base, scale, pre, raw, r = ctx.saved_tensors
    iters, hc_eps, head = ctx.args
    *lead, n, D = x.shape
    m = 0 if head else n
    gy = x.new_zeros(*lead, D) if gy is None else gy
    gpost = x.new_zeros(*lead, m) if gpost is None else gpost
    gmixed = x.new_zeros(*lead, m, D) if gmixed is None else gmixed
    gx, gfn, gbase, gscale = _read_backward(gy, gpost, gmixed, x, fn, base, scale, pre, raw, r, iters, hc_eps, head)
    return gx, gfn, gbase, gscale, None, None, None, None


_read.register_autograd(_read_grad, setup_context=_read_setup)


def read(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, sinkhorn_iters: int,
         hc_eps: float, norm_eps: float, head: bool = False):
    """Streams x (B,T,n,D) -> y (B,T,D), post (B,T,n) and the mixed streams sum_j comb[j,k] x_j
    (B,T,n,D) that `write` adds the sublayer's output to (head: y only, as a 1-tuple)."""
    _check(x, fn, base, scale)
    y, post, mixed, *_ = _read(x.contiguous(), fn.contiguous(), base.contiguous(), scale.contiguous(),
                               sinkhorn_iters, hc_eps, norm_eps, head)
    return (y,) if head else (y, post, mixed)


# ---------------------------------------------------------------- write: x'_k = mixed_k + post_k f

def _f_pointers(f: torch.Tensor) -> tuple:
    """The write's f as the C code takes it: an fp32 pointer or a bf16 one, the other NULL."""
    return (_p(f), None) if f.dtype == torch.float32 else (None, _p(f))


@torch.library.custom_op("seekling::mhc_write", mutates_args=())
def _write(mixed: torch.Tensor, f: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    *_, n, D = mixed.shape
    out = torch.empty_like(mixed)
    _call_void("hc_write_fwd", _p(mixed), *_f_pointers(f), _p(post), _p(out), mixed.numel() // (n * D), n, D)
    return out


@_write.register_fake
def _(mixed, f, post):
    return torch.empty_like(mixed)


@torch.library.custom_op("seekling::mhc_write_backward", mutates_args=())
def _write_backward(g: torch.Tensor, f: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    *_, n, D = g.shape
    g = g.contiguous()
    gf, gpost = torch.empty_like(f), torch.empty_like(post)  # gf in f's dtype (fp32 or bf16)
    _call_void("hc_write_bwd", _p(g), *_f_pointers(f), _p(post), *_f_pointers(gf), _p(gpost), g.numel() // (n * D),
               n, D)
    return gf, gpost


@_write_backward.register_fake
def _(g, f, post):
    return torch.empty_like(f), torch.empty_like(post)


def _write_setup(ctx, inputs, output):
    _, f, post = inputs
    ctx.save_for_backward(f, post)


def _write_grad(ctx, g):
    gf, gpost = _write_backward(g, *ctx.saved_tensors)
    return g, gf, gpost  # x' = mixed + post f: the mixed streams' gradient is g itself


_write.register_autograd(_write_grad, setup_context=_write_setup)


def write(mixed: torch.Tensor, f: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """x'_k = mixed_k + post_k f for the fp32 mixed streams (B,T,n,D) of `read`; f (B,T,D) in any dtype
    (fp32 and bf16 as they are, with f's gradient in its dtype; others through an fp32 copy)."""
    _check(mixed, post)
    if f.dtype not in (torch.float32, torch.bfloat16) or f.device.type != "cpu":
        f = f.float()
    return _write(mixed.contiguous(), f.contiguous(), post.contiguous())
