"""Engram wired through the stack (seekling/model/engram.py is tested alone in test_engram.py): the
model option, the engine's incremental decoding against full forwards (eager, the compiled step's
function run eagerly, and compiled), checkpoints, the row-sparse optimizer and clipping against
torch's, a training run that resumes exactly, and `seekling info`. Engram under torchrun (FSDP2, EP,
DCP checkpoints) is tests/test_distributed.py's."""

import json

import pytest
import torch
from test_train_support import _private_cache, data_dir, spread_out, tiny_config  # noqa: F401 (fixtures)

import seekling
from seekling.checkpoint import config_from_hf, config_to_hf
from seekling.config import ModelConfig
from seekling.inference import Engine, EngineConfig, SamplingParams
from seekling.inference.compiled import decode_hidden
from seekling.model.engram import EngramConfig, table_parameters
from seekling.model.transformer import Transformer
from seekling.presets import get_preset, tiny_engram, with_engram
from seekling.stats import model_stats
from seekling.train.config import TrainConfig
from seekling.train.core import StepConfig, TrainStep, clip_grad_norm_with_sparse, next_token_loss
from seekling.train.optim import MixedOptimizer, RowSparseAdam, build_optimizer, param_groups
from seekling.train.state import read_metrics
from seekling.train.trainer import resume, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why

TINY = dict(vocab_size=97, dim=32, n_layers=3, n_dense_layers=1, inter_dim=48, n_heads=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16, n_routed_experts=4,
            n_shared_experts=1, n_activated_experts=2, max_seq_len=256, n_mtp_layers=1)
ENGRAM = EngramConfig(layers=(0, 2), max_ngram=3, n_heads=2, head_rows=31, embed_dim=8)


def engram_cfg(**changes) -> ModelConfig:
    return ModelConfig(**(TINY | dict(engram=ENGRAM) | changes))


def engram_model(seed=0, **changes) -> Transformer:
    model = spread_out(Transformer(engram_cfg(**changes)), seed).eval()
    # a compressing map, with merges, so the compressed ids matter
    model.engram_vocab.load_map([i // 3 for i in range(model.cfg.vocab_size)])
    return model


# ---------------------------------------------------------------- the option

def test_off_by_default_and_validated():
    plain = ModelConfig(**TINY)
    assert not plain.has_engram and plain.engram == EngramConfig()
    model = Transformer(plain)
    assert model.engram_vocab is None and not any("engram" in k for k in model.state_dict())
    d = config_to_hf(plain)
    assert d["model_type"] == "deepseek_v3" and "engram" not in d
    with pytest.raises(ValueError, match=r"ModelConfig.engram: layers \(0, 3\) must be block indices below n_layers"):
        engram_cfg(engram=EngramConfig(layers=(0, 3)))
    with pytest.raises(ValueError, match=r"ModelConfig.engram: pad_id 200 is outside"):
        engram_cfg(engram=EngramConfig(layers=(0,), pad_id=200))
    # a TrainConfig with an Engram model round-trips through JSON
    tc = TrainConfig(model=engram_cfg(), max_steps=3, warmup_steps=1, seq_len=32)
    back = TrainConfig.from_dict(json.loads(json.dumps(tc.to_dict())))
    assert back == tc and back.model_config.engram == ENGRAM
    assert get_preset("tiny_engram") == tiny_engram() and tiny_engram().engram.layers == (1, 4)


def test_zero_engram_is_the_plain_model():
    """With W_V and its bias zero the Engram output is exactly 0, so the model is the same model without
    Engram: the only change Engram makes is the residual add before attention."""
    model = engram_model(seed=1, hc_mult=2)
    with torch.no_grad():
        for layer in model.layers:
            if layer.engram is not None:
                layer.engram.value_proj.weight.zero_()
                layer.engram.value_proj.bias.zero_()
    plain = Transformer(model.cfg.replace(engram=EngramConfig()))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "engram" not in k})
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=0)
        model.layers[0].engram.value_proj.bias.fill_(0.5)
        assert (model(ids) - plain(ids)).abs().max() > 1e-3


def test_cache_without_engram_batch_is_refused():
    model = engram_model()
    with pytest.raises(ValueError, match="needs an EngramBatch"):
        model.hidden(torch.zeros(1, 3, dtype=torch.long), cache=object())


