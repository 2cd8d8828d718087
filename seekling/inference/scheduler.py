"""Continuous batching: which sequences run in the next forward, and how many of their tokens.

A sequence is its token list (prompt, then generated tokens) plus `num_cached`, the positions
already in the latent cache. Every step must feed tokens[num_cached:] to the model, and the step
that feeds the last of them samples the next token. Decode is the case of one remaining token
(plus the MTP drafts being verified); prefill is the case of many, fed in chunks that fit the
step's token budget (chunked prefill, Agrawal et al. 2024 "Sarathi-Serve"), so a long prompt
never stalls the running decodes for more than one bounded step.

Policy, per step, within `max_batch_tokens`:
1. every decode sequence, oldest first; if its next block cannot be found, the youngest running
   sequence is preempted (blocks freed, sent back to the front of the queue to be recomputed);
2. the unfinished prefills of running sequences, oldest first;
3. waiting sequences, first come first served, admitted only when free blocks cover their whole
   prompt (reserved at admission, so a prefill never waits for memory half-way).
The oldest sequence therefore always progresses; an engine checks at submission that every
request fits the cache on its own, so nothing can wait forever.

Prompt sharing: the engine puts unfinished sequences with the same prompt in one `PromptGroup`
(GRPO's G samples of a prompt, a server's n choices). The group's prompt is computed once: in
step 3 a waiting member is admitted as a fork when another member holds the whole prompt in its
cache row (it gets a copy of those latents, is fed 0 tokens, and samples its first token from the
group's kept last prompt hidden state); it waits while a member is still computing the prompt; and
only with no member running does it prefill the prompt itself. Forks cost no token budget, so step
3 keeps forking after the budget is spent. A fork that is later preempted is recomputed from its
tokens like any other sequence (or forks again).
Left out: priorities and fairness between tenants; swapping preempted latents to host memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from seekling.inference.kv_cache import LatentCache
from seekling.inference.sampling import SamplingParams


class PromptGroup:
    """The unfinished sequences that share one prompt, and that prompt's last hidden state once computed."""

    def __init__(self):
        self.members: list[Sequence] = []
        self.hidden: torch.Tensor | None = None  # (dim,): what a fork samples its first token from
        self.state = None  # per-sequence decode state at the prompt's end (Engram's), copied into each fork

    def source(self) -> Sequence | None:
        """A running member whose cache row holds the whole prompt (one to copy it from), if any."""
        if self.hidden is None:
            return None
        return next((m for m in self.members if m.row is not None and m.num_cached >= m.prompt_len), None)

    def computing(self) -> bool:
        """Whether a running member is computing the prompt now."""
        return any(m.row is not None and m.num_cached < m.prompt_len for m in self.members)


@dataclass(eq=False)
class Sequence:
    """One request's state: its tokens, its place in the cache, its sampler and its outputs so far."""

    request_id: str
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator  # on the CPU whatever the model's device (sampling.py says why)
    on_token: Callable | None = None
    row: int | None = None  # block-table row while running
    num_cached: int = 0
    drafts: list[int] = field(default_factory=list)  # MTP draft tokens awaiting verification
    draft_probs: torch.Tensor | None = None  # (k, V) the distributions they were drawn from; None if greedy
    mtp_frontier: int = 0  # MTP cache entries below this position are final
    hidden_tail: torch.Tensor | None = None  # main hidden states for [mtp_frontier, num_cached)
    # On the model's device, updated in place as tokens are committed:
    counts: torch.Tensor | None = None  # (V,) generated-token counts, for frequency/presence penalties
    seen: torch.Tensor | None = None  # (V,) prompt-or-generated mask, for the repetition penalty
    logprobs: list[float] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None
    n_drafted: int = 0
    n_accepted: int = 0
    group: PromptGroup | None = None  # with prompt sharing: the sequences with this prompt

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.num_cached

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def forget_cache(self):
        """After preemption: everything cached is gone and will be recomputed from the tokens."""
        self.row, self.num_cached, self.drafts, self.draft_probs = None, 0, [], None
        self.mtp_frontier, self.hidden_tail = 0, None


class Scheduler:
    def __init__(self, cache: LatentCache, *, max_batch_tokens: int):
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: oldest first
        self.n_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def remove(self, seq: Sequence):
        """Drop a finished or cancelled sequence and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.cache.close_row(seq.row)
            seq.row = None
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _preempt(self, seq: Sequence):
        self.running.remove(seq)
        self.cache.close_row(seq.row)
        seq.forget_cache()
        self.waiting.appendleft(seq)
        self.n_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next forward's work: (sequence, tokens to feed), decodes first. Never over budget."""
        budget = self.max_batch_tokens
        work: list[tuple[Sequence, int]] = []
        scheduled: set[int] = set()
        for seq in [s for s in self.running if s.remaining == 1]:
            if seq not in self.running:  # preempted by an older sequence in this loop
                continue
            n = 1 + len(seq.drafts)
            while not self.cache.reserve(seq.row, seq.num_cached + n):
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.row is None:
                continue
            work.append((seq, n))
            scheduled.add(id(seq))
            budget -= n
        for seq in self.running:
            if budget <= 0:
                break
            if seq.remaining > 1:
                n = min(seq.remaining, budget)
                work.append((seq, n))
                budget -= n
        for seq in list(self.waiting):
            if not self.cache.num_free_rows:
                break
            source = None
            if seq.group is not None and len(seq.group.members) > 1:
                source = seq.group.source()
                if source is None and seq.group.computing():
                    continue  # another member is computing the prompt: fork from it when it is done
            if source is None and budget <= 0:
                continue  # only forks are free
            row = self.cache.open_row()
            # Reserve the whole prompt, plus the position of the first sampled token.
            if not self.cache.reserve(row, len(seq.tokens) + 1):
                self.cache.close_row(row)
                break
            self.waiting.remove(seq)
            seq.row = row
            self.running.append(seq)
            if source is not None:
                self.cache.copy_prefix(source.row, row, seq.prompt_len)
                seq.num_cached = seq.prompt_len
                work.append((seq, 0))
                continue
            n = min(seq.remaining, budget)
            work.append((seq, n))
            budget -= n
        assert budget >= 0
        return work
