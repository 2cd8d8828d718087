"""The inference engine against slow references: naive attention, full re-forward greedy decoding."""

import pytest
import torch

from seekling.config import ModelConfig
from seekling.inference import Engine, EngineConfig, SamplingParams
from seekling.inference import attention as attention_module
from seekling.inference.attention import CacheBatch
from seekling.inference.kv_cache import LatentCache
from seekling.model.transformer import Transformer

SMALL = dict(vocab_size=97, dim=64, n_layers=3, n_dense_layers=1, inter_dim=96, n_heads=4, kv_lora_rank=24,
             qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, moe_inter_dim=16, n_routed_experts=8,
             n_activated_experts=3, max_seq_len=512, n_mtp_layers=1)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def tiny_model(seed: int = 0, **changes) -> Transformer:
    """A small model with spread-out logits (std-0.08 weights, uneven norms), so ties are rare."""
    model = Transformer(ModelConfig(**(SMALL | changes))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name else 0.08 * torch.randn(p.shape, generator=g))
    return model


def ids_on(model, rows) -> torch.Tensor:
    """Token ids (a list of rows) as a tensor on the model's device (the `device` fixture's)."""
    return torch.tensor(rows, device=next(model.parameters()).device)


@torch.no_grad()
def reference_greedy(model, prompt, n) -> list[int]:
    """The obvious decoder: re-run the whole sequence every step and take the argmax."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(ids_on(model, [ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(n, lo=3, hi=40, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def model(device):
    return tiny_model().to(device)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why


# ---------------------------------------------------------------- cache and attention

def test_latent_cache_holds_exactly_the_latent(model):
    cfg = model.cfg
    eng = Engine(model, EngineConfig(kv_cache_tokens=256, block_size=16))
    assert eng.cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * 4
    assert eng.cache.pool.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    spec = Engine(model, EngineConfig(kv_cache_tokens=256, speculative_tokens=2))
    assert spec.cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * (cfg.n_layers + 2) * 4
    by_bytes = Engine(model, EngineConfig(kv_cache_bytes=eng.cache.bytes_per_token * 16 * 10, block_size=16))
    assert by_bytes.cache.n_blocks == 10


def test_block_allocator_all_or_nothing_and_no_leak(device):
    cache = LatentCache(n_layers=1, n_blocks=5, block_size=4, latent_dim=2, rope_dim=2, max_seqs=3, max_blocks_per_seq=8,
                        device=device)
    a, b = cache.open_row(), cache.open_row()
    assert cache.reserve(a, 9) and cache.num_used_blocks == 3
    assert not cache.reserve(b, 12) and cache.num_used_blocks == 3  # needs 3, only 2 free: takes none
    assert cache.reserve(b, 8) and cache.num_free_blocks == 0
    assert cache.block_table[a, :3].tolist() != cache.block_table[b, :2].tolist()
    cache.check()
    cache.close_row(a)
    assert cache.num_free_blocks == 3 and cache.num_free_rows == 2
    cache.close_row(b)
    assert cache.num_used_blocks == 0
    cache.check()


def _run_cached(model, ids, chunks, mode, prefill="absorbed", block_size=4):
    cfg = model.cfg
    cache = LatentCache(n_layers=cfg.n_layers, n_blocks=64, block_size=block_size, latent_dim=cfg.kv_lora_rank,
                        rope_dim=cfg.qk_rope_head_dim, max_seqs=2, max_blocks_per_seq=64, device=model.embed.weight.device)
    row = cache.open_row()
    assert cache.reserve(row, len(ids))
    out, pos = [], 0
    for n in chunks:
        batch = CacheBatch(cache, [row], [pos], [n], n_heads=cfg.n_heads, mode=mode, prefill=prefill)
        out.append(model(ids_on(model, [ids[pos:pos + n]]), batch.positions[None], cache=batch)[0])
        pos += n
    return torch.cat(out)


@pytest.mark.parametrize("prefill", ["absorbed", "naive"])
@torch.no_grad()
def test_chunked_prefill_matches_full_forward(model, prefill):
    ids = prompts(1, 60, 61)[0]
    full = model(ids_on(model, [ids]))[0]
    for chunks in ([60], [7, 1, 13, 30, 9], [1] * 10 + [50]):
        got = _run_cached(model, ids, chunks, "absorbed", prefill)
        assert (got - full).abs().max() < 1e-4, chunks


@torch.no_grad()
def test_absorbed_decode_matches_naive_over_200_tokens(model):
    """Absorbed attention (W_UK into the query, W_UV after) against expanding K/V every step."""
    cfg = model.cfg
    caches = {m: LatentCache(n_layers=cfg.n_layers, n_blocks=70, block_size=4, latent_dim=cfg.kv_lora_rank,
                             rope_dim=cfg.qk_rope_head_dim, max_seqs=1, max_blocks_per_seq=70, device=model.embed.weight.device)
              for m in ("absorbed", "naive")}
    rows = {m: c.open_row() for m, c in caches.items()}
    ids, worst = prompts(1, 8, 9)[0], 0.0
    for step in range(201):
        start, n = (0, len(ids)) if step == 0 else (len(ids) - 1, 1)
        logits = {}
        for m, c in caches.items():
            assert c.reserve(rows[m], len(ids))
            batch = CacheBatch(c, [rows[m]], [start], [n], n_heads=cfg.n_heads, mode=m)
            logits[m] = model(ids_on(model, [ids[start:]]), batch.positions[None], cache=batch)[0, -1]
        worst = max(worst, (logits["absorbed"] - logits["naive"]).abs().max().item())
        assert logits["absorbed"].argmax() == logits["naive"].argmax(), step
        ids.append(int(logits["absorbed"].argmax()))
    assert worst < 1e-4
    full = model(ids_on(model, [ids[:-1]]))[0, -1]
    assert (full - logits["absorbed"]).abs().max() < 1e-4


@pytest.mark.parametrize("chunk_bytes", [None, 1])
@torch.no_grad()
def test_batched_decode_of_unequal_segments_matches_full_forward(model, chunk_bytes, monkeypatch):
    """The padded short-segment path: three sequences feeding 3, 1 and 5 tokens at different offsets;
    also with the batch attended one sequence at a time (the cache-sized chunks of a large batch)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(attention_module, "KEY_CHUNK_BYTES", chunk_bytes)
    cfg = model.cfg
    cache = LatentCache(n_layers=cfg.n_layers, n_blocks=64, block_size=4, latent_dim=cfg.kv_lora_rank,
                        rope_dim=cfg.qk_rope_head_dim, max_seqs=3, max_blocks_per_seq=16, device=model.embed.weight.device)
    seqs = prompts(3, 30, 31)
    rows = [cache.open_row() for _ in seqs]
    for r in rows:
        cache.reserve(r, 30)
    first = [20, 22, 25]
    batch = CacheBatch(cache, rows, [0] * 3, first, n_heads=cfg.n_heads)
    model(ids_on(model, [[t for s, f in zip(seqs, first) for t in s[:f]]]), batch.positions[None], cache=batch)
    lens = [3, 1, 5]
    batch = CacheBatch(cache, rows, first, lens, n_heads=cfg.n_heads)
    assert batch.short is not None and batch.short["gather"] is not None and not batch.long
    feed = [t for s, f, n in zip(seqs, first, lens) for t in s[f:f + n]]
    got = model(ids_on(model, [feed]), batch.positions[None], cache=batch)[0]
    want = torch.cat([model(ids_on(model, [s]))[0, f:f + n] for s, f, n in zip(seqs, first, lens)])
    assert (got - want).abs().max() < 1e-4


