"""Engram: hashed n-gram conditional memory (Cheng et al., "Conditional Memory via Scalable Lookup",
arXiv 2601.07372), numerically as DeepSeek's `engram_demo_v1.py` (deepseek-ai/Engram).

Shapes: B batch, T tokens, n residual streams (hc_mult; 1 without mHC), D model dim, N max n-gram
order, H heads per order, G = (N-1)*H hash heads, d = embed_dim / H one head's row width,
E = (N-1)*embed_dim the looked-up vector, C = n*D convolution channels, W = (K-1)*dilation the
convolution's reach into the past, S decode-state slots.

At a chosen layer, before attention, `h = h + Engram(h, ids)`:
  1. compressed ids: each token id goes through `compress` (V,), built from the tokenizer by
     seekling/engram_vocab.py (case, accents and spacing variants share one id), held by EngramVocab.
  2. hashing, per layer: for n = 2..N, `mix_n = XOR_{k<n} id_{t-k} * mult_k` in wrapping int64
     (ids before the sequence start are the compressed pad id), and for each of the H heads of
     order n, `index = mix_n mod p` with p a prime; primes are distinct across every head and
     layer, so two heads never collide in the same way. One table holds all G heads at offsets;
     their rows are concatenated into e (B,T,E).
  3. gating, per stream: `g = <RMSNorm(W_K e), RMSNorm(h)> / sqrt(D)`,
     `g = sign(g) sqrt(max(|g|, 1e-6))`, `v = sigmoid(g) W_V e`. W_V and the table are shared by the
     streams; W_K and both norms are per stream. So the memory is read once and each stream decides
     how much of it to take in.
  4. short convolution: `out = v + SiLU(causal depthwise conv1d(RMSNorm(v)))`, kernel K = 4,
     dilation N (per stream norm, C channels).

Two paths compute the same thing (tests/test_engram.py holds them to each other, token by token):
  - full sequence: ids (B,T) from position 0 (right padding is harmless, everything is causal);
    `ngram_windows` left-pads the ids, conv1d left-pads with zeros. Training and plain forwards.
  - step: tokens packed as the engine packs them (1, sum L_i), segment i continuing sequence slot
    `slots[i]` from position `starts[i]`. The caller owns an `EngramState` (each slot's last N-1
    compressed ids and each Engram layer's last W conv inputs), wraps one forward's segments in an
    `EngramBatch`, and after the forward calls `batch.commit(keep)`: keep < length drops rejected
    speculative tokens. A segment with start 0 ignores whatever its slot held, so a reused or
    preempted-and-recomputed slot needs no reset. (The engine's compiled decode step reads the same
    state through inference/compiled.py's DecodeEngram, one token per sequence.)

Numerics kept from the demo: multipliers `2 r + 1`, r ~ numpy default_rng(seed + 10007 * layer)
in [0, (int64max // V) // 2) so that no id * multiplier overflows; primes by next-prime search from
head_rows - 1, layer by layer, order by order, head by head; bias on W_K and W_V; no bias on the
conv; conv norm eps 1e-5. One deliberate difference: the demo bounds the multipliers by the
*compressed* vocabulary size, which depends on the tokenizer; we bound them by the model's id space
V (>= the compressed size), so a layer's hashing is fixed by (seed, layer, V) before any tokenizer
is seen. Built with V equal to the compressed size (and an identity map), the two agree exactly.
The multipliers are a persistent buffer: a checkpoint carries the hashing it was trained with, even
if numpy's Generator stream ever changes (NEP 19 does not freeze it; tests pin today's values).

The table's gradient is sparse by default (`nn.Embedding(sparse=True)`): a step's gradient is the
looked-up rows only, so with a lazy optimizer (torch.optim.SparseAdam: moments and updates of the
touched rows only) a step costs time in the rows a batch touches, not in the table's size
(bench/bench_engram_table.py measures it); seekling's trainer uses train/optim.py's RowSparseAdam,
SparseAdam's update with a checkpointable step. A dense optimizer rejects sparse gradients; set
`table.sparse = False` (see `table_parameters`) to train the table with one.

Left out: host-memory placement and prefetch of the table (the paper's offloading; the table is an
ordinary parameter, so moving it is the caller's choice), and fused kernels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seekling.validate import checker

# The demo's PRIME_1: layer l's multipliers come from the generator seeded with seed + 10007 * l.
LAYER_SEED_STRIDE = 10007
# The gate's floor inside the square root (the demo's clamp_min(1e-6)): keeps the gradient of
# sqrt finite at g = 0.
GATE_FLOOR = 1e-6
# The demo's ShortConv RMSNorm eps (its gating norms use torch's default; ours use the model's).
CONV_NORM_EPS = 1e-5


@dataclass(frozen=True, kw_only=True)
class EngramConfig:
    """Where Engram sits and how its memory is shaped; `layers=()` switches it off."""

    layers: tuple[int, ...] = ()  # block indices that get an Engram before attention (demo: 1, 15 of 30)
    max_ngram: int = 3  # N: orders 2..N are hashed (demo: 3)
    n_heads: int = 8  # hash heads per order (demo: 8)
    # Minimum rows of one head's table, per order (one int: every order). The demo uses 5 x vocab;
    # each head gets the next unused prime at or above it.
    head_rows: int | tuple[int, ...] = 5 * 4096
    embed_dim: int = 128  # width of one order's looked-up vector, split over its heads (demo: 512)
    kernel_size: int = 4  # the short convolution (demo: 4)
    dilation: int | None = None  # None: max_ngram, as the demo
    seed: int = 0
    pad_id: int = 2  # the *uncompressed* id padding the left of a sequence (seekling's <|pad|>)

    def __post_init__(self):
        need = checker("EngramConfig")
        # JSON gives lists; tuples keep the config frozen and hashable.
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.head_rows, list):
            object.__setattr__(self, "head_rows", tuple(self.head_rows))

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        need(isinstance(self.layers, tuple) and all(is_int(i) and i >= 0 for i in self.layers), "layers",
             f"must be a list of block indices (non-negative integers), got {self.layers!r}")
        need(all(a < b for a, b in zip(self.layers, self.layers[1:])), "layers",
             f"must be strictly increasing (the primes are assigned in this order), got {self.layers!r}")
        for f, lo in (("max_ngram", 2), ("n_heads", 1), ("embed_dim", 1), ("kernel_size", 1)):
            need(is_int(getattr(self, f)) and getattr(self, f) >= lo, f,
                 f"must be an integer >= {lo}, got {getattr(self, f)!r}")
        need(self.embed_dim % self.n_heads == 0, "embed_dim",
             f"({self.embed_dim}) must be a multiple of n_heads ({self.n_heads}): each head gets embed_dim / n_heads")
        rows = self.head_rows if isinstance(self.head_rows, tuple) else (self.head_rows,)
        need(all(is_int(r) and r >= 2 for r in rows), "head_rows",
             f"must be an integer >= 2 or a list of them (one per order 2..max_ngram), got {self.head_rows!r}")
        need(not isinstance(self.head_rows, tuple) or len(self.head_rows) == self.max_ngram - 1, "head_rows",
             f"lists one size per order 2..{self.max_ngram}, so it needs {self.max_ngram - 1} entries, "
             f"got {len(rows)}")
        need(self.dilation is None or (is_int(self.dilation) and self.dilation >= 1), "dilation",
             f"must be None (max_ngram) or a positive integer, got {self.dilation!r}")
        need(is_int(self.seed) and self.seed >= 0, "seed", f"must be a non-negative integer, got {self.seed!r}")
        need(is_int(self.pad_id) and self.pad_id >= 0, "pad_id", f"must be a token id, got {self.pad_id!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    @property
    def order_rows(self) -> tuple[int, ...]:
        """Minimum rows per head for orders 2..N."""
        r = self.head_rows
        return r if isinstance(r, tuple) else (r,) * (self.max_ngram - 1)

    @property
    def n_hash_heads(self) -> int:
        return (self.max_ngram - 1) * self.n_heads

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.n_heads

    @property
    def key_dim(self) -> int:
        """E: width of the concatenated lookup e."""
        return (self.max_ngram - 1) * self.embed_dim

    @property
    def conv_dilation(self) -> int:
        return self.max_ngram if self.dilation is None else self.dilation

    @property
    def window(self) -> int:
        """W: how many past conv inputs a decoding sequence keeps per layer."""
        return (self.kernel_size - 1) * self.conv_dilation


# ------------------------------------------------------------------------------------ hashing


def is_prime(n: int) -> bool:
    """Trial division: obviously right, and ~1 ms even for the ~1e9 head sizes of a large table."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def next_prime(after: int, taken: set[int]) -> int:
    """The smallest prime > after that is not in taken."""
    p = after + 1
    while not is_prime(p) or p in taken:
        p += 1
    return p


