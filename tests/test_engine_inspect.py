"""Routing tables for `seekling inspect`, against a hand-walked forward that calls each gate itself."""

import json

import pytest
import torch

from seekling.config import ModelConfig
from seekling.inference import route_table, write_heatmap
from seekling.model.transformer import Transformer

CFG = dict(vocab_size=97, dim=64, n_layers=3, n_dense_layers=1, inter_dim=96, n_heads=4, kv_lora_rank=24,
           qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, moe_inter_dim=16, n_routed_experts=8,
           n_activated_experts=3, max_seq_len=64, route_scale=2.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**CFG)).eval()
    with torch.no_grad():
        for blk in m.layers[1:]:
            blk.ffn.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8))  # selection != weights order
    return m


@torch.no_grad()
def test_route_table_matches_each_gate(model):
    ids = torch.randint(0, 97, (12,)).tolist()
    table = route_table(model, ids)
    T, L, K, E = 12, 2, 3, 8
    assert table.layers == [1, 2] and table.token_ids == ids
    assert table.experts.shape == (T, L, K) and table.weights.shape == (T, L, K) and table.scores.shape == (T, L, E)
    # Reference: walk the blocks by hand and ask each layer's gate directly.
    x = torch.tensor([ids])
    cos, sin = model.rope(torch.arange(T))
    h = model.embed(x)
    for i, blk in enumerate(model.layers):
        h = h + blk.attn(blk.attn_norm(h), cos, sin)
        if i >= 1:
            w, idx, scores = blk.ffn.gate(blk.ffn_norm(h)[0])
            assert torch.equal(table.experts[:, i - 1], idx)
            assert torch.allclose(table.weights[:, i - 1], w) and torch.allclose(table.scores[:, i - 1], scores)
            assert torch.allclose(w.sum(-1), torch.full((T,), 2.0))  # normalised, times route_scale
        h = h + blk.ffn(blk.ffn_norm(h))
    assert table.expert_load().sum(1).tolist() == [T * K] * L
    dense = table.dense_weights()
    assert dense.shape == (L, T, E) and torch.allclose(dense.sum(-1), table.weights.sum(-1).T)
    d = json.loads(json.dumps(table.to_dict()))
    assert d["tokens"][3]["routes"]["2"][0][0] == int(table.experts[3, 1, 0])


def test_heatmap_is_a_png(model, tmp_path):
    table = route_table(model, list(range(20)))
    path = write_heatmap(table, tmp_path / "sub" / "routes.png", decode=lambda ids: f" t{ids[0]}\n")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert sorted(p.name for p in path.parent.iterdir()) == ["routes.png"]  # no temporary left behind


def test_route_table_errors(model):
    with pytest.raises(ValueError, match="at least one token"):
        route_table(model, [])
    with pytest.raises(ValueError, match="max_seq_len"):
        route_table(model, [1] * 65)
    with pytest.raises(ValueError, match="no MoE layers"):
        route_table(Transformer(ModelConfig(**(CFG | dict(n_dense_layers=3)))), [1, 2])