# ---------------------------------------------------------------- engine vs the reference decoder

@pytest.mark.parametrize("attention", ["absorbed", "naive", "absorbed-chunked"])
def test_engine_greedy_matches_reference(model, attention, monkeypatch):
    chunked = attention == "absorbed-chunked"
    if chunked:  # decode attention in chunks of two sequences
        per_seq = 4 * 8 * (model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim) * 4  # 4 blocks of 8 tokens, fp32
        monkeypatch.setattr(attention_module, "KEY_CHUNK_BYTES", 2 * per_seq)
        attention = "absorbed"
    ps = prompts(5)
    eng = Engine(model, EngineConfig(block_size=8, max_batch_tokens=32, max_seqs=8, kv_cache_tokens=2048,
                                     attention=attention))
    gathered = []  # sequences per gather: how the short path split its batch
    real_gather = eng.cache.gather
    monkeypatch.setattr(eng.cache, "gather", lambda layer, table: gathered.append(table.shape[0]) or real_gather(layer, table))
    outs = eng.generate(ps, GREEDY)
    if attention == "absorbed":
        assert max(gathered) == (2 if chunked else 5)
    for p, o in zip(ps, outs):
        assert o.output_ids == reference_greedy(model, p, GREEDY.max_tokens)
        assert o.finish_reason == "length" and len(o.logprobs) == GREEDY.max_tokens
    assert eng.cache.num_used_blocks == 0
    eng.cache.check()


