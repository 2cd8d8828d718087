"""Checkpoint round trips, eos ids as transformers writes them, and the errors a user sees for bad files."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import seekling
from seekling.config import ModelConfig
from seekling.inference.engine import Engine, EngineConfig
from seekling.inference.sampling import SamplingParams
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
    seekling.save(model, tmp_path)
    loaded = seekling.load(tmp_path)
    assert loaded.cfg == model.cfg
    assert_same(model, loaded)
    ids = torch.randint(0, 80, (2, 9))
    assert torch.equal(model.eval()(ids), loaded(ids))


def test_sharded_round_trip_and_layout(model, tmp_path):
    seekling.save(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    assert_same(model, seekling.load(tmp_path))
    # re-saving unsharded removes the stale shards and the index
    seekling.save(model, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]


def test_file_uses_hf_names_with_per_expert_keys(model, tmp_path):
    seekling.save(model, tmp_path)
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
    seekling.save(model, tmp_path, dtype=torch.bfloat16)
    m = seekling.load(tmp_path)
    assert m.embed.weight.dtype == torch.bfloat16
    assert m.layers[1].ffn.gate.e_score_correction_bias.dtype == torch.float32  # kept in fp32
    assert seekling.load(tmp_path, dtype=torch.float32).embed.weight.dtype == torch.float32


def test_save_keeps_other_files(model, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    seekling.save(model, tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert not list(tmp_path.glob(".*tmp*"))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        seekling.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        seekling.load(tmp_path)


def test_bad_config_json(model, tmp_path):
    seekling.save(model, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        seekling.load(tmp_path)


def test_wrong_model_type(model, tmp_path):
    seekling.save(model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="model_type"):
        seekling.load(tmp_path)


def test_truncated_weights(model, tmp_path):
    seekling.save(model, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        seekling.load(tmp_path)


def test_missing_weights_file(model, tmp_path):
    seekling.save(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        seekling.load(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        seekling.load(tmp_path)


def test_missing_shard(model, tmp_path):
    seekling.save(model, tmp_path, max_shard_bytes=20_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards that are missing"):
        seekling.load(tmp_path)


def test_config_weights_mismatch(model, tmp_path):
    seekling.save(model, tmp_path)
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
    seekling.save(model, tmp_path)
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
    seekling.save(Transformer(cfg), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    d["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rp.items() if k != "rope_type"}}
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert seekling.load(tmp_path).cfg == cfg


# ---------------------------------------------------------------- eos ids, as transformers writes them

HF_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
               first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
               num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
               qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=128, num_nextn_predict_layers=0,
               bos_token_id=None)
PROMPT = [3, 11, 12, 13]


@torch.no_grad()
def hf_checkpoint(path, eos, first_token):
    """A transformers-written checkpoint whose eos is `eos` and whose greedy next token after PROMPT is `first_token`."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**HF_TINY, eos_token_id=eos)).eval()
    g = torch.Generator().manual_seed(0)
    for name, p in hf.named_parameters():  # spread-out logits, so near-ties between the two stacks are rare
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name else 0.08 * torch.randn(p.shape, generator=g))
    h = hf.model(torch.tensor([PROMPT])).last_hidden_state[0, -1]
    hf.lm_head.weight[first_token] = 100 * h / h.norm()  # a logit of ~100 * |h|: far above every other
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("eos,first_token,stop_ids", [
    (None, 1, ()), (5, 5, (5,)), (5, 1, (5,)), ([5, 7], 5, (5, 7)), ([5, 7], 7, (5, 7)),
])
@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_transformers_eos_loads_and_engine_stops_where_transformers_does(tmp_path, eos, first_token, stop_ids):
    """null stays "no eos" (not our default 1); every id of a list stops, not only the first."""
    hf = hf_checkpoint(tmp_path, eos, first_token)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == eos  # as transformers wrote it
    model = seekling.load(tmp_path)
    assert model.cfg.eos_token_id == (tuple(eos) if isinstance(eos, list) else eos)
    assert model.cfg.eos_token_ids == stop_ids and model.cfg.bos_token_id is None

    n_new = 6
    eng = Engine(model, EngineConfig(block_size=8, max_batch_tokens=16, max_seqs=4, kv_cache_tokens=256))
    ours = eng.generate([PROMPT], SamplingParams(temperature=0, max_tokens=n_new))[0].output_ids
    ids = torch.tensor([PROMPT])
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == theirs
    if first_token in stop_ids:
        assert ours == [first_token]
    else:  # token 1, the dataclass default eos, is greedy here and must not end the generation
        assert ours[0] == 1 and len(ours) == n_new


@pytest.mark.parametrize("eos", [None, 5, [5, 7]])
def test_eos_round_trip_through_save(tmp_path, eos):
    """Saving keeps the eos as transformers wrote it: null, one plain number, or the whole list."""
    transformers = pytest.importorskip("transformers")
    hf_checkpoint(tmp_path / "hf", eos, first_token=1)
    model = seekling.load(tmp_path / "hf")
    seekling.save(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["eos_token_id"] == eos
    assert json.loads((tmp_path / "ours" / "generation_config.json").read_text())["eos_token_id"] == eos
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "ours").eos_token_id == eos
    assert seekling.load(tmp_path / "ours").cfg == model.cfg
    # extra stop ids join the model's own in generation_config.json only; config.json keeps the model's
    seekling.save(model, tmp_path / "ours", stop_token_ids=(6, 5))
    assert json.loads((tmp_path / "ours" / "generation_config.json").read_text())["eos_token_id"] == (
        {None: [6, 5], 5: [5, 6], (5, 7): [5, 7, 6]}[model.cfg.eos_token_id])
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["eos_token_id"] == eos


# ---------------------------------------------------------------- shard names stay inside the checkpoint

def _point_index_at(ckpt, new_name_for):
    """Rewrite the index so every entry of one shard names `new_name_for(shard)` instead; returns that shard."""
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    new = new_name_for(shard)
    index["weight_map"] = {k: (new if v == shard else v) for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlinked_dir"])
def test_index_cannot_name_shards_outside_the_checkpoint(model, tmp_path, how):
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside"
    seekling.save(model, ckpt, max_shard_bytes=20_000)
    outside.mkdir()
    if how == "symlinked_dir":
        (ckpt / "sub").symlink_to(outside, target_is_directory=True)
    names = {"dotdot": lambda s: f"../outside/{s}", "absolute": lambda s: str(outside / s),
             "symlinked_dir": lambda s: f"sub/{s}"}
    shard = _point_index_at(ckpt, names[how])
    # The shard really is there, readable and right: only where it lies is wrong.
    (ckpt / shard).rename(outside / shard)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map names shard .* outside the "
                                         r"checkpoint directory .* move the shard files into the directory"):
        seekling.load(ckpt)


def test_index_may_name_a_symlinked_shard_file(model, tmp_path):
    """The Hugging Face hub cache keeps every file of a snapshot as a link to ../../blobs/<hash>: that loads."""
    snap, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    seekling.save(model, snap, max_shard_bytes=20_000)
    blobs.mkdir()
    for i, f in enumerate(sorted(snap.glob("model-*.safetensors"))):
        f.rename(blobs / f"blob{i}")
        f.symlink_to(f"../../blobs/blob{i}")
    assert_same(model, seekling.load(snap))


def test_index_with_a_non_string_shard_name(model, tmp_path):
    seekling.save(model, tmp_path, max_shard_bytes=20_000)
    _point_index_at(tmp_path, lambda s: 7)
    with pytest.raises(ValueError, match="weight_map names shard 7, which is not a file name"):
        seekling.load(tmp_path)
