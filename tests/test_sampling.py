"""Sampling parameters and the batched logit pipeline, against plain per-row Python references."""

import math

import pytest
import torch

from seekling.inference.sampling import (
    Penalties,
    SamplingParams,
    distribution,
    draw,
    process_logits,
    raw_logprobs,
    sample_from,
)

NEG = float("-inf")


def reference_row(logits: list[float], p: SamplingParams, counts=None, seen=None) -> list[float]:
    """One row, the way the papers and Hugging Face describe each stage, in plain Python."""
    x = list(logits)
    if counts is not None:
        for i in range(len(x)):
            if seen[i]:
                x[i] = x[i] / p.repetition_penalty if x[i] > 0 else x[i] * p.repetition_penalty
            x[i] -= p.frequency_penalty * counts[i] + p.presence_penalty * (counts[i] > 0)
    if p.greedy:
        return x
    x = [v / p.temperature for v in x]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if p.top_k:
        for i in order[p.top_k:]:
            x[i] = NEG
    if p.top_p < 1:
        z = sum(math.exp(v) for v in x if v != NEG)
        mass = 0.0
        for i in order:
            if mass >= p.top_p:
                x[i] = NEG
            elif x[i] != NEG:
                mass += math.exp(x[i]) / z
    if p.min_p:
        z = sum(math.exp(v) for v in x if v != NEG)
        top = max(math.exp(v) / z for v in x if v != NEG)
        x = [NEG if v == NEG or math.exp(v) / z < p.min_p * top else v for v in x]
    return x


CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=0),
    SamplingParams(top_k=5),
    SamplingParams(top_p=0.6, temperature=1.3),
    SamplingParams(min_p=0.2),
    SamplingParams(top_k=7, top_p=0.8, min_p=0.05, temperature=0.8),
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4),
    SamplingParams(temperature=0, repetition_penalty=2.0),
]


def test_process_logits_matches_per_row_reference():
    g = torch.Generator().manual_seed(0)
    V = 23
    logits = 2 * torch.randn(len(CASES), V, generator=g)
    counts = torch.randint(0, 3, (len(CASES), V), generator=g).float() * (torch.rand(len(CASES), V, generator=g) < 0.3)
    seen = (counts > 0) | (torch.rand(len(CASES), V, generator=g) < 0.2)
    got = process_logits(logits, CASES, Penalties(counts=counts, seen=seen))
    for i, p in enumerate(CASES):
        want = reference_row(logits[i].tolist(), p, counts[i].tolist(), seen[i].tolist()) if p.penalised else \
            reference_row(logits[i].tolist(), p)
        want = torch.tensor(want)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), p
        finite = ~torch.isinf(want)
        assert torch.allclose(got[i][finite], want[finite], atol=1e-5), p


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    kept = lambda top_p: (~torch.isinf(process_logits(logits, [SamplingParams(top_p=top_p)]))).sum().item()
    assert kept(0.5) == 1 and kept(0.51) == 2 and kept(0.8) == 2 and kept(0.81) == 3 and kept(1.0) == 3


def test_greedy_is_one_hot_and_draws_no_randomness():
    logits = torch.tensor([[0.1, 3.0, 2.9], [1.0, 0.0, 2.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)]
    probs = distribution(process_logits(logits, params), params)
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    before = g0.get_state()
    tok = draw(probs, params, [g0, g1])
    assert tok[0] == 1 and torch.equal(g0.get_state(), before) and not torch.equal(g1.get_state(), before)


def test_inverse_cdf_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    tok = sample_from(probs.expand(len(u), -1), u)
    freq = torch.bincount(tok, minlength=5).float() / len(u)
    sigma = (probs * (1 - probs) / len(u)).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-9).all(), freq
    # Token i owns [cdf_{i-1}, cdf_i): zero-probability tokens own nothing, even at the ends.
    edge = sample_from(probs.expand(4, -1), torch.tensor([0.0, 0.4999, 0.5, 1 - 1e-9]))
    assert edge.tolist() == [0, 0, 2, 3]


def test_per_row_generators_make_rows_independent_of_batch_mates():
    V = 50
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=1.0)] * 4
    probs = distribution(process_logits(logits, params), params)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (10, 11, 12, 13)]
    together = draw(probs, params, gens())
    alone = torch.cat([draw(probs[i:i + 1], params[:1], [g]) for i, g in enumerate(gens())])
    assert torch.equal(together, alone)
    reversed_rows = draw(probs.flip(0), params, gens()[::-1]).flip(0)
    assert torch.equal(together, reversed_rows)


def test_raw_logprobs_are_fp32_log_softmax():
    logits = torch.randn(3, 11, dtype=torch.float64).to(torch.bfloat16)
    tok = torch.tensor([0, 5, 10])
    chosen, top = raw_logprobs(logits, tok, 4)
    ref = torch.log_softmax(logits.float(), -1)
    assert chosen.dtype == torch.float32 and torch.allclose(chosen, ref[[0, 1, 2], tok])
    assert torch.equal(top.indices, ref.topk(4, -1).indices)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("temperature", -0.1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.2),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("seed", 1.5),
    ("stop_token_ids", [-1]), ("stop", [""]), ("logprobs", 21),
])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_sampling_params_store_tuples():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3])
    assert p.stop == ("a", "b") and p.stop_token_ids == (3,) and hash(p)
    assert SamplingParams(stop="end").stop == ("end",)