def test_requests_join_and_leave_between_steps(model):
    ps = prompts(4, seed=1)
    eng = Engine(model, EngineConfig(block_size=4, max_batch_tokens=16, max_seqs=4, kv_cache_tokens=1024))
    lengths = [5, 12, 3, 9]
    rids = [eng.add_request(ps[0], SamplingParams(temperature=0, max_tokens=lengths[0], ignore_eos=True))]
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        if steps in (2, 4, 5):  # join while others are mid-prefill or decoding
            i = len(rids)
            rids.append(eng.add_request(ps[i], SamplingParams(temperature=0, max_tokens=lengths[i], ignore_eos=True)))
    assert len(rids) == 4
    for p, n, rid in zip(ps, lengths, rids):
        assert eng.output(rid).output_ids == reference_greedy(model, p, n)
    assert eng.cache.num_used_blocks == 0


def test_cancel_frees_blocks(model):
    eng = Engine(model, EngineConfig(block_size=4, max_batch_tokens=8, max_seqs=2, kv_cache_tokens=512))
    ps = prompts(3, 10, 20)
    rids = [eng.add_request(p, GREEDY) for p in ps]
    eng.step()
    eng.step()
    assert eng.cache.num_used_blocks > 0 and len(eng.scheduler.waiting) == 1
    assert eng.cancel(rids[0]) and eng.cancel(rids[2])  # one running, one still queued
    assert not eng.cancel(rids[0]) and not eng.cancel("nope")
    assert eng.output(rids[0]).finish_reason == "cancelled"
    while eng.has_unfinished():
        eng.step()
    assert eng.output(rids[1]).output_ids == reference_greedy(model, ps[1], GREEDY.max_tokens)
    assert not eng.cancel(rids[1])  # already finished
    assert eng.cache.num_used_blocks == 0 and eng.cache.num_free_rows == 2
    eng.cache.check()


def test_request_that_can_never_fit_is_refused(model):
    eng = Engine(model, EngineConfig(block_size=8, kv_cache_tokens=64, max_seqs=2, max_batch_tokens=8))
    with pytest.raises(ValueError, match="can never fit"):
        eng.add_request([1] * 40, SamplingParams(max_tokens=30))
    eng.add_request([1] * 40, SamplingParams(max_tokens=20))  # 61 positions: fits alone
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.add_request([1] * 512)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([5, 97])
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], SamplingParams(max_tokens=4), request_id="req-0")


@pytest.mark.parametrize("compile", [False, True])
def test_full_cache_queues_and_preempts_without_changing_outputs(model, compile, compiled_spy):
    """A cache for about two sequences, five requests: queueing and recompute-preemption are exact."""
    ps = prompts(5, 10, 20, seed=3)
    params = [GREEDY, SamplingParams(temperature=0.9, top_k=30, seed=11, max_tokens=24, ignore_eos=True)] * 2 + [GREEDY]
    roomy = Engine(model, EngineConfig(block_size=4, max_batch_tokens=64, max_seqs=8, kv_cache_tokens=2048))
    want = [o.output_ids for o in roomy.generate(ps, params)]
    tight = Engine(model, EngineConfig(block_size=4, max_batch_tokens=16, max_seqs=4, kv_cache_tokens=88,
                                       compile=compile))
    rids = [tight.add_request(p, sp) for p, sp in zip(ps, params)]
    queued = 0
    while tight.has_unfinished():
        tight.step()
        queued = max(queued, len(tight.scheduler.waiting))
        tight.cache.check()
    assert queued > 0 and tight.scheduler.n_preemptions > 0
    assert bool(compiled_spy) == compile
    assert [tight.output(r).output_ids for r in rids] == want
    assert tight.cache.num_used_blocks == 0


# ---------------------------------------------------------------- prompt sharing

