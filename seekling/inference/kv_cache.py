"""The latent-only paged KV cache: fixed-size blocks of MLA latents, a free list, and block tables.

Shapes: L cache layers (main layers, then one per MTP draft depth), NB blocks, P block_size tokens,
C kv_lora_rank, R qk_rope_head_dim, Q max sequences (block-table rows), W blocks per row.

MLA needs only the normed latent kv_C and the shared rotary key k_pe per token (DeepSeek-V2 section
2.1), so a token costs L * (C + R) values: for the tiny preset 6 * 80 fp32 = 1920 bytes, against
6 * 4 * (48 + 32) * 4 = 7680 bytes for the expanded K/V a plain cache would hold.

Memory is one tensor `pool` (L, NB, P, C+R) allocated up front on the model's device, so a full
cache never fragments and capacity is known before the first request. A running sequence owns one
row of the int64 `block_table` (Q, W), on the same device: attention gathers a whole batch's blocks
with one indexing op per layer, with no Python per token. The free lists and each row's block list
are Python on the host; a reservation copies its new block ids into the table. Blocks are handed out from a LIFO free list (recently freed blocks are
warm in cache); unused table entries point at block 0 and are masked by sequence length.
A sequence whose prompt another running sequence has already computed gets a copy of those
positions (`copy_prefix`, the engine's prompt sharing): a few kilobytes per prompt token, against a
prefill's forward.
Left out: general prefix sharing (copy-on-write blocks with reference counts, so that a shared
prefix is stored once) and swapping to host memory; preempted sequences are recomputed instead,
which is cheap next to decode on a CPU.
"""

from __future__ import annotations

import math

import torch

from seekling.inference.host import to_device


class LatentCache:
    """Block pool, free list and per-sequence block tables for the latent cache."""

    def __init__(self, *, n_layers: int, n_blocks: int, block_size: int, latent_dim: int, rope_dim: int,
                 max_seqs: int, max_blocks_per_seq: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        assert n_layers > 0 and n_blocks > 0 and block_size > 0 and max_seqs > 0 and max_blocks_per_seq > 0
        self.n_layers, self.n_blocks, self.block_size = n_layers, n_blocks, block_size
        self.latent_dim, self.rope_dim = latent_dim, rope_dim
        self.device = device = torch.device(device)
        # Zero-filled, not empty: masked-out slots still enter `probs @ kv`, and 0 * NaN garbage is NaN.
        self.pool = torch.zeros(n_layers, n_blocks, block_size, latent_dim + rope_dim, dtype=dtype, device=device)
        self.block_table = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.long, device=device)
        self._free_blocks = list(range(n_blocks - 1, -1, -1))
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        self._row_blocks: dict[int, list[int]] = {}
        self._arange = torch.arange(0, device=device)
        self._workspace = torch.empty(0, block_size, latent_dim + rope_dim, dtype=dtype, device=device)
        # Additive attention bias for a batch that needs no mask; baddbmm broadcasts it.
        self.zero_bias = torch.zeros(1, 1, 1, device=device)

    # ------------------------------------------------------------ sizes

    @property
    def bytes_per_token(self) -> int:
        return self.n_layers * (self.latent_dim + self.rope_dim) * self.pool.element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def max_tokens_per_seq(self) -> int:
        return self.block_table.shape[1] * self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.n_blocks - len(self._free_blocks)

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    # ------------------------------------------------------------ rows and blocks

    def open_row(self) -> int:
        """Claim a block-table row for a new running sequence."""
        assert self._free_rows, "no free block-table row; the scheduler must check num_free_rows"
        row = self._free_rows.pop()
        self._row_blocks[row] = []
        return row

    def close_row(self, row: int):
        """Return a finished, cancelled or preempted sequence's blocks and row to the free lists."""
        blocks = self._row_blocks.pop(row)
        self._free_blocks.extend(reversed(blocks))
        self._free_rows.append(row)

    def slots(self, rows: list[int], positions: list[int]) -> torch.Tensor:
        """Flattened pool slot (block * P + offset) of one position per row, from the rows' block lists.

        For one token per sequence (a decode step): plain Python over the lists, cheaper per step
        than indexing `block_table` with freshly built tensors.
        """
        P = self.block_size
        return to_device([self._row_blocks[r][p // P] * P + p % P for r, p in zip(rows, positions)], self.device)

    def row_tokens(self, row: int) -> int:
        """Token positions the row's blocks cover."""
        return len(self._row_blocks[row]) * self.block_size

    def reserve(self, row: int, n_tokens: int) -> bool:
        """Grow `row` to cover positions [0, n_tokens); all or nothing. False when blocks are short."""
        have = self._row_blocks[row]
        need = self.blocks_for(n_tokens) - len(have)
        if need <= 0:
            return True
        assert len(have) + need <= self.block_table.shape[1], "sequence longer than the block table"
        if need > len(self._free_blocks):
            return False
        new = [self._free_blocks.pop() for _ in range(need)]
        self.block_table[row, len(have):len(have) + need] = to_device(new, self.device)
        have.extend(new)
        return True

    def copy_prefix(self, src: int, dst: int, n_tokens: int):
        """Copy positions [0, n_tokens) of row `src` into row `dst`, every layer; `dst` must cover them.

        Whole blocks are copied: the last one may carry src's later positions, which dst's own
        tokens overwrite before anything reads them (attention masks by each sequence's length).
        """
        n = self.blocks_for(n_tokens)
        have, want = self._row_blocks[src], self._row_blocks[dst]
        assert len(have) >= n and len(want) >= n, "copy_prefix: a row does not cover the positions"
        self.pool[:, to_device(want[:n], self.device)] = self.pool[:, to_device(have[:n], self.device)]

    def gather(self, layer: int, table: torch.Tensor) -> torch.Tensor:
        """Copy the blocks `table` (n, W') of one layer into a reused buffer -> (n, W' * P, C + R).

        The buffer outlives the call (and is overwritten by the next one): a fresh tensor this size
        is a fresh mmap, and its page faults cost more than the copy itself (measured 4x at 42 MB).
        """
        n_blocks = table.numel()
        if self._workspace.shape[0] < n_blocks:
            self._workspace = torch.empty(n_blocks, *self.pool.shape[2:], dtype=self.pool.dtype, device=self.device)
        out = self._workspace[:n_blocks]
        torch.index_select(self.pool[layer], 0, table.flatten(), out=out)
        return out.view(table.shape[0], -1, self.pool.shape[-1])

    def arange(self, n: int) -> torch.Tensor:
        """0..n-1 as int64, sliced from one cached tensor: masks are rebuilt every step."""
        if self._arange.numel() < n:
            self._arange = torch.arange(max(n, 2 * self._arange.numel()), device=self.device)
        return self._arange[:n]

    def check(self):
        """Internal invariant: every block is either free or owned by exactly one row."""
        owned = [b for bl in self._row_blocks.values() for b in bl]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert sorted(owned + self._free_blocks) == list(range(self.n_blocks)), "a block leaked"


def cache_blocks(*, capacity_tokens: int | None, capacity_bytes: int | None, block_size: int,
                 bytes_per_token: int) -> int:
    """Number of blocks for a capacity given in tokens or in bytes (exactly one of them)."""
    if capacity_bytes is not None:
        return capacity_bytes // (bytes_per_token * block_size)
    return math.ceil(capacity_tokens / block_size)
