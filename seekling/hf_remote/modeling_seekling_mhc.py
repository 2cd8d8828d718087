"""transformers model for seekling's mHC checkpoints, loaded with trust_remote_code=True.

Shapes: B batch, T tokens, n = hc_mult residual streams, D hidden size.

DeepSeek-V3 as transformers builds it (attention, MoE, norms, head and its forward are transformers'
own classes), with DeepSeek-V4's manifold-constrained hyper-connections (Xie et al., arXiv 2512.24880)
around every attention and MLP sublayer: the residual is n streams (B,T,n,D); each sublayer reads
y = sum_j pre_j x_j and writes x'_k = post_k F(y) + sum_j comb[j,k] x_j, comb projected by Sinkhorn-Knopp
onto doubly-stochastic matrices; before the final norm a head collapses the streams. The mixing is
DeepSeek-V4's (transformers' DeepseekV4HyperConnection / HyperHead): coefficients in fp32 from fp32
parameters, hc_eps where V4 adds it; hc_sinkhorn_iters = 0 skips the projection (seekling's ablation).

Written by seekling (seekling/hf_remote/) into each mHC checkpoint; it imports only torch and
transformers. Left out: MTP (the checkpoint's MTP weights are ignored, as for DeepSeek-V3).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
)

from .configuration_seekling_mhc import SeeklingMHCConfig

# The checkpoint stores one tensor set per routed expert, as DeepSeek-V3 checkpoints do; transformers
# fuses them on load through a conversion looked up by model type, so this type gets V3's.
register_checkpoint_conversion_mapping("seekling_mhc", get_checkpoint_conversion_mapping("deepseek_v3"), overwrite=True)


def _mixes(x, fn, norm_eps):
    """(B,T,n,D) -> (B,T,rows of fn): the projection of the flat streams, RMS-normalised (no weight)."""
    flat = x.flatten(2).float()
    return F.linear(flat, fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)


class SeeklingHyperConnection(nn.Module):
    def __init__(self, config):
        super().__init__()
        n = self.n = config.hc_mult
        self.iters, self.hc_eps, self.norm_eps = config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        """Streams (B,T,n,D) -> sublayer input (B,T,D), post (B,T,n), comb (B,T,n,n)."""
        n, eps = self.n, self.hc_eps
        m_pre, m_post, m_comb = _mixes(x, self.fn, self.norm_eps).split((n, n, n * n), dim=-1)
        b_pre, b_post, b_comb = self.base.float().split((n, n, n * n))
        s = self.scale.float()
        pre = torch.sigmoid(m_pre * s[0] + b_pre) + eps
        post = 2 * torch.sigmoid(m_post * s[1] + b_post)
        comb = torch.softmax((m_comb * s[2] + b_comb).unflatten(-1, (n, n)), dim=-1) + eps
        if self.iters > 0:  # columns first (softmax made the rows sum to 1), then rows and columns
            comb = comb / (comb.sum(-2, keepdim=True) + eps)
            for _ in range(self.iters - 1):
                comb = comb / (comb.sum(-1, keepdim=True) + eps)
                comb = comb / (comb.sum(-2, keepdim=True) + eps)
        return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype), post, comb


def _write(x, f, post, comb):
    """x'_k = post_k f + sum_j comb[j,k] x_j (comb is not symmetric: the index order matters)."""
    return post.to(x.dtype).unsqueeze(-1) * f.unsqueeze(-2) + comb.to(x.dtype).transpose(-1, -2) @ x


class SeeklingHyperHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        n = config.hc_mult
        self.hc_eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        """(B,T,n,D) -> (B,T,D)."""
        w = torch.sigmoid(_mixes(x, self.hc_fn, self.norm_eps) * self.hc_scale.float() + self.hc_base.float())
        return ((w + self.hc_eps).unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


class SeeklingMHCDecoderLayer(DeepseekV3DecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.hc_mult = config.hc_mult
        self.attn_hc = SeeklingHyperConnection(config)
        self.ffn_hc = SeeklingHyperConnection(config)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        x = hidden_states
        if x.dim() == 3:  # the first layer receives the embedding: copy it into every stream
            x = x.unsqueeze(2).expand(-1, -1, self.hc_mult, -1).contiguous()
        y, post, comb = self.attn_hc(x)
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(y), attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        x = _write(x, attn, post, comb)
        y, post, comb = self.ffn_hc(x)
        return _write(x, self.mlp(self.post_attention_layernorm(y)), post, comb)


class _MHCInit:
    """V4's initialisation for the mixing parameters: fn normal, base 0, scale 1."""

    # V3 keeps the balance bias fp32; the mixing stays fp32 too, as DeepSeek-V4 keeps it.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "attn_hc", "ffn_hc", "hc_head"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SeeklingHyperConnection):
            module.fn.normal_(0.0, self.config.initializer_range)
            module.base.zero_()
            module.scale.fill_(1.0)
        elif isinstance(module, SeeklingHyperHead):
            module.hc_fn.normal_(0.0, self.config.initializer_range)
            module.hc_base.zero_()
            module.hc_scale.fill_(1.0)


class SeeklingMHCModel(_MHCInit, DeepseekV3Model):
    config_class = SeeklingMHCConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList(SeeklingMHCDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.hc_head = SeeklingHyperHead(config)
        # DeepSeek-V3's forward runs unchanged; this hook collapses the streams right before the
        # final norm, where DeepSeek-V4 collapses them.
        self.norm.register_forward_pre_hook(lambda norm, args: (self.hc_head(args[0]), *args[1:]))
        self.post_init()


class SeeklingMHCForCausalLM(_MHCInit, DeepseekV3ForCausalLM):
    config_class = SeeklingMHCConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = SeeklingMHCModel(config)
        self.post_init()
