"""Self-speculative decoding with the model's own multi-token-prediction layers (DeepSeek-V3 2.2).

Shapes: M sequences, K draft tokens per step, V vocabulary, D model dim.

MTP depth j at position i combines depth j-1's hidden at i (depth 0: the main model's final-normed
hidden) with the embedding of token i+j, and predicts token i+j+1. After a main forward has made
positions up to `last` final (their tokens are committed), depth 1 at `last` sees the freshly
committed token and proposes draft 1; depth j at `last` sees draft j-1 and proposes draft j. The
next main forward feeds [pending token, draft 1..K] and `accept_drafts` keeps a prefix.

Each depth has its own cache slot (layer n_layers + j - 1) and runs over every position since its
cache was last final: usually the a+1 positions the last verification accepted. Entries computed
from a draft token are provisional; `mtp_frontier` marks where the final ones end, and the main
hidden states above it are kept (`hidden_tail`, K-1 vectors at most) so the next round can redo them.
With K larger than the model's MTP depth, the last MTP layer is reused for the deeper drafts (as
vLLM does), each depth still in its own cache slot.

Verification is standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023): the
emitted tokens are distributed exactly as the target model's processed distribution, so sampling
with and without drafts is the same distribution, and greedy output is the same tokens.
Left out: tree drafts (several candidates per position); one chain keeps verification one forward.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seekling.inference.attention import CacheBatch
from seekling.inference.host import read_back, to_device
from seekling.inference.kv_cache import LatentCache
from seekling.inference.sampling import (
    draw,
    draw_uniforms,
    make_penalties,
    sample_from,
    target_probs,
)


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
                  u_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling over M rows at once.

    p (M,K+1,V) target distributions, q (M,K,V) draft distributions, drafts (M,K) drawn from q,
    u_accept (M,K), u_sample (M,). Draft j is kept while u < p(x)/q(x); at the first rejection the
    token is drawn from normalise(max(0, p - q)), and if all K survive a bonus token comes from p[K].
    Returns (n_accepted (M,), next_token (M,)).
    """
    M, K = drafts.shape
    px = p[:, :K].gather(2, drafts[..., None]).squeeze(-1)
    qx = q.gather(2, drafts[..., None]).squeeze(-1)
    ok = u_accept * qx < px  # u < p/q without dividing; q(x) > 0 for a drawn draft
    n_acc = ok.int().cumprod(dim=1).sum(dim=1)  # length of the accepted prefix
    rows = torch.arange(M, device=p.device)
    target = p[rows, n_acc]  # (M,V) at the first rejection, or the bonus position
    residual = torch.where((n_acc < K)[:, None], (target - q[rows, n_acc.clamp_max(K - 1)]).clamp_min(0), target)
    # p == q makes rejection impossible, but rounding can still leave an all-zero residual: use p.
    residual = torch.where((residual.sum(-1) <= 0)[:, None], target, residual)
    return n_acc, sample_from(residual, u_sample)


def verify_drafts(logits: torch.Tensor, seqs: list, K: int, vocab_size: int):
    """Judge each sequence's K drafts against the target logits (M*(K+1), V) of [pending, drafts].

    Returns n_accepted (M,), the token scored at each row (M,K+1) - the accepted draft, then the
    token drawn at the first rejection or the bonus position - and its processed log-probability.
    """
    M, dev = len(seqs), logits.device
    drafts = to_device([s.drafts for s in seqs], dev)
    params = [s.params for s in seqs for _ in range(K + 1)]
    # Row (m, j) conditions on drafts[:j]: draft i extends the history of rows j > i.
    extra = [(m * (K + 1) + j, s.drafts[i]) for m, s in enumerate(seqs) for j in range(K + 1) for i in range(j)]
    penalties = make_penalties([s for s in seqs for _ in range(K + 1)], vocab_size, dev,
                               tuple(to_device(list(zip(*extra)), dev)) if extra else None)
    if penalties is None and all(p.greedy for p in params):
        # Greedy is accept_drafts with one-hot p and q: keep drafts while they are the argmax.
        best = logits.argmax(dim=-1).view(M, K + 1)
        n_acc = (drafts == best[:, :K]).int().cumprod(dim=1).sum(dim=1)
        return n_acc, best, torch.zeros(M, K + 1, device=dev)
    p = target_probs(logits, params, penalties).view(M, K + 1, -1)
    u = draw_uniforms([s.generator for s in seqs], K + 1)  # on the host (sampling.py says why)
    greedy = torch.tensor([s.params.greedy for s in seqs], device="cpu")
    u = to_device(torch.where(greedy[:, None], 0.5, u), dev)  # one-hot rows give the same answer for any u
    # Greedy drafts were kept without their (one-hot) distributions.
    one_hot = F.one_hot(drafts, p.shape[-1]).to(p.dtype)
    q = torch.stack([s.draft_probs if s.draft_probs is not None else one_hot[m] for m, s in enumerate(seqs)])
    n_acc, nxt = accept_drafts(p, q, drafts, u[:, :K], u[:, K])
    tok = torch.cat((drafts, nxt[:, None]), dim=1)
    tok[torch.arange(M, device=dev), n_acc] = nxt
    return n_acc, tok, p.gather(2, tok[..., None]).squeeze(-1).log()


