"""bench_mhc.py's stability measure: the Amax gains of the product of the residual mixing matrices,
with comb taken from the streams each HyperConnection reads, whichever path (the fused kernels, whose
read hands the write the mixed streams, or PyTorch ops, whose read hands it comb itself) runs."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from test_train_support import spread_out

from seekling.config import ModelConfig
from seekling.model import mhc_kernels
from seekling.model.mhc import HyperConnection
from seekling.model.transformer import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_mhc import amax_gains  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why

SMALL = dict(vocab_size=97, dim=32, n_layers=3, n_dense_layers=1, inter_dim=48, n_heads=2, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16, n_routed_experts=4,
             n_shared_experts=1, n_activated_experts=2, max_seq_len=64, n_mtp_layers=1, hc_mult=4)


def _reference_gains(model, x) -> tuple[float, float]:
    """The gains from the comb matrices the PyTorch path's reads carry, multiplied in float64."""
    combs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: combs.append(out[2][1]))
             for name, m in model.named_modules() if isinstance(m, HyperConnection) and name.startswith("layers.")]
    with torch.no_grad(), mhc_kernels.switched_off():
        model.hidden(x)
    for h in hooks:
        h.remove()
    assert len(combs) == 2 * model.cfg.n_layers
    A = torch.eye(model.cfg.hc_mult, dtype=torch.float64)
    for c in combs:
        A = c.double().transpose(-1, -2) @ A
    return A.abs().sum(-1).amax().item(), A.abs().sum(-2).amax().item()


@pytest.mark.parametrize("fused", [True, False])
def test_amax_gains_hold_mhc_at_one_and_let_unconstrained_streams_grow(fused):
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    gains = {}
    for name, iters in (("mhc", 20), ("hc", 0)):
        model = spread_out(Transformer(ModelConfig(**(SMALL | dict(hc_sinkhorn_iters=iters)))), seed=1).eval()
        with contextlib.nullcontext() if fused else mhc_kernels.switched_off():
            gains[name] = amax_gains(model, x)
        assert gains[name] == pytest.approx(_reference_gains(model, x), rel=1e-5)
    # Sinkhorn makes every comb doubly stochastic (up to hc_eps and its tolerance): no amplification.
    assert gains["mhc"] == pytest.approx((1.0, 1.0), abs=1e-3)
    # Rows alone normalised (softmax): the backward gain stays 1, the forward one grows.
    assert gains["hc"][1] == pytest.approx(1.0, abs=1e-3) and gains["hc"][0] > 1.05


def test_amax_gains_of_a_plain_model_are_none():
    model = Transformer(ModelConfig(**(SMALL | dict(hc_mult=1))))
    assert amax_gains(model, torch.zeros(1, 4, dtype=torch.long)) is None
