"""transformers config for seekling's mHC checkpoints: DeepSeek-V3's fields plus DeepSeek-V4's three
hyper-connection fields. Written by seekling (seekling/hf_remote/); loaded with trust_remote_code=True."""

from huggingface_hub.dataclasses import strict
from transformers import DeepseekV3Config


@strict
class SeeklingMHCConfig(DeepseekV3Config):
    model_type = "seekling_mhc"

    hc_mult: int = 4  # residual streams
    hc_sinkhorn_iters: int = 20  # Sinkhorn-Knopp rounds on each stream-mixing matrix; 0: none
    hc_eps: float = 1e-6
