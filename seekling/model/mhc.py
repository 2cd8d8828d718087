"""Manifold-constrained hyper-connections (mHC): n residual streams, mixed around every sublayer.

Xie et al., "mHC: Manifold-Constrained Hyper-Connections" (arXiv 2512.24880), in the form
DeepSeek-V4 runs it; transformers 5.23's `DeepseekV4HyperConnection` and `DeepseekV4HyperHead`
are the oracle that tests/test_mhc.py compares against.

Shapes: B batch, T tokens, n = hc_mult streams, D model dim, M = (2 + n) * n mixing outputs.

The residual x (B,T,n,D) starts as n copies of the embedding. Around each sublayer F (attention,
FFN), a HyperConnection computes from all n streams of a token, per token:
    pre  (n)    F reads  y = sum_j pre_j x_j                      (through its usual RMSNorm)
    post (n)    F's output is written back as  x'_k = post_k F(y) + sum_j comb[j,k] x_j
    comb (n,n)  the streams' own mixing; comb is not symmetric, so the index order matters.
comb is projected onto (nearly) doubly-stochastic matrices by Sinkhorn-Knopp: rows and columns sum
to 1, so a product of them over any depth has no row or column gain above 1 and the residual signal
neither explodes nor vanishes. That is the paper's fix: with unconstrained hyper-connections the
composite mixing reached gains near 3000 in its 27B runs (its section 3).
Before the final norm, HyperHead collapses the streams with per-token sigmoid weights (no Sinkhorn).

Numerics as V4: the coefficients come from fp32 parameters in fp32 whatever the activation dtype
(autocast is switched off around them and around the stream mixing, so a bf16-autocast run keeps
an fp32 residual), the RMS normalisation of the flattened streams has no weight and uses the model's
norm_eps, and the hc_eps terms sit exactly where V4 adds them. The normalisation is applied after the
projection (a per-token scalar scales M outputs instead of n*D inputs), the same value as V4's order
up to fp32 rounding.

hc_sinkhorn_iters = 0 switches the projection off (comb is the row softmax alone): the unconstrained
ablation bench/bench_mhc.py measures. transformers treats 0 like 1 (it always normalises columns
once), so such a model is seekling-only; its checkpoints say so (model_type seekling_mhc).

Three forms of the same arithmetic, each held to the plain one (`*_reference`, V4's own expressions)
by the tests, values and gradients:
  - fused CPU kernels (mhc_kernels.py, C): fp32 streams on the CPU, eager or inside a compiled
    training step. A HyperConnection is two ops, the read (RMS scale, projection, coefficients with
    Sinkhorn, the read y and the mixed streams sum_j comb[j,k] x_j, per block of tokens in one pass)
    and the write (adds post_k F), each with one backward: the streams are swept a handful of times
    per sublayer instead of dozens.
  - autograd.Functions with hand-written backwards (`_Mixes`, `_Read`, `_Write`, `_Sinkhorn`): any
    other dtype or device eagerly, and the CPU when no C compiler is at hand.
  - the plain forms, when torch.compile traces a step without gradients (the engine's compiled
    decode): Inductor fuses them into the step.
There are no graph breaks in any of them. Left out: V4's fused TileLang GPU kernels.
bench/bench_mhc.py --overhead prices each path in tokens/s against the plain residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekling.config import ModelConfig
from seekling.model import mhc_kernels


def hc_coefficients(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
                    sinkhorn_iters: int, hc_eps: float, norm_eps: float):
    """pre (B,T,n), post (B,T,n), comb (B,T,n,n) in fp32 for the streams x (B,T,n,D)."""
    n = x.shape[-2]
    with torch.autocast(x.device.type, enabled=False):
        mixes = _mixes(x, fn, norm_eps)
        m_pre, m_post, m_comb = mixes.split((n, n, n * n), dim=-1)
        b_pre, b_post, b_comb = base.float().split((n, n, n * n))
        s = scale.float()
        pre = torch.sigmoid(m_pre * s[0] + b_pre) + hc_eps
        # post in (0, 2): the paper's 2*sigmoid, so a stream can take up to twice F's output.
        post = 2 * torch.sigmoid(m_post * s[1] + b_post)
        comb = torch.softmax((m_comb * s[2] + b_comb).unflatten(-1, (n, n)), dim=-1) + hc_eps
        if sinkhorn_iters > 0:
            comb = _Sinkhorn.apply(comb, sinkhorn_iters, hc_eps)
    return pre, post, comb


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or fp64 if it is (the tests check gradients in fp64): V4's `.float()` otherwise."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ---------------------------------------------------------------- the slow, obvious forms
# What the autograd.Functions below compute, written as V4 writes it; tests/test_mhc.py holds them
# to these, values and gradients.

def mixes_reference(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """(B,T,n,D) streams -> (B,T,M) fp32: V4's unweighted RMS norm of the flat streams, then the projection."""
    flat = _wide(x.flatten(-2))
    return F.linear(flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps), _wide(fn))


