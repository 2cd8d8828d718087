"""mHC (model/mhc.py) against transformers' DeepseekV4 modules, and through the model, checkpoints,
optimizer, training step and engine."""

import json
from unittest import mock

import pytest
import torch
from test_train_support import spread_out

import seekling
from seekling.checkpoint import config_to_hf
from seekling.config import ModelConfig
from seekling.inference import Engine, EngineConfig, SamplingParams
from seekling.model.mhc import (HyperConnection, HyperHead, _Mixes, _mixes_fusable, _Read, _Sinkhorn, _Write,
                                _write_fusable, hc_write, mixes_reference, read_reference, sinkhorn_reference,
                                write_reference)
from seekling.model.transformer import Transformer
from seekling.train.core import StepConfig, TrainStep, next_token_loss
from seekling.train.optim import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why

TINY = dict(vocab_size=97, dim=32, n_layers=3, n_dense_layers=1, inter_dim=48, n_heads=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16, n_routed_experts=4,
            n_shared_experts=1, n_activated_experts=2, max_seq_len=256, n_mtp_layers=1)


def mhc_model(seed=0, **changes) -> Transformer:
    return spread_out(Transformer(ModelConfig(**(TINY | dict(hc_mult=4) | changes))), seed).eval()


# ---------------------------------------------------------------- parity with transformers' DeepseekV4

v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config  # noqa: E402


def _pair(n, iters, D=24, eps=1e-6):
    ours_cfg = ModelConfig(**(TINY | dict(dim=D, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=eps)))
    v4_cfg = DeepseekV4Config(hidden_size=D, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=eps, rms_norm_eps=ours_cfg.norm_eps)
    return ours_cfg, v4_cfg


@pytest.mark.parametrize("n, iters", [(4, 20), (2, 1), (3, 5)])
def test_hyper_connection_matches_deepseek_v4(n, iters):
    ours_cfg, v4_cfg = _pair(n, iters)
    theirs = v4.DeepseekV4HyperConnection(v4_cfg)
    ours = spread_out(HyperConnection(ours_cfg), seed=n)
    theirs.load_state_dict(ours.state_dict())  # same names: fn, base, scale
    x = torch.randn(2, 7, n, ours_cfg.dim, dtype=torch.float32)
    f = torch.randn(2, 7, ours_cfg.dim)

    sigmoids = []  # pre is consumed inside their module: its first sigmoid is pre - hc_eps
    real_sigmoid = torch.sigmoid
    with mock.patch("torch.sigmoid", side_effect=lambda t: sigmoids.append(real_sigmoid(t)) or sigmoids[-1]):
        post_t, comb_t, y_t = theirs(x)
    pre_t = sigmoids[0] + v4_cfg.hc_eps

    pre, post, comb = ours.coefficients(x)
    y, post2, carry = ours(x)
    for a, b in ((pre, pre_t), (post, post_t), (comb, comb_t), (y, y_t), (post2, post_t)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # The block update as DeepseekV4DecoderLayer writes it, against ours: x'_k = post_k f + sum_j comb[j,k] x_j.
    want = post_t.unsqueeze(-1) * f.unsqueeze(-2) + torch.einsum("btjk,btjd->btkd", comb_t, x)
    torch.testing.assert_close(hc_write(carry, f, post2), want, atol=1e-5, rtol=0)
    assert not torch.allclose(comb, comb.transpose(-1, -2), atol=1e-3)  # the mixing direction is tested


def test_hyper_connection_gradients_match_deepseek_v4():
    # Our hand-written backwards (Sinkhorn's included) against autograd through their module, with
    # every output in the loss: y, post, and the block update (where comb acts).
    ours_cfg, v4_cfg = _pair(4, 20)
    theirs = v4.DeepseekV4HyperConnection(v4_cfg)
    ours = spread_out(HyperConnection(ours_cfg), seed=1)
    theirs.load_state_dict(ours.state_dict())
    x, f = torch.randn(2, 5, 4, ours_cfg.dim), torch.randn(2, 5, ours_cfg.dim)
    w = [torch.randn(2, 5, 4), torch.randn(2, 5, 4, ours_cfg.dim), torch.randn(2, 5, ours_cfg.dim)]
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y_o, post_o, carry = ours(xs[0])
    post_t, comb_t, y_t = theirs(xs[1])
    sum((a * b).sum() for a, b in zip((post_o, hc_write(carry, f, post_o), y_o), w)).backward()
    sum((a * b).sum() for a, b in zip((post_t, write_reference(xs[1], f, post_t, comb_t), y_t), w)).backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-4)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(theirs.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


def test_hyper_head_matches_deepseek_v4():
    ours_cfg, v4_cfg = _pair(4, 20)
    theirs = v4.DeepseekV4HyperHead(v4_cfg)
    ours = spread_out(HyperHead(ours_cfg), seed=2)
    theirs.load_state_dict(ours.state_dict())  # same names: hc_fn, hc_base, hc_scale
    x = torch.randn(3, 6, 4, ours_cfg.dim)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_model_matches_a_forward_built_from_deepseek_v4_modules():
    # The whole residual path (copy into streams, per-sublayer read/write, head, final norm) written
    # as DeepseekV4Model / DeepseekV4DecoderLayer run it, over our attention and FFN sublayers.
    model = mhc_model(n_mtp_layers=0)
    cfg = model.cfg
    v4_cfg = DeepseekV4Config(hidden_size=cfg.dim, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=cfg.hc_eps,
                              rms_norm_eps=cfg.norm_eps)

    def v4_module(cls, ours):
        m = cls(v4_cfg)
        m.load_state_dict(ours.state_dict())
        return m

    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cos, sin = model.rope(torch.arange(11))
        x = model.embed(ids).unsqueeze(2).expand(-1, -1, 4, -1).contiguous()
        for layer in model.layers:
            for hc, sub in ((layer.attn_hc, lambda h: layer.attn(layer.attn_norm(h), cos, sin)),
                            (layer.ffn_hc, lambda h: layer._ffn(layer.ffn_norm(h), None))):
                post, comb, collapsed = v4_module(v4.DeepseekV4HyperConnection, hc)(x)
                x = post.unsqueeze(-1) * sub(collapsed).unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x)
        want = model.head(model.norm(v4_module(v4.DeepseekV4HyperHead, model.hc_head)(x)))
        got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the projection itself