# ---------------------------------------------------------------- the engine

@torch.no_grad()
def _greedy_by_full_forward(model, prompt, n):
    """Greedy tokens and their log-probabilities, each from a full forward of everything so far."""
    ids, lps = list(prompt), []
    for _ in range(n):
        logp = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
        ids.append(int(logp.argmax()))
        lps.append(float(logp.max()))
    return ids[len(prompt):], lps


PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 8, 71, 30, 12, 7, 19, 40, 41, 42], [33] * 6, [70]]
N_NEW = 10
GREEDY = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)


def _check_engine(model, engine, prompts=PROMPTS):
    outs = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        want, lps = _greedy_by_full_forward(model, prompt, N_NEW)
        assert out.output_ids == want
        # token by token: every step's distribution equals the full forward's (the logprob of its token)
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(lps), atol=2e-4, rtol=0)


@pytest.mark.parametrize("hc, options", [
    (1, dict()),
    (2, dict()),
    (1, dict(speculative_tokens=2)),  # verifications keep only their accepted drafts' history
    (1, dict(prefill_attention="naive", attention="naive")),
])
def test_engine_decode_equals_full_forward(hc, options):
    # max_batch_tokens 8: the 14-token prompt is prefilled in chunks beside the others' decodes.
    model = engram_model(seed=6, hc_mult=hc)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=512, max_seqs=4, max_batch_tokens=12, **options))
    _check_engine(model, engine)


def test_engine_state_survives_preemption_and_slot_reuse():
    """A cache so small that sequences are preempted (re-prefilled from position 0, which ignores the
    slot's stale history) and more requests than slots (slots reused)."""
    model = engram_model(seed=3)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=48, max_seqs=3, max_batch_tokens=9))
    prompts = PROMPTS + [[11, 12, 13, 14, 15], [90, 91]]
    _check_engine(model, engine, prompts)
    assert engine.scheduler.n_preemptions > 0


MIXED = [PROMPTS[1]] * 3 + [PROMPTS[0]] * 2 + [PROMPTS[3]]


@pytest.mark.parametrize("hc, max_seqs, prompts, forks", [(1, 4, MIXED, 2), (2, 4, MIXED, 2), (1, 2, [PROMPTS[1]] * 4, 3)])
def test_shared_prompts_fork_the_engram_state(hc, max_seqs, prompts, forks):
    """Requests with one prompt compute it once; a fork starts from the Engram state at the prompt's end
    (kept when the prompt was computed: the member it copies from has decoded on since), so every output
    is still the full forward's. With 2 slots the last forks wait for a row and copy from a fork (the
    member that computed the prompt has finished by then)."""
    model = engram_model(seed=5, hc_mult=hc)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=512, max_seqs=max_seqs, max_batch_tokens=12))
    _check_engine(model, engine, prompts)
    assert engine.n_forked == forks


def test_compiled_step_function_equals_full_forward_eagerly(monkeypatch):
    """The compiled decode step's function (DecodeEngram beside DecodeAttention) run without compiling:
    the same tokens as full forwards, batches of one-token decodes included."""
    monkeypatch.setattr("seekling.inference.compiled._need_cxx", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    calls = []

    def spy(*args):
        calls.append(args[1].numel())
        return decode_hidden(*args)

    monkeypatch.setattr("seekling.inference.compiled.decode_hidden", spy)
    for hc in (1, 2):
        model = engram_model(seed=4, hc_mult=hc)
        engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=512, max_seqs=4, max_batch_tokens=16,
                                            compile=True))
        _check_engine(model, engine)
    assert calls and max(calls) == len(PROMPTS)