def read_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_j w_j x_j over the streams, in fp32 (w fp32), returned in x's dtype: (B,T,n,D), (B,T,n) -> (B,T,D)."""
    return (w.unsqueeze(-1) * x).sum(dim=-2).to(x.dtype)


def write_reference(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """x'_k = post_k f + sum_j comb[j,k] x_j in x's dtype, as DeepseekV4DecoderLayer writes it."""
    dt = x.dtype
    return post.to(dt).unsqueeze(-1) * f.to(dt).unsqueeze(-2) + mix_reference(x, comb)


def mix_reference(x: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The streams' own part of the write, sum_j comb[j,k] x_j, in x's dtype: (B,T,n,D), (B,T,n,n) -> (B,T,n,D)."""
    return torch.matmul(comb.to(x.dtype).transpose(-1, -2), x)


def sinkhorn_reference(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """V4's projection written out plainly: the slow, obvious form `_Sinkhorn` is tested against.

    Columns first (the softmax already made the rows sum to 1), then iters - 1 rounds of rows then
    columns, with eps in each denominator where V4 has it.
    """
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


# ---------------------------------------------------------------- the fast forms
# Each residual op is one autograd node with a hand-written backward, because autograd through the
# plain forms is what made mHC expensive on the CPU: a broadcast multiply-and-sum writes an (N,n,D)
# temporary forward and backward, batched products over matrices that are neither row- nor
# column-major (a transposed view of Sinkhorn's permuted output) fall back to one small GEMM per
# token, and a (n,D) @ (D,1) product per token is a slow GEMV where (1,D) @ (D,n) is not. What is
# left is the arithmetic itself: a (4,4) @ (4,D) product per token runs ~7x slower than a pass over
# memory, and the streams still get three gradients (projection, read, write) that autograd sums.
# Measured per op at N = 2048 tokens, n = 4, D = 256, fp32, 1 thread of a 2-core AMD EPYC: one
# elementwise pass over (N,n,D) 0.3 ms in cache, 0.6-1.2 ms from memory; G_k . f for every k as
# (n,D) @ (D,1) products 2.3 ms, as multiply-and-sum 0.5 ms, as (1,D) @ (D,n) products 0.27 ms.

class _Mixes(torch.autograd.Function):
    """`mixes_reference` with the RMS scale applied after the projection (a per-token scalar on M
    outputs rather than on n*D inputs; equal up to fp32 rounding), and a backward that folds the
    scale's gradient into the input gradient in place."""

    @staticmethod
    def forward(ctx, x, fn, eps: float):
        flat = _wide(x.flatten(-2))  # (..., n*D)
        # mean(flat^2) as norm^2 / K: one reduction with no (..., K) temporary.
        r = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1] + eps)
        raw = F.linear(flat, _wide(fn))  # (..., M)
        ctx.save_for_backward(x, fn, r, raw)
        return raw * r

    @staticmethod
    def backward(ctx, g):
        x, fn, r, raw = ctx.saved_tensors
        flat = _wide(x.flatten(-2))
        g_raw = g * r
        gx = gfn = None
        if ctx.needs_input_grad[0]:
            # d r / d flat = -r^3 flat / K
            coef = (g * raw).sum(-1, keepdim=True) * r.pow(3) / -flat.shape[-1]
            gx = (g_raw @ _wide(fn)).addcmul_(flat, coef).unflatten(-1, x.shape[-2:]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gfn = (g_raw.flatten(0, -2).t() @ flat.flatten(0, -2)).to(fn.dtype)
        return gx, gfn, None


class _Read(torch.autograd.Function):
    """`read_reference`: y = sum_j w_j x_j as a (1,n) @ (n,D) product per token (0.3 ms forward; the
    broadcast form writes an (N,n,D) temporary), gradients as an outer product and a (1,D) @ (D,n) product."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return (w.unsqueeze(-2) @ _wide(x)).squeeze(-2).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy = _wide(gy).unsqueeze(-2)  # (..., 1, D)
        gx = (w.unsqueeze(-1) * gy).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = (gy @ _wide(x).transpose(-1, -2)).squeeze(-2).to(w.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw


class _Write(torch.autograd.Function):
    """`write_reference` as one node: the mix as a batched product on contiguous comb^T, post f added
    in place; backward comb @ G, x @ G^T, f @ G^T and post @ G. Every operand is a row- or
    column-major matrix per token (Sinkhorn's comb is neither, hence the copies of comb^T and comb)."""

    @staticmethod
    def forward(ctx, x, f, post, comb):
        dt = x.dtype
        post_, f_ = post.to(dt), f.to(dt)
        comb_t = comb.to(dt).transpose(-1, -2).contiguous()
        ctx.save_for_backward(x, f_, post_, comb_t)
        ctx.dtypes = f.dtype, post.dtype, comb.dtype
        return torch.matmul(comb_t, x).addcmul_(post_.unsqueeze(-1), f_.unsqueeze(-2))

    @staticmethod
    def backward(ctx, g):
        x, f, post, comb_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = g.contiguous()
        gx = torch.matmul(comb_t.transpose(-1, -2).contiguous(), g) if need[0] else None  # sum_k comb[j,k] G_k
        gf = (post.unsqueeze(-2) @ g).squeeze(-2).to(ctx.dtypes[0]) if need[1] else None  # sum_k post_k G_k
        gpost = (f.unsqueeze(-2) @ g.transpose(-1, -2)).squeeze(-2).to(ctx.dtypes[1]) if need[2] else None  # f . G_k
        gcomb = (x @ g.transpose(-1, -2)).to(ctx.dtypes[2]) if need[3] else None  # [j,k] = x_j . G_k
        return gx, gf, gpost, gcomb


class _Sinkhorn(torch.autograd.Function):
    """`sinkhorn_reference` with a hand-written backward, on a tokens-last layout.

    Autograd through the 39 unrolled normalisations records ~8 ops per step, and sums over a
    trailing axis of 4 are slow reductions; here each step is sum + add + div on (n, n, N) tensors
    whose reductions add contiguous N-vectors, and the backward of c' = c / (sum_axis c + eps) is
    g = (g' - sum_axis(g' c')) / (sum_axis c + eps): four ops. Measured fwd+bwd for 2040 tokens,
    n = 4, 1 thread of a 2-core AMD EPYC: 3.2 ms against 16 ms for autograd through the reference.
    """

    @staticmethod
    def forward(ctx, comb, iters: int, eps: float):
        shape = comb.shape
        c = comb.reshape(-1, shape[-2], shape[-1]).permute(1, 2, 0).contiguous()  # (j, k, N)
        axes = (0,) + (1, 0) * (iters - 1)  # 0 sums over j (a column of comb), 1 over k (a row)
        outs, dens = [], []
        for ax in axes:
            d = c.sum(ax, keepdim=True).add_(eps)
            c = c / d
            outs.append(c)
            dens.append(d)
        ctx.save_for_backward(*outs, *dens)
        ctx.axes, ctx.shape = axes, shape
        return c.permute(2, 0, 1).reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        k, shape = len(ctx.axes), ctx.shape
        outs, dens = ctx.saved_tensors[:k], ctx.saved_tensors[k:]
        g = grad.reshape(-1, shape[-2], shape[-1]).permute(1, 2, 0).contiguous()
        for ax, out, d in zip(reversed(ctx.axes), reversed(outs), reversed(dens)):
            g = (g - (g * out).sum(ax, keepdim=True)) / d
        return g.permute(2, 0, 1).reshape(shape), None, None


# torch.compile gets the plain forms instead: Inductor fuses their broadcasts and reductions (and the
# backward it derives) into loops that read each stream once, where the batched products above would
# stay separate library calls; it has no use for a hand-written backward.

def _mixes_fusable(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """`_Mixes`'s forward in plain ops."""
    flat = _wide(x.flatten(-2))
    return F.linear(flat, _wide(fn)) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def _write_fusable(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """`write_reference` with the mix as a broadcast product summed over j, which Inductor fuses."""
    dt = x.dtype
    mix = (comb.to(dt).unsqueeze(-1) * x.unsqueeze(-2)).sum(-3)  # (..., j, k, D) summed over j, never stored
    return post.to(dt).unsqueeze(-1) * f.to(dt).unsqueeze(-2) + mix


def _mixes(x, fn, eps):
    return _mixes_fusable(x, fn, eps) if torch.compiler.is_compiling() else _Mixes.apply(x, fn, eps)


def _read(x, w):
    return read_reference(x, w) if torch.compiler.is_compiling() else _Read.apply(x, w)


def _fused(x: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether the fused CPU kernels (mhc_kernels.py) take this call: fp32 streams and parameters on the
    CPU, except while torch.compile traces a step without gradients (the engine's decode step), where
    Inductor fuses the plain forms into the surrounding graph at no per-op cost."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return False
    return mhc_kernels.applies(x, param)


# What a HyperConnection's read hands its write besides post: the streams' own part of the write
# (sum_j comb[j,k] x_j), which the fused read computes while x is in its cache, so that the write
# needs nothing else and the streams' gradient is assembled in one kernel (not summed by autograd
# from the read's and the write's); or, on PyTorch ops, the streams and comb, which the write mixes
# and adds to in one product (an (N, n, D) temporary less).
Carry = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def hc_read(x: torch.Tensor, fn, base, scale, *, sinkhorn_iters: int, hc_eps: float,
            norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, Carry]:
    """Streams x (B,T,n,D) -> the sublayer's input y (B,T,D), post (B,T,n) and the carry that `hc_write` needs."""
    if _fused(x, fn):
        with torch.autocast(x.device.type, enabled=False):
            return mhc_kernels.read(x, fn, base, scale, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps, norm_eps=norm_eps)
    pre, post, comb = hc_coefficients(x, fn, base, scale, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps,
                                      norm_eps=norm_eps)
    with torch.autocast(x.device.type, enabled=False):  # summed in fp32, as V4, even under bf16 autocast
        return _read(x, pre), post, (x, comb)


def hc_write(carry: Carry, f: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """x'_k = post_k f + sum_j comb[j,k] x_j from `hc_read`'s carry and post and the sublayer's output
    f (B,T,D): (B,T,n,D) streams."""
    # Autocast off: it would run the mixing matmul in bf16 and round the whole residual every sublayer.
    with torch.autocast(post.device.type, enabled=False):
        if isinstance(carry, torch.Tensor):  # the fused read's mixed streams
            return mhc_kernels.write(carry, f, post)
        x, comb = carry
        return _write_fusable(x, f, post, comb) if torch.compiler.is_compiling() else _Write.apply(x, f, post, comb)


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B,T,D) -> (B,T,n,D): the embedding copied into each stream."""
    return x.unsqueeze(2).expand(-1, -1, n, -1).contiguous()


class HyperConnection(nn.Module):
    """The mixing around one sublayer: `fn`, `base`, `scale` as V4 names them, fp32 whatever the model's dtype."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.hc_mult
        self.sinkhorn_iters, self.hc_eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * cfg.dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros((2 + n) * n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))  # for pre, post, comb

    def coefficients(self, x: torch.Tensor):
        """pre (B,T,n), post (B,T,n), comb (B,T,n,n) for the streams x (B,T,n,D)."""
        return hc_coefficients(x, self.fn, self.base, self.scale, sinkhorn_iters=self.sinkhorn_iters,
                               hc_eps=self.hc_eps, norm_eps=self.norm_eps)

    def forward(self, x: torch.Tensor):
        """Streams x (B,T,n,D) -> sublayer input (B,T,D), post (B,T,n), the carry for `hc_write`."""
        return hc_read(x, self.fn, self.base, self.scale, sinkhorn_iters=self.sinkhorn_iters,
                       hc_eps=self.hc_eps, norm_eps=self.norm_eps)


class HyperHead(nn.Module):
    """Collapses the n streams into one before the final norm: sigmoid weights per token, no Sinkhorn."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n = n = cfg.hc_mult
        self.hc_eps, self.norm_eps = cfg.hc_eps, cfg.norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * cfg.dim, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,T,n,D) -> (B,T,D)."""
        with torch.autocast(x.device.type, enabled=False):
            if _fused(x, self.hc_fn):
                return mhc_kernels.read(x, self.hc_fn, self.hc_base, self.hc_scale, sinkhorn_iters=0,
                                        hc_eps=self.hc_eps, norm_eps=self.norm_eps, head=True)[0]
            w = torch.sigmoid(_mixes(x, self.hc_fn, self.norm_eps) * self.hc_scale.float()
                              + self.hc_base.float()) + self.hc_eps
            return _read(x, w)
