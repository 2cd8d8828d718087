"""Grouped-GEMM MoE against the per-expert loop; routing rules; sparsity."""

import pytest
import torch

from seekling.config import ModelConfig
from seekling.model.moe import MoE, RouterTrace
from seekling.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, dim=48, n_layers=2, n_dense_layers=0, inter_dim=64, n_heads=2, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=32, n_routed_experts=12,
                  n_activated_experts=3, n_expert_groups=4, n_limited_groups=2, route_scale=2.0)


def make_moe(seed=0):
    torch.manual_seed(seed)
    moe = MoE(CFG, 0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.e_score_correction_bias.normal_(std=0.05)
    return moe


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_matches_loop_forward_and_grads(dtype, tol):
    moe = make_moe().to(dtype)
    x = torch.randn(3, 17, CFG.dim, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 17, CFG.dim, dtype=dtype)
    results = []
    for loop in (False, True):
        moe.use_loop = loop
        moe.zero_grad()
        x.grad = None
        y = moe(x)
        (y * g).sum().backward()
        results.append((y.detach().float(), x.grad.float(), {n: p.grad.float() for n, p in moe.named_parameters()}))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    scale = y1.abs().max()
    assert (y0 - y1).abs().max() <= tol * scale
    assert (gx0 - gx1).abs().max() <= tol * gx1.abs().max()
    for n in gp0:
        assert (gp0[n] - gp1[n]).abs().max() <= tol * (gp1[n].abs().max() + 1e-12), n


@pytest.mark.parametrize("multiple", [8, 32])
def test_padded_groups_match_loop(multiple, monkeypatch):
    """Expert groups padded with zero rows (CPU bf16 pads to keep GEMM shapes few): same outputs and
    grads as the loop. Forced on in fp32 so every CPU runs the padding, not only bf16-capable ones;
    with 12 experts some groups are empty and some smaller than one multiple."""
    monkeypatch.setattr("seekling.model.moe.group_rows_multiple", lambda dtype, device: multiple)
    moe = make_moe()
    x = torch.randn(3, 17, CFG.dim, requires_grad=True)
    g = torch.randn(3, 17, CFG.dim)
    results = []
    for loop in (False, True):
        moe.use_loop = loop
        moe.zero_grad()
        x.grad = None
        (moe(x) * g).sum().backward()
        results.append((moe(x).detach(), x.grad.clone(), [p.grad.clone() for p in moe.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx0, gx1, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp0, gp1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_only_chosen_experts_compute():
    """An expert no token picks gets exactly zero gradient: it never ran."""
    moe = make_moe()
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[5] = -100.0  # expert 5 is never selected
    x = torch.randn(40, CFG.dim)
    trace = RouterTrace()
    moe(x, trace).sum().backward()
    counts = trace.expert_counts()[0]
    assert counts[5] == 0 and counts.sum() == 40 * CFG.n_activated_experts
    assert torch.count_nonzero(moe.experts.w13.grad[5]) == 0
    assert torch.count_nonzero(moe.experts.w2.grad[5]) == 0
    used = counts.nonzero().flatten()
    assert all(torch.count_nonzero(moe.experts.w13.grad[e]) > 0 for e in used)


def test_gate_matches_reference_definition():
    """Weights from unbiased sigmoid scores, selection from biased ones within the best groups."""
    moe = make_moe(3)
    gate = moe.gate
    x = torch.randn(50, CFG.dim)
    weights, idx, scores = gate(x)
    ref_scores = torch.sigmoid(x @ gate.weight.t())
    torch.testing.assert_close(scores, ref_scores)
    biased = ref_scores + gate.e_score_correction_bias
    per = CFG.n_routed_experts // CFG.n_expert_groups
    for t in range(50):
        gs = biased[t].view(CFG.n_expert_groups, per).topk(2).values.sum(-1)
        keep = set(gs.topk(CFG.n_limited_groups).indices.tolist())
        cand = [e for e in range(CFG.n_routed_experts) if e // per in keep]
        want = sorted(sorted(cand, key=lambda e: -biased[t, e].item())[: CFG.n_activated_experts])
        assert sorted(idx[t].tolist()) == want
        w = ref_scores[t, idx[t]]
        torch.testing.assert_close(weights[t], w / w.sum() * CFG.route_scale)


def test_whole_model_grouped_equals_loop():
    model = Transformer(CFG.replace(n_mtp_layers=1))
    ids = torch.randint(0, CFG.vocab_size, (2, 24))
    a = model(ids)
    for m in model.modules():
        if isinstance(m, MoE):
            m.use_loop = True
    b = model(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("n_tokens", [1, 2])
def test_few_pairs_path_matches_loop(dtype, tol, n_tokens, monkeypatch):
    """Decode-sized inputs (pairs <= E/2) take the per-pair path; same outputs and grads as the reference."""
    moe = make_moe().to(dtype)
    x = torch.randn(1, n_tokens, CFG.dim, dtype=dtype, requires_grad=True)
    results = []
    for loop in (False, True):
        moe.use_loop = loop
        moe.zero_grad()
        x.grad = None
        if not loop:  # prove the few-pairs path ran: grouped_mm is not reachable
            monkeypatch.setattr(torch.nn.functional, "grouped_mm", None)
        y = moe(x)
        monkeypatch.undo()
        y.sum().backward()
        results.append((y.detach().float(), x.grad.float(), moe.experts.w13.grad.float()))
    (y0, gx0, gw0), (y1, gx1, gw1) = results
    assert (y0 - y1).abs().max() <= tol * y1.abs().max()
    assert (gx0 - gx1).abs().max() <= tol * gx1.abs().max()
    assert (gw0 - gw1).abs().max() <= tol * gw1.abs().max()


def test_empty_input_gives_empty_output():
    """Zero tokens route nowhere: an empty result, not an error from the per-pair path."""
    moe = make_moe()
    assert moe(torch.randn(2, 0, CFG.dim)).shape == (2, 0, CFG.dim)
