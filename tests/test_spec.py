"""MTP self-speculative decoding: same greedy tokens as plain decoding, same sampling distribution."""

import itertools
import math

import pytest
import torch

from seekling.config import ModelConfig
from seekling.inference import Engine, EngineConfig, SamplingParams
from seekling.inference.sampling import sample_from
from seekling.inference.speculative import accept_drafts
from seekling.model.transformer import Transformer

SMALL = dict(vocab_size=97, dim=64, n_layers=3, n_dense_layers=1, inter_dim=96, n_heads=4, kv_lora_rank=24,
             qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, moe_inter_dim=16, n_routed_experts=8,
             n_activated_experts=3, max_seq_len=512, n_mtp_layers=1)


def tiny_model(seed=0, context=None, **changes) -> Transformer:
    """Random weights; with `context` set, a model whose MTP layers nearly agree with it.

    The main blocks' outputs are scaled by `context`, so the model is close to a bigram model
    logits = head(norm(embed(t))). Each MTP layer is made to pass the next token's embedding
    straight through (eh_proj = [I, 0], its block's outputs zeroed): it then predicts that same
    bigram, one position ahead. Drafts are mostly accepted, sometimes rejected: both paths run.
    """
    model = Transformer(ModelConfig(**(SMALL | changes))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name else 0.08 * torch.randn(p.shape, generator=g))
        if context is not None:
            model.embed.weight.mul_(10)  # a peaked bigram distribution
            for blk in model.layers:
                blk.attn.wo.weight.mul_(context)
                for name, p in blk.ffn.named_parameters():
                    if name.endswith(("w2", "w2.weight")):
                        p.mul_(context)
            D = model.cfg.dim
            for mtp in model.mtp:
                mtp.eh_proj.weight.copy_(torch.cat((torch.eye(D), torch.zeros(D, D)), dim=1))
                mtp.enorm.weight.fill_(1.0)
                mtp.norm.weight.copy_(model.norm.weight)
                mtp.block.attn.wo.weight.zero_()
                for name, p in mtp.block.ffn.named_parameters():
                    if name.endswith(("w2", "w2.weight")):
                        p.zero_()
    return model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why


def prompts(n, lo=3, hi=30, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# ---------------------------------------------------------------- rejection sampling itself

def test_accept_drafts_emits_the_target_distribution():
    """Draws from q, accepted against p: every emitted position must be distributed as p."""
    g = torch.Generator().manual_seed(0)
    V, K, M = 5, 2, 200_000
    p = torch.softmax(2 * torch.randn(K + 1, V, generator=g), -1)
    q = torch.softmax(2 * torch.randn(K, V, generator=g), -1)
    q[0, 1] = 0.0  # a token the draft never proposes but the target likes
    q[0] /= q[0].sum()
    drafts = torch.stack([sample_from(q[j].expand(M, -1), torch.rand(M, generator=g)) for j in range(K)], 1)
    n_acc, nxt = accept_drafts(p.expand(M, -1, -1), q.expand(M, -1, -1), drafts, torch.rand(M, K, generator=g),
                               torch.rand(M, generator=g))
    emitted = torch.where(n_acc[:, None] > torch.arange(K + 1)[None], torch.cat((drafts, nxt[:, None]), 1), -1)
    emitted[torch.arange(M), n_acc] = nxt
    for j in range(K + 1):
        rows = n_acc >= j  # position j is emitted by every row that accepted j drafts before it
        freq = torch.bincount(emitted[rows, j], minlength=V).float() / rows.sum()
        sigma = (p[j] * (1 - p[j]) / rows.sum()).sqrt()
        assert ((freq - p[j]).abs() <= 5 * sigma + 1e-6).all(), (j, freq, p[j])
    # the acceptance rate of the first draft is sum(min(p, q)) (Leviathan et al., section 3.3)
    rate = (n_acc >= 1).float().mean()
    assert abs(rate - torch.minimum(p[0], q[0]).sum()) < 5 * math.sqrt(0.25 / M)


def test_accept_drafts_with_one_hot_rows_is_greedy_verification():
    V = 4
    onehot = lambda ids: torch.nn.functional.one_hot(torch.tensor(ids), V).float()
    p = onehot([[2, 3, 1], [2, 0, 1]])
    q = onehot([[2, 3], [2, 3]])
    n_acc, nxt = accept_drafts(p, q, torch.tensor([[2, 3], [2, 3]]), torch.full((2, 2), 0.99), torch.full((2,), 0.5))
    assert n_acc.tolist() == [2, 1] and nxt.tolist() == [1, 0]


# ---------------------------------------------------------------- the engine

@pytest.mark.parametrize("k,n_mtp,context", [(1, 1, None), (1, 1, 0.3), (2, 2, 0.3), (3, 1, 0.3)])
def test_speculative_greedy_equals_plain_greedy(k, n_mtp, context, device):
    model = tiny_model(context=context, n_mtp_layers=n_mtp).to(device)
    ps = prompts(4)
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    cfg = dict(block_size=4, max_seqs=4, max_batch_tokens=32, kv_cache_tokens=1024)
    plain_eng = Engine(model, EngineConfig(**cfg))
    plain = [o.output_ids for o in plain_eng.generate(ps, sp)]
    eng = Engine(model, EngineConfig(**cfg, speculative_tokens=k))
    outs = eng.generate(ps, sp)
    assert [o.output_ids for o in outs] == plain
    assert eng.cache.num_used_blocks == 0
    assert sum(o.n_drafted for o in outs) == eng.n_drafted > 0
    assert sum(o.n_accepted for o in outs) == eng.n_accepted
    if context is not None:  # drafts that agree with the model must be accepted, and save steps
        assert eng.acceptance_rate > 0.5, eng.acceptance_rate
        assert eng.n_steps < 0.8 * plain_eng.n_steps


def test_speculative_with_penalties_preemption_and_stops(device):
    """Penalties see the drafts as history; preemption drops them; a stop inside accepted drafts ends there."""
    model = tiny_model(context=0.3).to(device)
    ps = prompts(5, 8, 16, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5, presence_penalty=0.5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)] * 2 + [
              SamplingParams(temperature=0.8, seed=5, max_tokens=24, frequency_penalty=0.7, ignore_eos=True)]
    roomy = dict(block_size=4, max_seqs=8, max_batch_tokens=64, kv_cache_tokens=2048)
    plain = [o.output_ids for o in Engine(model, EngineConfig(**roomy)).generate(ps[:4], params[:4])]
    tight = Engine(model, EngineConfig(block_size=4, max_seqs=4, max_batch_tokens=16, kv_cache_tokens=64,
                                       speculative_tokens=3))
    outs = tight.generate(ps, params)
    assert tight.scheduler.n_preemptions > 0
    assert [o.output_ids for o in outs[:4]] == plain
    assert [len(o.output_ids) for o in outs[:4]] == [24, 7, 24, 7]  # never past max_tokens
    stop = plain[0][5]
    out = Engine(model, EngineConfig(**roomy, speculative_tokens=3)).generate(
        [ps[0]], SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5, presence_penalty=0.5,
                                ignore_eos=True, stop_token_ids=[stop]))[0]
    assert out.output_ids == plain[0][:plain[0].index(stop) + 1] and out.finish_reason == "stop"