def test_comb_rows_and_columns_sum_to_one():
    cfg = ModelConfig(**(TINY | dict(hc_mult=4)))
    hc = spread_out(HyperConnection(cfg), seed=4)
    _, _, comb = hc.coefficients(torch.randn(4, 50, 4, cfg.dim) * 3)
    torch.testing.assert_close(comb.sum(-2), torch.ones(4, 50, 4), atol=1e-5, rtol=0)  # columns: last normalised
    torch.testing.assert_close(comb.sum(-1), torch.ones(4, 50, 4), atol=1e-3, rtol=0)  # rows: Sinkhorn's tolerance
    assert (comb > 0).all()
    # Sinkhorn off (the unconstrained ablation): the softmax rows still sum to 1, the columns do not.
    off = HyperConnection(cfg.replace(hc_sinkhorn_iters=0))
    off.load_state_dict(hc.state_dict())
    _, _, raw = off.coefficients(torch.randn(4, 50, 4, cfg.dim) * 3)
    assert (raw.sum(-2) - 1).abs().max() > 0.1


@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_backward_matches_autograd_of_the_reference(iters):
    c = (torch.rand(3, 2, 4, 4, dtype=torch.float64) + 0.05).requires_grad_()
    torch.testing.assert_close(_Sinkhorn.apply(c, iters, 1e-6), sinkhorn_reference(c, iters, 1e-6), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda t: _Sinkhorn.apply(t, iters, 1e-6), (c,))


def _residual_op_cases(n: int, dtype: torch.dtype, seed: int = 0):
    """(fast, reference, args) for the residual ops on random streams of the given dtype: the eager
    autograd.Functions, and the plain forms torch.compile gets instead."""
    g = torch.Generator().manual_seed(seed)
    B, T, D = 2, 3, 8

    def r(*shape, positive=False, dt=dtype):
        t = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1 if positive else torch.randn(shape, generator=g)
        return t.to(dt).requires_grad_()

    coef = torch.float64 if dtype == torch.float64 else torch.float32  # fn, w, post, comb stay fp32 beside bf16 streams
    x, f, fn = r(B, T, n, D), r(B, T, D), r((2 + n) * n, n * D, dt=coef)
    w, post, comb = (r(*shape, positive=True, dt=coef) for shape in ((B, T, n), (B, T, n), (B, T, n, n)))
    return [(lambda x, fn: _Mixes.apply(x, fn, 1e-6), lambda x, fn: mixes_reference(x, fn, 1e-6), (x, fn)),
            (_Read.apply, read_reference, (x, w)),
            (_Write.apply, write_reference, (x, f, post, comb)),
            (lambda x, fn: _mixes_fusable(x, fn, 1e-6), lambda x, fn: mixes_reference(x, fn, 1e-6), (x, fn)),
            (_write_fusable, write_reference, (x, f, post, comb))]


