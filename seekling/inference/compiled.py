"""The compiled decode step: one torch.compile graph for a forward in which every sequence feeds one token.

Shapes: n sequences (one new token each), W blocks per block-table row, P block_size, S = W * P
cached key positions, L main layers, D = kv_lora_rank + qk_rope_head_dim (one cache entry).

A small model's eager decode step is mostly dispatcher overhead: about 250 top-level ops at 3-5 us
each, against ~2 ms of actual weight reads (tiny preset, one token, 2-core AVX2 CPU). Compiled by
Inductor, the same forward becomes ~50 fused C++ kernels plus the mat-vecs. This runs the model's
own `hidden` (embedding, RoPE, blocks, residuals, norms); only two things differ from eager:

* attention is `DecodeAttention`, a pure function of the pool: the new token's latent is scored
  as one extra key instead of being written first, and the engine writes every layer's new
  latents into the pool afterwards with one op (an in-graph write to the pool would make the
  compiler copy the whole pool);
* an Engram model's layers read `DecodeEngram`, likewise a pure function of the engine's
  EngramState: each sequence's n-gram window is its N-1 stored ids plus the new one, its conv window
  the W stored inputs plus the new one, and the new histories are returned for the engine to store
  (the same numbers as EngramBatch, which tests/test_engram_model.py holds it to);
* routed experts take `Experts._forward_gathered` (chosen via `torch.compiler.is_compiling`):
  each (token, expert) pair reads its expert's rows through an index that the compiler fuses into
  the reduction, so no expert weight is copied (grouped_mm has no fp32 CPU lowering).

Batch size and context length are dynamic, so one compile serves every decode step (Inductor
specialises n = 1 separately: two compiles in all, ~30 s each cold, seconds from its on-disk cache;
`Engine.warm_up` runs both before the first request).
Prefill chunks and long contexts (see MAX_KEY_BYTES) stay eager; EngineConfig refuses compile with
speculative decoding, whose verification and drafting steps the graph does not cover.
"""

from __future__ import annotations

import torch

from seekling.inference.host import to_device

# Above this many bytes of gathered latents per layer, the eager step is faster: it attends in
# cache-sized chunks (attention.KEY_CHUNK_BYTES), while the graph gathers every key at once.
# Measured per step, tiny preset, 1 thread: 8 x 1k context (2.6 MB) 10.8 ms compiled vs 20.4 eager;
# 8 x 4k (10.5 MB) 38.5 vs 30.8; 1 x 4k (1.3 MB) 5.7 vs 9.5.
MAX_KEY_BYTES = 4 * 2**20


