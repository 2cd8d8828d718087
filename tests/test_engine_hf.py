"""Greedy continuations token-identical to transformers' DeepseekV3ForCausalLM.generate, same checkpoint."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3ForCausalLM

from seekling.checkpoint import save
from seekling.config import ModelConfig
from seekling.inference import Engine, EngineConfig, SamplingParams
from seekling.model.transformer import Transformer

# eos None: transformers then generates exactly max_new_tokens, as the engine does.
CFG = dict(vocab_size=97, dim=64, n_layers=3, n_dense_layers=1, inter_dim=96, n_heads=4, kv_lora_rank=24,
           qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, moe_inter_dim=16, n_routed_experts=8,
           n_activated_experts=3, max_seq_len=256, eos_token_id=None, bos_token_id=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why


@pytest.mark.parametrize("variant", [
    dict(q_lora_rank=None, rope_interleave=True, n_mtp_layers=1),
    dict(q_lora_rank=16, rope_interleave=False, n_expert_groups=4, n_limited_groups=2, rope_type="yarn",
         rope_factor=4.0, original_seq_len=64, mscale=1.0, mscale_all_dim=1.0),
])
@torch.no_grad()
def test_greedy_matches_transformers_generate(variant, tmp_path):
    model = Transformer(ModelConfig(**(CFG | variant))).eval()
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():  # spread-out logits, so near-ties are rare
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name else 0.08 * torch.randn(p.shape, generator=g))
    save(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers reports the MTP weights it does not use
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 17, 40)]
    n_new = 40
    spec = dict(speculative_tokens=1) if model.cfg.n_mtp_layers else {}
    eng = Engine(model, EngineConfig(block_size=8, max_batch_tokens=16, max_seqs=4, kv_cache_tokens=1024, **spec))
    ours = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=n_new))
    for p, o in zip(prompts, ours):
        ids = torch.tensor([p])
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                             pad_token_id=0)[0, len(p):].tolist()
        assert len(theirs) == n_new
        assert o.output_ids == theirs


@torch.no_grad()
def test_transformers_generate_stops_at_saved_stop_ids(tmp_path):
    """generation_config.json lists the end-of-turn id with eos, so transformers' generate stops there."""
    from transformers import GenerationConfig

    model = Transformer(ModelConfig(**(CFG | dict(eos_token_id=1, bos_token_id=0)))).eval()
    ids = torch.tensor([[0, 11, 12, 13]])
    h = model.hidden(ids)[0, -1]
    model.head.weight[6] = 100 * h / h.norm()  # id 6 (end of turn) becomes the greedy next token
    save(model, tmp_path, stop_token_ids=(6,))
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [1, 6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert out[0, 4:].tolist() == [6]
    save(model, tmp_path)  # without extra stop ids the file keeps a single eos, as DeepSeek's own
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == 1
    save(Transformer(ModelConfig(**CFG)), tmp_path, stop_token_ids=(6,))  # a model with no eos of its own
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == 6
