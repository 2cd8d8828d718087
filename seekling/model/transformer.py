"""The DeepSeek-V3-style decoder: embeddings, blocks of MLA + (dense MLP | MoE), final norm, head, MTP.

Shapes: B batch, T tokens, D model dim, V vocabulary, n residual streams (hc_mult).

Each block keeps its residual in one place (`Block.forward`). With hc_mult > 1 the residual is n
streams (B,T,n,D) mixed by manifold-constrained hyper-connections (model/mhc.py, DeepSeek-V4): the
embedding is copied into every stream, each sublayer reads and writes them through its own
HyperConnection, and `hc_head` collapses them before the final norm. With hc_mult = 1 none of that
exists (no parameters, no ops): the plain DeepSeek-V3 residual, bit for bit.

An MTP depth keeps V3's interface with mHC too: it reads the main model's collapsed, final-normed
hidden state (B,T,D) and returns one (B,T,D), so the MTP loss and speculative drafting are the same
code for both. Inside, its eh_proj output is copied into n streams, its block mixes them with its own
attn_hc / ffn_hc, and its own hc_head collapses them before its norm. (transformers' DeepseekV4 ignores
MTP weights, so there is no oracle for this part; the choice is ours, see the README.)

With Engram (cfg.engram.layers, model/engram.py) the model owns the compressed-id map
(`engram_vocab`, a buffer saved with it) and each chosen block adds `Engram(x, ids)` to its residual
(every stream with mHC) before attention. A full-sequence forward computes the n-grams from the ids
alone; an incremental one (the engine) passes an EngramBatch over its own EngramState beside the
KV cache, and commits it after sampling.

The model holds no process-group, cache or training state: the caller passes an engine-owned KV cache,
EngramBatch and a RouterTrace when it wants them.
"""

from __future__ import annotations

import torch
from torch import nn

from seekling.config import ModelConfig
from seekling.model.engram import Engram, EngramBatch, EngramInput, EngramVocab, table_parameters
from seekling.model.mhc import HyperConnection, HyperHead, expand_streams, hc_write
from seekling.model.mla import MLA
from seekling.model.mlp import MLP
from seekling.model.moe import MoE, RouterTrace
from seekling.model.norm import RMSNorm
from seekling.model.rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, layer_id) if moe else MLP(cfg.dim, cfg.inter_dim)
        # None with hc_mult = 1: no parameters and no state-dict keys, so the plain model is unchanged.
        self.attn_hc = HyperConnection(cfg) if cfg.has_mhc else None
        self.ffn_hc = HyperConnection(cfg) if cfg.has_mhc else None
        # None except at the Engram layers (MTP depths never have one): no keys, no ops elsewhere.
        self.engram = (Engram(cfg.engram, layer_id, dim=cfg.dim, vocab_size=cfg.vocab_size, hc_mult=cfg.hc_mult,
                              norm_eps=cfg.norm_eps) if layer_id in cfg.engram.layers else None)

    def _ffn(self, h, trace):
        return self.ffn(h, trace) if isinstance(self.ffn, MoE) else self.ffn(h)

    def forward(self, x, cos, sin, cache=None, trace: RouterTrace | None = None, engram: EngramInput | None = None):
        """x (B,T,D), or (B,T,n,D) streams with mHC -> the same shape."""
        if self.engram is not None:
            x = x + self.engram(x, engram)
        if self.attn_hc is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, cache)
            return x + self._ffn(self.ffn_norm(x), trace)
        y, post, carry = self.attn_hc(x)
        x = hc_write(carry, self.attn(self.attn_norm(y), cos, sin, cache), post)
        y, post, carry = self.ffn_hc(x)
        return hc_write(carry, self._ffn(self.ffn_norm(y), trace), post)


