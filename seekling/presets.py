"""Model presets as plain functions (torchtitan's config registry style).

`tiny` is the laptop demo, `small` about an hour of CPU training; `gpu_100m` and `gpu_1b` are
sized for one or a few GPUs. `tiny_mhc` is `tiny` with DeepSeek-V4's manifold-constrained
hyper-connections (4 residual streams); any preset takes them with `with_mhc(preset())`, or
`cfg.replace(hc_mult=4)`. `tiny_engram` is `tiny` with Engram hashed n-gram memory at two blocks
(`with_engram(preset())` for any preset). Parameter counts are printed by `seekling info PRESET`.
"""

from seekling.config import ModelConfig
from seekling.model.engram import EngramConfig


def tiny() -> ModelConfig:
    # hidden 256, 6 layers, 16 routed experts top-4: the configuration the demo trains in minutes.
    return ModelConfig(
        vocab_size=4096, dim=256, n_layers=6, n_dense_layers=1, inter_dim=768, n_heads=4,
        q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe_inter_dim=128, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
        n_expert_groups=1, n_limited_groups=1, route_scale=1.0, max_seq_len=1024, n_mtp_layers=1)


def small() -> ModelConfig:
    return ModelConfig(
        vocab_size=4096, dim=384, n_layers=8, n_dense_layers=1, inter_dim=1152, n_heads=6,
        q_lora_rank=None, kv_lora_rank=96, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48,
        moe_inter_dim=192, n_routed_experts=32, n_shared_experts=1, n_activated_experts=4,
        n_expert_groups=4, n_limited_groups=2, route_scale=1.5, max_seq_len=2048, n_mtp_layers=1)


def gpu_100m() -> ModelConfig:
    return ModelConfig(
        vocab_size=32768, dim=512, n_layers=12, n_dense_layers=1, inter_dim=1536, n_heads=8,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        moe_inter_dim=128, n_routed_experts=24, n_shared_experts=1, n_activated_experts=4,
        n_expert_groups=4, n_limited_groups=2, route_scale=2.0, max_seq_len=4096, n_mtp_layers=1)


def gpu_1b() -> ModelConfig:
    return ModelConfig(
        vocab_size=65536, dim=1024, n_layers=16, n_dense_layers=1, inter_dim=3072, n_heads=16,
        q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        moe_inter_dim=256, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
        n_expert_groups=8, n_limited_groups=4, route_scale=2.5, max_seq_len=4096, n_mtp_layers=1)


def with_mhc(cfg: ModelConfig, hc_mult: int = 4) -> ModelConfig:
    """The same model with mHC: DeepSeek-V4's 4 streams, 20 Sinkhorn rounds, eps 1e-6 (its config defaults)."""
    return cfg.replace(hc_mult=hc_mult, hc_sinkhorn_iters=20, hc_eps=1e-6)


def tiny_mhc() -> ModelConfig:
    # +0.35M parameters over tiny (mixing projections; 0.30M of them active in the main model): `seekling info tiny_mhc`.
    return with_mhc(tiny())


def with_engram(cfg: ModelConfig, layers: tuple[int, ...] | None = None, **options) -> ModelConfig:
    """The same model with Engram: orders 2..3, 8 heads per order, kernel 4 (the demo's), at blocks 1 and
    about two thirds of the depth (the demo: 1 and 15 of 30), and one head's table 5x the vocabulary
    (the demo's size). The embedding width is scaled to the model: 128 for tiny (the demo: 512 for 2560-wide)."""
    if layers is None:
        layers = tuple(sorted({min(1, cfg.n_layers - 1), (2 * cfg.n_layers) // 3}))
    fields = dict(layers=layers, max_ngram=3, n_heads=8, head_rows=5 * cfg.vocab_size,
                  embed_dim=max(64, cfg.dim // 2), kernel_size=4, seed=0, pad_id=2) | options
    return cfg.replace(engram=EngramConfig(**fields))


def tiny_engram() -> ModelConfig:
    # +10.6M table parameters (two layers of 16 heads of ~20.5k rows x 16), +0.27M active (projections,
    # norms, conv): `seekling info tiny_engram`.
    return with_engram(tiny())


PRESETS = {"tiny": tiny, "small": small, "gpu_100m": gpu_100m, "gpu_1b": gpu_1b, "tiny_mhc": tiny_mhc,
           "tiny_engram": tiny_engram}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
