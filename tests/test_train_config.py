"""TrainConfig validation and presets, AdamW parameter groups, the lr schedules, FLOP accounting."""

import json
import math

import pytest
import torch
from test_train_support import TINY_MODEL
from torch.utils.flop_counter import FlopCounterMode

from seekling import device as device_mod
from seekling.config import ModelConfig
from seekling.device import resolve_dtype
from seekling.model.transformer import Transformer
from seekling.presets import PRESETS
from seekling.train.config import TrainConfig, train_preset
from seekling.train.flops import train_flops_per_token
from seekling.train.optim import build_optimizer, lr_at, param_groups


@pytest.mark.parametrize("changes,field", [
    (dict(model="huge"), "model"),
    (dict(model=3), "model"),
    (dict(batch_size=0), "batch_size"),
    (dict(seq_len=-1), "seq_len"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(max_steps=None), "max_steps"),  # neither max_steps nor token_budget
    (dict(token_budget=1000), "max_steps"),  # both
    (dict(max_steps=0), "max_steps"),
    (dict(seq_len=4096), "seq_len"),  # beyond tiny's max_seq_len 1024
    (dict(warmup_steps=1000), "warmup_steps"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(schedule="linear"), "schedule"),
    (dict(decay_fraction=0.0), "decay_fraction"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(mtp_lambda=-0.1), "mtp_lambda"),
    (dict(bias_update_gamma=-1e-3), "bias_update_gamma"),
    (dict(seq_aux_alpha=-1.0), "seq_aux_alpha"),
    (dict(dtype="fp16"), "dtype"),
    (dict(compile="yes"), "compile"),
    (dict(eval_every=-1), "eval_every"),
    (dict(out_dir=""), "out_dir"),
    (dict(time_limit_s=0), "time_limit_s"),
])
def test_invalid_config_names_field(changes, field):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}"):
        TrainConfig(**changes)


def test_frozen_and_keyword_only():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0
    with pytest.raises(TypeError):
        TrainConfig("tiny")


def test_token_budget_rounds_up_to_whole_steps():
    cfg = TrainConfig(max_steps=None, token_budget=10_000, batch_size=2, seq_len=64, grad_accum=3, warmup_steps=1)
    assert cfg.tokens_per_step == 384
    assert cfg.steps == math.ceil(10_000 / 384)


@pytest.mark.parametrize("model", ["tiny", TINY_MODEL])
def test_json_round_trip(model):
    cfg = TrainConfig(model=model, betas=(0.8, 0.99), data="some/path.txt", seq_len=32)
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_from_dict_rejects_unknown_and_bad_fields():
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"run.json: TrainConfig\.lr"):
        TrainConfig.from_dict({"lr": -1.0}, "run.json")


@pytest.mark.parametrize("name", list(PRESETS))
def test_train_presets_are_valid(name):
    cfg = train_preset(name)
    assert cfg.model == name and cfg.out_dir == f"runs/{name}"
    assert cfg.seq_len <= cfg.model_config.max_seq_len
    assert cfg.warmup_steps < cfg.steps


def test_train_preset_overrides():
    cfg = train_preset("tiny", lr=1e-3, max_steps=None, token_budget=100_000, seed=None)
    assert cfg.lr == 1e-3 and cfg.max_steps is None and cfg.steps == math.ceil(100_000 / cfg.tokens_per_step)
    assert cfg.seed == 0  # None means "keep the default"
    assert train_preset("tiny", max_steps=5).warmup_steps == 0  # the preset's warmup would not fit
    with pytest.raises(ValueError, match=r"TrainConfig\.warmup_steps"):
        train_preset("tiny", max_steps=5, warmup_steps=5)  # asked for explicitly: an error, not a silent change
    with pytest.raises(ValueError, match="unknown training setting"):
        train_preset("tiny", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        train_preset("giant")


def test_param_groups_decay_only_matrices():
    model = Transformer(TINY_MODEL)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    assert "embed.weight" in kept and "head.weight" in decayed
    assert all("norm" in n for n in kept - {"embed.weight"})
    assert "layers.1.ffn.experts.w13" in decayed and "layers.0.attn.wq.weight" in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_optimizer_matches_plain_adamw():
    """Our optimizer (fused, two groups) takes the same step as torch's reference AdamW loop."""
    torch.manual_seed(0)
    a, b = Transformer(TINY_MODEL), Transformer(TINY_MODEL)
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(model=TINY_MODEL, seq_len=32, weight_decay=0.1, lr=1e-2)
    ours = build_optimizer(a, cfg)
    ref = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=cfg.betas, eps=cfg.eps, foreach=False)
    for _ in range(3):
        for m in (a, b):
            for p in m.parameters():
                p.grad = torch.ones_like(p) * 0.01 + p.detach() * 0.1
        ours.step()
        ref.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_cosine_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))  # then never rises
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[10 + 89 // 2] == pytest.approx(5.5e-4, rel=0.02)  # half-way: the mean of peak and floor


def test_wsd_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert all(lr == 1e-3 for lr in lrs[10:80])  # stable phase
    assert all(x > y for x, y in zip(lrs[79:], lrs[80:]))  # decay phase falls every step
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_fast_bf16_needs_the_flag_and_a_measured_speedup(monkeypatch):
    assert 0 < device_mod.bf16_matmul_speedup.__wrapped__() < 100  # a real measurement: a finite ratio of times
    fast = device_mod.cpu_has_fast_bf16.__wrapped__  # the uncached check
    for flag, speedup, expected in [(False, 3.0, False), (True, 0.5, False), (True, 1.1, False), (True, 2.0, True)]:
        monkeypatch.setattr(device_mod, "cpu_has_bf16_flag", lambda flag=flag: flag)
        monkeypatch.setattr(device_mod, "bf16_matmul_speedup", lambda speedup=speedup: speedup)
        assert fast() is expected, (flag, speedup)


def test_the_bf16_speedup_is_measured_outside_autocast():
    # The first call may come from inside a bf16 autocast region (a MoE forward): the fp32 side of the
    # comparison must still run in fp32, or the ratio is ~1 and the experts fall back to fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert device_mod._best_matmul_s(torch.float32)[1] == torch.float32
        assert device_mod._best_matmul_s(torch.bfloat16)[1] == torch.bfloat16


def test_auto_dtype_uses_bf16_only_with_native_support(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16  # explicit choice is honoured
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("float32", cpu) == torch.float32


def test_train_flops_match_a_flop_counter():
    """Our FLOPs per trained token vs torch's FlopCounterMode on a dense model's forward+backward.

    Dense so every weight matmul is a plain mm the counter sees. Attention is left out of the
    comparison (the counter does not see every SDPA kernel; model_stats counts it analytically).
    """
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_dense_layers=2, inter_dim=96, n_heads=2, kv_lora_rank=16,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=0,
                      n_activated_experts=0, max_seq_len=64, n_mtp_layers=1)
    model = Transformer(cfg)
    B, T = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        h = model.hidden(ids)
        (mtp,) = model.mtp_hidden(h, ids)
        (model.head(h).sum() + model.head(mtp).sum()).backward()
    ops = counter.get_flop_counts()["Global"]
    counted = sum(n for op, n in ops.items() if "mm" in str(op))  # mm, addmm, bmm: the weight matmuls
    attention_fwd = 2 * (cfg.n_layers + cfg.n_mtp_layers) * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * T
    ours = (train_flops_per_token(cfg, T) - 3 * attention_fwd) * B * T
    # the MTP depth runs on T-1 of the T positions: within a few percent of B*T full tokens
    assert counted == pytest.approx(ours, rel=0.03)