@pytest.mark.slow  # compiles two graphs: about a minute or more on a 2-core CPU
def test_compiled_decode_equals_full_forward(compiled_spy):
    model = engram_model(seed=6, hc_mult=2)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=512, max_seqs=4, max_batch_tokens=16, compile=True))
    _check_engine(model, engine)
    assert len(PROMPTS) in compiled_spy, f"the compiled step ran for batches of {sorted(set(compiled_spy))}"


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("hc", [1, 2])
def test_checkpoint_round_trip(tmp_path, hc):
    model = engram_model(seed=2, hc_mult=hc)
    seekling.save(model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "seekling_engram" and "auto_map" not in d and d["engram"]["layers"] == [0, 2]
    assert not (tmp_path / "modeling_seekling_mhc.py").exists()  # transformers has no code for it
    names = set(seekling.checkpoint.read_tensors(tmp_path))
    assert "model.engram_vocab.compress" in names and "model.layers.2.engram.table.weight" in names
    assert {n for n in names if "engram" in n and "layers.1." in n} == set()
    loaded = seekling.load(tmp_path)
    assert loaded.cfg == model.cfg
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    # bf16: integer tensors (the id map, the multipliers) stay int64
    seekling.save(model, tmp_path / "bf16", dtype=torch.bfloat16)
    half = seekling.load(tmp_path / "bf16")
    assert half.engram_vocab.compress.dtype == torch.long and torch.equal(half.engram_vocab.compress,
                                                                            model.engram_vocab.compress)
    assert torch.equal(half.layers[0].engram.multipliers, model.layers[0].engram.multipliers)


def test_wrong_loader_or_config_is_refused(tmp_path):
    model = engram_model()
    seekling.save(model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    for model_type in ("deepseek_v3", "seekling_mhc"):
        with pytest.raises(ValueError, match="engram is set but model_type"):
            config_from_hf(d | {"model_type": model_type, "hc_mult": 2})
    with pytest.raises(ValueError, match="needs the Engram settings"):
        config_from_hf({k: v for k, v in d.items() if k != "engram"})
    # weights with Engram tensors under a plain config.json: named
    plain = {k: v for k, v in d.items() if k not in ("engram", "architectures")} | {"model_type": "deepseek_v3"}
    (tmp_path / "config.json").write_text(json.dumps(plain))
    with pytest.raises(ValueError, match="hold Engram tensors"):
        seekling.load(tmp_path)
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises((ValueError, KeyError), match="seekling_engram"):
        transformers.AutoConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------- training

def test_row_sparse_adam_equals_torch_sparse_adam():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, 4, generator=g)
    ours, ref = torch.nn.Embedding.from_pretrained(w0.clone(), freeze=False, sparse=True), \
        torch.nn.Embedding.from_pretrained(w0.clone(), freeze=False, sparse=True)
    opt_ours = RowSparseAdam(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt_ref = torch.optim.SparseAdam(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        idx = torch.randint(0, 50, (12,), generator=g)  # repeated rows included
        target = torch.randn(12, 4, generator=g)
        for emb, opt in ((ours, opt_ours), (ref, opt_ref)):
            (emb(idx) - target).square().sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=1e-7)
    assert opt_ours.state[ours.weight]["step"].dtype == torch.float32  # a tensor: checkpoints carry it


def test_clip_with_sparse_grads_equals_clip_of_the_dense_model():
    model = engram_model(seed=5)
    dense = engram_model(seed=5)
    for layer in dense.layers:
        if layer.engram is not None:
            layer.engram.table.sparse = False  # the same model, dense table gradients
    ids = torch.randint(0, 97, (2, 9))
    for m in (model, dense):
        m(ids).square().mean().backward()
    norm = clip_grad_norm_with_sparse(model.parameters(), 0.05)
    ref = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.05)
    torch.testing.assert_close(norm, ref)
    assert norm > 0.05  # clipping happened
    for (name, p), q in zip(model.named_parameters(), dense.parameters()):
        if p.grad is None:  # MTP: not in this forward
            assert q.grad is None and name.startswith("mtp.")
            continue
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(grad, q.grad, msg=name)


def test_optimizer_splits_tables_from_the_rest():
    model = Transformer(engram_cfg())
    opt = build_optimizer(model, TrainConfig(model=engram_cfg(), max_steps=3, warmup_steps=1, seq_len=32))
    assert isinstance(opt, MixedOptimizer)
    tables = {id(p) for _, p in table_parameters(model)}
    assert len(tables) == 2 and {id(p) for p in opt.sparse.param_groups[0]["params"]} == tables
    dense = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert not dense & tables and len(dense) + 2 == len(list(model.parameters()))
    plain = Transformer(ModelConfig(**TINY))
    assert isinstance(build_optimizer(plain, TrainConfig(model=ModelConfig(**TINY), max_steps=3, warmup_steps=1,
                                                         seq_len=32)), torch.optim.AdamW)


def test_training_steps_lower_the_loss_and_touch_only_looked_up_rows():
    torch.manual_seed(0)
    cfg = engram_cfg()
    model = Transformer(cfg)
    model.init_weights(0)
    opt = build_optimizer(model, TrainConfig(model=cfg, max_steps=10, warmup_steps=1, seq_len=32, lr=1e-2))
    step = TrainStep(model, opt, next_token_loss(mtp_lambda=0.3), StepConfig(dtype=torch.float32, grad_clip=1.0))
    seq = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(0))
    table = model.layers[0].engram.table.weight
    before = table.detach().clone()
    losses = [step([(seq[:, :-1], seq[:, 1:])], lr=1e-2)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.3, losses
    changed = (table.detach() != before).any(1).sum()
    assert 0 < changed <= 4 * 32 * ENGRAM.n_hash_heads  # at most one row per head per token


ENGRAM_TRAIN_MODEL = with_engram(
    ModelConfig(vocab_size=4096, dim=32, n_layers=2, n_dense_layers=1, inter_dim=64, n_heads=2, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16, n_routed_experts=8,
                n_activated_experts=2, n_expert_groups=2, n_limited_groups=2, max_seq_len=64, n_mtp_layers=1),
    layers=(0, 1), head_rows=1000, embed_dim=16, n_heads=2)


def test_train_builds_the_map_and_resumes_exactly(data_dir, tmp_path):
    def cfg(out, **kw):
        return tiny_config(data_dir, out, model=ENGRAM_TRAIN_MODEL, max_steps=6, batch_size=2, grad_accum=2,
                           ckpt_every=0, **kw)

    straight = train(cfg(tmp_path / "straight"), live=False, plots=False)
    assert straight["finished"]
    first = train(cfg(tmp_path / "run"), on_step=lambda step, *_: step == 3, live=False, plots=False)
    assert first["step"] == 3 and not first["finished"]
    assert resume(str(tmp_path / "run"), live=False, plots=False)["finished"]
    keys = ("step", "loss", "mtp_loss", "lr", "grad_norm", "expert_load", "val_loss")
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "run")
    assert [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]
    # the trained model carries the tokenizer's compressed-id map (fewer ids than tokens)
    model = seekling.load(tmp_path / "run" / "model")
    compress = model.engram_vocab.compress
    assert int(compress.max()) + 1 < model.cfg.vocab_size and not torch.equal(compress, torch.arange(4096))


