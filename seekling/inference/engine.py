"""The inference engine: token ids in, token ids out, for the CLI, the server, evaluation and RL.

Shapes: N tokens packed into one forward (the model sees (1, N)), M sampling rows, V vocabulary.

`Engine.step()` runs one forward over everything the scheduler picked (decodes, draft
verifications and prefill chunks packed together), samples, and returns one `TokenEvent` per
emitted token. `generate` (batch, blocking), `stream` (one request, an iterator) and `on_token`
callbacks are thin loops over `step`. The engine is single-threaded: a server drives `step()` from
one thread and hands events to its clients.

Only the rows that sample go through the output head: a prefill chunk costs no (chunk, V) logits.
Eager, a small model's decode step is mostly per-op overhead (~250 top-level ops per token).
With `compile=True` a step in which every sequence feeds one token runs as one torch.compile graph
of the whole forward (compiled.py): 2.0-2.5 ms against ~7 ms eager for the demo model at batch 1.
Compiling pieces of the model instead (projections, norms) was measured slower: graph breaks at
the cache and the routing cost more than the fusion saved.

The engine runs on the model's device (CPU, CUDA or MPS), read once at construction: the cache,
the batch metadata, the sampling tensors and the penalty counts are all made there (host.py says
how lists cross over), and a step reads its results back in one transfer (a second when MTP
drafts are drawn): on a GPU the engine's only waits (the model's MoE routing has its own).
Requests' random generators stay on the CPU, so a seed gives the same draws on every device
(sampling.py).
It takes the caller's model as it is and changes nothing in it: no `.eval()` (steps run under
`torch.inference_mode`, and the model has no dropout or batch statistics), no attribute, no
compiled replacement. It caches nothing derived from the weights (absorbed MLA weights are views
of `wkv_b` taken at each call), so a model that a trainer updates in place is served with its new
weights from the next step on, and the compiled step reads them as graph inputs (no recompile).
Update between requests: a running request's cached latents were computed with the old weights.

An Engram model (cfg.engram.layers) also needs, per sequence, its last N-1 compressed ids and each
Engram layer's convolution window: the engine keeps them in one EngramState with a slot per
block-table row, so a slot is claimed and released with the sequence's row. Each step's forward
gets an EngramBatch over it, committed after sampling with the tokens each sequence keeps (a
verification keeps only its accepted drafts). A preempted sequence is recomputed from its tokens,
as its KV cache is: its re-prefill starts at position 0, which ignores whatever the slot held.

Requests with the same prompt compute it once (`EngineConfig.share_prompts`, scheduler.py's
"Prompt sharing"): the first member of a prompt group to run prefills it and keeps its last hidden
state (and, with Engram, its slot's state at the prompt's end); each other member is admitted as a
fork, with a copy of the prompt's latents, and samples its first token from that hidden state.
Its outputs are what its own prefill would give (tests/test_engine.py holds them to 1e-5).

Left out: tokenisation (callers pass ids, and a `decode` function when they want stop strings);
tensor-parallel sharding; CUDA graphs of the eager step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from seekling.inference.attention import CacheBatch
from seekling.inference.compiled import CompiledDecode
from seekling.inference.host import MAX_EXACT_ID, read_back, to_device
from seekling.inference.kv_cache import LatentCache, cache_blocks
from seekling.inference.sampling import SamplingParams, raw_logprobs, sample_tokens
from seekling.inference.scheduler import PromptGroup, Scheduler, Sequence
from seekling.inference.speculative import MTPDrafter, verify_drafts
from seekling.model.engram import EngramState
from seekling.validate import checker

DEFAULT_CACHE_TOKENS = 65536


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Cache geometry, batching limits and decoding strategy for one Engine."""

    # Tokens per cache block: bigger blocks gather faster (a 42 MB gather: 10.8 ms with 16-token blocks,
    # 5.0 ms with 64) but waste up to a block per sequence; 32 sits between.
    block_size: int = 32
    kv_cache_tokens: int | None = None  # capacity in tokens (default 65536 when neither is given) ...
    kv_cache_bytes: int | None = None  # ... or in bytes
    max_batch_tokens: int = 512  # tokens per forward: bounds each prefill chunk and so the decode stall
    max_seqs: int = 64  # sequences running at once
    speculative_tokens: int = 0  # MTP draft tokens per decode step; 0 disables speculative decoding
    attention: str = "absorbed"  # "naive" expands K/V every step: the reference the tests compare against
    # Long segments: absorbed runs SDPA's fused kernel over the shared latents; measured 2.4-3.6x faster
    # than naive for a 1024-4096-token tiny-preset prefill on the 2-core AVX2 CPU (naive's unequal
    # q/v head widths send SDPA down its unfused path).
    prefill_attention: str = "absorbed"
    seed: int | None = None  # seeds the generators of requests that bring no seed
    # Run steps where every sequence decodes one token through one torch.compile graph (compiled.py):
    # measured ~3x faster per step at batch 1 and ~1.5-2x at batch 8-32 (demo model, 1 thread),
    # after a one-off compile of ~30 s per graph (two graphs; seconds from Inductor's on-disk cache).
    # Off by default so a one-shot `seekling generate` starts at once. Not with speculative_tokens:
    # every decode step would verify drafts, which the graph does not cover (see __post_init__).
    compile: bool = False
    # Requests with the same prompt compute it once: a later one copies the earlier one's prompt
    # latents and samples its first token from the same hidden state (scheduler.py, "Prompt
    # sharing"). GRPO's G samples per prompt and a server's n choices are such requests. Measured
    # on the R1 recipe's rollouts (32 prompts x 8 samples, 43-token prompts, ~35-token completions,
    # 1 thread): the prefill was ~45% of the rollout. An Engram model's forks start from the n-gram
    # state kept at the prompt's end. Not with speculative decoding, whose per-sequence MTP state
    # (draft-layer cache, kept hidden states) a fork would not have.
    share_prompts: bool = True

    def __post_init__(self):
        need = checker("EngineConfig")

        for f in ("block_size", "max_batch_tokens", "max_seqs"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f,
                 f"must be a positive integer, got {getattr(self, f)!r}")
        need(not (self.kv_cache_tokens is not None and self.kv_cache_bytes is not None), "kv_cache_bytes",
             "give the capacity in tokens or in bytes, not both")
        for f in ("kv_cache_tokens", "kv_cache_bytes"):
            v = getattr(self, f)
            need(v is None or (isinstance(v, int) and v > 0), f, f"must be a positive integer or None, got {v!r}")
        for f in ("compile", "share_prompts"):
            need(isinstance(getattr(self, f), bool), f, f"must be True or False, got {getattr(self, f)!r}")
        need(not (self.compile and self.attention == "naive"), "compile",
             "the compiled step is absorbed attention; the naive mode is an uncompiled reference")
        need(isinstance(self.speculative_tokens, int) and 0 <= self.speculative_tokens <= 8, "speculative_tokens",
             f"must be an integer in [0, 8], got {self.speculative_tokens!r}")
        # The graph covers steps where each sequence feeds one token; with drafts every decode step
        # feeds 1 + K, so compiling would cost its warm-up and never run. Compiled verification is
        # not built: on this project's CPUs it could not pay (bench/bench_floor.py bounds it near 1.1-1.3x
        # over compiled plain decoding with drafting free, against ~3x from compiling alone).
        need(not (self.compile and self.speculative_tokens), "compile",
             "cannot be combined with speculative_tokens > 0: the compiled step covers plain decoding only, and "
             "with drafts every step verifies them eagerly; use one of the two (on a CPU, compile alone is faster)")
        need(self.attention in ("absorbed", "naive"), "attention", f"must be 'absorbed' or 'naive', got {self.attention!r}")
        need(self.prefill_attention in ("absorbed", "naive"), "prefill_attention",
             f"must be 'absorbed' or 'naive', got {self.prefill_attention!r}")
        per_step = self.max_seqs * (1 + self.speculative_tokens)
        need(self.max_batch_tokens >= per_step, "max_batch_tokens",
             f"({self.max_batch_tokens}) must cover one decode step of every sequence, "
             f"max_seqs * (1 + speculative_tokens) = {per_step}; raise it or lower max_seqs")