class MTPLayer(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 section 2.2).

    Combines the previous depth's (normed) hidden state at position i with the embedding of token
    i+k, runs one block, and predicts token i+k+1 through the shared head. The embeddings and the
    output head are shared with the main model, as in the paper.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        # [embedding; hidden] order, as DeepSeek's released weights (and vLLM, transformers) use.
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        # transformers always builds MTP blocks as MoE; a model with no experts gets a dense one.
        self.block = Block(cfg, layer_id, moe=cfg.n_routed_experts > 0)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # "shared_head.norm" in the checkpoint
        self.hc_head = HyperHead(cfg) if cfg.has_mhc else None

    def forward(self, h_prev, emb_next, cos, sin, cache=None, trace=None):
        """h_prev (B,T,D) final-normed, emb_next (B,T,D) -> final-normed (B,T,D), with or without mHC."""
        x = self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))
        if self.hc_head is None:
            return self.norm(self.block(x, cos, sin, cache, trace))
        # The streams in the main model's residual dtype, the embedding's (under autocast eh_proj's
        # output is bf16 while the main streams stay fp32, as V4 keeps them; and mHC's fused CPU
        # kernels take fp32 streams only).
        x = self.block(expand_streams(x.to(emb_next.dtype), self.hc_head.n), cos, sin, cache, trace)
        return self.norm(self.hc_head(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.n_layers + k) for k in range(cfg.n_mtp_layers))
        self.rope = RotaryEmbedding(cfg)
        self.hc_head = HyperHead(cfg) if cfg.has_mhc else None  # "model.hc_head" in the checkpoint
        # The compressed-id map, identity until a trainer installs the tokenizer's (engram_vocab.py).
        self.engram_vocab = EngramVocab(cfg.engram, cfg.vocab_size) if cfg.has_engram else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Normal(0, initializer_range) for every matrix, ones for norms, zero balance bias; mHC as
        transformers' DeepseekV4: fn normal, base 0, scale 1 (so every stream starts equally weighted)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if ".engram." in name:
                continue  # Engram initialises itself (zero biases), below
            if name.endswith("norm.weight") or name.endswith(("_hc.scale", "hc_head.hc_scale")):
                p.fill_(1.0)
            elif name.endswith(("_hc.base", "hc_head.hc_base")):
                p.zero_()
            else:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        for layer in self.layers:
            if layer.engram is not None:
                layer.engram.init_weights(std, gen)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
               trace: RouterTrace | None = None, engram: EngramBatch | None = None) -> torch.Tensor:
        """Final-normed hidden states (B,T,D). `engram`: the decode batch of an incremental forward."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        eng = None
        if self.engram_vocab is not None:
            if cache is not None and engram is None:
                # Without the n-gram history the Engram layers would read pads: silently wrong logits.
                raise ValueError("an Engram model decoding with a KV cache needs an EngramBatch (engram=...) over "
                                 "an EngramState that carries each sequence's history; seekling's Engine keeps one")
            eng = self.engram_vocab(input_ids, engram)
        elif engram is not None:
            raise ValueError("engram=... was given but this model has no Engram layers (cfg.engram.layers is empty)")
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope(positions)
        x = self.embed(input_ids)
        if self.hc_head is not None:
            x = expand_streams(x, self.cfg.hc_mult)  # (B,T,n,D)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, trace, eng)
        if self.hc_head is not None:
            x = self.hc_head(x)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                trace: RouterTrace | None = None, engram: EngramBatch | None = None) -> torch.Tensor:
        """Logits (B,T,V) for token ids (B,T)."""
        return self.head(self.hidden(input_ids, positions, cache, trace, engram))

    def mtp_hidden(self, h: torch.Tensor, input_ids: torch.Tensor, trace: RouterTrace | None = None) -> list[torch.Tensor]:
        """Training-time MTP: for depth k = 1..n_mtp_layers, hidden states (B, T-k, D) whose logits
        predict token i+k+1 at position i. `h` is the main model's final-normed output for `input_ids`."""
        outs, T = [], input_ids.shape[1]
        for k, layer in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            cos, sin = self.rope(torch.arange(T - k, device=input_ids.device))
            h = layer(h[:, : T - k], self.embed(input_ids[:, k:]), cos, sin, None, trace)
            outs.append(h)
        return outs

    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        """Total parameters (main model and MTP), or those a token activates in the main model.

        Engram tables count in the total but not as active: a token reads (N-1)*H rows of each, a
        lookup like the embedding's (`table_params` gives them apart)."""
        cfg = self.cfg
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total if embeddings else total - self.embed.weight.numel()
        n = total - sum(p.numel() for p in self.mtp.parameters()) - self.table_params()
        E, K = cfg.n_routed_experts, cfg.n_activated_experts
        per_expert = 3 * cfg.dim * cfg.moe_inter_dim
        n -= (cfg.n_layers - cfg.n_dense_layers) * (E - K) * per_expert
        return n if embeddings else n - self.embed.weight.numel()

    def table_params(self) -> int:
        """Parameters in Engram tables (0 without Engram)."""
        return sum(p.numel() for _, p in table_parameters(self))
