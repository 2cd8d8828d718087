"""Rotary position embedding with optional YaRN scaling, as DeepSeek-V3 and transformers define it.

Shapes: T positions, R = qk_rope_head_dim.
Two weight layouts exist. `rope_interleave=True` (DeepSeek's own checkpoints) rotates adjacent pairs
(x0,x1),(x2,x3),...; `False` rotates (x_i, x_{i+R/2}) as in Llama. Both are supported so that either
kind of checkpoint gives transformers' logits.
Left out: dynamic NTK and other rope types transformers knows; DeepSeek models use default or YaRN.
"""

import math

import torch
from torch import nn

from seekling.config import ModelConfig, yarn_mscale


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) and the factor applied to cos/sin."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_type != "yarn":
        return inv_freq, 1.0
    factor = cfg.rope_factor
    # YaRN (Peng et al. 2023): keep high frequencies (many rotations within the original context),
    # interpolate low ones by `factor`, and ramp linearly between the two correction dimensions.
    def correction_dim(n_rot: float) -> float:
        return dim * math.log(cfg.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as the reference does
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    # cos/sin scaling: transformers' "attention_factor"; DeepSeek configs set mscale == mscale_all_dim,
    # which makes it 1 and moves the whole correction into the softmax scale (ModelConfig.softmax_scale).
    if cfg.mscale and cfg.mscale_all_dim:
        attn_factor = yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
    else:
        attn_factor = yarn_mscale(factor)
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attn_factor = rope_inv_freq(cfg)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width tables cos, sin of shape (*positions.shape, R), fp32, laid out for `apply_rope`.

        Built once per forward and shared by every layer, so each layer's rotation is four
        elementwise ops (a decode step is bound by per-op overhead on a CPU). `sin` carries the
        rotation's sign: -sin on the first element of each pair, +sin on the second.
        """
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        cos, sin = freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor
        if self.interleave:  # pairs (x0,x1),(x2,x3),...: element 2i and 2i+1 share frequency i
            return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # pairs (x_i, x_{i+R/2})


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (..., T, R) by the tables of `RotaryEmbedding` (..., T, R), broadcast over x's leading dims.

    out = x * cos + partner(x) * sin, where partner swaps the two elements of each rotated pair.
    With the sign folded into `sin` this is bit-identical to the textbook (x1 cos - x2 sin,
    x2 cos + x1 sin): IEEE a - b equals a + (-b). Math in fp32 (a no-op for fp32 activations).
    """
    xf = x.float()
    if interleave:
        partner = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        partner = xf.roll(xf.shape[-1] // 2, dims=-1)
    return (xf * cos + partner * sin).to(x.dtype)