@functools.lru_cache(maxsize=None)
def engram_primes(cfg: EngramConfig) -> dict[int, tuple[int, ...]]:
    """Each Engram layer's G head sizes (order-major: order 2's heads, then order 3's, ...).

    The demo's search: layer by layer, order by order, each order starting at head_rows - 1 and
    each head continuing from the previous head's prime, skipping every prime already taken.
    """
    taken: set[int] = set()
    out = {}
    for layer in cfg.layers:
        primes = []
        for rows in cfg.order_rows:
            p = rows - 1
            for _ in range(cfg.n_heads):
                p = next_prime(p, taken)
                taken.add(p)
                primes.append(p)
        out[layer] = tuple(primes)
    return out


def layer_multipliers(cfg: EngramConfig, layer: int, vocab_size: int) -> list[int]:
    """The N odd multipliers of one layer's hash (see the module docstring for the bound)."""
    half = max(1, (np.iinfo(np.int64).max // vocab_size) // 2)
    r = np.random.default_rng(cfg.seed + LAYER_SEED_STRIDE * layer).integers(0, half, size=cfg.max_ngram,
                                                                              dtype=np.int64)
    return [int(x) * 2 + 1 for x in r]


def ngram_windows(ids: torch.Tensor, pad: torch.Tensor, n: int) -> torch.Tensor:
    """Compressed ids (B,T) from position 0 -> (B,T,n) windows, [..., k] = id_{t-k}, pad before the start."""
    B, T = ids.shape
    padded = torch.cat((pad.to(ids.dtype).expand(B, n - 1), ids), dim=1)  # (B, n-1+T)
    return torch.stack([padded[:, n - 1 - k:n - 1 - k + T] for k in range(n)], dim=-1)


def ngram_hashes(grams: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Windows (..., N) of compressed ids -> (..., G) head indices, each in [0, its prime).

    int64 arithmetic wraps on every torch backend; `%` is floored, so indices are non-negative even
    for a negative mix (which the multiplier bound already rules out).
    """
    N = grams.shape[-1]
    prods = grams * multipliers  # (..., N)
    mix = prods[..., 0]
    out = []
    for n in range(2, N + 1):
        mix = torch.bitwise_xor(mix, prods[..., n - 1])
        out.append(mix.unsqueeze(-1) % primes[(n - 2) * n_heads:(n - 1) * n_heads])
    return torch.cat(out, dim=-1)


# ------------------------------------------------------------------ the compressed-id map


class EngramVocab(nn.Module):
    """The compressed-id map `compress` (V,) as a buffer, so the model never needs the tokenizer.

    It starts as the identity; `load_map` installs the map seekling/engram_vocab.py builds, and a
    checkpoint carries it. Called once per forward: it turns token ids into the n-gram windows every
    Engram layer hashes (layers differ only in their multipliers and primes).
    """

    def __init__(self, cfg: EngramConfig, vocab_size: int):
        super().__init__()
        if cfg.pad_id >= vocab_size:
            raise ValueError(f"EngramConfig.pad_id: {cfg.pad_id} is outside the vocabulary (size {vocab_size}); "
                             "set it to the tokenizer's pad id")
        self.n, self.pad_id = cfg.max_ngram, cfg.pad_id
        self.register_buffer("compress", torch.arange(vocab_size, dtype=torch.long))

    @torch.no_grad()
    def load_map(self, compress) -> None:
        """Install a map (V,) of compressed ids (seekling.engram_vocab.build_compressed_vocab(...).compress)."""
        c = torch.as_tensor(compress, dtype=torch.long)
        V = self.compress.shape[0]
        if c.shape != (V,):
            raise ValueError(f"compressed-id map has shape {tuple(c.shape)}, the model's vocabulary needs ({V},); "
                             "build it from the tokenizer this model was made for")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= V):
            raise ValueError(f"compressed ids must lie in [0, {V}), got [{int(c.min())}, {int(c.max())}]")
        self.compress.copy_(c)

    @property
    def pad(self) -> torch.Tensor:
        """The compressed pad id, as a 0-d tensor (no host sync)."""
        return self.compress[self.pad_id]

    def forward(self, input_ids: torch.Tensor, batch: EngramBatch | None = None) -> EngramInput:
        """Token ids (B,T) (packed (1, sum L) with a batch) -> what every Engram layer of this forward reads."""
        cids = self.compress[input_ids]
        if batch is None:
            return EngramInput(ngram_windows(cids, self.pad, self.n), None)
        return EngramInput(batch.windows(cids.reshape(-1), self.pad)[None], batch)


@dataclass
class EngramInput:
    """One forward's n-gram windows (B,T,N), and the decode batch when stepping (None for full sequences)."""

    grams: torch.Tensor
    batch: EngramBatch | None


# -------------------------------------------------------------------------- the layer


class StreamLinear(nn.Module):
    """One Linear(in, out) per residual stream: weight (n, out, in), bias (n, out)."""

    def __init__(self, n: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(n, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., n, out): every stream's projection of the same input."""
        return torch.einsum("...i,noi->...no", x, self.weight) + self.bias


class StreamRMSNorm(nn.Module):
    """RMSNorm with its own weight per stream, fp32 inside as model/norm.py: (..., n, D) -> (..., n, D)."""

    def __init__(self, n: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Engram(nn.Module):
    """One layer's Engram: h (B,T,D), or mHC streams (B,T,n,D), and the forward's EngramInput -> an
    update of h's shape, added to the residual (every stream) before attention."""

    def __init__(self, cfg: EngramConfig, layer_id: int, *, dim: int, vocab_size: int, hc_mult: int = 1,
                 norm_eps: float = 1e-6):
        super().__init__()
        if layer_id not in cfg.layers:
            raise ValueError(f"layer {layer_id} is not one of EngramConfig.layers {cfg.layers}")
        self.n, self.dim, self.n_heads = hc_mult, dim, cfg.n_heads
        # Which slice of EngramState.conv is this layer's.
        self.state_index = cfg.layers.index(layer_id)
        self.cfg, self.layer_id = cfg, layer_id
        primes = engram_primes(cfg)[layer_id]
        self.register_buffer("multipliers", torch.tensor(layer_multipliers(cfg, layer_id, vocab_size)))
        # Derived from the config alone (pure Python), so not saved; a table of another layout fails
        # to load on its shape.
        self.register_buffer("primes", torch.empty(len(primes), dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.empty(len(primes), dtype=torch.long), persistent=False)
        self.reset_index_buffers()
        self.table = nn.Embedding(sum(primes), cfg.head_dim, sparse=True)
        E, C = cfg.key_dim, hc_mult * dim
        self.value_proj = nn.Linear(E, dim)  # W_V, shared by the streams
        self.key_proj = StreamLinear(hc_mult, E, dim)  # W_K, one per stream
        self.key_norm = StreamRMSNorm(hc_mult, dim, norm_eps)
        self.query_norm = StreamRMSNorm(hc_mult, dim, norm_eps)
        self.conv_norm = StreamRMSNorm(hc_mult, dim, CONV_NORM_EPS)
        self.window = cfg.window
        # Causal: no padding here, the forward pads W zeros on the left (or the state supplies them).
        self.conv = nn.Conv1d(C, C, cfg.kernel_size, dilation=cfg.conv_dilation, groups=C, bias=False)
        self.init_weights()

    @torch.no_grad()
    def reset_index_buffers(self) -> None:
        """(Re)compute the non-persistent primes and table offsets from the config; a model built on the
        meta device (checkpoint loading) calls this once its tensors are real."""
        primes = engram_primes(self.cfg)[self.layer_id]
        dev = self.multipliers.device
        self.primes = torch.tensor(primes, device=dev)
        self.offsets = torch.tensor([0, *primes[:-1]], device=dev).cumsum(0)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Normal(0, std) for the table and every matrix, zero biases, unit norms."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))

    def lookup(self, grams: torch.Tensor) -> torch.Tensor:
        """Windows (..., N) -> e (..., E): every head's row, concatenated."""
        idx = ngram_hashes(grams, self.multipliers, self.primes, self.n_heads) + self.offsets
        return self.table(idx).flatten(-2)

    def gated_value(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Streams h (B,T,n,D), lookup e (B,T,E) -> v (B,T,n,D)."""
        k = self.key_norm(self.key_proj(e))  # (B,T,n,D)
        g = (k * self.query_norm(h)).sum(-1) / math.sqrt(self.dim)  # (B,T,n)
        g = g.abs().clamp_min(GATE_FLOOR).sqrt() * g.sign()
        return torch.sigmoid(g).unsqueeze(-1) * self.value_proj(e).unsqueeze(-2)

    def forward(self, h: torch.Tensor, eng: EngramInput) -> torch.Tensor:
        streams = h.dim() == 4
        if streams != (self.n > 1) or (streams and h.shape[2] != self.n):
            raise ValueError(f"Engram built for {self.n} stream(s) got hidden states of shape {tuple(h.shape)}; "
                             "expected (B,T,D) without mHC, (B,T,n,D) with hc_mult = n")
        if eng.batch is not None and h.shape[0] != 1:
            raise ValueError(f"with an EngramBatch the tokens are packed as (1, sum of lengths), got {tuple(h.shape)}")
        h4 = h if streams else h.unsqueeze(2)
        v = self.gated_value(h4, self.lookup(eng.grams))  # (B,T,n,D)
        u = self.conv_norm(v).flatten(2)  # (B,T,C) the conv's input
        if eng.batch is None:
            c = self.conv(F.pad(u.transpose(1, 2), (self.window, 0))).transpose(1, 2)
        else:
            c = eng.batch.conv(self.state_index, u[0], self.conv.weight)[None]
        out = v + F.silu(c).view_as(v)
        return out if streams else out.squeeze(2)


def table_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every Engram table in a model: the rows an optimizer should update lazily."""
    return [(f"{name}.table.weight" if name else "table.weight", m.table.weight)
            for name, m in model.named_modules() if isinstance(m, Engram)]


# ------------------------------------------------------------- incremental decoding state


class EngramState:
    """Caller-owned decode state of every Engram layer of a model, one slot per sequence.

    ids (S, N-1): each slot's last N-1 compressed ids; conv (L_e, S, W, C): each Engram layer's last
    W conv inputs. The engine creates it beside its KV cache (slot = the sequence's cache row) and
    passes an EngramBatch into each forward; the model keeps nothing.
    """

    def __init__(self, cfg: EngramConfig, *, n_slots: int, dim: int, hc_mult: int = 1,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.ids = torch.zeros(n_slots, cfg.max_ngram - 1, dtype=torch.long, device=device)
        self.conv = torch.zeros(len(cfg.layers), n_slots, cfg.window, hc_mult * dim, dtype=dtype, device=device)

    def batch(self, slots: list[int], starts: list[int], lengths: list[int]) -> EngramBatch:
        return EngramBatch(self, slots, starts, lengths)

    def snapshot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of one slot's state: a sequence that continues from the same tokens starts from it."""
        return self.ids[slot].clone(), self.conv[:, slot].clone()

    def restore(self, slot: int, snap: tuple[torch.Tensor, torch.Tensor]):
        self.ids[slot], self.conv[:, slot] = snap


class _Segments:
    """Index arithmetic for packed segments, each preceded by w history rows: [hist_0, seg_0, hist_1, seg_1, ...]."""

    def __init__(self, lengths: list[int], w: int, device):
        S = len(lengths)
        base = [0] * S  # where segment i's history starts
        for i in range(1, S):
            base[i] = base[i - 1] + w + lengths[i - 1]
        self.w, self.size = w, (base[-1] + w + lengths[-1]) if S else 0
        self.base = torch.tensor(base, device=device)
        self.hist = (self.base[:, None] + torch.arange(w, device=device)).flatten()  # (S*w,)
        # Token j of segment i sits at base_i + w + j.
        self.tok = torch.tensor([b + w + j for b, L in zip(base, lengths) for j in range(L)], device=device)

    def gather(self, hist: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """hist (S, w, ...), tokens (sum L, ...) -> the packed layout (size, ...)."""
        ext = tokens.new_empty((self.size, *tokens.shape[1:]))
        ext[self.hist] = hist.reshape(-1, *tokens.shape[1:])
        ext[self.tok] = tokens
        return ext

    def taps(self, delays: list[int]) -> torch.Tensor:
        """(sum L, len(delays)) packed positions of each token's predecessors at those delays."""
        return self.tok[:, None] - torch.tensor(delays, device=self.tok.device)

    def tail(self, keep: torch.Tensor) -> torch.Tensor:
        """(S, w) packed positions of the last w rows once each segment keeps its first keep_i tokens."""
        return self.base[:, None] + keep[:, None] + torch.arange(self.w, device=keep.device)


class EngramBatch:
    """One forward's segments over an EngramState: segment i continues slot slots[i] at position starts[i].

    A segment with start 0 begins its sequence: its history is the pad id and zero conv inputs,
    whatever the slot held. After the forward, `commit(keep)` writes each slot's new history.
    """

    def __init__(self, state: EngramState, slots: list[int], starts: list[int], lengths: list[int]):
        assert len(slots) == len(starts) == len(lengths) > 0 and min(lengths) > 0
        self.state, self.lengths = state, list(lengths)
        dev = state.ids.device
        self.slots = torch.tensor(slots, device=dev)
        self.fresh = torch.tensor([s == 0 for s in starts], device=dev)
        self._ids = _Segments(lengths, state.ids.shape[1], dev)
        self._conv = _Segments(lengths, state.conv.shape[2], dev)
        self._dil = state.cfg.conv_dilation
        self._ext_ids: torch.Tensor | None = None
        self._ext_conv: dict[int, torch.Tensor] = {}

    def windows(self, cids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Packed compressed ids (sum L,) -> (sum L, N) n-gram windows, history from the state."""
        hist = torch.where(self.fresh[:, None], pad, self.state.ids[self.slots])  # (S, N-1)
        self._ext_ids = ext = self._ids.gather(hist, cids)
        return ext[self._ids.taps(list(range(self.state.ids.shape[1] + 1)))]

    def conv(self, layer: int, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Packed conv inputs u (sum L, C), depthwise weight (C, 1, K) -> (sum L, C), history from the state."""
        hist = self.state.conv[layer, self.slots].to(u.dtype)  # (S, W, C)
        hist = hist.masked_fill(self.fresh[:, None, None], 0)
        self._ext_conv[layer] = ext = self._conv.gather(hist, u)
        K = weight.shape[-1]
        # conv1d is a cross-correlation: tap i of the kernel reads the input (K-1-i)*dilation steps back.
        x = ext[self._conv.taps([(K - 1 - i) * self._dil for i in range(K)])]  # (sum L, K, C)
        return (x * weight[:, 0, :].t()).sum(1)

    def commit(self, keep: list[int] | None = None) -> None:
        """Write each slot's history as of its first keep[i] fed tokens (default: all of them)."""
        keep = self.lengths if keep is None else list(keep)
        if len(keep) != len(self.lengths) or any(not 0 <= k <= L for k, L in zip(keep, self.lengths)):
            raise ValueError(f"keep {keep} must give 0..length tokens for each of the segments {self.lengths}")
        if self._ext_ids is None:
            raise RuntimeError("EngramBatch.commit before a forward: pass the batch to the model first")
        k = torch.tensor(keep, device=self.slots.device)
        self.state.ids[self.slots] = self._ext_ids[self._ids.tail(k)]
        for layer, ext in self._ext_conv.items():
            self.state.conv[layer, self.slots] = ext[self._conv.tail(k)].to(self.state.conv.dtype)
