"""Logits parity with transformers' DeepseekV3ForCausalLM, in both directions."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import seekling  # noqa: E402
from seekling.checkpoint import config_to_hf  # noqa: E402
from seekling.config import ModelConfig  # noqa: E402
from seekling.model.transformer import Transformer  # noqa: E402

BASE = dict(vocab_size=97, dim=64, n_layers=3, inter_dim=96, n_heads=4, kv_lora_rank=24, qk_nope_head_dim=12,
            qk_rope_head_dim=8, v_head_dim=10, moe_inter_dim=16, n_routed_experts=8, n_shared_experts=1,
            n_activated_experts=3, max_seq_len=256, original_seq_len=64, route_scale=2.5)
YARN = dict(rope_type="yarn", rope_factor=4.0, original_seq_len=64, mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1)

CONFIGS = {
    "direct-q/all-moe/default-rope": dict(q_lora_rank=None, n_dense_layers=0, rope_interleave=True),
    "q-lora/1-dense/groups/no-norm/yarn/llama-rope/mtp": dict(
        q_lora_rank=20, n_dense_layers=1, n_expert_groups=4, n_limited_groups=2, norm_topk_prob=False,
        rope_interleave=False, n_mtp_layers=1, **YARN),
    "2-dense/groups-1-of-2/interleave/mtp2": dict(
        q_lora_rank=16, n_dense_layers=2, n_expert_groups=2, n_limited_groups=1, n_activated_experts=2,
        n_mtp_layers=2, rope_interleave=True),
    "yarn-unequal-mscale/norm/2-shared": dict(
        q_lora_rank=None, n_dense_layers=1, n_shared_experts=2, rope_interleave=True,
        **(YARN | dict(mscale=0.707, mscale_all_dim=1.0, rope_factor=8.0))),
    "v2-lite-like/8-groups": dict(
        q_lora_rank=None, n_dense_layers=1, n_routed_experts=16, n_expert_groups=8, n_limited_groups=3,
        n_activated_experts=4, rope_interleave=True, n_mtp_layers=1),
}


def randomize(model: torch.nn.Module, negative_bias: bool = True):
    """Non-trivial norms and a (mostly negative) balance bias, so every tensor matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * (-0.5 if negative_bias else 0.5))


def hf_model(cfg: ModelConfig):
    hf_cfg = DeepseekV3Config(**{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")})
    return DeepseekV3ForCausalLM(hf_cfg).eval()


def compare(ours, theirs, T=40):
    ids = torch.randint(0, ours.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ours(ids)
        b = theirs(ids).logits
    delta = (a - b).abs().max().item()
    assert a.shape == b.shape
    assert delta <= 1e-4, delta
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    return delta


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_saved_loads_in_seekling(name, tmp_path):
    cfg = ModelConfig(**(BASE | CONFIGS[name]))
    theirs = hf_model(cfg)
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers does not save MTP weights; we warn about that
        ours = seekling.load(tmp_path)
    print(name, "transformers->seekling max|dlogits|", compare(ours, theirs))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_seekling_saved_loads_in_transformers(name, tmp_path):
    cfg = ModelConfig(**(BASE | CONFIGS[name]))
    ours = Transformer(cfg).eval()
    randomize(ours)
    seekling.save(ours, tmp_path)
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    print(name, "seekling->transformers max|dlogits|", compare(ours, theirs))


def test_negative_bias_masks_deselected_groups(tmp_path):
    """With all-negative biases, a masked group must still lose: -inf, not 0.0, fills it."""
    cfg = ModelConfig(**(BASE | dict(n_dense_layers=0, n_expert_groups=4, n_limited_groups=1, n_activated_experts=2)))
    ours = Transformer(cfg).eval()
    randomize(ours, negative_bias=True)
    gate = ours.layers[0].ffn.gate
    x = torch.randn(64, cfg.dim)
    _, idx, _ = gate(x)
    scores = torch.sigmoid(x @ gate.weight.t()) + gate.e_score_correction_bias
    group_of = idx // (cfg.n_routed_experts // cfg.n_expert_groups)
    # every token's experts come from its single best group (by top-2 sum)
    best = scores.view(64, 4, -1).topk(2, -1)[0].sum(-1).argmax(-1)
    assert torch.equal(group_of, best.unsqueeze(-1).expand_as(group_of))
    theirs = hf_model(cfg)
    seekling.save(ours, tmp_path)
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    compare(ours, theirs)


def test_mtp_layer_matches_transformers_mtp_model(tmp_path, monkeypatch):
    """Our MTP weights load into transformers' own MtpModel (DeepSeek layout) and give the same logits."""
    from transformers.modeling_layers import MtpModel

    cfg = ModelConfig(**(BASE | CONFIGS["q-lora/1-dense/groups/no-norm/yarn/llama-rope/mtp"]))
    ours = Transformer(cfg).eval()
    randomize(ours)
    seekling.save(ours, tmp_path)
    # transformers only looks for MTP weights at DeepSeek-V3's layer 61; point it at this config's.
    monkeypatch.setattr(DeepseekV3ForCausalLM, "_keys_to_ignore_on_load_unexpected", [rf"model\.layers\.{cfg.n_layers}.*"])
    main = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    mtp = MtpModel.from_pretrained(main).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        h = main(ids, output_hidden_states=True).hidden_states[-1]
        theirs = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], torch.arange(1, 33)[None], None, input_ids=ids[:, 1:]))
        mine = ours.head(ours.mtp_hidden(ours.hidden(ids), ids)[0])
    assert (mine - theirs).abs().max() <= 1e-4
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))
