"""ModelConfig validation: every bad value names its field."""

import pytest

from seekling.config import ModelConfig
from seekling.presets import PRESETS, get_preset
from seekling.model.transformer import Transformer


@pytest.mark.parametrize("changes,field", [
    (dict(n_heads=0), "n_heads"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(n_activated_experts=17), "n_activated_experts"),
    (dict(n_expert_groups=3), "n_expert_groups"),
    (dict(n_expert_groups=4, n_limited_groups=5), "n_limited_groups"),
    (dict(n_expert_groups=4, n_limited_groups=1, n_activated_experts=5), "n_activated_experts"),
    (dict(n_dense_layers=7), "n_dense_layers"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(rope_type="ntk"), "rope_type"),
    (dict(rope_type="yarn", rope_factor=0.5), "rope_factor"),
    (dict(eos_token_id=5000), "eos_token_id"),
    (dict(eos_token_id=[1, 5000]), "eos_token_id"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(eos_token_id=True), "eos_token_id"),
    (dict(bos_token_id="0"), "bos_token_id"),
    (dict(n_routed_experts=0), "n_routed_experts"),
    (dict(n_expert_groups=16, n_limited_groups=2), "n_expert_groups"),
])
def test_invalid_config_names_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
        ModelConfig(**changes)


def test_eos_ids_one_several_or_none():
    assert ModelConfig().eos_token_ids == (1,)
    assert ModelConfig(eos_token_id=None).eos_token_ids == ()
    several = ModelConfig(eos_token_id=[3, 4])  # a list, as JSON gives it, is kept as a hashable tuple
    assert several.eos_token_id == (3, 4) == several.eos_token_ids and several == ModelConfig(eos_token_id=(3, 4))
    assert hash(several) == hash(ModelConfig(eos_token_id=(3, 4)))


def test_frozen():
    cfg = ModelConfig()
    with pytest.raises(AttributeError):
        cfg.dim = 3


def test_all_dense_needs_no_experts():
    cfg = ModelConfig(n_layers=2, n_dense_layers=2, n_routed_experts=0, n_activated_experts=0)
    assert not cfg.has_moe


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build(name):
    import torch

    cfg = get_preset(name)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.num_params(active=True) < m.num_params()


def test_preset_sizes():
    import torch

    with torch.device("meta"):
        sizes = {n: Transformer(get_preset(n)).num_params() for n in ("tiny", "gpu_100m", "gpu_1b")}
    assert 10e6 < sizes["tiny"] < 16e6
    assert 80e6 < sizes["gpu_100m"] < 130e6
    assert 0.8e9 < sizes["gpu_1b"] < 1.3e9


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of"):
        get_preset("huge")
