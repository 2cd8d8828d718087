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
* Long segments (prefill chunks) loop one by one, absorbed too by default (`prefill="absorbed"`):
  queries move into latent space and SDPA's fused kernel attends over the latents, all heads
  sharing one stride-0 key set. Measured on the 2-core AVX2 CPU, tiny preset, whole-model
  prefill: 1024 tokens in one chunk 290 ms absorbed vs 697 ms naive, 4096 tokens 1.6 s vs 5.8 s,
  4096 tokens in 512-token chunks 2.4 s vs 3.5 s. Naive expands latents to per-head K/V through
  W_UKV, and its unequal widths (q/k 48, v 32) send SDPA down the unfused path that materialises
  every score; absorbed keys and values are the same 80-wide latent, which the fused kernel takes.
  A segment that starts its sequence attends over its own projections, causally, without a gather.

`mode="naive"` sends every segment through the naive path: the slow, obvious reference the
tests compare the absorbed path against.
Left out: a fused paged kernel that reads blocks in place; on CPU the gather costs one copy of
the batch's latents per layer. (transformers 5.x also caches only latents, but grows them with
torch.cat and re-expands the whole context through W_UKV at every decode step.)
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from seekling.inference.host import to_device
from seekling.inference.kv_cache import LatentCache


# Sequences per attention chunk are chosen so that one chunk's gathered latents stay near this size:
# gathered, scored and read back while they are still in cache. Measured on the 2-core AVX2 CPU
# (tiny preset, one layer of a 32-sequence decode): 5.5 -> 3.8 ms at 1056 cached tokens, 19.3 ->
# 10.1 ms at 4128; the best chunk held 2.6 MB of latents.
KEY_CHUNK_BYTES = 3 * 2**20


def absorbed_attention(mla, q_nope: torch.Tensor, q_pe: torch.Tensor, keys, bias: torch.Tensor,
                       chunk: int) -> torch.Tensor:
    """q_nope (n,L,H,N_d), q_pe (n,L,H,R), bias (n, 1 or L*H, S) additive -> (n,L,H,V).

    `keys(i, j)` returns the cache entries (j-i, S, D) of sequences i..j-1; it is called once per
    `chunk` sequences, so a large batch's latents are gathered and used chunk by chunk.
    Scores, softmax and the latent-space output are fp32 whatever the model dtype (a no-op for fp32
    models): a bf16 softmax over thousands of positions loses the small weights.
    """
    n, L, H, _ = q_nope.shape
    w_uk, w_uv = mla.absorbed_weights()  # (H,N_d,C), (H,V,C)
    C = w_uk.shape[-1]
    # (H, n*L, N_d) @ (H, N_d, C): one batched matmul over heads moves every query into latent space.
    q_lat = torch.bmm(q_nope.reshape(n * L, H, -1).transpose(0, 1), w_uk).transpose(0, 1)
    q = torch.cat((q_lat.float(), q_pe.reshape(n * L, H, -1).float()), dim=-1).view(n, L * H, -1)
    parts = []
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        k = keys(i, j).float()
        scores = torch.baddbmm(bias[i:j] if bias.shape[0] > 1 else bias, q[i:j], k.transpose(1, 2),
                               alpha=mla.softmax_scale)  # (j-i, L*H, S)
        # Multiply by the whole entry and drop the rope columns after: cheaper than copying k[..., :C].
        parts.append(torch.bmm(scores.softmax(dim=-1), k)[..., :C])  # (j-i, L*H, C)
    o = parts[0] if len(parts) == 1 else torch.cat(parts)
    out = torch.bmm(o.reshape(n * L, H, C).transpose(0, 1), w_uv.float().transpose(1, 2))  # (H, n*L, V)
    return out.transpose(0, 1).reshape(n, L, H, -1).to(q_nope.dtype)


