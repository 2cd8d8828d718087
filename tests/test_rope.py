"""RoPE: the full-width-table form used by the model equals the textbook rotation bit for bit."""

import pytest
import torch

from seekling.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq
from seekling.presets import tiny


def textbook(x, positions, cfg):
    """Rotate pairs explicitly: (x1 cos - x2 sin, x2 cos + x1 sin), pairs per the layout."""
    inv_freq, factor = rope_inv_freq(cfg)
    freqs = positions.float()[:, None] * inv_freq
    cos, sin = freqs.cos() * factor, freqs.sin() * factor
    if cfg.rope_interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("yarn", [False, True])
def test_rope_tables_match_textbook_rotation(interleave, yarn):
    extra = dict(rope_type="yarn", rope_factor=4.0, original_seq_len=256, mscale=1.0, mscale_all_dim=0.8) if yarn else {}
    cfg = tiny().replace(rope_interleave=interleave, **extra)
    positions = torch.tensor([0, 1, 7, 300, 1000])
    x = torch.randn(2, 5, 3, cfg.qk_rope_head_dim)  # (B, T, H, R)
    cos, sin = RotaryEmbedding(cfg)(positions)
    assert cos.shape == sin.shape == (5, cfg.qk_rope_head_dim)
    got = apply_rope(x, cos.unsqueeze(-2), sin.unsqueeze(-2), interleave)
    want = textbook(x.transpose(1, 2), positions, cfg).transpose(1, 2)
    assert torch.equal(got, want)
    # A rotation keeps each pair's length; a sign slip in the tables would not.
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1) * (cos[:, :1] ** 2 + sin[:, :1] ** 2).sqrt(), atol=1e-5)