def _chi2_ok(counts: torch.Tensor, expected: torch.Tensor) -> tuple[bool, float, float]:
    """Pearson's chi-square, cells with expected < 5 pooled; critical value at p ~ 1e-6 (Wilson-Hilferty)."""
    small = expected < 5
    obs = torch.cat((counts[~small], counts[small].sum()[None]))
    exp = torch.cat((expected[~small], expected[small].sum()[None]))
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = 4.75
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < crit, stat, crit


@pytest.mark.parametrize("k,V,n_new", [(1, 8, 2), (2, 6, 3)])
@torch.no_grad()
def test_speculative_sampling_keeps_the_distribution(k, V, n_new, device):
    """Thousands of seeded requests: the joint law of the first n_new tokens must be the model's."""
    model = tiny_model(seed=1, context=0.5, vocab_size=V, eos_token_id=None, bos_token_id=None).to(device)
    prompt, N = [3, 1, 4, 1], 6000
    eng = Engine(model, EngineConfig(block_size=8, max_seqs=128, max_batch_tokens=512, kv_cache_tokens=128 * 16,
                                     speculative_tokens=k))
    params = [SamplingParams(temperature=1.0, top_k=V - 1, seed=s, max_tokens=n_new) for s in range(N)]
    outs = eng.generate([prompt] * N, params)
    assert 0 < eng.n_accepted < eng.n_drafted  # both acceptance and rejection happened
    counts = torch.zeros(V ** n_new)
    for o in outs:
        counts[sum(t * V ** (n_new - 1 - i) for i, t in enumerate(o.output_ids))] += 1
    # Exact law: chain the model's top-k-truncated next-token distributions over every prefix.
    prefixes = [list(c) for c in itertools.product(range(V), repeat=n_new - 1)]
    logits = model(torch.tensor([prompt + c for c in prefixes], device=device))[:, len(prompt) - 1:].cpu()  # (V^(n-1), n, V)
    kth = logits.topk(V - 1, -1).values[..., -1:]
    probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    joint = torch.zeros(V ** n_new)
    for i, c in enumerate(prefixes):
        for last in range(V):
            seq = c + [last]
            joint[sum(t * V ** (n_new - 1 - j) for j, t in enumerate(seq))] = math.prod(
                float(probs[i, j, t]) for j, t in enumerate(seq))
    assert abs(joint.sum() - 1) < 1e-4
    ok, stat, crit = _chi2_ok(counts, joint * N)
    assert ok, f"chi2 {stat:.1f} > {crit:.1f}"
