"""mHC's fused CPU kernels (mhc_kernels.c) as PyTorch ops with their own backward.

Two ops cover a HyperConnection, one on each side of its sublayer:
    seekling::mhc_read    x, fn, base, scale -> y, post, comb   (RMS scale, projection GEMM,
                          coefficients with Sinkhorn, read: one kernel each, the GEMM by PyTorch)
    seekling::mhc_write   x, f, post, comb -> x'
The HyperHead is mhc_read with head=True (M = n sigmoid weights, no post, comb or Sinkhorn).
Each has a backward op; both are registered with torch.library, so they run eagerly and inside
torch.compile graphs alike (Inductor calls them as opaque kernels) with no graph break.

Measured, one HyperConnection read + write forward and backward at 2048 tokens, n = 4, D = 256,
1 thread of a 2-core AMD EPYC (Zen 5), median of 40 interleaved: 18.1 ms against 27.3 ms on PyTorch
ops, of which the three projection GEMMs are ~6 ms either way. bench/bench_mhc.py --overhead gives
the training-step figures.

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
        "hc_read_fwd": [P, P, P, I64, I64, I64, I],
        "hc_read_bwd_w": [P, P, P, I64, I64, I64, I],
        "hc_read_bwd_x": [P, P, P, P, P, I64, I64, I64, I],
        "hc_write_fwd": [P, P, P, P, P, I64, I64, I64, I],
        "hc_write_bwd": [P, P, P, P, P, P, P, P, P, I64, I64, I64, I],
        "hc_coeffs_fwd": [P, P, P, P, P, P, P, I64, I64, I64, F, I, I],
        "hc_coeffs_bwd": [P, P, P, P, P, P, P, P, I64, I64, I64, F, I, I],
    }
    for name, argtypes in signatures.items():
        getattr(_lib, name).argtypes = argtypes
        getattr(_lib, name).restype = I if name.startswith("hc_coeffs") else None


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


def _segment_scale(scale: torch.Tensor, n: int, head: bool) -> torch.Tensor:
    """scale broadcast to the M logits: pre | post | comb use scale[0] | [1] | [2]; the head has one scale."""
    if head:
        return scale.expand(n)
    return torch.cat([scale[0].expand(n), scale[1].expand(n), scale[2].expand(n * n)])


# ---------------------------------------------------------------- read: x -> (y, post, comb)

@torch.library.custom_op("seekling::mhc_read", mutates_args=())
def _read(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int, hc_eps: float,
          norm_eps: float, head: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, torch.Tensor]:
    *lead, n, D = x.shape
    N = x.numel() // (n * D)
    flat = x.reshape(N, n * D)
    r = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1).square() / (n * D) + norm_eps)
    raw = flat @ fn.t()  # (N, M)
    pre = x.new_empty(N, n)
    post = x.new_empty(N, 0 if head else n)
    comb = x.new_empty(N, 0 if head else n, 0 if head else n)
    _call("hc_coeffs_fwd", _p(raw), _p(r), _p(base), _p(scale), _p(pre), _p(post), _p(comb), N, n, iters,
          hc_eps, int(head))
    y = x.new_empty(N, D)
    _call_void("hc_read_fwd", _p(flat), _p(pre), _p(y), N, n, D)
    return (y.view(*lead, D), post.view(*lead, post.shape[-1]), comb.view(*lead, *comb.shape[1:]), pre, raw, r)


@_read.register_fake
def _(x, fn, base, scale, iters, hc_eps, norm_eps, head):
    *lead, n, D = x.shape
    N, m = x.numel() // (n * D), 0 if head else n
    return (x.new_empty(*lead, D), x.new_empty(*lead, m), x.new_empty(*lead, m, m), x.new_empty(N, n),
            x.new_empty(N, fn.shape[0]), x.new_empty(N))


@torch.library.custom_op("seekling::mhc_read_backward", mutates_args=())
def _read_backward(gy: torch.Tensor, gpost: torch.Tensor, gcomb: torch.Tensor, x: torch.Tensor, fn: torch.Tensor,
                   base: torch.Tensor, scale: torch.Tensor, pre: torch.Tensor, raw: torch.Tensor, r: torch.Tensor,
                   iters: int, hc_eps: float, head: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    *lead, n, D = x.shape
    N, K = x.numel() // (n * D), n * D
    flat, gy = x.reshape(N, K), gy.reshape(N, D).contiguous()
    gpre = x.new_empty(N, n)
    _call_void("hc_read_bwd_w", _p(flat), _p(gy), _p(gpre), N, n, D)
    gz = x.new_empty(raw.shape)  # dL/d(logits), per token
    gpost, gcomb = gpost.reshape(N, -1).contiguous(), gcomb.reshape(N, -1).contiguous()
    _call("hc_coeffs_bwd", _p(raw), _p(r), _p(base), _p(scale), _p(gpre), _p(gpost), _p(gcomb), _p(gz), N, n,
          iters, hc_eps, int(head))
    s = _segment_scale(scale, n, head)
    mixes = raw * r.unsqueeze(-1)
    gbase = gz.sum(0)
    gs = (gz * mixes).sum(0)
    gscale = gs.sum(0, keepdim=True) if head else torch.stack([gs[:n].sum(), gs[n:2 * n].sum(), gs[2 * n:].sum()])
    gmix = gz * s
    g_raw = gmix * r.unsqueeze(-1)
    # The RMS scale r = (|x|^2/K + eps)^-1/2: dr/dx = -r^3 x / K, times sum_m gmix_m raw_m.
    coef = (gmix * raw).sum(-1) * r.pow(3) / -K
    gx = g_raw @ fn  # (N, K), then the read's and the scale's terms added in place
    _call_void("hc_read_bwd_x", _p(gx), _p(flat), _p(gy), _p(pre), _p(coef), N, n, D)
    gfn = g_raw.t() @ flat
    return gx.view(x.shape), gfn, gbase, gscale


@_read_backward.register_fake
def _(gy, gpost, gcomb, x, fn, base, scale, pre, raw, r, iters, hc_eps, head):
    return torch.empty_like(x), torch.empty_like(fn), torch.empty_like(base), torch.empty_like(scale)


def _read_setup(ctx, inputs, output):
    x, fn, base, scale, iters, hc_eps, _, head = inputs
    _, _, _, pre, raw, r = output
    ctx.save_for_backward(x, fn, base, scale, pre, raw, r)
    ctx.args = iters, hc_eps, head


def _read_grad(ctx, gy, gpost, gcomb, *_):
    x, fn, base, scale, pre, raw, r = ctx.saved_tensors
    iters, hc_eps, head = ctx.args
    *lead, n, D = x.shape
    m = 0 if head else n
    gy = x.new_zeros(*lead, D) if gy is None else gy
    gpost = x.new_zeros(*lead, m) if gpost is None else gpost
    gcomb = x.new_zeros(*lead, m, m) if gcomb is None else gcomb
    gx, gfn, gbase, gscale = _read_backward(gy, gpost, gcomb, x, fn, base, scale, pre, raw, r, iters, hc_eps, head)
    return gx, gfn, gbase, gscale, None, None, None, None


_read.register_autograd(_read_grad, setup_context=_read_setup)


def read(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, sinkhorn_iters: int,
         hc_eps: float, norm_eps: float, head: bool = False):
    """Streams x (B,T,n,D) -> y (B,T,D), post (B,T,n), comb (B,T,n,n) (head: y only, as a 1-tuple)."""
    _check(x, fn, base, scale)
    y, post, comb, *_ = _read(x.contiguous(), fn.contiguous(), base.contiguous(), scale.contiguous(), sinkhorn_iters,
                              hc_eps, norm_eps, head)
    return (y,) if head else (y, post, comb)


# ---------------------------------------------------------------- write: x'_k = post_k f + sum_j comb[j,k] x_j

@torch.library.custom_op("seekling::mhc_write", mutates_args=())
def _write(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    *_, n, D = x.shape
    out = torch.empty_like(x)
    _call_void("hc_write_fwd", _p(x), _p(f), _p(post), _p(comb), _p(out), x.numel() // (n * D), n, D)
    return out


@_write.register_fake
def _(x, f, post, comb):
    return torch.empty_like(x)


@torch.library.custom_op("seekling::mhc_write_backward", mutates_args=())
def _write_backward(g: torch.Tensor, x: torch.Tensor, f: torch.Tensor, post: torch.Tensor,
                    comb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    *_, n, D = x.shape
    g = g.contiguous()
    gx, gf, gpost, gcomb = torch.empty_like(x), torch.empty_like(f), torch.empty_like(post), torch.empty_like(comb)
    _call_void("hc_write_bwd", _p(g), _p(x), _p(f), _p(post), _p(comb), _p(gx), _p(gf), _p(gpost), _p(gcomb),
               x.numel() // (n * D), n, D)
    return gx, gf, gpost, gcomb


@_write_backward.register_fake
def _(g, x, f, post, comb):
    return torch.empty_like(x), torch.empty_like(f), torch.empty_like(post), torch.empty_like(comb)


def _write_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _write_grad(ctx, g):
    return _write_backward(g, *ctx.saved_tensors)


_write.register_autograd(_write_grad, setup_context=_write_setup)


def write(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """x'_k = post_k f + sum_j comb[j,k] x_j for fp32 streams x (B,T,n,D); f (B,T,D) in any dtype."""
    _check(x, post, comb)
    return _write(x.contiguous(), f.float().contiguous(), post.contiguous(), comb.contiguous())
