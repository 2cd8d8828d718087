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

Left out: V4's fused TileLang kernels. `hc_read` and `hc_write` are plain functions with no graph
breaks (the Sinkhorn rounds are one autograd.Function with a fixed loop), so torch.compile fuses them
into the graph that contains them: the engine's compiled decode step, a compiled training step
(TrainConfig.compile). Eager, the Sinkhorn is one autograd node and the rest ~20 ops per sublayer,
but each reads or writes the n-times-wider residual: bench/bench_mhc.py prices that in tokens/s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekling.config import ModelConfig


def _mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """(B,T,n,D) streams, (M, n*D) projection -> (B,T,M) fp32 mixes of the RMS-normalised flat streams."""
    flat = x.flatten(2).float()  # (B,T,n*D)
    # mean(flat^2) as norm^2 / (n*D): one reduction with no (B,T,n*D) temporary, forward or backward.
    ms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1]
    return F.linear(flat, fn.float()) * torch.rsqrt(ms + norm_eps)


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


def hc_read(x: torch.Tensor, fn, base, scale, *, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
    """Streams x (B,T,n,D) -> the sublayer's input y (B,T,D) and the (post, comb) that `hc_write` needs."""
    pre, post, comb = hc_coefficients(x, fn, base, scale, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps,
                                      norm_eps=norm_eps)
    # Summed in fp32, as V4. A (1, n) @ (n, D) product per token rather than multiply-and-sum:
    # measured fwd+bwd 4.1 ms against 5.3 (2040 tokens, n = 4, D = 256, 1 thread, AMD EPYC).
    y = (pre.unsqueeze(-2) @ x.float()).squeeze(-2).to(x.dtype)
    return y, post, comb


def hc_write(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """x'_k = post_k f + sum_j comb[j,k] x_j: streams x (B,T,n,D), sublayer output f (B,T,D) -> (B,T,n,D)."""
    dt = x.dtype
    # Autocast off: it would run the mixing matmul in bf16 and round the whole residual every sublayer.
    with torch.autocast(x.device.type, enabled=False):
        # comb^T made contiguous first: a batched product over strided 4x4 matrices took 30 ms fwd+bwd
        # against 10.5 (2040 tokens, n = 4, D = 256, 1 thread, AMD EPYC), its backward copying matrix by matrix.
        mix = comb.to(dt).transpose(-1, -2).contiguous() @ x  # (B,T,n,D): mix_k = sum_j comb[j,k] x_j
        return post.to(dt).unsqueeze(-1) * f.to(dt).unsqueeze(-2) + mix


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
        """Streams x (B,T,n,D) -> sublayer input (B,T,D), post (B,T,n), comb (B,T,n,n)."""
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
            w = torch.sigmoid(_mixes(x, self.hc_fn, self.norm_eps) * self.hc_scale.float()
                              + self.hc_base.float()) + self.hc_eps
            return (w.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)
