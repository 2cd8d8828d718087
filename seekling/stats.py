"""Numbers that show sparsity: parameters (total / active), FLOPs per token, KV-cache bytes.

Counted from the config alone (no weights), so `seekling info` works for a 671B config too.
FLOPs count multiply-adds as 2; the lm-head is included, embedding lookups are not.
"""

from dataclasses import dataclass

from seekling.config import ModelConfig


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


def _attn_params(c: ModelConfig) -> int:
    q = c.dim * c.n_heads * c.qk_head_dim if c.q_lora_rank is None else (
        c.dim * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.n_heads * c.qk_head_dim)
    kv = c.dim * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * c.n_heads * (
        c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + c.n_heads * c.v_head_dim * c.dim + 2 * c.dim  # + the block's two norms


def _moe_params(c: ModelConfig, experts: int) -> int:
    return (experts + c.n_shared_experts) * 3 * c.dim * c.moe_inter_dim + c.n_routed_experts * c.dim


def model_stats(c: ModelConfig, context: int | None = None, bytes_per_value: int = 2) -> ModelStats:
    context = context or c.max_seq_len
    n_moe = c.n_layers - c.n_dense_layers
    dense_ffn = 3 * c.dim * c.inter_dim
    emb = c.vocab_size * c.dim
    main_total = emb * 2 + c.dim + c.n_layers * _attn_params(c) + c.n_dense_layers * dense_ffn + n_moe * _moe_params(c, c.n_routed_experts)
    mtp_block = _attn_params(c) + (_moe_params(c, c.n_routed_experts) if c.n_routed_experts else dense_ffn)
    mtp = c.n_mtp_layers * (mtp_block + 2 * c.dim * c.dim + 3 * c.dim)
    active = main_total - n_moe * (c.n_routed_experts - c.n_activated_experts) * 3 * c.dim * c.moe_inter_dim
    # matmul FLOPs: 2 per active weight (minus the embedding table, which is a lookup)
    # plus attention over `context` tokens: scores (qk_head_dim) and weighted values (v_head_dim) per head.
    attn = 2 * c.n_layers * c.n_heads * (c.qk_head_dim + c.v_head_dim) * context
    flops = 2 * (active - emb) + attn
    latent = c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_value
    full = c.n_layers * c.n_heads * (c.qk_head_dim + c.v_head_dim) * bytes_per_value
    return ModelStats(main_total + mtp, active, mtp, emb, float(flops), context, latent, full)
