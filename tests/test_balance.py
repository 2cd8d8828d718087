"""Load-balancing hooks: expert counts, the aux-loss-free bias update, the sequence-wise loss."""

import pytest
import torch

from seekling.config import ModelConfig
from seekling.model.moe import RouterTrace
from seekling.model.transformer import Transformer
from seekling.train.balance import moe_gates, sequence_balance_loss, update_expert_bias

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_dense_layers=1, inter_dim=48, n_heads=2, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16, n_routed_experts=8,
                  n_activated_experts=2, n_mtp_layers=1)


def test_counts_per_layer():
    model = Transformer(CFG)
    trace = RouterTrace()
    model(torch.randint(0, 64, (2, 10)), trace=trace)
    counts = trace.expert_counts()
    assert counts.shape == (2, 8)  # two MoE layers in the main model
    assert (counts.sum(1) == 2 * 10 * 2).all()


def test_bias_update_direction():
    model = Transformer(CFG)
    counts = torch.tensor([[10, 0, 5, 5, 5, 5, 5, 5], [5] * 8, [1, 2, 3, 4, 5, 6, 7, 8]])
    update_expert_bias(model, counts, gamma=0.01)
    b0, b1, b2 = (g.e_score_correction_bias for g in moe_gates(model))
    assert b0[0] == pytest.approx(-0.01) and b0[1] == pytest.approx(0.01) and b0[2] == 0
    assert torch.all(b1 == 0)  # balanced: untouched
    assert b2[0] > 0 and b2[7] < 0
    with pytest.raises(ValueError, match="MoE routers"):
        update_expert_bias(model, counts[:2])


def test_bias_update_balances_load():
    """Repeated updates flatten a skewed router's load (the mechanism works, not just its sign)."""
    torch.manual_seed(0)
    model = Transformer(CFG.replace(n_layers=2, n_mtp_layers=0))
    with torch.no_grad():
        moe_gates(model)[0].weight[0] += 0.5  # expert 0 hogs the tokens
    ids = torch.randint(0, 64, (4, 32))

    def imbalance():
        tr = RouterTrace()
        model(ids, trace=tr)
        c = tr.expert_counts().float()
        return (c.max() / c.mean()).item(), c

    before, _ = imbalance()
    for _ in range(300):
        _, c = imbalance()
        update_expert_bias(model, c, gamma=2e-3)
    after, _ = imbalance()
    assert after < before and after < 1.6, (before, after)


def test_sequence_balance_loss_values_and_grad():
    model = Transformer(CFG)
    trace = RouterTrace()
    model(torch.randint(0, 64, (3, 12)), trace=trace)
    loss = sequence_balance_loss(trace, alpha=1e-4)
    assert 0 < loss.item() < 1e-4 * CFG.n_routed_experts  # f_i <= E/K and sum P_i = 1 bound it
    loss.backward()
    assert moe_gates(model)[0].weight.grad.abs().sum() > 0
    # Hand-built trace: perfectly uniform scores give exactly alpha.
    B, T, E, K = 2, 4, 4, 2
    scores = torch.full((B * T, E), 0.5)
    idx = torch.tensor([[0, 1], [2, 3]] * (B * T // 2))
    tr = RouterTrace()
    tr.record(0, scores, idx, None, (B, T))
    assert sequence_balance_loss(tr, 0.3).item() == pytest.approx(0.3)
    # All tokens on experts 0,1 with scores concentrated there: larger loss.
    skew = torch.tensor([[0.9, 0.9, 0.1, 0.1]]).repeat(B * T, 1)
    tr2 = RouterTrace()
    tr2.record(0, skew, torch.tensor([[0, 1]]).repeat(B * T, 1), None, (B, T))
    assert sequence_balance_loss(tr2, 0.3).item() == pytest.approx(0.3 * 2 * 0.45 * 2)