@pytest.mark.parametrize("n", [2, 4])
def test_residual_ops_match_their_references_with_gradients(n):
    # The hand-written backwards against autograd through the plain forms, and against finite differences, in fp64.
    for fast, ref, args in _residual_op_cases(n, torch.float64):
        out = fast(*args)
        torch.testing.assert_close(out, ref(*args), rtol=1e-12, atol=1e-12)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(ref(*args), args, g)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(fast, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_ops_keep_the_dtypes_of_the_plain_forms(dtype):
    # fp32 streams: equal to the plain forms up to fp32 rounding. bf16 streams (an engine run in bf16):
    # the same dtypes out and in the gradients, values within bf16 rounding.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    for fast, ref, args in _residual_op_cases(4, dtype, seed=1):
        out, want = fast(*args), ref(*args)
        assert out.dtype == want.dtype
        torch.testing.assert_close(out, want, **tol)
        g = torch.randn(out.shape).to(out.dtype)
        for a, b, arg in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(want, args, g), args):
            assert a.dtype == arg.dtype
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_stream_arithmetic_stays_fp32_under_bf16_autocast():
    # As V4 (and as the plain fp32 residual): under bf16 autocast the sublayer input, the coefficients and the
    # written streams are the fp32 numbers, bit for bit; only the sublayers themselves run in bf16.
    cfg = ModelConfig(**(TINY | dict(hc_mult=4)))
    hc = spread_out(HyperConnection(cfg), seed=7)
    x, f = torch.randn(2, 9, 4, cfg.dim), torch.randn(2, 9, cfg.dim).bfloat16()
    want = hc(x)
    want = (want[0], want[1], hc_write(want[2], f, want[1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hc(x)
        got = (got[0], got[1], hc_write(got[2], f, got[1]))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


# ---------------------------------------------------------------- hc_mult = 1 is today's model

def test_hc_mult_1_is_the_plain_residual_model():
    cfg = ModelConfig(**TINY)
    model = spread_out(Transformer(cfg)).eval()
    assert not [n for n in model.state_dict() if "hc" in n]
    assert config_to_hf(cfg)["model_type"] == "deepseek_v3" and "hc_mult" not in config_to_hf(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():  # the residual written out: x + attn(norm x), then x + ffn(norm x)
        cos, sin = model.rope(torch.arange(13))
        x = model.embed(ids)
        for layer in model.layers:
            x = x + layer.attn(layer.attn_norm(x), cos, sin)
            x = x + layer._ffn(layer.ffn_norm(x), None)
        assert torch.equal(model(ids), model.head(model.norm(x)))
    # Seeded initialisation draws the same numbers as before mHC existed: the parameter order is unchanged.
    names = [n for n, _ in Transformer(cfg).named_parameters()]
    assert names[:3] == ["embed.weight", "layers.0.attn_norm.weight", "layers.0.attn.wq.weight"]
    assert names[-1] == "mtp.0.norm.weight"


def test_mhc_model_with_equal_streams_differs_from_plain():
    # Guards the test above against a model that ignores hc_mult: 4 streams must change the output.
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        a = mhc_model(seed=5, hc_mult=1)(ids)
        b = mhc_model(seed=5, hc_mult=4)(ids)
    assert not torch.allclose(a, b)


def test_config_is_validated():
    for bad in (dict(hc_mult=0), dict(hc_mult=True), dict(hc_sinkhorn_iters=-1), dict(hc_eps=-1e-6), dict(hc_eps=0.5)):
        with pytest.raises(ValueError, match=f"ModelConfig.{next(iter(bad))}"):
            ModelConfig(**bad)


def test_stats_count_mhc_parameters_and_flops():
    from seekling.stats import model_stats

    cfg = ModelConfig(**(TINY | dict(hc_mult=4)))
    with torch.device("meta"):
        m = Transformer(cfg)
    s, plain = model_stats(cfg), model_stats(cfg.replace(hc_mult=1))
    assert s.total_params == m.num_params() and s.active_params == m.num_params(active=True)
    assert s.total_params > plain.total_params and s.flops_per_token > plain.flops_per_token


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_names_and_dtype(tmp_path):
    model = mhc_model()
    seekling.save(model, tmp_path, dtype=torch.bfloat16)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "seekling_mhc" and d["architectures"] == ["SeeklingMHCForCausalLM"]
    assert (d["hc_mult"], d["hc_sinkhorn_iters"], d["hc_eps"]) == (4, 20, 1e-6)
    from seekling.checkpoint import read_tensors
    t = read_tensors(tmp_path)
    L = model.cfg.n_layers
    for k in ("model.layers.0.attn_hc.fn", "model.layers.2.ffn_hc.scale", "model.hc_head.hc_fn",
              f"model.layers.{L}.attn_hc.base", f"model.layers.{L}.hc_head.hc_scale"):
        assert t[k].dtype == torch.float32, k  # kept fp32 in a bf16 checkpoint, as DeepSeek-V4
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16

    seekling.save(model, tmp_path)
    loaded = seekling.load(tmp_path)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        h = model.hidden(ids)
        assert torch.equal(loaded.mtp_hidden(h, ids)[0], model.mtp_hidden(h, ids)[0])


def test_wrong_model_type_is_refused_by_name(tmp_path):
    seekling.save(mhc_model(), tmp_path)
    cfg_file = tmp_path / "config.json"
    good = json.loads(cfg_file.read_text())

    def with_config(**changes):
        d = {k: v for k, v in (good | changes).items() if v is not None}
        cfg_file.write_text(json.dumps(d))

    with_config(model_type="deepseek_v3")
    with pytest.raises(ValueError, match="hc_mult is 4 but model_type is 'deepseek_v3'"):
        seekling.load(tmp_path)
    with_config(model_type="deepseek_v3", hc_mult=None)
    with pytest.raises(ValueError, match="the weights hold mHC tensors"):
        seekling.load(tmp_path)
    with_config(hc_mult=None)
    with pytest.raises(ValueError, match="seekling_mhc' needs hc_mult > 1"):
        seekling.load(tmp_path)
    with_config(model_type="deepseek_v4")
    with pytest.raises(ValueError, match="model_type is 'deepseek_v4'.*seekling_mhc"):
        seekling.load(tmp_path)


@pytest.mark.parametrize("changes", [dict(), dict(n_mtp_layers=0, q_lora_rank=12, hc_mult=2, hc_sinkhorn_iters=3)])
def test_transformers_loads_it_only_with_the_remote_code_it_carries(tmp_path, changes):
    import warnings

    import transformers

    model = mhc_model(**changes)
    seekling.save(model, tmp_path)
    assert (tmp_path / "modeling_seekling_mhc.py").is_file()
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it reports the MTP weights as unused, as for DeepSeek-V3
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(theirs).__name__ == "SeeklingMHCForCausalLM"
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- training

def test_mhc_parameters_are_not_decayed():
    model = mhc_model()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.1)}
    hc = {id(p) for n, p in model.named_parameters() if "hc" in n}
    assert hc and not hc & groups["decay"] and hc <= groups["no_decay"]
    assert id(model.layers[0].attn.wq.weight) in groups["decay"]  # other matrices still decay


def test_training_steps_lower_the_loss_and_reach_every_mhc_parameter():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**(TINY | dict(hc_mult=4))))
    model.init_weights(0)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    step = TrainStep(model, opt, next_token_loss(mtp_lambda=0.3), StepConfig(dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 97, (4, 33), generator=g)
    batch = (seq[:, :-1], seq[:, 1:])
    # gradients reach every mixing parameter, the MTP depth's included
    loss = next_token_loss(mtp_lambda=0.3)(model, batch, None).loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if "hc" in n and (p.grad is None or p.grad.abs().max() == 0)]
    assert not missing, missing
    model.zero_grad()
    losses = [step([batch])["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------- the engine

@torch.no_grad()
def _greedy_by_full_forward(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 8, 71, 30, 12, 7, 19], [33] * 6]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("options", [dict(), dict(speculative_tokens=2), dict(prefill_attention="naive", attention="naive")])
def test_engine_decode_equals_full_forward(options):
    model = mhc_model(seed=6)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=512, max_seqs=4, max_batch_tokens=16, **options))
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.output_ids for o in outs] == [_greedy_by_full_forward(model, p, 12) for p in PROMPTS]


@pytest.mark.slow  # compiles two graphs: ~85 s cold, ~20 s from Inductor's on-disk cache (2-core CPU)
def test_compiled_decode_equals_full_forward(compiled_spy):
    model = mhc_model(seed=6)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=512, max_seqs=4, max_batch_tokens=16, compile=True))
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.output_ids for o in outs] == [_greedy_by_full_forward(model, p, 12) for p in PROMPTS]
    assert 3 in compiled_spy, f"the compiled step ran for batches of {sorted(set(compiled_spy))}"