class CacheBatch:
    """One forward's segments over a LatentCache; implements the model's `cache.attend` protocol."""

    def __init__(self, cache: LatentCache, rows: list[int], starts: list[int], lengths: list[int], *,
                 n_heads: int, mode: str = "absorbed", prefill: str = "absorbed", short_max: int = 8,
                 slot: int | None = None):
        assert mode in ("absorbed", "naive") and prefill in ("absorbed", "naive")
        assert len(rows) == len(starts) == len(lengths) > 0
        self.cache, self.slot = cache, slot
        self.prefill = "naive" if mode == "naive" else prefill
        P, dev = cache.block_size, cache.device
        self.n_tokens = sum(lengths)
        # Positions of all packed tokens, and where each one is written in the flattened pool.
        # Decode and verification steps have equal lengths: a few tensor ops, however large the batch.
        decode = all(L == 1 for L in lengths)
        if decode:
            # One token per row (plain decode): slots and positions straight from the rows' block
            # lists, one tensor each. Building this batch is per-step overhead that the forward of a
            # small model does not hide (it was a quarter of the engine's own time at batch 1).
            pos = to_device(starts, dev)
            self.slots = cache.slots(rows, starts)
        elif len(set(lengths)) == 1:
            L0 = lengths[0]
            pos = (to_device(starts, dev)[:, None] + cache.arange(L0)[None]).flatten()
            row_of_token = to_device(rows, dev).repeat_interleave(L0)
        else:
            # Built on the host: one copy, where a cat of per-segment aranges is one op per segment.
            pos = to_device([p for s, L in zip(starts, lengths) for p in range(s, s + L)], dev)
            row_of_token = to_device([r for r, L in zip(rows, lengths) for _ in range(L)], dev)
        if not decode:
            self.slots = cache.block_table[row_of_token, pos // P] * P + pos % P
        self.positions = pos

        offsets = list(itertools.accumulate(lengths, initial=0))
        short = [i for i, L in enumerate(lengths) if mode == "absorbed" and L <= short_max]
        is_short = set(short)
        self.long = [(offsets[i], rows[i], starts[i], lengths[i]) for i in range(len(rows)) if i not in is_short]
        self.short = None
        if short:
            n, Lmax = len(short), max(lengths[i] for i in short)
            S = math.ceil(max(starts[i] + lengths[i] for i in short) / P) * P
            # Query l of a segment starting at position s may see keys 0..s+l; padding rows l >= length
            # see a valid prefix too, so no softmax row is empty (they are discarded afterwards).
            keep = None
            if n == 1 and Lmax == 1:
                # One decoding sequence: attend over exactly its positions 0..start, no mask needed.
                keep, bias = starts[short[0]] + 1, cache.zero_bias
            else:
                q_pos = to_device([[starts[i] + l for l in range(Lmax)] for i in short], dev)  # (n, Lmax)
                bias = torch.zeros(n, Lmax, S, device=dev).masked_fill_(cache.arange(S)[None, None] > q_pos[..., None],
                                                                        float("-inf"))
                bias = bias.view(n, 1, S) if Lmax == 1 else (
                    bias[:, :, None, :].expand(n, Lmax, n_heads, S).reshape(n, Lmax * n_heads, S))
            table = cache.block_table[to_device([rows[i] for i in short], dev), :S // P]
            self.short = dict(n=n, L=Lmax, table=table, bias=bias, gather=None, keep=keep)
            if short != list(range(n)) or any(lengths[i] != Lmax for i in short):
                # Packed index of every padded (segment, l) slot; pads repeat the segment's last token.
                padded = [(i, l) for i in short for l in range(Lmax)]
                pad = [offsets[i] + min(l, lengths[i] - 1) for i, l in padded]
                valid = [j for j, (i, l) in enumerate(padded) if l < lengths[i]]
                # Index lists rather than a boolean mask: masked indexing waits on a GPU for the count.
                self.short.update(gather=to_device(pad, dev), valid=to_device(valid, dev),
                                  scatter=to_device([pad[j] for j in valid], dev))

    def attend(self, mla, q_nope, q_pe, kv, k_pe) -> torch.Tensor:
        """q_nope (1,N,H,N_d), q_pe (1,N,H,R), kv (1,N,C), k_pe (1,N,R) -> (1,N,H*V); stores kv, k_pe."""
        layer = mla.layer_id if self.slot is None else self.slot
        pool = self.cache.pool[layer]  # (NB, P, D)
        D = pool.shape[-1]
        entries = torch.cat((kv[0], k_pe[0]), dim=-1)
        pool.view(-1, D).index_copy_(0, self.slots, entries.to(pool.dtype))
        H = q_nope.shape[2]
        if self.short is not None and not self.long and self.short["gather"] is None:
            return self._short(mla, layer, q_nope[0], q_pe[0]).reshape(1, self.n_tokens, -1)
        out = q_nope.new_empty(self.n_tokens, H * mla.v_dim)
        if self.short is not None:
            s = self.short
            g = s["gather"]
            if g is None:  # the group is the first n*L packed tokens, unpadded
                out[:s["n"] * s["L"]] = self._short(mla, layer, q_nope[0, :s["n"] * s["L"]], q_pe[0, :s["n"] * s["L"]])
            else:
                o = self._short(mla, layer, q_nope[0, g], q_pe[0, g])  # (n*L, H*V), padded order
                out[s["scatter"]] = o[s["valid"]]
        segment = self._segment_naive if self.prefill == "naive" else self._segment_absorbed
        for off, row, start, length in self.long:
            sl = slice(off, off + length)
            out[sl] = segment(mla, layer, row, start, length, q_nope[0, sl], q_pe[0, sl], kv[0, sl], k_pe[0, sl])
        return out[None]

    def _short(self, mla, layer, q_nope, q_pe) -> torch.Tensor:
        s = self.short
        n, L = s["n"], s["L"]
        table, keep = s["table"], s["keep"]
        pool = self.cache.pool
        per_seq = table.shape[1] * self.cache.block_size * pool.shape[-1] * pool.element_size()

        def keys(i, j):  # one copy of these sequences' blocks
            k = self.cache.gather(layer, table[i:j])
            return k if keep is None else k[:, :keep]

        out = absorbed_attention(mla, q_nope.view(n, L, *q_nope.shape[1:]), q_pe.view(n, L, *q_pe.shape[1:]),
                                 keys, s["bias"], chunk=max(1, KEY_CHUNK_BYTES // per_seq))
        return out.reshape(n * L, -1)

    def _cached(self, layer, row, S) -> torch.Tensor:
        """(S, D) cache entries of positions [0, S) of one row, including this forward's."""
        table = self.cache.block_table[row, :math.ceil(S / self.cache.block_size)]
        return self.cache.gather(layer, table[None])[0, :S]

    def _segment_naive(self, mla, layer, row, start, length, q_nope, q_pe, kv, k_pe) -> torch.Tensor:
        """Expand latents to per-head K/V (W_UKV) and attend; over its own projections at start 0."""
        if start == 0:
            return mla.attend_naive(q_nope[None], q_pe[None], kv[None], k_pe[None], causal=True)[0]
        S = start + length
        cached = self._cached(layer, row, S).to(kv.dtype)
        ar = self.cache.arange(S)
        mask = ar[None, :] <= (start + ar[:length])[:, None]
        C = mla.kv_lora_rank
        return mla.attend_naive(q_nope[None], q_pe[None], cached[None, :, :C], cached[None, :, C:],
                                mask=mask[None, None])[0]

    def _segment_absorbed(self, mla, layer, row, start, length, q_nope, q_pe, kv, k_pe) -> torch.Tensor:
        """Absorbed attention for one long segment through SDPA's fused kernel, heads sharing one key set."""
        if start == 0:
            keys, mask = torch.cat((kv, k_pe), dim=-1), None
        else:
            S = start + length
            keys = self._cached(layer, row, S).to(kv.dtype)
            ar = self.cache.arange(S)
            mask = (ar[None, :] <= (start + ar[:length])[:, None])[None, None]
        w_uk, w_uv = mla.absorbed_weights()  # (H,N_d,C), (H,V,C)
        H, C = w_uk.shape[0], w_uk.shape[-1]
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk)  # (H, L, C)
        q = torch.cat((q_lat, q_pe.transpose(0, 1).to(q_lat.dtype)), dim=-1)
        k = keys[None, None].expand(1, H, *keys.shape)  # a stride-0 view: the heads share the latents
        o = F.scaled_dot_product_attention(q[None], k, k, attn_mask=mask, is_causal=mask is None,
                                           scale=mla.softmax_scale)[0, ..., :C]
        return torch.bmm(o, w_uv.transpose(1, 2)).transpose(0, 1).reshape(length, -1)  # (L, H*V)