@dataclass
class _Plan:
    seq: object
    first: int  # first position this round recomputes
    last: int  # last position (inclusive)
    hidden: torch.Tensor  # (last-first+1, D) main hidden states for those positions
    drafting: bool


class MTPDrafter:
    """Keeps each sequence's MTP caches current and proposes K draft tokens for decoding sequences."""

    def __init__(self, model, cache: LatentCache, k: int, **batch_kwargs):
        assert model.cfg.n_mtp_layers >= 1 and k >= 1
        self.model, self.cache, self.k = model, cache, k
        self.batch_kwargs = batch_kwargs

    def run(self, items: list[tuple[object, torch.Tensor, bool]]):
        """items: (sequence, main hidden states (T,D) for the positions it just fed, drafting?)."""
        k, plans = self.k, []
        for seq, h_new, drafting in items:
            last = seq.num_cached - 1
            first = seq.mtp_frontier
            h = h_new if seq.hidden_tail is None else torch.cat((seq.hidden_tail, h_new))
            h = h[: last - first + 1]  # a verification feeds drafts beyond `last` that were rejected
            assert h.shape[0] == last - first + 1, "MTP hidden-state bookkeeping out of step"
            # Outside drafting, only positions whose K next tokens are all committed are final.
            hi = last if drafting else min(last, len(seq.tokens) - 1 - k)
            if hi >= first:
                plans.append(_Plan(seq, first, hi, h[: hi - first + 1], drafting))
            frontier = max(first, last + 2 - k) if drafting else max(first, hi + 1)
            seq.hidden_tail = h[frontier - first:].clone() if frontier <= last else None
            seq.mtp_frontier = frontier
        if plans:
            self._draft(plans)

    def _draft(self, plans: list[_Plan]):
        model, cfg, k, dev = self.model, self.model.cfg, self.k, self.cache.device
        drafting = [p for p in plans if p.drafting]
        seqs = [p.seq for p in drafting]
        M = len(seqs)
        # Drafts stay on the device until all K are drawn: depth j's input holds depth j-1's drafts,
        # and reading each depth back would wait on a GPU K times per step instead of once.
        drafted = torch.zeros(max(M, 1), k, dtype=torch.long, device=dev)  # (M, K)
        probs = []  # per depth: (M, V) distributions the drafts were drawn from; empty if all greedy
        h_prev = torch.cat([p.hidden for p in plans])
        lens = [p.last - p.first + 1 for p in plans]
        ends = list(itertools.accumulate(lens))
        draft_rows = to_device([ends[i] - 1 for i, p in enumerate(plans) if p.drafting], dev)
        greedy = all(s.params.greedy for s in seqs) and not any(s.params.penalised for s in seqs)
        for j in range(1, k + 1):
            # Positions past a drafting sequence's tokens are its drafts: (slot in ids, flat index in drafted).
            ids, slots, m = [], [], 0
            for p in plans:
                n_tok = len(p.seq.tokens)
                for x in range(p.first + j, p.last + j + 1):
                    if x < n_tok:
                        ids.append(p.seq.tokens[x])
                    else:
                        slots.append((len(ids), m * k + x - n_tok))
                        ids.append(0)
                m += p.drafting
            ids = to_device(ids, dev)
            if slots:
                at, src = to_device(list(zip(*slots)), dev)
                ids[at] = drafted.view(-1)[src]
            batch = CacheBatch(self.cache, [p.seq.row for p in plans], [p.first for p in plans], lens,
                               n_heads=cfg.n_heads, slot=cfg.n_layers + j - 1, **self.batch_kwargs)
            cos, sin = model.rope(batch.positions[None])
            layer = model.mtp[min(j, cfg.n_mtp_layers) - 1]
            h_prev = layer(h_prev[None], model.embed(ids)[None], cos, sin, cache=batch)[0]
            if not drafting:
                continue
            logits = model.head(h_prev[draft_rows]).float()
            if greedy:
                tok = logits.argmax(dim=-1)  # a greedy draft's q is one-hot: nothing to keep
            else:
                # Drafts so far extend each row's history for the penalties.
                rows = torch.arange(M, device=dev).repeat_interleave(j - 1)
                extra = (rows, drafted[:, :j - 1].flatten()) if j > 1 else None
                penalties = make_penalties(seqs, cfg.vocab_size, dev, extra)
                q = target_probs(logits, [s.params for s in seqs], penalties)
                tok = draw(q, [s.params for s in seqs], [s.generator for s in seqs])
                probs.append(q)
            drafted[:, j - 1] = tok
        if not drafting:
            return
        toks = [int(t) for t in read_back(drafted[:M])[0]]
        q_all = torch.stack(probs, dim=1) if probs else None  # (M, K, V)
        for i, p in enumerate(drafting):
            p.seq.drafts = toks[i * k:(i + 1) * k]
            p.seq.draft_probs = q_all[i] if q_all is not None else None