class DecodeEngram:
    """EngramBatch's interface (windows, conv) for one token per sequence, traceable by torch.compile.

    ids (S, N-1) and conv (L_e, S, W, C) are the EngramState's tensors, read at `slots` (n,) and never
    written: `new_ids` (n, N-1) and `new_conv` (one (n, W, C) per Engram layer) are the histories
    after this token, for the caller to store. A sequence at position 0 (a one-token prompt) starts
    from the pad id and zero inputs, as EngramBatch's fresh segments do.
    """

    def __init__(self, ids: torch.Tensor, conv: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 dilation: int):
        self.ids, self.conv_state, self.slots, self.dilation = ids, conv, slots, dilation
        self.fresh = positions == 0  # (n,)
        self.new_ids: torch.Tensor | None = None
        self.new_conv: dict[int, torch.Tensor] = {}

    def windows(self, cids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """New compressed ids (n,) -> (n, N) windows, [:, k] = id_{t-k}."""
        hist = torch.where(self.fresh[:, None], pad, self.ids[self.slots])  # (n, N-1), oldest first
        ext = torch.cat((hist, cids[:, None]), dim=1)  # (n, N)
        self.new_ids = ext[:, 1:]
        return ext.flip(1)

    def conv(self, layer: int, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Conv inputs u (n, C), depthwise weight (C, 1, K) -> (n, C)."""
        hist = self.conv_state[layer, self.slots].to(u.dtype).masked_fill(self.fresh[:, None, None], 0)  # (n, W, C)
        ext = torch.cat((hist, u[:, None]), dim=1)  # (n, W+1, C)
        self.new_conv[layer] = ext[:, 1:]
        K, W = weight.shape[-1], hist.shape[1]
        # Tap i of the kernel reads the input (K-1-i)*dilation steps back (conv1d is a cross-correlation).
        x = ext[:, [W - (K - 1 - i) * self.dilation for i in range(K)]]  # (n, K, C)
        return (x * weight[:, 0, :].t()).sum(1)


class DecodeAttention:
    """Absorbed MLA over the paged cache for one token per sequence, traceable by torch.compile.

    Reads `pool` (cache layers, NB, P, D) through `table` (n, W) and never writes it: `entries`
    collects each layer's new (n, D) latents for the caller to store.
    """

    def __init__(self, pool: torch.Tensor, table: torch.Tensor, positions: torch.Tensor):
        self.pool, self.table = pool, table
        S = table.shape[1] * pool.shape[2]
        # Slot `position` and later hold stale entries (the new token is scored separately).
        self.stale = torch.arange(S, device=pool.device)[None, :] >= positions[:, None]  # (n, S)
        self.entries: list[torch.Tensor] = []

    def attend(self, mla, q_nope, q_pe, kv, k_pe) -> torch.Tensor:
        """q_nope (1,n,H,N_d), q_pe (1,n,H,R), kv (1,n,C), k_pe (1,n,R) -> (1,n,H*V)."""
        new = torch.cat((kv[0], k_pe[0]), dim=-1)  # (n, D)
        self.entries.append(new)
        n, C = new.shape[0], mla.kv_lora_rank
        keys = self.pool[mla.layer_id][self.table].view(n, -1, new.shape[-1])  # (n, S, D)
        w_uk, w_uv = mla.absorbed_weights()  # (H,N_d,C), (H,V,C)
        q = torch.cat((torch.einsum("nhd,hdc->nhc", q_nope[0], w_uk), q_pe[0]), dim=-1).float()  # (n,H,D)
        cached = torch.einsum("nhd,nsd->nhs", q, keys.float()).masked_fill(self.stale[:, None], float("-inf"))
        scores = torch.cat((cached, (q * new.float()[:, None]).sum(-1, keepdim=True)), dim=-1)
        p = (scores * mla.softmax_scale).softmax(dim=-1)
        o = torch.einsum("nhs,nsc->nhc", p[..., :-1], keys[..., :C].float()) + p[..., -1:] * new[:, None, :C].float()
        out = torch.einsum("nhc,hvc->nhv", o, w_uv.float())
        return out.reshape(1, n, -1).to(q_nope.dtype)


def decode_hidden(model, ids: torch.Tensor, positions: torch.Tensor, pool: torch.Tensor, table: torch.Tensor,
                  engram: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """ids, positions (n,), table (n, W) -> final-normed hidden (n, dim), new latents (L, n, D); with
    engram = (state ids, state conv, slots (n,)) also the new Engram histories (n, N-1), (L_e, n, W, C)."""
    attention = DecodeAttention(pool, table, positions)
    eng = None
    if engram is not None:
        eng = DecodeEngram(*engram, positions, model.cfg.engram.conv_dilation)
    h = model.hidden(ids[None], positions[None], cache=attention, engram=eng)[0]
    if eng is None:
        return h, torch.stack(attention.entries)
    return h, torch.stack(attention.entries), eng.new_ids, torch.stack([eng.new_conv[i] for i in sorted(eng.new_conv)])


def _need_cxx():
    """Inductor builds CPU kernels with a C++ compiler; without one it fails deep in the first step."""
    from torch._inductor.cpp_builder import get_cpp_compiler  # the lookup Inductor itself does

    try:
        get_cpp_compiler()
    except Exception as e:
        raise ValueError("EngineConfig.compile: torch.compile on a CPU needs a C++ compiler and none was found "
                         f"({e}); install one (e.g. `apt install g++`, or set CXX), or run without --compile") from e


class CompiledDecode:
    """A compiled `decode_hidden` for one model and cache; call it with a plain decode batch."""

    def __init__(self, model, cache, engram=None):
        self.model, self.cache, self.engram = model, cache, engram  # engram: the engine's EngramState, or None
        if cache.pool.device.type == "cpu":
            _need_cxx()
        # cpp_wrapper: the graph's kernel calls are issued from C++, not Python (2.5 vs 2.9 ms a step,
        # tiny preset, batch 1). The guard filter: Dynamo would otherwise re-check every parameter
        # of the model on each call (~0.2 ms a step at batch 1). Safe here: this object is bound to
        # one model, whose parameters are graph inputs (in-place weight updates are seen), and
        # `isolate_recompiles` keeps another engine's model from ever matching this one's graphs.
        # Sizes are marked dynamic one by one (in __call__) rather than with dynamic=True, which
        # would also turn every Python float the model reads (norm eps, softmax scale) into a tensor
        # input converted on each call (26 conversions, ~0.15 ms a step).
        self._fn = torch.compile(decode_hidden, isolate_recompiles=True,
                                 options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                          "cpp_wrapper": True})

    def fits(self, positions: list[int]) -> bool:
        """Whether a decode batch at these positions is short enough for the compiled step."""
        pool = self.cache.pool
        return len(positions) * (max(positions) + 1) * pool.shape[-1] * pool.element_size() <= MAX_KEY_BYTES

    def __call__(self, ids: list[int], rows: list[int], positions: list[int]) -> torch.Tensor:
        """Run one step and store its latents; returns the hidden states (n, dim)."""
        cache, P, dev = self.cache, self.cache.block_size, self.cache.device
        pos = to_device(positions, dev)
        # Blocks that cover every sequence's new position, at least 2: Inductor specialises a size-1
        # dimension, and a width of 1 would cost a second compile for the first 32 tokens.
        width = min(max(2, (max(positions) + P) // P), cache.block_table.shape[1])
        table = cache.block_table[to_device(rows, dev), :width]
        ids = to_device(ids, dev)
        # The pool's block count and block size too, so that Inductor's on-disk cache serves any
        # cache geometry (the graph depends only on the model's config).
        for t, dims in ((ids, (0,)), (pos, (0,)), (table, (0, 1)), (cache.pool, (1, 2))):
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(t, d)
        # The caller's torch-function modes (`torch.set_default_device("cuda")` installs one) are
        # suspended for the graph: Dynamo traces through them and breaks the graph inside each block
        # (at Tensor.unflatten in RoPE), and the guard filter above would then let one block's resumed
        # frame run for another (seen: a dense block's code run on an MoE block, KeyError 'w1').
        # Every tensor the graph makes names its device, so no mode has anything to do there.
        eng = None
        if self.engram is not None:
            slots = to_device(rows, dev)  # Engram slots are block-table rows (engine.py)
            torch._dynamo.maybe_mark_dynamic(slots, 0)
            torch._dynamo.maybe_mark_dynamic(self.engram.ids, 0)
            torch._dynamo.maybe_mark_dynamic(self.engram.conv, 1)
            eng = (self.engram.ids, self.engram.conv, slots)
        with torch._C.DisableTorchFunction():
            h, entries, *new = self._fn(self.model, ids, pos, cache.pool, table, eng)
        if new:
            self.engram.ids[slots] = new[0]
            self.engram.conv[:, slots] = new[1].to(self.engram.conv.dtype)
        L = entries.shape[0]
        cache.pool[:L].view(L, -1, cache.pool.shape[-1]).index_copy_(1, cache.slots(rows, positions),
                                                                     entries.to(cache.pool.dtype))
        return h