def _group_requests(n_prompts=3, group=4, seed=20):
    """GRPO-shaped requests: each prompt `group` times, seeded samples of unequal lengths and one greedy."""
    ps = prompts(n_prompts, 10, 40, seed=seed)
    reqs = [(p, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True) if g == 0 else
             SamplingParams(temperature=1.0, top_p=0.95, seed=100 * j + g, max_tokens=4 + 5 * g, ignore_eos=True))
            for j, p in enumerate(ps) for g in range(group)]
    return [p for p, _ in reqs], [sp for _, sp in reqs]


def _assert_same_outputs(got, want):
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    for a, b in zip(got, want):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        assert torch.allclose(torch.tensor(a.sampled_logprobs), torch.tensor(b.sampled_logprobs), atol=1e-5)


@pytest.mark.parametrize("compile", [False, True])
def test_shared_prompts_compute_each_prompt_once_and_sample_as_if_alone(model, compile, compiled_spy):
    """G requests with one prompt: one prefill, G-1 forks; every output is what separate prefills give."""
    ps, params = _group_requests()
    want = Engine(model, EngineConfig(kv_cache_tokens=4096, max_seqs=16, share_prompts=False)).generate(ps, params)
    eng = Engine(model, EngineConfig(kv_cache_tokens=4096, max_seqs=16, max_batch_tokens=32, compile=compile))
    fed = []
    forward = model.hidden

    def counting(ids, *a, **k):
        fed.append(ids.shape[1])
        return forward(ids, *a, **k)

    model.hidden = counting  # counts the tokens of the eager forwards (prefills are never compiled)
    try:
        got = eng.generate(ps, params)
    finally:
        del model.hidden
    _assert_same_outputs(got, want)
    assert eng.n_forked == 3 * 3
    # Prefill fed each prompt once: the eager forwards' tokens are the 3 prompts plus decode tokens.
    assert sum(fed) < sum(map(len, ps[::4])) + sum(sp.max_tokens for sp in params)
    assert bool(compiled_spy) == compile
    assert eng.cache.num_used_blocks == 0 and not eng._groups
    eng.cache.check()


def test_shared_prompts_with_few_rows_fork_from_any_member(model):
    """Two rows for eight requests of two prompts: members fork as rows free up, from whichever member
    still holds the prompt (the one that computed it may be gone); the outputs do not change."""
    ps, params = _group_requests(n_prompts=2, seed=21)
    want = Engine(model, EngineConfig(kv_cache_tokens=4096, max_seqs=8, share_prompts=False)).generate(ps, params)
    eng = Engine(model, EngineConfig(kv_cache_tokens=4096, max_seqs=2, max_batch_tokens=16))
    rids = [eng.add_request(p, sp) for p, sp in zip(ps, params)]
    while eng.has_unfinished():
        eng.step()
        eng.cache.check()
    _assert_same_outputs([eng.output(r) for r in rids], want)
    assert 0 < eng.n_forked <= 6


def test_a_request_joining_a_running_prompt_forks_from_it(model):
    """Sharing is not only for requests submitted together: one that arrives while another with its
    prompt is decoding copies that prompt instead of prefilling it."""
    p = prompts(1, 20, 30, seed=24)[0]
    sps = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True) for s in (1, 2)]
    want = [Engine(model, EngineConfig(kv_cache_tokens=1024, share_prompts=False)).generate([p], sp)[0] for sp in sps]
    eng = Engine(model, EngineConfig(kv_cache_tokens=1024, max_batch_tokens=64))
    first = eng.add_request(p, sps[0])
    for _ in range(3):
        eng.step()
    second = eng.add_request(p, sps[1])
    while eng.has_unfinished():
        eng.step()
    assert eng.n_forked == 1
    _assert_same_outputs([eng.output(first), eng.output(second)], want)


def test_shared_prompts_survive_preemption_and_cancellation(model):
    """A cache too small for the batch (members are preempted and recomputed) and the member computing
    a prompt cancelled mid-prefill: the others still get the outputs separate prefills give."""
    ps, params = _group_requests(seed=22)
    want = Engine(model, EngineConfig(kv_cache_tokens=4096, max_seqs=16, share_prompts=False)).generate(ps, params)
    tight = Engine(model, EngineConfig(block_size=4, max_batch_tokens=16, max_seqs=6, kv_cache_tokens=120))
    rids = [tight.add_request(p, sp) for p, sp in zip(ps, params)]
    tight.step()  # the first prompt's prefill has begun (16 of its tokens)
    first = tight.scheduler.running[0]
    assert first.num_cached < first.prompt_len and first.request_id == rids[0]
    assert tight.cancel(rids[0])
    while tight.has_unfinished():
        tight.step()
        tight.cache.check()
    assert tight.scheduler.n_preemptions > 0 and tight.n_forked > 0
    _assert_same_outputs([tight.output(r) for r in rids[1:]], want[1:])
    assert tight.cache.num_used_blocks == 0 and not tight._groups


