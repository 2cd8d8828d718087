"""Sampling: per-request parameters, batched logit processing, and token choice from per-request RNGs.

Shapes: M sampling rows (one per sequence, or k+1 per sequence when verifying drafts), V vocabulary.

Every request owns a `torch.Generator` and draws exactly one uniform per sampled token (plus the
acceptance uniforms of speculative decoding), so a seeded request gives the same tokens whatever
else is in the batch. Tokens are drawn by inverse CDF from that uniform rather than with
`torch.multinomial`, which would need one call per row to honour per-row generators anyway.
The generators are CPU generators whatever the model's device: the step's uniforms are drawn on
the host and copied to the device with one transfer. A seed then means the same uniforms on a
CPU, a GPU or MPS (CUDA's Philox stream differs from the CPU's Mersenne Twister), and a batch
costs no per-row random kernel on a GPU. Everything else here runs on the logits' device.

Processing order follows vLLM and Hugging Face: repetition, frequency and presence penalties on
the raw logits, then temperature, then top-k, top-p and min-p truncation. Temperature 0 means
greedy: argmax of the penalised logits, whose processed distribution is one-hot.

Two logprobs are reported per token: `logprob`, the fp32 log-softmax of the raw logits (what a
trainer recomputes, so RL can compare policies), and `sampled_logprob`, under the processed
distribution the token was actually drawn from.
Left out: logit bias, bad-word lists and guided decoding; they would slot in as one more stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seekling.inference.host import to_device
from seekling.validate import checker

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for `top_logprobs`


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request is decoded. `temperature=0` is greedy; `logprobs=N` returns N alternatives per token."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0  # on generated tokens only, as OpenAI and vLLM
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # on prompt and generated tokens, as Hugging Face and vLLM
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; need the engine's `decode` function
    ignore_eos: bool = False
    logprobs: int = 0  # number of top alternatives (raw log-softmax) reported per token

    def __post_init__(self):
        need = checker("SamplingParams")

        # Accept lists (JSON requests) but store tuples so the dataclass stays hashable and frozen.
        for f in ("stop_token_ids", "stop"):
            v = getattr(self, f)
            if isinstance(v, (str, int)):
                v = (v,)
            object.__setattr__(self, f, tuple(v))
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
             f"must be a positive integer, got {self.max_tokens!r}")
        need(self.temperature >= 0, "temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be an integer >= 0 (0 disables), got {self.top_k!r}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        for f in ("presence_penalty", "frequency_penalty"):
            need(-2 <= getattr(self, f) <= 2, f, f"must be in [-2, 2] (OpenAI's range), got {getattr(self, f)}")
        need(self.repetition_penalty > 0, "repetition_penalty", f"must be > 0 (1 disables), got {self.repetition_penalty}")
        need(self.seed is None or isinstance(self.seed, int), "seed", f"must be an integer or None, got {self.seed!r}")
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             f"must be non-negative token ids, got {self.stop_token_ids!r}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", f"must be non-empty strings, got {self.stop!r}")
        need(isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS, "logprobs",
             f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class Penalties:
    """Per-row token statistics for the penalties: generated-token counts and a prompt-or-generated mask."""

    counts: torch.Tensor  # (M,V) fp32
    seen: torch.Tensor  # (M,V) bool


def process_logits(logits: torch.Tensor, params: list[SamplingParams],
                   penalties: Penalties | None = None) -> torch.Tensor:
    """Raw logits (M,V) -> processed fp32 logits, truncated tokens at -inf. Greedy rows get penalties only."""
    x = logits.float().clone()
    V = x.shape[1]
    # Every per-row parameter in one table, one host-to-device copy; each column is then (M, 1).
    # Greedy rows get neutral values (temperature 1, no truncation); top_p 1 becomes 2, never reached.
    table = [(p.repetition_penalty, p.frequency_penalty, p.presence_penalty, 1.0 if p.greedy else p.temperature,
              float(V if p.greedy or not p.top_k else p.top_k), 2.0 if p.greedy or p.top_p >= 1.0 else p.top_p,
              0.0 if p.greedy else p.min_p) for p in params]
    rep, freq, pres, temp, k, limit, min_p_col = to_device(table, x.device, torch.float32).T[..., None]
    if penalties is not None:
        # Repetition penalty (Keskar et al. 2019, CTRL): shrink seen logits towards zero.
        x = torch.where(penalties.seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - freq * penalties.counts - pres * (penalties.counts > 0).float()
    if all(p.greedy for p in params):
        return x
    x = x / temp
    top_k = [p.top_k if not p.greedy else 0 for p in params]
    top_p = [p.top_p if not p.greedy else 1.0 for p in params]
    if any(top_k) or any(v < 1.0 for v in top_p):
        sorted_x, order = x.sort(dim=-1, descending=True)
        remove = torch.zeros_like(sorted_x, dtype=torch.bool)
        if any(top_k):
            remove |= torch.arange(V, device=x.device)[None] >= k
            sorted_x = sorted_x.masked_fill(remove, float("-inf"))
        if any(v < 1.0 for v in top_p):
            probs = sorted_x.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
            remove |= before >= limit
        x = x.masked_fill(torch.zeros_like(remove).scatter_(1, order, remove), float("-inf"))
    min_p = [p.min_p if not p.greedy else 0.0 for p in params]
    if any(min_p):
        probs = x.softmax(dim=-1)
        floor = min_p_col * probs.max(dim=-1, keepdim=True).values
        x = x.masked_fill(probs < floor, float("-inf"))
    return x


def distribution(processed: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Processed logits -> probabilities (M,V); greedy rows are one-hot at their argmax."""
    probs = processed.softmax(dim=-1)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        g = to_device(greedy, probs.device)
        probs[g] = torch.zeros_like(probs[g]).scatter_(1, processed[g].argmax(-1, keepdim=True), 1.0)
    return probs


