"""The shared training step (train/core.py): against a hand-written step, its hooks and plug-in
losses, and compilation by wrapping (the caller's modules untouched, the engine on the same weights)."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from test_train_support import TINY_MODEL, _private_cache  # noqa: F401 (fixture)

from seekling.inference.engine import Engine, EngineConfig
from seekling.inference.sampling import SamplingParams
from seekling.model.moe import RouterTrace
from seekling.model.transformer import Transformer
from seekling.train.balance import moe_gates, update_expert_bias
from seekling.train.config import TrainConfig
from seekling.train.core import LossOutput, StepConfig, TrainStep, evaluate, next_token_loss
from seekling.train.optim import build_optimizer, set_lr


def _model(seed=0, device="cpu"):
    model = Transformer(TINY_MODEL)
    model.init_weights(seed)
    return model.to(device)


def _batches(n, B=2, T=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 4096, (B, T), generator=g).to(device), torch.randint(0, 4096, (B, T), generator=g).to(device))
            for _ in range(n)]


def _reference_step(model, opt, micro, mtp_lambda, gamma, clip):
    """The step written out by hand: what every driver did before the core existed."""
    counts, losses = None, []
    for x, y in micro:
        trace = RouterTrace()
        h = model.hidden(x, trace=trace)
        main = F.cross_entropy(model.head(h).flatten(0, 1).float(), y.flatten())
        (hk,) = model.mtp_hidden(h, x, trace)
        mtp = F.cross_entropy(model.head(hk).flatten(0, 1).float(), y[:, 1:].flatten())
        ((main + mtp_lambda * mtp) / len(micro)).backward()
        losses.append(main.item())
        c = trace.expert_counts()
        counts = c if counts is None else counts + c
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_expert_bias(model, counts, gamma)
    return losses, counts


def test_step_matches_a_hand_written_step(device):
    tc = TrainConfig(model=TINY_MODEL, seq_len=16)
    ours, ref = _model(device=device), _model(device=device)
    step = TrainStep(ours, build_optimizer(ours, tc), next_token_loss(mtp_lambda=0.3),
                     StepConfig(grad_clip=1.0, bias_update_gamma=1e-2))
    ref_opt = build_optimizer(ref, tc)
    set_lr(ref_opt, 1e-3)
    for i in range(3):
        micro = _batches(2, seed=i, device=device)
        metrics = step(micro, lr=1e-3)
        losses, counts = _reference_step(ref, ref_opt, micro, 0.3, 1e-2, 1.0)
        assert metrics["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
        assert metrics["expert_load"] == counts.tolist()
        assert metrics["grad_norm"] > 0
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert ours.layers[1].ffn.gate.e_score_correction_bias.abs().max() > 0  # the bias moved


def test_reduce_counts_hook_decides_the_bias_update():
    """A distributed driver all-reduces the counts: the update must use what the hook returns."""
    model = _model()
    seen = []

    def reduce(counts):
        seen.append(counts.clone())
        out = torch.zeros_like(counts)
        out[:, 0] = 1000  # as if the other ranks sent everything to expert 0
        return out

    step = TrainStep(model, build_optimizer(model, TrainConfig(model=TINY_MODEL, seq_len=16)), next_token_loss(),
                     StepConfig(bias_update_gamma=0.5), reduce_counts=reduce)
    metrics = step(_batches(1))
    assert len(seen) == 1 and seen[0].sum() > 0
    assert metrics["expert_load"][0][0] == 1000
    for gate in moe_gates(model):
        assert gate.e_score_correction_bias[0] == -0.5  # overloaded: pushed down
        assert torch.all(gate.e_score_correction_bias[1:] == 0.5)


def test_masked_targets_count_only_where_set():
    """SFT's loss is the same CE with -100 on prompt tokens: those positions must not matter."""
    model = _model()
    x, y = _batches(1)[0]
    y_masked = y.clone()
    y_masked[:, :10] = -100
    loss = next_token_loss()(model, (x, y_masked), None).loss
    with torch.no_grad():
        logits = model(x)
    want = F.cross_entropy(logits[:, 10:].flatten(0, 1), y[:, 10:].flatten())
    torch.testing.assert_close(loss, want)
    total, n = evaluate(model, [(x, y_masked)], torch.float32)
    assert n == y.numel() - 20
    assert total / n == pytest.approx(want.item(), rel=1e-5)


def test_a_plugged_in_loss_and_its_metrics():
    """Any loss_fn(model, batch, trace) -> LossOutput plugs in; its metrics are averaged over micro-batches."""
    model = _model()
    calls = []

    def loss_fn(m, batch, trace):
        x, weight = batch["ids"], batch["weight"]
        calls.append(trace is not None)
        loss = weight * m(x).float().logsumexp(-1).mean()
        return LossOutput(loss, {"weighted": loss.detach(), "one": torch.tensor(1.0)})

    step = TrainStep(model, build_optimizer(model, TrainConfig(model=TINY_MODEL, seq_len=16)), loss_fn)
    x = _batches(1)[0][0]
    metrics = step([{"ids": x, "weight": torch.tensor(1.0)}, {"ids": x, "weight": torch.tensor(3.0)}])
    assert calls == [True, True]  # a model with experts gets a trace
    assert metrics["one"] == 1.0 and metrics["weighted"] > 0
    with pytest.raises(ValueError, match="micro-batch"):
        step([])


def test_step_config_is_validated():
    with pytest.raises(ValueError, match="StepConfig.dtype"):
        StepConfig(dtype=torch.float16)
    with pytest.raises(ValueError, match="StepConfig.grad_clip"):
        StepConfig(grad_clip=-1)


def _greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_compiled_step_wraps_and_the_engine_shares_its_weights():
    """compile=True must not touch the caller's modules; the engine then samples the trained weights
    eagerly, with no compilation of its own, and a later step moves the weights it sees."""
    torch._dynamo.reset()
    model = _model()
    before = {name: (type(m).forward, dict(vars(m)).keys()) for name, m in model.named_modules()}
    eager = copy.deepcopy(model)
    tc = TrainConfig(model=TINY_MODEL, seq_len=16)
    step = TrainStep(model, build_optimizer(model, tc), next_token_loss(0.3), StepConfig(compile=True))
    ref = TrainStep(eager, build_optimizer(eager, tc), next_token_loss(0.3))
    for i in range(2):
        a, b = step(_batches(1, seed=i)), ref(_batches(1, seed=i))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    after = {name: (type(m).forward, dict(vars(m)).keys()) for name, m in model.named_modules()}
    assert after == before  # no module was compiled or patched in place
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())

    engine = Engine(model, EngineConfig(max_seqs=2, kv_cache_tokens=256))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = engine.generate([[1, 2, 3]], greedy)[0].output_ids
    assert out == _greedy(model, [1, 2, 3], 6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # the engine compiled nothing
    step(_batches(1, seed=7))  # the trainer moves the weights; the engine's next request sees them
    assert engine.generate([[1, 2, 3]], greedy)[0].output_ids == _greedy(model, [1, 2, 3], 6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_training_keeps_freed_memory_for_reuse():
    # TrainStep on the CPU asks glibc to keep freed blocks (seekling.device.keep_freed_memory), and
    # glibc takes both settings (mallopt returns 1 for each).
    from seekling import device

    model = torch.nn.Linear(2, 2)
    model.cfg = type("Cfg", (), {})()
    TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda *a: None)
    assert device.keep_freed_memory() is True