@dataclass(frozen=True)
class TokenEvent:
    """One emitted token. `finish_reason` is set on a request's last event: 'stop' or 'length'."""

    request_id: str
    token_id: int
    index: int  # position in the request's output
    logprob: float  # fp32 log-softmax of the raw logits: what a trainer recomputes
    sampled_logprob: float  # under the processed distribution the token was drawn from
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    sampled_logprobs: list[float]
    top_logprobs: list[tuple[tuple[int, float], ...]]
    finish_reason: str | None  # None while running; 'stop', 'length' or 'cancelled'
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    text: str | None  # decoded output, cut before a stop string (needs Engine(decode=...))
    n_drafted: int
    n_accepted: int


class Engine:
    """Continuous-batching generation over a paged latent cache, optionally with MTP speculation."""

    def __init__(self, model, config: EngineConfig | None = None, *, decode: Callable[[list[int]], str] | None = None):
        self.config = config = config or EngineConfig()
        # The caller's model as it is: no .eval(), no copy. Every step runs under inference_mode and
        # the model has no dropout or batch statistics, so its training flag changes nothing here.
        self.model, self.decode = model, decode
        cfg = model.cfg
        k = config.speculative_tokens
        if k and cfg.n_mtp_layers == 0:
            raise ValueError("EngineConfig.speculative_tokens: this model has no MTP layers (n_mtp_layers=0); "
                             "set speculative_tokens=0 or load a checkpoint trained with MTP")
        if cfg.vocab_size > MAX_EXACT_ID:
            raise ValueError(f"the model's vocab_size {cfg.vocab_size} is above {MAX_EXACT_ID}: the engine reads "
                             "token ids back through fp32 (inference/host.py), which holds integers exactly only below it")
        param = next(model.parameters())
        dtype, self.device = param.dtype, param.device  # read once: move the model before building its engine
        n_layers = cfg.n_layers + k  # one cache slot per main layer and per draft depth
        bytes_per_token = n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize
        tokens = config.kv_cache_tokens or (None if config.kv_cache_bytes else DEFAULT_CACHE_TOKENS)
        n_blocks = cache_blocks(capacity_tokens=tokens, capacity_bytes=config.kv_cache_bytes,
                                block_size=config.block_size, bytes_per_token=bytes_per_token)
        if n_blocks < 1:
            raise ValueError(f"EngineConfig.kv_cache_bytes: {config.kv_cache_bytes} bytes hold less than one block "
                             f"({config.block_size} tokens x {bytes_per_token} bytes)")
        self.cache = LatentCache(n_layers=n_layers, n_blocks=n_blocks, block_size=config.block_size,
                                 latent_dim=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim, max_seqs=config.max_seqs,
                                 max_blocks_per_seq=math.ceil((cfg.max_seq_len + k + 1) / config.block_size),
                                 dtype=dtype, device=self.device)
        # One Engram decode-state slot per block-table row (None without Engram).
        self.engram = (EngramState(cfg.engram, n_slots=config.max_seqs, dim=cfg.dim, hc_mult=cfg.hc_mult,
                                   device=self.device, dtype=dtype) if cfg.has_engram else None)
        self.scheduler = Scheduler(self.cache, max_batch_tokens=config.max_batch_tokens)
        self._batch_kwargs = dict(mode=config.attention, prefill=config.prefill_attention)
        self.drafter = MTPDrafter(model, self.cache, k, **self._batch_kwargs) if k else None
        self._compiled = CompiledDecode(model, self.cache, self.engram) if config.compile else None
        self._requests: dict[str, Sequence] = {}
        # Prompt sharing: prompt -> the group of unfinished requests with it.
        self._sharing = config.share_prompts and not k
        self._groups: dict[tuple[int, ...], PromptGroup] = {}
        self.n_forked = 0  # requests that copied another's prompt instead of prefilling it
        self._ids = itertools.count()
        # CPU generators whatever the device: uniforms are drawn on the host (sampling.py says why).
        self._rng = torch.Generator(device="cpu")
        if config.seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(config.seed)
        self.n_drafted = self.n_accepted = self.n_steps = 0

    # ------------------------------------------------------------ requests

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, on_token: Callable[[TokenEvent], None] | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError for a request that can never run."""
        params = params or SamplingParams()
        cfg, k = self.model.cfg, self.config.speculative_tokens
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: give at least one token (e.g. the BOS token)")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids holds {bad[:3]} outside the vocabulary [0, {cfg.vocab_size})")
        if len(prompt) >= cfg.max_seq_len:
            raise ValueError(f"prompt has {len(prompt)} tokens but the model's max_seq_len is {cfg.max_seq_len}; "
                             "shorten the prompt")
        if params.stop and self.decode is None:
            raise ValueError("SamplingParams.stop: stop strings need a detokenizer; pass Engine(..., decode=fn)")
        need = min(len(prompt) + params.max_tokens, cfg.max_seq_len) + k + 1
        if self.cache.blocks_for(need) > self.cache.n_blocks:
            raise ValueError(f"request can never fit: prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) needs "
                             f"{self.cache.blocks_for(need)} cache blocks but the cache has {self.cache.n_blocks} "
                             f"({self.cache.capacity_tokens} tokens); raise EngineConfig.kv_cache_tokens or lower max_tokens")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng,
                                                                             device="cpu"))
        seq = Sequence(request_id=rid, tokens=prompt, prompt_len=len(prompt), params=params,
                       generator=torch.Generator(device="cpu").manual_seed(seed), on_token=on_token)
        if params.penalised:
            seq.counts = torch.zeros(cfg.vocab_size, device=self.device)
            seq.seen = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=self.device)
            seq.seen[to_device(prompt, self.device)] = True
        self._requests[rid] = seq
        if self._sharing:
            seq.group = self._groups.setdefault(tuple(prompt), PromptGroup())
            seq.group.members.append(seq)
        self.scheduler.add(seq)
        return rid

    def cancel(self, request_id: str) -> bool:
        """Stop a request and free its cache blocks; False if it is unknown or already finished."""
        seq = self._requests.get(request_id)
        if seq is None or seq.finished:
            return False
        self._remove(seq)
        seq.finish_reason = "cancelled"
        self._finalize_text(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def output(self, request_id: str, *, pop: bool = False) -> RequestOutput:
        """A request's output so far (complete once finish_reason is set); pop=True forgets the request."""
        seq = self._requests.pop(request_id) if pop else self._requests[request_id]
        return RequestOutput(
            request_id=seq.request_id, prompt_ids=seq.tokens[:seq.prompt_len], output_ids=seq.output_ids,
            logprobs=list(seq.logprobs), sampled_logprobs=list(seq.sampled_logprobs),
            top_logprobs=list(seq.top_logprobs), finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            text=seq.text, n_drafted=seq.n_drafted, n_accepted=seq.n_accepted)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None, *,
                 on_token: Callable[[TokenEvent], None] | None = None) -> list[RequestOutput]:
        """Run a batch of prompts to completion; outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        rids = [self.add_request(p, sp, on_token=on_token) for p, sp in zip(prompts, plist)]
        while any(not self._requests[r].finished for r in rids):
            self.step()
        return [self.output(r, pop=True) for r in rids]

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
               request_id: str | None = None) -> Iterator[TokenEvent]:
        """Yield one request's tokens as they are produced; closing the iterator cancels the request."""
        rid = self.add_request(prompt_ids, params, request_id=request_id)
        try:
            while not self._requests[rid].finished:
                for event in self.step():
                    if event.request_id == rid:
                        yield event
        finally:
            self.cancel(rid)
            self._requests.pop(rid, None)

    def warm_up(self, batches: tuple[int, ...] = (1, 2)):
        """Compile the decode step now, instead of in the middle of the first requests (a server calls
        this before it listens). One graph serves batch 1, another every larger batch: warm (1,) for
        a single stream. A no-op unless compile=True."""
        if self._compiled is None:
            return
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        for n in batches:
            self.generate([[0]] * n, params)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of MTP draft tokens accepted so far (0 when nothing was drafted)."""
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    # ------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Schedule, run one forward, sample; returns the tokens emitted by this step."""
        work = self.scheduler.schedule()
        if not work:
            return []
        self.n_steps += 1
        model, cfg = self.model, self.model.cfg
        # Forks (fed 0 tokens: their prompt latents were copied) sample from their group's kept
        # hidden state, appended after the forward's rows; the rest feed their tokens.
        forks = [seq for seq, n in work if n == 0]
        fed = [(seq, n) for seq, n in work if n > 0]
        ids, rows, starts, lens = [], [], [], []
        for seq, n in fed:
            feed = [seq.tokens[-1]] + seq.drafts if seq.drafts else seq.tokens[seq.num_cached:seq.num_cached + n]
            assert len(feed) == n
            ids += feed
            rows.append(seq.row)
            starts.append(seq.num_cached)
            lens.append(n)
        eng = None
        if not fed:  # forks only
            h = forks[0].group.hidden.new_empty(0, cfg.dim)
        # One token per sequence: a plain decode step (compile excludes speculation, so no drafts here).
        elif self._compiled is not None and len(ids) == len(fed) and self._compiled.fits(starts):
            h = self._compiled(ids, rows, starts)  # (N, D)
        else:
            batch = CacheBatch(self.cache, rows, starts, lens, n_heads=cfg.n_heads, **self._batch_kwargs)
            eng = self.engram.batch(rows, starts, lens) if self.engram is not None else None
            h = model.hidden(to_device(ids, self.device)[None], batch.positions[None], cache=batch, engram=eng)[0]

        offsets = list(itertools.accumulate(lens, initial=0))
        # Sequences whose prompt this step completes: the other members of their group, and any
        # that join it while one of them runs, fork from them.
        ended = []
        for (seq, n), end in zip(fed, offsets[1:]):
            if seq.group is not None and len(seq.tokens) == seq.prompt_len == seq.num_cached + n:
                seq.group.hidden = h[end - 1].clone()
                ended.append(seq)
        if forks:
            h = torch.cat([h, torch.stack([seq.group.hidden for seq in forks])])
            if self.engram is not None:
                for seq in forks:
                    self.engram.restore(seq.row, seq.group.state)
            self.n_forked += len(forks)
        offsets = offsets[:-1] + list(range(offsets[-1], offsets[-1] + len(forks)))
        lens = lens + [1] * len(forks)  # one row each: the group's kept hidden state
        work = fed + [(seq, 0) for seq in forks]
        events, emitted = self._sample(work, h, offsets, lens)

        drafting, kept = [], []
        for idx, (seq, n) in enumerate(work):
            n_fed = len(emitted[idx]) if seq.drafts else n  # a verification keeps the pending token + accepted drafts
            kept.append(n_fed)
            seq.num_cached += n_fed
            seq.drafts, seq.draft_probs = [], None
            if self.drafter is not None and not seq.finished:
                drafting.append((seq, h[offsets[idx]:offsets[idx] + lens[idx]], seq.remaining == 1))
        if eng is not None:
            eng.commit(kept[:len(fed)])  # the compiled step wrote its own (one token per sequence, all kept)
        if self.engram is not None:
            for seq in ended:  # the slot now holds the state at the prompt's end: what a fork starts from
                seq.group.state = self.engram.snapshot(seq.row)
        if drafting:
            self.drafter.run(drafting)
        for seq, _ in work:
            if seq.finished:
                self._remove(seq)
        return events

    def _remove(self, seq: Sequence):
        """Forget a finished or cancelled sequence: its blocks, and its prompt group once that is empty."""
        self.scheduler.remove(seq)
        if seq.group is not None:  # the engine makes the groups (add_request) and ends them here
            seq.group.members.remove(seq)
            if not seq.group.members:
                del self._groups[tuple(seq.tokens[:seq.prompt_len])]

    def _sample(self, work, h: torch.Tensor, offsets: list[int], lens: list[int]):
        """Sample or verify every sequence that finished feeding its tokens; commit the results.

        Returns the events and, per work index, the logits rows of its emitted tokens.
        """
        model, cfg, K = self.model, self.model.cfg, self.config.speculative_tokens
        plain = [i for i, (seq, n) in enumerate(work) if not seq.drafts and seq.num_cached + n == len(seq.tokens)]
        verify = [i for i, (seq, n) in enumerate(work) if seq.drafts]
        sample_rows = [offsets[i] + lens[i] - 1 for i in plain] + [offsets[i] + j for i in verify for j in range(K + 1)]
        if not sample_rows:
            return [], {}
        logits = model.head(h[to_device(sample_rows, self.device)]).float()
        # One token per logits row is scored: the sampled token of a plain row, the draft a
        # verification row judged (or the token it drew instead). Rows past a rejection are unused.
        toks, slps, n_acc = [], [], None
        if plain:
            tok, slp = sample_tokens(logits[:len(plain)], [work[i][0] for i in plain], cfg.vocab_size)
            toks.append(tok)
            slps.append(slp)
        if verify:
            n_acc, tok, slp = verify_drafts(logits[len(plain):], [work[i][0] for i in verify], K, cfg.vocab_size)
            toks.append(tok.flatten())
            slps.append(slp.flatten())
        row_tok = toks[0] if len(toks) == 1 else torch.cat(toks)
        row_slp = slps[0] if len(slps) == 1 else torch.cat(slps)
        # Raw log-probabilities of every scored token in one batched op; then everything the host
        # needs from this step in one read-back (on a GPU, the step's one wait).
        top_n = max(work[i][0].params.logprobs for i in plain + verify)
        lp, top = raw_logprobs(logits, row_tok, top_n)
        got = read_back(lp, row_slp, row_tok, *([n_acc] if verify else []), *([top.values, top.indices] if top_n else []))
        lp, slp, toks = got[0], got[1], [int(t) for t in got[2]]
        top_v, top_i = (got[-2], [int(t) for t in got[-1]]) if top_n else ([], [])

        emitted = {i: [r] for r, i in enumerate(plain)}
        for r, (i, a) in enumerate(zip(verify, [int(a) for a in got[3]] if verify else [])):
            seq, first = work[i][0], len(plain) + r * (K + 1)
            seq.n_drafted += K
            seq.n_accepted += a
            self.n_drafted += K
            self.n_accepted += a
            emitted[i] = list(range(first, first + a + 1))
        events = []
        for i in sorted(emitted):
            seq = work[i][0]
            n_alt = seq.params.logprobs
            for r in emitted[i]:
                if seq.finished:
                    break  # a stop among this step's accepted drafts
                alts = tuple(zip(top_i[r * top_n:r * top_n + n_alt], top_v[r * top_n:r * top_n + n_alt]))
                events.append(self._commit(seq, toks[r], lp[r], slp[r], alts))
        return events, emitted

    def _commit(self, seq: Sequence, token: int, logprob: float, sampled_logprob: float, alts) -> TokenEvent:
        """Append one token to a sequence, record its logprobs and decide whether it finished."""
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        seq.sampled_logprobs.append(sampled_logprob)
        seq.top_logprobs.append(alts)
        if seq.counts is not None:
            seq.counts[token] += 1
            seq.seen[token] = True
        p, cfg = seq.params, self.model.cfg
        n_out = len(seq.tokens) - seq.prompt_len
        if (token in cfg.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif p.stop and (hit := self._stop_string(seq)) is not None:
            seq.finish_reason, seq.stop_reason = "stop", hit
        elif n_out >= p.max_tokens or len(seq.tokens) >= cfg.max_seq_len:
            seq.finish_reason = "length"
        if seq.finished:
            self._finalize_text(seq)
        event = TokenEvent(seq.request_id, token, n_out - 1, logprob, sampled_logprob, alts, seq.finish_reason)
        if seq.on_token is not None:
            seq.on_token(event)
        return event

    def _stop_string(self, seq: Sequence) -> str | None:
        """A stop string that the newest token completed, if any.

        A new match ends inside the newest token's text and is at most the longest stop string
        long, so only a tail of the output is decoded: the cost per token stays constant however
        long the output grows (decoding the whole output every token was quadratic). The window
        grows only if the tail decodes to too few characters (e.g. tokens that decode to nothing).
        """
        ids, stops = seq.output_ids, seq.params.stop
        need = max(map(len, stops)) + len(self.decode(ids[-1:])) + 8
        m = need
        while True:
            text = self.decode(ids[-m:])
            # +4: the window's first characters may be a UTF-8 sequence cut by the window's edge.
            if m >= len(ids) or len(text) >= need + 4:
                break
            m *= 2
        window = text[-need:]
        hits = [s for s in stops if s in window]
        return min(hits, key=window.find) if hits else None

    def _finalize_text(self, seq: Sequence):
        if self.decode is None:
            return
        ids = seq.output_ids
        if seq.finish_reason == "stop" and isinstance(seq.stop_reason, int):
            ids = ids[:-1]  # the stop token itself is not part of the text
        text = self.decode(ids)
        if isinstance(seq.stop_reason, str):
            text = text[:text.find(seq.stop_reason)]
        seq.text = text
