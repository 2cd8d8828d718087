"""Checkpoint round trips and the errors a user sees for bad files."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import seekling
from seekling.config import ModelConfig
from seekling.model.transformer import Transformer

CFG = ModelConfig(vocab_size=80, dim=32, n_layers=3, n_dense_layers=1, inter_dim=48, n_heads=2, q_lora_rank=12,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16,
                  n_routed_experts=6, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, n_mtp_layers=1)


@pytest.fixture
def model():
    m = Transformer(CFG)
    with torch.no_grad():
        for g in m.modules():
            if hasattr(g, "e_score_correction_bias"):
                g.e_score_correction_bias.normal_()
    return m


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_bit_exact(model, tmp_path):
    model.save(tmp_path)
    loaded = seekling.load(tmp_path)
    assert loaded.cfg == model.cfg
    assert_same(model, loaded)
    ids = torch.randint(0, 80, (2, 9))
    assert torch.equal(model.eval()(ids), loaded(ids))


def test_sharded_round_trip_and_layout(model, tmp_path):
    model.save(tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    assert_same(model, seekling.load(tmp_path))
    # re-saving unsharded removes the stale shards and the index
    model.save(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]


def test_file_uses_hf_names_with_per_expert_keys(model, tmp_path):
    model.save(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "model.layers.1.mlp.experts.5.gate_proj.weight" in keys
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.3.eh_proj.weight" in keys and "model.layers.3.shared_head.norm.weight" in keys
    assert "model.layers.3.embed_tokens.weight" in keys
    assert not any("w13" in k or "experts.w2" in k for k in keys)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_nextn_predict_layers"] == 1
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]


def test_bf16_save_and_load_dtype(model, tmp_path):
    model.save(tmp_path, dtype=torch.bfloat16)
    m = seekling.load(tmp_path)
    assert m.embed.weight.dtype == torch.bfloat16
    assert m.layers[1].ffn.gate.e_score_correction_bias.dtype == torch.float32  # kept in fp32
    assert seekling.load(tmp_path, dtype=torch.float32).embed.weight.dtype == torch.float32


def test_save_keeps_other_files(model, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    model.save(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert not list(tmp_path.glob(".*tmp*"))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        seekling.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        seekling.load(tmp_path)


def test_bad_config_json(model, tmp_path):
    model.save(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        seekling.load(tmp_path)


def test_wrong_model_type(model, tmp_path):
    model.save(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="model_type"):
        seekling.load(tmp_path)


def test_truncated_weights(model, tmp_path):
    model.save(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        seekling.load(tmp_path)


def test_missing_weights_file(model, tmp_path):
    model.save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        seekling.load(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        seekling.load(tmp_path)


def test_missing_shard(model, tmp_path):
    model.save(tmp_path, max_shard_bytes=20_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards that are missing"):
        seekling.load(tmp_path)


def test_config_weights_mismatch(model, tmp_path):
    model.save(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["moe_intermediate_size"] = 24
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="has shape .* but the config implies"):
        seekling.load(tmp_path)
    d["moe_intermediate_size"] = 16
    d["num_hidden_layers"] = 4  # the MTP layer now looks like a main layer, and MTP weights vanish
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="do not match"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seekling.load(tmp_path)


def test_unsupported_fields(model, tmp_path):
    model.save(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    for key, value, match in [("hidden_act", "gelu", "hidden_act"), ("quantization_config", {"quant_method": "fp8"}, "quantized"),
                              ("scoring_func", "softmax", "scoring_func")]:
        bad = dict(d, **{key: value})
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            seekling.load(tmp_path)


def test_legacy_rope_scaling_field(model, tmp_path):
    """DeepSeek's released config.json uses rope_scaling + rope_theta (transformers 4 style)."""
    cfg = CFG.replace(rope_type="yarn", rope_factor=4.0, original_seq_len=64, mscale=1.0, mscale_all_dim=1.0)
    Transformer(cfg).save(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    d["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rp.items() if k != "rope_type"}}
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert seekling.load(tmp_path).cfg == cfg
