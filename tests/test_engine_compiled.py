"""The compiled decode step (EngineConfig(compile=True)) against the eager engine and its references.

One engine per module: each compile costs seconds, and an engine serves request after request.
"""

import pytest
import torch

from seekling.inference import Engine, EngineConfig, SamplingParams
from seekling.inference import compiled as compiled_module
from tests.test_engine import GREEDY, prompts, reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why


@pytest.fixture(scope="module")
def model(device):
    return tiny_model().to(device)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, EngineConfig(block_size=16, kv_cache_tokens=2048, compile=True))


def test_compiled_greedy_matches_reference_alone_and_batched(model, engine, compiled_spy):
    # 40 new tokens cross block boundaries (block_size 16); unequal prompts give each row its own
    # position, so the stale-slot mask differs per row.
    ps = prompts(5, lo=3, hi=30, seed=1)
    outs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert [o.output_ids for o in outs] == [reference_greedy(model, p, 40) for p in ps]
    lone = engine.generate([ps[0]], GREEDY)[0]
    assert lone.output_ids == reference_greedy(model, ps[0], GREEDY.max_tokens)
    assert 1 in compiled_spy and 5 in compiled_spy, f"the compiled step ran for batches of {sorted(set(compiled_spy))}"


def test_compiled_logprobs_match_eager(model, engine, compiled_spy):
    ps = prompts(3, seed=2)
    params = SamplingParams(temperature=0.8, max_tokens=20, seed=7, logprobs=3, ignore_eos=True)
    eager = Engine(model, EngineConfig(block_size=16, kv_cache_tokens=2048)).generate(ps, params)
    ours = engine.generate(ps, params)
    for a, b in zip(ours, eager):
        assert a.output_ids == b.output_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert compiled_spy, "the compiled step never ran"


def test_long_contexts_fall_back_to_the_eager_step(model, engine, compiled_spy, monkeypatch):
    monkeypatch.setattr(compiled_module, "MAX_KEY_BYTES", 1)  # every batch counts as long
    p = prompts(1, seed=3)[0]
    assert engine.generate([p], GREEDY)[0].output_ids == reference_greedy(model, p, GREEDY.max_tokens)
    assert compiled_spy == [], "a long-context batch took the compiled step"


def test_gathered_experts_match_the_loop():
    # The compiled graph's expert form, run eagerly, against the per-expert reference loop.
    moe = tiny_model().layers[1].ffn
    x = torch.randn(5, moe.gate.weight.shape[1])
    weights, idx, _ = moe.gate(x)
    torch.testing.assert_close(moe.experts._forward_gathered(x, weights, idx, torch.float32),
                               moe.experts.forward_loop(x, weights, idx), atol=1e-5, rtol=1e-5)


def test_compile_option_is_validated():
    with pytest.raises(ValueError, match="EngineConfig.compile"):
        EngineConfig(compile="yes")
    with pytest.raises(ValueError, match="EngineConfig.compile.*naive"):
        EngineConfig(compile=True, attention="naive")
    with pytest.raises(ValueError, match="EngineConfig.compile.*speculative_tokens > 0.*use one of the two"):
        EngineConfig(compile=True, speculative_tokens=1)


def test_missing_cxx_compiler_is_a_clear_error(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def missing():
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler.*without --compile"):
        Engine(tiny_model(), EngineConfig(compile=True))  # on the CPU: the C++ compiler is a CPU need