def draw_uniforms(generators: list[torch.Generator], n: int = 1) -> torch.Tensor:
    """(M, n) uniforms on the host, row i from CPU generator i: the only randomness the sampler uses."""
    return torch.stack([torch.rand(n, generator=g, device="cpu") for g in generators])


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs (M,V), u (M,) in [0,1) -> token ids (M,). Zero-probability tokens are never drawn."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    tok = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[1] - 1)
    # Rounding can push the target onto the top of the CDF; fall back to the last token with mass.
    # Always computed: asking first whether any row needs it would wait on a GPU every step.
    bad = probs.gather(1, tok[:, None]).squeeze(1) <= 0
    last = (probs > 0).float().cumsum(-1).argmax(-1)
    return torch.where(bad, last, tok)


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0):
    """fp32 log-softmax of raw logits at `tokens` (M,), and the top_n (values, ids) alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    top = logp.topk(top_n, dim=-1) if top_n else None
    return chosen, top


def make_penalties(seqs: list, vocab_size: int, device: torch.device,
                   extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> Penalties | None:
    """Penalty statistics for rows of `seqs`, or None when no row is penalised.

    `extra` = (rows, tokens), 1-D on `device`: tokens (drafts) that extend those rows' histories.
    Rows of unpenalised sequences start empty; whatever they get has no effect (penalties of 0 and 1).
    """
    if not any(seq.params.penalised for seq in seqs):
        return None
    counts = torch.zeros(len(seqs), vocab_size, device=device)
    seen = torch.zeros(len(seqs), vocab_size, dtype=torch.bool, device=device)
    have = [i for i, seq in enumerate(seqs) if seq.counts is not None]
    if have:
        idx = to_device(have, device)
        counts[idx] = torch.stack([seqs[i].counts for i in have])
        seen[idx] = torch.stack([seqs[i].seen for i in have])
    if extra is not None and extra[0].numel():
        rows, tokens = extra
        counts.index_put_((rows, tokens), torch.ones(len(tokens), device=device), accumulate=True)
        seen[rows, tokens] = True
    return Penalties(counts=counts, seen=seen)


def target_probs(logits: torch.Tensor, params: list[SamplingParams], penalties: Penalties | None) -> torch.Tensor:
    """The processed distribution (M,V) each row's token is drawn from."""
    return distribution(process_logits(logits, params, penalties), params)


def draw(probs: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row; greedy rows are one-hot and consume no randomness."""
    u = torch.full((len(params),), 0.5, device="cpu")
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        u[rows] = draw_uniforms([generators[i] for i in rows]).squeeze(1)
    return sample_from(probs, to_device(u, probs.device))


def sample_tokens(logits: torch.Tensor, seqs: list, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` (M,V) for `seqs`, and its log-probability under the processed distribution."""
    params = [s.params for s in seqs]
    penalties = make_penalties(seqs, vocab_size, logits.device)
    if penalties is None and all(p.greedy for p in params):  # the common greedy batch: argmax, nothing else
        return logits.argmax(dim=-1), torch.zeros(len(seqs), device=logits.device)
    probs = target_probs(logits, params, penalties)
    tok = draw(probs, params, [s.generator for s in seqs])
    return tok, probs.gather(1, tok[:, None]).squeeze(1).log()
