"""The Engram benches' claims: bench_engram.py's allocation arms have the parameter counts its table
prints (equal totals, equal active parameters but for the router rows that leave with the experts),
and bench_engram_table.py times `seekling train`'s real step, whose table update touches only the
looked-up rows, against a dense peer that differs in the table alone."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from seekling.model.engram import Engram, table_parameters
from seekling.model.transformer import Transformer
from seekling.stats import model_stats
from seekling.train.config import train_preset
from seekling.train.optim import MixedOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_engram import (ablation_base, allocation_arms, engram_share, main_params, quick_base,  # noqa: E402
                          table_params, with_table_total)
from bench_engram_table import table_config, table_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why


@pytest.mark.parametrize("make_base", [quick_base, ablation_base])
def test_allocation_arms_hold_total_and_active_parameters(make_base):
    base = make_base()
    arms = allocation_arms(base, [0.25, 0.5, 0.75], mhc_share=0.25)
    assert list(arms) == ["moe", "engram-25", "engram-50", "engram-75", "engram-25+mhc"]
    moe = arms["moe"]
    assert not moe.has_engram and moe.n_routed_experts == base.n_routed_experts and moe.inter_dim > base.inter_dim
    ref_total, ref_active = main_params(moe), model_stats(moe).active_params
    n_moe = base.n_layers - base.n_dense_layers
    rhos = []
    for name in ("engram-25", "engram-50", "engram-75"):
        c = arms[name]
        moved = base.n_routed_experts - c.n_routed_experts
        assert moved > 0 and c.n_activated_experts == base.n_activated_experts and c.inter_dim == base.inter_dim
        # the tables take the removed experts' parameters: the totals agree to within a few rows per head
        heads = len(c.engram.layers) * c.engram.n_hash_heads
        assert abs(main_params(c) - ref_total) <= 8 * heads * c.engram.head_dim, name
        assert table_params(c) > 0.9 * n_moe * moved * 3 * base.dim * base.moe_inter_dim
        # active: equal but for the router's rows of the removed experts and the baseline's width step
        router_rows = n_moe * moved * base.dim
        assert abs(model_stats(c).active_params + router_rows - ref_active) <= 3 * base.dim * base.n_dense_layers / 2
        rhos.append(engram_share(c))
    assert rhos == sorted(rhos) and engram_share(moe) == 0
    mhc = arms["engram-25+mhc"]
    assert mhc.hc_mult == 4 and mhc.engram == arms["engram-25"].engram
    assert mhc.n_routed_experts == arms["engram-25"].n_routed_experts
    # the counts the bench prints are the built models' own
    for name, c in arms.items():
        m = Transformer(c)
        s = model_stats(c)
        assert (m.num_params(), m.num_params(active=True), m.table_params()) == (
            s.total_params, s.active_params, s.table_params), name


def test_ablation_shares_are_the_ones_asked_for():
    arms = allocation_arms(ablation_base(), [0.25, 0.5, 0.75])
    for share, name in ((0.25, "engram-25"), (0.5, "engram-50"), (0.75, "engram-75")):
        assert engram_share(arms[name]) == pytest.approx(share, abs=0.01)
    with pytest.raises(ValueError, match="share"):
        allocation_arms(ablation_base(), [0.01])


def test_table_sizing_picks_the_closest_table_of_all():
    cut = allocation_arms(quick_base(), [0.5])["engram-50"]
    for target in (5_000, 12_345, 40_000):
        got = table_params(with_table_total(cut, target))
        best = min(abs(table_params(cut.replace(engram=dataclasses.replace(cut.engram, head_rows=r))) - target)
                   for r in range(2, 400))
        assert abs(got - target) == best, target


def _one_step(sparse: bool, batch):
    cfg = table_config(quick_base(), rows=20_000, width=4)
    tcfg = train_preset("tiny", model=cfg, batch_size=2, seq_len=16, dtype="float32")
    model, step, timed = table_step(cfg, tcfg, sparse)
    (_, table), = table_parameters(model)
    engram = next(m for m in model.modules() if isinstance(m, Engram))
    touched, sparse_grads = [], []
    engram.table.register_forward_pre_hook(lambda mod, args: touched.append(args[0].flatten()))
    table.register_hook(lambda g: sparse_grads.append(g.is_sparse))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step([batch])
    return model, table, timed, torch.unique(torch.cat(touched)), sparse_grads, before


def test_table_step_touches_only_the_looked_up_rows_and_the_peer_differs_in_the_table_alone():
    x = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(3))
    batch = (x[:, :-1], x[:, 1:])
    model, table, timed, rows, grads, before = _one_step(True, batch)
    assert isinstance(timed.optimizer, MixedOptimizer) and grads == [True] and len(timed.times) == 1
    assert 0 < rows.numel() < table.shape[0] // 10
    st = timed.optimizer.state[table]
    moved = (table.detach() != before[next(n for n, p in model.named_parameters() if p is table)]).any(1)
    assert torch.equal(moved.nonzero().flatten(), rows)  # exactly the looked-up rows changed
    assert torch.equal((st["exp_avg"] != 0).any(1).nonzero().flatten(), rows)
    assert torch.equal((st["exp_avg_sq"] != 0).any(1).nonzero().flatten(), rows)

    dense, dtable, dtimed, drows, dgrads, dbefore = _one_step(False, batch)
    assert isinstance(dtimed.optimizer, torch.optim.AdamW) and dgrads == [False]
    assert torch.equal(drows, rows)
    # everything but the table took the same step (clipping sees the same global norm either way)
    for (n, p), (_, q) in zip(model.named_parameters(), dense.named_parameters()):
        if p is not table:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    dmoved = (dtable.detach() != dbefore[next(n for n, p in dense.named_parameters() if p is dtable)]).any(1)
    assert torch.equal(dmoved.nonzero().flatten(), rows)
