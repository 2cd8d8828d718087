"""Numbers that show sparsity: parameters (total / active), FLOPs per token, KV-cache bytes.

Counted from the config alone (no weights), so `seekling info` works for a 671B config too.
FLOPs count multiply-adds as 2; the lm-head is included, embedding lookups are not.
With mHC (hc_mult = n > 1) every block carries two hyper-connections and the model (and each MTP
depth) one head collapse: their projections count as weights, and the stream arithmetic they add
(reading, mixing and writing n streams of width D, and the Sinkhorn rounds) as FLOPs.
With Engram, its tables are counted apart (`table_params`): in the total, not as active, since a token
reads (N-1)*H rows of each, a lookup like the embedding's; its projections, norms and conv are active.
"""

from dataclasses import dataclass

from seekling.config import ModelConfig
from seekling.model.engram import engram_primes


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    active_params: int  # per token, main model (MTP excluded: it is a training/drafting extra)
    mtp_params: int
    embedding_params: int
    flops_per_token: float  # forward, at `context`
    context: int
    kv_latent_bytes_per_token: int  # what MLA caches
    kv_full_bytes_per_token: int  # what full per-head K/V would need
    table_params: int = 0  # Engram tables: in total_params, not in active_params


def _attn_params(c: ModelConfig) -> int:
    q = c.dim * c.n_heads * c.qk_head_dim if c.q_lora_rank is None else (
        c.dim * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.n_heads * c.qk_head_dim)
    kv = c.dim * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * c.n_heads * (
        c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + c.n_heads * c.v_head_dim * c.dim + 2 * c.dim  # + the block's two norms


def _moe_params(c: ModelConfig, experts: int) -> int:
    return (experts + c.n_shared_experts) * 3 * c.dim * c.moe_inter_dim + c.n_routed_experts * c.dim


def _hc_params(c: ModelConfig) -> tuple[int, int]:
    """Parameters of one HyperConnection (fn, base, scale) and of one HyperHead; (0, 0) without mHC."""
    if not c.has_mhc:
        return 0, 0
    n, m = c.hc_mult, (2 + c.hc_mult) * c.hc_mult
    return m * n * c.dim + m + 3, n * n * c.dim + n + 1


def _engram_params(c: ModelConfig) -> tuple[int, int]:
    """All Engram layers' (table rows x head width, everything else); (0, 0) without Engram."""
    e = c.engram
    if not e.enabled:
        return 0, 0
    table = sum(sum(ps) for ps in engram_primes(e).values()) * e.head_dim
    E, D, n = e.key_dim, c.dim, c.hc_mult
    # value_proj (shared), key_proj per stream (both with bias), three per-stream norms, the depthwise conv.
    per_layer = (E * D + D) + n * (E * D + D) + 3 * n * D + n * D * e.kernel_size
    return table, len(e.layers) * per_layer


def _hc_stream_flops(c: ModelConfig) -> int:
    """Per token, non-weight FLOPs of the streams: per sublayer the pre-weighted read (n*D), the comb
    mixing (n*n*D) and the post-weighted write (n*D) multiply-adds plus ~3 ops per comb entry per
    Sinkhorn half-round; the head's read (n*D)."""
    if not c.has_mhc:
        return 0
    n = c.hc_mult
    sublayer = 2 * n * (n + 2) * c.dim + 3 * (2 * c.hc_sinkhorn_iters) * n * n
    return 2 * c.n_layers * sublayer + 2 * n * c.dim


def model_stats(c: ModelConfig, context: int | None = None, bytes_per_value: int = 2) -> ModelStats:
    context = context or c.max_seq_len
    n_moe = c.n_layers - c.n_dense_layers
    dense_ffn = 3 * c.dim * c.inter_dim
    emb = c.vocab_size * c.dim
    hc, hc_head = _hc_params(c)
    table, engram = _engram_params(c)
    main_total = (emb * 2 + c.dim + c.n_layers * (_attn_params(c) + 2 * hc) + c.n_dense_layers * dense_ffn
                  + n_moe * _moe_params(c, c.n_routed_experts) + hc_head + table + engram)
    mtp_block = (_attn_params(c) + (_moe_params(c, c.n_routed_experts) if c.n_routed_experts else dense_ffn)
                 + 2 * hc + hc_head)  # an MTP depth has its own mHC and head collapse (model/transformer.py)
    mtp = c.n_mtp_layers * (mtp_block + 2 * c.dim * c.dim + 3 * c.dim)
    active = main_total - table - n_moe * (c.n_routed_experts - c.n_activated_experts) * 3 * c.dim * c.moe_inter_dim
    # matmul FLOPs: 2 per active weight (minus the embedding table, which is a lookup)
    # plus attention over `context` tokens: scores (qk_head_dim) and weighted values (v_head_dim) per head.
    attn = 2 * c.n_layers * c.n_heads * (c.qk_head_dim + c.v_head_dim) * context
    flops = 2 * (active - emb) + attn + _hc_stream_flops(c)
    latent = c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_value
    full = c.n_layers * c.n_heads * (c.qk_head_dim + c.v_head_dim) * bytes_per_value
    return ModelStats(main_total + mtp, active, mtp, emb, float(flops), context, latent, full, table)
