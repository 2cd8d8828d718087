"""Our optimizer's weight decay, taken as a real step: matrices shrink, gains and embeddings do not."""

import pytest
import torch

from seekling.config import ModelConfig
from seekling.model.transformer import Transformer
from seekling.train.config import TrainConfig
from seekling.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why

# q_lora_rank and MTP on, so q_norm/kv_norm and the MTP layer's enorm/hnorm/norm gains are all present.
MODEL = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_dense_layers=1, inter_dim=64, n_heads=2, q_lora_rank=16,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16,
                    n_routed_experts=4, n_activated_experts=2, max_seq_len=64, n_mtp_layers=1)


@torch.no_grad()
def test_zero_gradient_step_decays_matrices_only():
    """With zero gradients Adam's update is 0/(0 + eps) = 0, so a step is weight decay alone."""
    model = Transformer(MODEL)
    for p in model.parameters():  # gains away from 1, so that decaying one would show
        p.copy_(torch.randn_like(p))
    cfg = TrainConfig(model=MODEL, seq_len=32, lr=0.05, weight_decay=0.5)
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()

    kept = {n for n, p in model.named_parameters() if p.dim() < 2} | {"embed.weight"}
    assert {"attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight", "attn.kv_norm.weight"} <= {
        n.removeprefix("layers.0.") for n in kept}
    assert {"mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.norm.weight", "norm.weight"} <= kept
    decayed = set(before) - kept
    assert {"head.weight", "layers.1.ffn.experts.w13", "layers.0.attn.wq_a.weight"} <= decayed
    for n in sorted(kept):
        assert torch.equal(dict(model.named_parameters())[n], before[n]), f"{n} changed: it must not be decayed"

    # The reference: torch's plain single-tensor AdamW on copies of the matrices, decay included.
    ref = {n: before[n].clone() for n in decayed}
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay, foreach=False)
    for p in ref.values():
        p.grad = torch.zeros_like(p)
    ref_opt.step()
    for n, p in model.named_parameters():
        if n in decayed:
            torch.testing.assert_close(p, ref[n], rtol=1e-6, atol=0, msg=lambda m, n=n: f"{n}: {m}")
            assert p.norm() < 0.99 * before[n].norm(), f"{n} was not decayed"