def test_compiled_training_is_refused_clearly():
    with pytest.raises(ValueError, match="TrainConfig.compile: cannot train an Engram model"):
        TrainConfig(model=engram_cfg(), max_steps=3, warmup_steps=1, seq_len=32, compile=True)
    model = Transformer(engram_cfg())
    with pytest.raises(ValueError, match="StepConfig.compile: this model has sparse-gradient embeddings"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), next_token_loss(), StepConfig(compile=True))


# ---------------------------------------------------------------- seekling info

def test_stats_count_tables_apart():
    for cfg in (engram_cfg(), engram_cfg(hc_mult=2), tiny_engram()):
        model, s = Transformer(cfg), model_stats(cfg)
        assert s.total_params == model.num_params() and s.active_params == model.num_params(active=True)
        assert s.table_params == model.table_params() == sum(p.numel() for _, p in table_parameters(model)) > 0
        plain = model_stats(cfg.replace(engram=EngramConfig()))
        assert plain.table_params == 0 and s.total_params - plain.total_params > s.table_params


def test_info_shows_tables(capsys, monkeypatch):
    from seekling.cli import main

    monkeypatch.setenv("COLUMNS", "240")  # one line per row
    assert main(["info", "tiny_engram"]) == 0
    out = capsys.readouterr().out
    assert f"Engram tables {model_stats(tiny_engram()).table_params / 1e6:.2f}M" in out and "layers 1, 4" in out
    assert "Engram tables are looked up, not active" in out
