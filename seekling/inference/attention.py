"""Attention over the paged latent cache: the object an engine passes to the model as `cache=`.

Shapes: N new tokens of one forward, packed along one axis (the model sees input (1, N)); n
sequences in a group; L new tokens per sequence (padded to the group's longest); S cached key
positions (a whole number of blocks); H heads; N_d qk_nope_head_dim; R qk_rope_head_dim;
C kv_lora_rank; V v_head_dim; D = C + R, one cache entry.

Each forward is a list of segments (block-table row, first position, length). Every MLA layer
calls `attend`, which writes the segments' new latents into the pool and attends:

* Short segments (decode: 1 token; draft verification: k+1; MTP catch-up) go through the
  *absorbed* path as one padded batch: q_nope is moved into latent space through W_UK, so a
  head's query is a D-vector scored straight against cached entries, and the heads of one
  sequence share keys: they are stacked as query rows of one (H*L, D) x (D, S) matmul per
  sequence (MLA decodes like multi-query attention, DeepSeek-V2 section 2.1.2). W_UV is applied
  after attention. Nothing per head of size S is ever materialised beyond the scores.
* Long segments (prefill chunks) loop one by one through the *naive* path: the latents are
  expanded to per-head K/V with W_UKV and attended with SDPA. Measured on the 2-core AVX2 CPU
  for the tiny preset (bench notes in docs of `EngineConfig.prefill_attention`): naive prefill
  of 1024 tokens is ~1.6x faster than absorbed, because with T == S the score matmuls dominate and
  absorbed scores are D=80 wide against naive 48 (and values 64 against 32).
  A fresh prompt (start 0) attends over the projections directly with the causal kernel.

`mode="naive"` sends every segment through the naive path: the slow, obvious reference the
tests compare the absorbed path against.
Left out: a fused paged kernel that reads blocks in place; on CPU the gather costs one copy of
the batch's latents per layer, which is small next to transformers' full-K/V cache growth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seekling.inference.kv_cache import LatentCache


def absorbed_attention(mla, q_nope: torch.Tensor, q_pe: torch.Tensor, keys: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """q_nope (n,L,H,N_d), q_pe (n,L,H,R), keys (n,S,D), bias (n, 1 or L*H, S) additive -> (n,L,H,V)."""
    n, L, H, _ = q_nope.shape
    w_uk, w_uv = mla.absorbed_weights()  # (H,N_d,C), (H,V,C)
    C = w_uk.shape[-1]
    # (H, n*L, N_d) @ (H, N_d, C): one batched matmul over heads moves every query into latent space.
    q_lat = torch.bmm(q_nope.reshape(n * L, H, -1).transpose(0, 1), w_uk).transpose(0, 1)
    q = torch.cat((q_lat, q_pe.reshape(n * L, H, -1).to(q_lat.dtype)), dim=-1).view(n, L * H, -1)
    scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=mla.softmax_scale)  # (n, L*H, S)
    probs = scores.softmax(dim=-1)
    # Multiply by the whole entry and drop the rope columns after: cheaper than copying keys[..., :C].
    o = torch.bmm(probs, keys)[..., :C]  # (n, L*H, C)
    out = torch.bmm(o.reshape(n * L, H, C).transpose(0, 1), w_uv.transpose(1, 2))  # (H, n*L, V)
    return out.transpose(0, 1).reshape(n, L, H, -1)


class CacheBatch:
    """One forward's segments over a LatentCache; implements the model's `cache.attend` protocol."""

    def __init__(self, cache: LatentCache, rows: list[int], starts: list[int], lengths: list[int], *,
                 n_heads: int, mode: str = "absorbed", short_max: int = 8, slot: int | None = None):
        assert mode in ("absorbed", "naive") and len(rows) == len(starts) == len(lengths) > 0
        self.cache, self.mode, self.slot = cache, mode, slot
        P = cache.block_size
        self.n_tokens = sum(lengths)
        rows_t = torch.tensor(rows)
        starts_t = torch.tensor(starts)
        lens_t = torch.tensor(lengths)
        # Positions of all packed tokens, and where each one is written in the flattened pool.
        seg_of_token = torch.repeat_interleave(torch.arange(len(rows)), lens_t)
        offsets = torch.cumsum(lens_t, 0) - lens_t
        self.positions = starts_t[seg_of_token] + torch.arange(self.n_tokens) - offsets[seg_of_token]
        blocks = cache.block_table[rows_t[seg_of_token], self.positions // P]
        self.slots = blocks * P + self.positions % P

        short = [i for i, L in enumerate(lengths) if mode == "absorbed" and L <= short_max]
        self.long = [(int(offsets[i]), rows[i], starts[i], lengths[i]) for i in range(len(rows)) if i not in set(short)]
        self.short = None
        if short:
            s_idx = torch.tensor(short)
            s_lens, s_starts = lens_t[s_idx], starts_t[s_idx]
            n, Lmax = len(short), int(s_lens.max())
            nb = math.ceil(int((s_starts + s_lens).max()) / P)
            # Query l of a segment starting at position s may see keys 0..s+l; padding rows l >= length
            # see a valid prefix too, so no softmax row is empty (they are discarded afterwards).
            allowed = torch.arange(nb * P)[None, None, :] <= (s_starts[:, None] + torch.arange(Lmax)[None])[:, :, None]
            bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))  # (n, Lmax, S)
            bias = bias.view(n, 1, nb * P) if Lmax == 1 else (
                bias[:, :, None, :].expand(n, Lmax, n_heads, nb * P).reshape(n, Lmax * n_heads, nb * P))
            # Packed index of every padded (segment, l) slot; pads repeat the segment's first token.
            pad = offsets[s_idx][:, None] + torch.minimum(torch.arange(Lmax)[None], s_lens[:, None] - 1)
            valid = (torch.arange(Lmax)[None] < s_lens[:, None]).flatten()
            contiguous = bool((s_lens == Lmax).all()) and short == list(range(n))
            self.short = dict(n=n, L=Lmax, table=cache.block_table[rows_t[s_idx], :nb], bias=bias,
                              gather=None if contiguous else pad.flatten(),
                              scatter=None if contiguous else pad.flatten()[valid], valid=valid)

    def attend(self, mla, q_nope, q_pe, kv, k_pe) -> torch.Tensor:
        """q_nope (1,N,H,N_d), q_pe (1,N,H,R), kv (1,N,C), k_pe (1,N,R) -> (1,N,H*V); stores kv, k_pe."""
        pool = self.cache.pool[mla.layer_id if self.slot is None else self.slot]  # (NB, P, D)
        D = pool.shape[-1]
        entries = torch.cat((kv[0], k_pe[0]), dim=-1)
        pool.view(-1, D).index_copy_(0, self.slots, entries.to(pool.dtype))
        H = q_nope.shape[2]
        if self.short is not None and not self.long and self.short["gather"] is None:
            return self._short(mla, pool, q_nope[0], q_pe[0]).reshape(1, self.n_tokens, -1)
        out = q_nope.new_empty(self.n_tokens, H * mla.v_dim)
        if self.short is not None:
            s = self.short
            g = s["gather"]
            o = self._short(mla, pool, q_nope[0, g], q_pe[0, g])  # (n*L, H*V), padded order
            out[s["scatter"]] = o[s["valid"]]
        for off, row, start, length in self.long:
            out[off:off + length] = self._segment(mla, pool, row, start, length, q_nope[:, off:off + length],
                                                  q_pe[:, off:off + length], kv[:, off:off + length],
                                                  k_pe[:, off:off + length])[0]
        return out[None]

    def _short(self, mla, pool, q_nope, q_pe) -> torch.Tensor:
        s = self.short
        n, L = s["n"], s["L"]
        keys = pool[s["table"]].view(n, -1, pool.shape[-1])  # one gather of the group's blocks
        out = absorbed_attention(mla, q_nope.view(n, L, *q_nope.shape[1:]), q_pe.view(n, L, *q_pe.shape[1:]),
                                 keys, s["bias"])
        return out.reshape(n * L, -1)

    def _segment(self, mla, pool, row, start, length, q_nope, q_pe, kv, k_pe) -> torch.Tensor:
        """Naive attention for one segment: over its own projections when it starts the sequence."""
        if start == 0:
            return mla.attend_naive(q_nope, q_pe, kv, k_pe, causal=True)
        S = start + length
        nb = math.ceil(S / self.cache.block_size)
        cached = pool[self.cache.block_table[row, :nb]].view(-1, pool.shape[-1])[:S]
        mask = torch.arange(S)[None, :] <= (start + torch.arange(length))[:, None]
        C = mla.kv_lora_rank
        return mla.attend_naive(q_nope, q_pe, cached[None, :, :C].to(kv.dtype), cached[None, :, C:].to(kv.dtype),
                                mask=mask[None, None])