def test_prompt_sharing_is_off_where_per_sequence_state_is_not_copied(model):
    """Speculative decoding keeps MTP state per sequence that a fork would not have: no forks, same outputs."""
    ps, params = _group_requests(n_prompts=2, seed=23)
    greedy = [SamplingParams(temperature=0, max_tokens=sp.max_tokens, ignore_eos=True) for sp in params]
    spec = Engine(model, EngineConfig(kv_cache_tokens=4096, speculative_tokens=2, max_seqs=8, max_batch_tokens=96))
    got = spec.generate(ps, greedy)
    assert spec.n_forked == 0
    assert [o.output_ids for o in got] == [reference_greedy(model, p, sp.max_tokens) for p, sp in zip(ps, greedy)]


# ---------------------------------------------------------------- requests: seeds, stops, logprobs, streaming

def test_seeded_sampling_ignores_batch_mates(model):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)
    p = prompts(1, seed=5)[0]
    alone = Engine(model, EngineConfig(kv_cache_tokens=1024)).generate([p], sp)[0].output_ids
    others = prompts(3, seed=6)
    crowd = Engine(model, EngineConfig(kv_cache_tokens=2048, max_batch_tokens=64)).generate(
        others[:2] + [p] + others[2:], [SamplingParams(temperature=1.0, seed=i, max_tokens=12, ignore_eos=True) for i in range(2)]
        + [sp] + [SamplingParams(temperature=0.5, max_tokens=30, ignore_eos=True)])[2].output_ids
    assert alone == crowd
    other_seed = Engine(model, EngineConfig(kv_cache_tokens=1024)).generate(
        [p], SamplingParams(temperature=1.0, top_p=0.9, seed=8, max_tokens=20, ignore_eos=True))[0].output_ids
    assert other_seed != alone


def test_stop_tokens_eos_and_max_tokens(model):
    p = prompts(1, seed=9)[0]
    ref = reference_greedy(model, p, 24)
    eng = Engine(model, EngineConfig(kv_cache_tokens=1024))
    out = eng.generate([p], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ref[4]], ignore_eos=True))[0]
    cut = ref.index(ref[4])
    assert out.output_ids == ref[:cut + 1] and out.finish_reason == "stop" and out.stop_reason == ref[4]
    eos_model = tiny_model().to(model.embed.weight.device)
    eos_model.cfg = eos_model.cfg.replace(eos_token_id=ref[6])
    out = Engine(eos_model, EngineConfig(kv_cache_tokens=1024)).generate([p], SamplingParams(temperature=0, max_tokens=24))[0]
    assert out.output_ids == ref[:ref.index(ref[6]) + 1] and out.finish_reason == "stop"
    out = eng.generate([p], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.output_ids == ref[:5] and out.finish_reason == "length"


def test_stop_strings_cut_the_text(model):
    def decode(ids):  # a toy detokenizer: two letters per token
        return "".join(chr(97 + t % 26) + chr(97 + t // 26) for t in ids)

    p = prompts(1, seed=9)[0]
    ref = reference_greedy(model, p, 24)
    stop = decode(ref[5:7])[1:]  # straddles a token boundary
    eng = Engine(model, EngineConfig(kv_cache_tokens=1024), decode=decode)
    out = eng.generate([p], SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True))[0]
    full = decode(ref)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.find(stop)]
    assert out.output_ids == ref[:7]
    with pytest.raises(ValueError, match="decode"):
        Engine(model, EngineConfig(kv_cache_tokens=1024)).add_request(p, SamplingParams(stop=["x"]))


@torch.no_grad()
def test_logprobs_match_a_full_forward(model):
    sp = SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=16, logprobs=5, ignore_eos=True)
    p = prompts(1, seed=4)[0]
    out = Engine(model, EngineConfig(kv_cache_tokens=1024, max_seqs=2, max_batch_tokens=8)).generate([p], sp)[0]
    logits = model(ids_on(model, [p + out.output_ids]))[0, len(p) - 1:-1].cpu()
    logp = torch.log_softmax(logits.float(), -1)
    toks = torch.tensor(out.output_ids)
    assert torch.allclose(torch.tensor(out.logprobs), logp.gather(1, toks[:, None])[:, 0], atol=1e-4)
    kth = logits.topk(20, -1).values[:, -1:]
    processed = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")) / 0.7, -1)
    assert torch.allclose(torch.tensor(out.sampled_logprobs), processed.gather(1, toks[:, None])[:, 0], atol=1e-4)
    for t, alts in enumerate(out.top_logprobs):
        top = logp[t].topk(5)
        assert [a for a, _ in alts] == top.indices.tolist()
        assert torch.allclose(torch.tensor([v for _, v in alts]), top.values, atol=1e-4)


