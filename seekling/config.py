"""Model configuration: one frozen dataclass in DeepSeek's own vocabulary.

Field names follow DeepSeek-V3's reference `ModelArgs` (dim, inter_dim, n_routed_experts, ...).
The renaming to Hugging Face's `DeepseekV3Config` lives in one table in `seekling/checkpoint.py`.
Presets live in `seekling/presets.py`.

Engram's options are one nested EngramConfig (seekling/model/engram.py, where the mechanism and its
validation live); its default has no layers, so a model without Engram is today's, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from seekling.model.engram import EngramConfig
from seekling.validate import checker


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A DeepSeek-V3-style model: MLA attention, DeepSeekMoE feed-forward, optional MTP."""

    vocab_size: int = 4096
    dim: int = 256  # hidden size
    n_layers: int = 6
    n_dense_layers: int = 1  # the first layers use a dense SwiGLU MLP (first_k_dense_replace)
    inter_dim: int = 768  # dense MLP width
    norm_eps: float = 1e-6
    # Multi-head Latent Attention (DeepSeek-V2 section 2.1)
    n_heads: int = 4
    q_lora_rank: int | None = None  # None: direct query projection, as DeepSeek-V2-Lite
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # RoPE; rope_type "yarn" enables YaRN context extension with DeepSeek's mscale
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # DeepSeek's checkpoints rotate interleaved pairs (x0,x1),(x2,x3),...
    rope_type: str = "default"
    rope_factor: float = 1.0
    original_seq_len: int = 1024
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # DeepSeekMoE (DeepSeek-V3 section 2.1.2)
    moe_inter_dim: int = 128  # width of one routed (and one shared) expert
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    n_activated_experts: int = 4  # top-k
    n_expert_groups: int = 1  # n_group
    n_limited_groups: int = 1  # topk_group
    route_scale: float = 1.0  # routed_scaling_factor
    norm_topk_prob: bool = True
    # Multi-token prediction depth (DeepSeek-V3 section 2.2)
    n_mtp_layers: int = 0
    # Manifold-constrained hyper-connections (mHC, arXiv 2512.24880; DeepSeek-V4 uses 4 / 20 / 1e-6):
    # hc_mult residual streams mixed around every sublayer (seekling/model/mhc.py). 1 is the plain
    # residual: no mHC parameters, today's model and checkpoints unchanged.
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20  # Sinkhorn-Knopp rounds on each comb matrix; 0 switches the projection off
    hc_eps: float = 1e-6
    # Engram hashed n-gram memory (arXiv 2601.07372; seekling/model/engram.py) at engram.layers, before
    # attention. A dict (from JSON) is turned into an EngramConfig.
    engram: EngramConfig = EngramConfig()
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    # One id, several (a checkpoint's config.json may list them; every one ends a generation), or
    # None for a model with no eos. A list is stored as a tuple so the config stays hashable.
    eos_token_id: int | tuple[int, ...] | None = 1

    def __post_init__(self):
        need = checker("ModelConfig")

        for f in ("vocab_size", "dim", "n_layers", "inter_dim", "n_heads", "kv_lora_rank",
                  "qk_rope_head_dim", "v_head_dim", "max_seq_len", "moe_inter_dim",
                  "n_expert_groups", "n_limited_groups", "original_seq_len"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f,
                 f"must be a positive integer, got {getattr(self, f)!r}")
        for f in ("qk_nope_head_dim", "n_dense_layers", "n_routed_experts", "n_shared_experts",
                  "n_activated_experts", "n_mtp_layers", "hc_sinkhorn_iters"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 0, f,
                 f"must be a non-negative integer, got {getattr(self, f)!r}")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", f"must be None (direct query projection) or a positive integer, got {self.q_lora_rank!r}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even (RoPE rotates pairs of dimensions), got {self.qk_rope_head_dim}")
        need(self.n_dense_layers <= self.n_layers, "n_dense_layers",
             f"({self.n_dense_layers}) cannot exceed n_layers ({self.n_layers}); "
             "set it to n_layers for an all-dense model")
        if self.has_moe:
            need(self.n_routed_experts > 0, "n_routed_experts",
                 "must be > 0 when some layers are MoE (n_dense_layers < n_layers)")
            need(1 <= self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
                 f"top-k ({self.n_activated_experts}) must be between 1 and n_routed_experts ({self.n_routed_experts})")
            need(self.n_routed_experts % self.n_expert_groups == 0, "n_expert_groups",
                 f"({self.n_expert_groups}) must divide n_routed_experts ({self.n_routed_experts})")
            need(self.n_limited_groups <= self.n_expert_groups, "n_limited_groups",
                 f"topk_group ({self.n_limited_groups}) cannot exceed n_expert_groups ({self.n_expert_groups})")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_expert_groups > 1:
                # group score = sum of the top-2 expert scores in the group (DeepSeek-V3 reference)
                need(per_group >= 2, "n_expert_groups",
                     f"each group needs at least 2 experts for the top-2 group score, got {per_group}")
            need(self.n_activated_experts <= self.n_limited_groups * per_group, "n_activated_experts",
                 f"top-k ({self.n_activated_experts}) exceeds the experts in the {self.n_limited_groups} "
                 f"selected groups ({self.n_limited_groups * per_group}); raise n_limited_groups")
        need(self.rope_type in ("default", "yarn"), "rope_type",
             f"must be 'default' or 'yarn', got {self.rope_type!r}")
        if self.rope_type == "yarn":
            need(self.rope_factor >= 1.0, "rope_factor", f"YaRN factor must be >= 1, got {self.rope_factor}")
        need(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        need(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        need(self.route_scale > 0, "route_scale", f"must be positive, got {self.route_scale}")
        need(isinstance(self.hc_mult, int) and not isinstance(self.hc_mult, bool) and self.hc_mult >= 1, "hc_mult",
             f"must be a positive integer (1: plain residual, 4: DeepSeek-V4's mHC), got {self.hc_mult!r}")
        need(isinstance(self.hc_eps, (int, float)) and not isinstance(self.hc_eps, bool)
             and 0 <= self.hc_eps < 1e-2, "hc_eps",
             f"must be a small non-negative number (DeepSeek-V4 uses 1e-6), got {self.hc_eps!r}")
        if isinstance(self.engram, dict):  # as a saved TrainConfig or config.json gives it
            object.__setattr__(self, "engram", EngramConfig(**self.engram))
        need(isinstance(self.engram, EngramConfig), "engram",
             f"must be an EngramConfig (or a dict of its fields), got {type(self.engram).__name__}")
        if self.has_engram:
            need(max(self.engram.layers) < self.n_layers, "engram",
                 f"layers {self.engram.layers} must be block indices below n_layers ({self.n_layers})")
            need(self.engram.pad_id < self.vocab_size, "engram",
                 f"pad_id {self.engram.pad_id} is outside the vocabulary (size {self.vocab_size}); "
                 "set it to the tokenizer's pad id")
        if isinstance(self.eos_token_id, list):  # as JSON (config.json, a saved TrainConfig) gives it
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        need(not isinstance(self.eos_token_id, tuple) or len(self.eos_token_id) > 0, "eos_token_id",
             "is an empty list; use None for a model without an eos token")
        ids = {"bos_token_id": (() if self.bos_token_id is None else (self.bos_token_id,), "a token id or None"),
               "eos_token_id": (self.eos_token_ids, "a token id, a list of token ids, or None")}
        for f, (values, kinds) in ids.items():
            for v in values:
                # bool is an int subclass, so True would otherwise pass as token 1.
                need(isinstance(v, int) and not isinstance(v, bool), f, f"must be {kinds}, got {getattr(self, f)!r}")
                need(0 <= v < self.vocab_size, f, f"{v} is outside the vocabulary (size {self.vocab_size})")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation by itself: () when the model has no eos."""
        eos = self.eos_token_id
        if eos is None:
            return ()
        return eos if isinstance(eos, tuple) else (eos,)

    @property
    def has_moe(self) -> bool:
        return self.n_dense_layers < self.n_layers

    @property
    def has_mhc(self) -> bool:
        """Whether the residual is hc_mult > 1 mHC streams (seekling/model/mhc.py) rather than one plain stream."""
        return self.hc_mult > 1

    @property
    def has_engram(self) -> bool:
        """Whether some blocks carry an Engram (seekling/model/engram.py)."""
        return self.engram.enabled

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """Attention scale, with YaRN's mscale correction (DeepSeek-V2 appendix, reference `MLA.__init__`)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
