"""DeepSeekMoE (DeepSeek-V3 section 2.1.2): shared experts plus fine-grained routed experts.

Shapes: N tokens (B*T flattened), D model dim, E routed experts, K experts per token (top-k),
G expert groups, I expert width, S = N*K routed (token, expert) pairs.

Routing: sigmoid affinities in fp32; the load-balancing bias (`e_score_correction_bias`) is added
for *selection only*, the gating weights come from the unbiased scores. Group-limited routing
keeps the `n_limited_groups` groups with the best top-2 sums and masks the rest to -inf (masking
to 0.0, as some ports did, lets a masked expert beat negative biased scores).

Experts are stacked 3-D parameters. The fast path sorts the S pairs by expert and runs two grouped
GEMMs (`torch.nn.functional.grouped_mm`); only chosen experts ever see a token. `forward_loop`
is the plain per-expert loop kept as the test reference.
The grouped path is three steps, `Experts.permute` / `compute` / `combine`, so that expert
parallelism can move the permuted rows to the ranks owning their experts and back in between.
The one seam for that is `Experts.dispatch` (None here): a callable `(experts, routed, dtype) ->
(S, D)` that stands in for `compute`, set by seekling.distributed.expert_parallel.
Left out: expert parallelism itself (the all-to-all dispatch) lives beside the trainer, not in the model.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seekling.config import ModelConfig
from seekling.device import gemm_dtype, group_rows_multiple
from seekling.model.mlp import MLP


class RouterTrace:
    """Caller-owned record of routing decisions, filled by each MoE layer during one forward.

    The model keeps no state of its own: the trainer passes a trace to read expert loads (for the
    auxiliary-loss-free bias update) and router scores (for the sequence-wise balance loss);
    `seekling inspect` uses it to show which experts fired.
    A plain class, not a dataclass: wrappers that map over forward arguments (FSDP2's input
    handling) rebuild dataclasses and lists they pass through, and the layers would then record
    into a copy the caller never sees.
    """

    def __init__(self, layers: list | None = None):
        self.layers = [] if layers is None else layers  # (layer_id, scores (N,E) fp32, idx (N,K), weights (N,K), (B,T))

    def record(self, layer_id, scores, idx, weights, batch_shape):
        self.layers.append((layer_id, scores, idx, weights, batch_shape))

    def expert_counts(self) -> torch.Tensor:
        """(n_moe_layers, E) tokens routed to each expert, per MoE layer, in recording order."""
        return torch.stack([torch.bincount(idx.flatten(), minlength=s.shape[-1]) for _, s, idx, _, _ in self.layers])


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Updated by the trainer's balancing step, never by gradients; kept in fp32 whatever the model dtype.
        self.e_score_correction_bias = nn.Buffer(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x (N,D) -> weights (N,K) fp32, idx (N,K), scores (N,E) fp32."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.n_groups > 1:
            grouped = choice.view(x.shape[0], self.n_groups, choice.shape[-1] // self.n_groups)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N,G)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        idx = choice.topk(self.topk, dim=-1)[1]
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        # Skipping a multiply by 1.0 is exact, and one op fewer per layer of a decode step.
        return (weights * self.route_scale if self.route_scale != 1.0 else weights), idx, scores


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    # grouped_mm is not autocast-aware: under autocast use the autocast dtype, as nn.Linear would.
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else w.dtype
    # On CPUs without native bf16 the expert GEMMs run in fp32 (exact up-cast, and ~10x faster there).
    return gemm_dtype(dtype, x.device)


@dataclass
class Routed:
    """The routed (token, expert) pairs laid out by expert, as Experts.permute leaves them: S rows
    (N*K, or more with CPU bf16's zero padding), grouped by expert with ends `offs`."""

    rows: torch.Tensor  # (S, D) each pair's token, in the compute dtype
    weights: torch.Tensor  # (S,) each pair's routing weight (0 on padding rows)
    offs: torch.Tensor  # (E,) int32 cumulative group ends
    token: torch.Tensor  # (S,) the token each row came from (N for padding rows)
    n_tokens: int  # N


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        # (E, out, in) like nn.Linear: grouped_mm then reads each weight as a column-major (in, out)
        # view, the layout its CPU kernel is fast for (measured: ~15x faster than row-major in fp32).
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, D))  # gate (w1) and up (w3) projections fused
        self.w2 = nn.Parameter(torch.empty(E, D, I))  # down projection
        # Expert parallelism's seam: when set, it replaces `compute` between permute and combine
        # (moving rows to the ranks owning their experts and back); the model itself never sets it.
        self.dispatch: Callable[[Experts, Routed, torch.dtype], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Grouped-GEMM path. x (N,D), weights (N,K), idx (N,K) -> (N,D)."""
        N, K = idx.shape
        dtype = _compute_dtype(x, self.w13)
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if self.dispatch is not None:
            # Every rank of an expert-parallel group must join every exchange: always the grouped path.
            return self._forward_grouped(x, weights, idx, dtype).to(out_dtype)
        if torch.compiler.is_compiling():
            if torch.is_grad_enabled():
                # A graph with gradients (a compiled training step): grouped_mm has no fp32
                # fake-tensor kernel on CPU in torch 2.13 (it asserts bf16), so the experts run
                # eagerly behind a graph break and the rest of the block stays fused.
                return _grouped_outside_graph(self, x, weights, idx, dtype).to(out_dtype)
            return self._forward_gathered(x, weights, idx, dtype).to(out_dtype)
        if x.device.type != "cpu" and dtype != torch.bfloat16:
            # grouped_mm on a GPU takes bf16 only (its documentation): other dtypes loop over experts.
            return self.forward_loop(x.to(dtype), weights, idx).to(out_dtype)
        # CPU only: reading the expert ids back (tolist) would stall a GPU's stream every layer.
        if x.device.type == "cpu" and 0 < N * K <= self.w13.shape[0] // 2:
            return self._forward_few(x, weights, idx, dtype).to(out_dtype)
        return self._forward_grouped(x, weights, idx, dtype).to(out_dtype)

    def _forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, dtype) -> torch.Tensor:
        """Sort the pairs by expert, two grouped GEMMs, scatter back: the training and prefill path."""
        routed = self.permute(x, weights, idx, dtype)
        if self.dispatch is not None:
            return self.combine(self.dispatch(self, routed, dtype), routed)
        return self.combine(self.compute(routed.rows, routed.weights, routed.offs, dtype), routed)

    # The grouped path in three steps, so that expert parallelism can send `rows` (and `weights`,
    # `offs`) to the ranks that own the experts between permute and compute, and bring the results
    # back between compute and combine; a single process runs them back to back.

    def permute(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, dtype) -> "Routed":
        """Lay the (token, expert) pairs out by expert: x (N,D), weights (N,K), idx (N,K) -> Routed."""
        N, K = idx.shape
        E = self.w13.shape[0]
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # (S,) pairs sorted by expert
        counts = torch.bincount(flat, minlength=E)
        # Cast before gathering: each token is copied K times, and a cast of N rows is cheaper than
        # one of N*K (the same values either way).
        x = x.to(dtype)
        pad = group_rows_multiple(dtype, x.device)
        if pad > 1:
            # Each expert's rows padded with zero rows (token N, weight 0) to a multiple of `pad`,
            # so the GEMMs see few distinct shapes (device.group_rows_multiple says why).
            padded = (counts + pad - 1) // pad * pad
            rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts).repeat_interleave(counts)
            dest = (padded.cumsum(0) - padded).repeat_interleave(counts) + rank
            pair = torch.full((int(padded.sum()),), N * K, device=x.device).index_copy_(0, dest, order)
            offs = padded.cumsum(0).to(torch.int32)
            x = torch.cat((x, x.new_zeros(1, x.shape[1])))
            weights = torch.cat((weights.flatten(), weights.new_zeros(1)))
        else:
            pair, offs = order, counts.cumsum(0).to(torch.int32)
            weights = weights.flatten()
        token = pair // K
        # index_select, not x[token]: the backward of advanced indexing is index_put_(accumulate=True),
        # which on CPU sums the K copies of a token from several threads in a varying order (runs
        # differed from step ~10 on a 2-core AVX-512 EPYC); index_add_, its backward here, is ordered.
        return Routed(rows=x.index_select(0, token), weights=weights.index_select(0, pair), offs=offs, token=token,
                      n_tokens=N)

    def compute(self, rows: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor, dtype) -> torch.Tensor:
        """Every expert on its rows: rows (S,D) grouped by `offs`, weights (S,) -> weighted outputs (S,D)."""
        return grouped_experts(rows, weights, offs, self.w13, self.w2, dtype)

    def combine(self, out: torch.Tensor, routed: "Routed") -> torch.Tensor:
        """Sum each token's expert outputs: (S,D) -> (N,D). Padding rows land on an extra row, dropped."""
        N = routed.n_tokens
        return torch.zeros(N + 1, out.shape[1], dtype=out.dtype, device=out.device).index_add_(0, routed.token, out)[:N]

    def _forward_few(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, dtype) -> torch.Tensor:
        """Few (token, expert) pairs, as in a decode step: one matrix-vector product per pair.

        grouped_mm walks every expert's group, empty or not, and that bookkeeping costs more than
        the work at one token: measured 127 us here against 258 us for grouped_mm (tiny preset, one
        token, 1 thread; 247 vs 311 us at two tokens). Used while pairs <= E/2: on the tiny preset
        (E=16, K=4) up to two tokens; grouped_mm wins from about four tokens on.
        """
        I = self.w2.shape[-1]
        xs, weights = x.to(dtype), weights.to(dtype)
        outs = []
        for n, experts in enumerate(idx.tolist()):
            h = torch.stack([F.linear(xs[n], self.w13[e].to(dtype)) for e in experts])  # (K, 2I)
            h = F.silu(h[:, :I]) * h[:, I:] * weights[n, :, None]
            y = F.linear(h[0], self.w2[experts[0]].to(dtype))
            for k in range(1, len(experts)):
                y = y + F.linear(h[k], self.w2[experts[k]].to(dtype))
            outs.append(y)
        return torch.stack(outs)

    def _forward_gathered(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, dtype) -> torch.Tensor:
        """Every (token, expert) pair as an indexed mat-vec: the form the compiled decode step uses.

        Written as multiply-and-sum over `w13[idx]` so that Inductor fuses the indexing into the
        reduction and reads each chosen expert's rows in place (nothing is copied, no Python per
        expert, no data-dependent shapes). Run eagerly it would materialise the (N, K, 2I, D)
        product: it is for compiled graphs of one token per sequence. Measured compiled, one MoE
        layer of the demo model at 32 tokens: 1.3-1.5 ms, against 1.7 ms eager grouped_mm and
        2.9 ms for a dense GEMM over every expert.
        """
        I = self.w2.shape[-1]
        xs = x.to(dtype)
        h = (self.w13[idx].to(dtype) * xs[:, None, None, :]).sum(-1)  # (N, K, 2I)
        h = F.silu(h[..., :I]) * h[..., I:] * weights[..., None].to(dtype)
        return (self.w2[idx].to(dtype) * h[:, :, None, :]).sum((1, 3))  # (N, D)

    def forward_loop(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reference: one plain matmul per expert over the tokens routed to it."""
        out = torch.zeros_like(x)
        I = self.w2.shape[-1]
        for e in range(self.w13.shape[0]):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            h = x[token] @ self.w13[e].t()
            y = (F.silu(h[:, :I]) * h[:, I:]) @ self.w2[e].t()
            out = out.index_add(0, token, y * weights[token, slot].unsqueeze(-1).to(y.dtype))
        return out


def grouped_experts(rows: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, dtype) -> torch.Tensor:
    """SwiGLU experts as two grouped GEMMs: rows (S,D) grouped by `offs` (one group per expert of
    w13 (E,2I,D) and w2 (E,D,I)), weights (S,) -> weighted outputs (S,D). A function of its weights,
    so that an expert-parallel dispatch can run it on the experts a rank owns."""
    gate, up = F.grouped_mm(rows, w13.to(dtype).transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    # Scale by the routing weight before the down projection: it is linear, and I < D usually.
    h = F.silu(gate) * up * weights.unsqueeze(-1).to(dtype)
    return F.grouped_mm(h, w2.to(dtype).transpose(-2, -1), offs=offs)


_grouped_outside_graph = torch.compiler.disable(Experts._forward_grouped)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.use_loop = False  # tests flip this to run the reference path through the whole model

    def forward(self, x: torch.Tensor, trace: RouterTrace | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(x)
        if trace is not None:
            trace.record(self.layer_id, scores, idx, weights, shape[:-1])
        y = (self.experts.forward_loop if self.use_loop else self.experts)(x, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