def test_stream_and_callback_agree_with_generate(model):
    p = prompts(1, seed=2)[0]
    eng = Engine(model, EngineConfig(kv_cache_tokens=1024))
    seen = []
    want = eng.generate([p], GREEDY, on_token=seen.append)[0]
    events = list(eng.stream(p, GREEDY))
    assert [e.token_id for e in events] == want.output_ids == [e.token_id for e in seen]
    assert [e.index for e in events] == list(range(len(events)))
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    it = eng.stream(p, GREEDY)
    next(it)
    it.close()  # a client going away cancels its request
    assert eng.cache.num_used_blocks == 0 and not eng.has_unfinished()


def test_engine_config_is_validated(model):
    with pytest.raises(ValueError, match="EngineConfig.block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="EngineConfig.max_batch_tokens"):
        EngineConfig(max_seqs=64, max_batch_tokens=32)
    with pytest.raises(ValueError, match="not both"):
        EngineConfig(kv_cache_tokens=10, kv_cache_bytes=10)
    with pytest.raises(ValueError, match="EngineConfig.attention"):
        EngineConfig(attention="flash")
    with pytest.raises(ValueError, match="no MTP layers"):
        Engine(tiny_model(n_mtp_layers=0), EngineConfig(speculative_tokens=1))
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine(model, EngineConfig(kv_cache_bytes=100))


def test_bf16_model_decodes_like_its_reference():
    """Servers load bf16 on CPUs with native bf16: the cache follows the model dtype, attention math stays fp32."""
    model = tiny_model().to(torch.bfloat16)
    ps = prompts(3)
    eng = Engine(model, EngineConfig(kv_cache_tokens=1024, max_seqs=4, max_batch_tokens=16, speculative_tokens=1))
    outs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert eng.cache.pool.dtype == torch.bfloat16
    assert [o.output_ids for o in outs] == [reference_greedy(model, p, 10) for p in ps]
    shared = Engine(model, EngineConfig(kv_cache_tokens=1024, max_seqs=4, max_batch_tokens=16))
    outs = shared.generate([ps[0]] * 3, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert shared.n_forked == 2 and all(o.output_ids == reference_greedy(model, ps[0], 10) for o in outs)


def test_stop_strings_decode_only_a_tail(model):
    """The stop-string check decodes a bounded tail per token, not the whole output (which was quadratic)."""
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return "".join(chr(97 + t % 26) for t in ids)

    p = prompts(1, seed=9)[0]
    eng = Engine(model, EngineConfig(kv_cache_tokens=1024), decode=decode)
    out = eng.generate([p], SamplingParams(temperature=0, max_tokens=120, stop=["0never"], ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.output_ids) == 120
    assert lengths[-1] == 120  # the final text, decoded once
    assert max(lengths[:-1]) <= 4 * (len("0never") + 1 + 8)


def test_stop_strings_found_when_tokens_decode_to_nothing(model):
    """Tokens with empty text make the tail window grow until it holds enough characters."""
    def decode(ids):  # only every third token id writes a letter
        return "".join(chr(97 + t % 26) for t in ids if t % 3 == 0)

    p = prompts(1, seed=9)[0]
    ref = reference_greedy(model, p, 60)
    full = decode(ref)
    assert len(full) >= 6, "the reference output writes too few letters for this test"
    stop = full[len(full) // 2 - 2: len(full) // 2 + 1]
    out = Engine(model, EngineConfig(kv_cache_tokens=1024), decode=decode).generate(
        [p], SamplingParams(temperature=0, max_tokens=60, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.find(stop)]
