"""Blocked causal attention (the CPU bf16 training path of model/mla.py) against SDPA."""

import pytest
import torch
import torch.nn.functional as F

from seekling.model import mla
from seekling.model.mla import causal_attention_blocks
from seekling.model.transformer import Transformer
from seekling.presets import get_preset


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          scale=scale).transpose(1, 2)


@pytest.mark.parametrize("T", [1, 7, 64, 65, 200])
def test_blocks_match_sdpa_forward_and_grads(T, monkeypatch):
    """fp32, small blocks so that several full and one partial block are exercised."""
    monkeypatch.setattr(mla, "ATTENTION_BLOCK", 32)
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(2, T, 3, 24, generator=g, dtype=torch.float64).float().requires_grad_() for _ in range(2))
    v = torch.randn(2, T, 3, 16, generator=g).requires_grad_()
    w = torch.randn(2, T, 3, 16, generator=g)
    outs = []
    for fn in (causal_attention_blocks, _sdpa):
        q.grad = k.grad = v.grad = None
        out = fn(q, k, v, 0.3)
        (out * w).sum().backward()
        outs.append((out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_model_uses_blocks_in_bf16_only(monkeypatch):
    """The blocked path is taken for bf16 on the CPU (and matches SDPA there); fp32 keeps SDPA."""
    calls = []
    real = mla.causal_attention_blocks
    monkeypatch.setattr(mla, "causal_attention_blocks", lambda *a: calls.append(1) or real(*a))
    cfg = get_preset("tiny").replace(n_layers=2, n_mtp_layers=0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids)
        assert calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            blocked = model(ids).float()
        assert len(calls) == 2
        monkeypatch.setattr(mla, "causal_attention_blocks", lambda q, k, v, s: _sdpa(q, k, v, s))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = model(ids).float()
    # Both are bf16 approximations of the fp32 forward: the blocked one must be no less accurate.
    err_blocked, err_fused = (blocked - exact).abs().mean(), (fused - exact).abs().mean()
    assert err_blocked <= 1.25 * err_fused, (err_blocked, err_fused)
